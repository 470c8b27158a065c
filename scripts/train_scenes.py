"""Train the embedded scenes model, seeded (CPU or CUDA): from scratch, or continuing a checkpoint.

    python scripts/train_scenes.py --out assets/scenes-llava --seed 0 --device cuda --workers 14
    python scripts/train_scenes.py --init assets/scenes-llava --out runs/next --minutes 30 --threads 2

Each step's images and questions depend only on ``--seed`` and the step number, so the data does not
depend on ``--workers`` (data-loading processes) or the device. The shipped checkpoint was made in two
runs, both recorded in its ``accuracy.json`` (the second run's record nests the first's under ``init``).

Data: training scenes (``scenes.scene_seed("train", i)``) rendered on the fly, several questions per
image. Objective:

- cross-entropy on the answer word and the ``</s>`` after it, given ``USER: <image>\\n{question} ASSISTANT:``;
- on the vision tower's feature layer (hidden state -2, what LLaVA feeds the projector), training-only
  heads that are not saved: a multi-label presence head (which colours and shapes are in the scene) and
  an object-count head on the [CLS] token, so that [CLS] attends to the objects as CLIP's does, a
  per-patch head (colour and shape of the object covering the patch, or background), and a per-patch
  coordinate head (also on the projector's output);
- attention supervision of two heads of decoder layer ``--attn-layer`` from the answer position (the
  question's first and second object), and a head reading both objects' centres from that layer's
  output at the answer position.

Position: the vision position embedding starts from (or, continuing, is added) a 2-D sine-cosine table
(``--position-table``). With CLIP's tiny random init and no coordinate heads, no feature carried where a
patch is and every position question stayed at chance; the coordinate and centre heads make the
projector and the supervised heads' values keep it.

Efficiency: an image's prefix (``<s> USER : <image> x 576``) is the same for all its questions, so the
language model runs it once per image and every question continues from that prefix's key/value cache
(the cache is indexed per question; gradients flow through it). This is exactly the causal computation
of each full prompt; ``check_training_forward`` verifies it against the model's own forward. The vision
tower's last layer does not feed hidden state -2, so training skips it (it stays at its initialisation,
like every layer after the feature layer in LLaVA it is unused).

At the end the model is saved with ``save_pretrained`` (with the processor), reloaded from disk and
evaluated on the held-out set (accuracy per category, written to ``accuracy.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vtoken.eval import scenes
from vtoken.eval import scenes_model as sm
from vtoken.eval.scenes_benchmark import accuracy_by_category

COLOR_INDEX = {c: i for i, c in enumerate(scenes.COLOR_NAMES)}
SHAPE_INDEX = {s: i for i, s in enumerate(scenes.SHAPES)}
PREFIX_TEXT = 3  # <s> USER :


# --- data ------------------------------------------------------------------------------------------
def normalise(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> CLIP-normalised pixel values (what the processor produces at 336 px)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(sm.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(sm.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def attention_targets(item: dict, cover: np.ndarray, anchors: list[int], prefix: int) -> np.ndarray:
    """Two target distributions (2, prefix) over the prefix keys (``<s> USER :`` then the 576 patches) for
    the supervised heads' attention from the answer position: the patches of the object(s) the question
    is about; for count, ``<s>`` plus one anchor patch per matching object; for a "no" to exists, ``<s>``."""
    out = np.zeros((2, prefix), dtype=np.float32)
    refs = item["objects"]

    def obj(i: int) -> np.ndarray:
        row = np.zeros(prefix, dtype=np.float32)
        row[PREFIX_TEXT:] = cover[i] / max(cover[i].sum(), 1e-6)
        return row

    if item["category"] == "count":
        out[:, 0] = 1.0
        for i in refs:
            out[:, PREFIX_TEXT + anchors[i]] += 1.0
    elif item["category"] == "exists" and not refs:
        out[:, 0] = 1.0
    elif item["category"] == "position" and len(refs) == 2:
        out[0], out[1] = obj(refs[0]), obj(refs[1])
    else:
        out[:] = sum(obj(i) for i in refs)
    return out / out.sum(axis=1, keepdims=True)


def object_locations(item: dict, scene: scenes.Scene) -> tuple[np.ndarray, bool]:
    """Centres (x, y) of the question's first and second object in [-1, 1] (the first twice when it
    names one), and whether the question names one or two objects (count and a "no" to exists do not)."""
    refs = item["objects"]
    if item["category"] == "count" or not 1 <= len(refs) <= 2:
        return np.zeros(4, dtype=np.float32), False
    first, second = scene.objects[refs[0]], scene.objects[refs[-1]]
    centres = np.array([first.x, first.y, second.x, second.y], dtype=np.float32)
    return centres / scenes.IMAGE_SIZE * 2 - 1, True


def make_batch(seeds: list[int], tokenizer, rng: np.random.Generator, rounds: int = 2) -> dict:
    images, colour_labels, shape_labels, anchor_labels, presence, counts = [], [], [], [], [], []
    owners, suffixes, categories, targets_attn, where, located = [], [], [], [], [], []
    prefix = PREFIX_TEXT + scenes.GRID ** 2
    for b, seed in enumerate(seeds):
        image, scene, masks = scenes.make_scene(seed, with_masks=True)
        images.append(np.asarray(image))
        owner = scenes.patch_labels(scene, masks).reshape(-1)
        cover = [m.reshape(scenes.GRID, scenes.PATCH, scenes.GRID, scenes.PATCH).mean(axis=(1, 3)).reshape(-1)
                 for m in masks]
        anchors = [int(o.y // scenes.PATCH) * scenes.GRID + int(o.x // scenes.PATCH) for o in scene.objects]
        colours = np.zeros_like(owner)
        shapes = np.zeros_like(owner)
        anchor = np.zeros(owner.shape, dtype=np.float32)
        for i, obj in enumerate(scene.objects):
            colours[owner == i] = COLOR_INDEX[obj.color] + 1
            shapes[owner == i] = SHAPE_INDEX[obj.shape] + 1
            anchor[anchors[i]] = 1.0
        colour_labels.append(colours)
        shape_labels.append(shapes)
        anchor_labels.append(anchor)
        present = np.zeros(len(COLOR_INDEX) + len(SHAPE_INDEX), dtype=np.float32)
        for obj in scene.objects:
            present[COLOR_INDEX[obj.color]] = 1
            present[len(COLOR_INDEX) + SHAPE_INDEX[obj.shape]] = 1
        presence.append(present)
        counts.append(len(scene.objects))
        seen = set()
        for _ in range(rounds):
            for item in scenes.questions_for(scene, rng, with_objects=True):
                if item["question"] in seen:
                    continue
                seen.add(item["question"])
                text = item["question"] + " ASSISTANT: " + item["answer"]
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                suffixes.append(ids + [sm.EOS_ID])
                owners.append(b)
                categories.append(item["category"])
                targets_attn.append(attention_targets(item, cover, anchors, prefix))
                target, known = object_locations(item, scene)
                where.append(target)
                located.append(known)
    # pack each image's questions into one row after the image's prefix; a block mask lets every question
    # see the prefix and itself only, and its positions restart where the prefix ends
    rows: list[list[int]] = [[] for _ in seeds]
    spans: list[tuple[int, int, int]] = []  # (row, start, length) per question
    for b, ids in zip(owners, suffixes):
        spans.append((b, len(rows[b]), len(ids)))
        rows[b] += ids
    width = max(len(r) for r in rows)
    n_rows = len(seeds)
    tokens = torch.full((n_rows, width), sm.PAD_ID, dtype=torch.long)
    positions = torch.full((n_rows, width), prefix, dtype=torch.long)
    targets = torch.full((n_rows, width), -100, dtype=torch.long)
    allowed = torch.zeros((n_rows, width, prefix + width), dtype=torch.bool)
    allowed[:, :, :prefix] = True
    answer_row = torch.zeros(len(spans), dtype=torch.long)
    answer_pos = torch.zeros(len(spans), dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for q, (b, start, length) in enumerate(spans):
        ids = suffixes[q]
        tokens[b, start: start + length] = torch.tensor(ids)
        positions[b, start: start + length] = torch.arange(prefix, prefix + length)
        allowed[b, start: start + length, prefix + start: prefix + start + length] = causal[:length, :length]
        # the ":" before the answer predicts the answer, the answer predicts </s>
        targets[b, start + length - 3] = ids[-2]
        targets[b, start + length - 2] = ids[-1]
        answer_row[q], answer_pos[q] = b, start + length - 3
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {
        "pixel_values": normalise(images),
        "patch_colour": torch.from_numpy(np.stack(colour_labels)),
        "patch_shape": torch.from_numpy(np.stack(shape_labels)),
        "patch_anchor": torch.from_numpy(np.stack(anchor_labels)),
        "presence": torch.from_numpy(np.stack(presence)),
        "count": torch.tensor(counts),
        "tokens": tokens,
        "positions": positions,
        "mask": mask.unsqueeze(1),
        "targets": targets,
        "answer_row": answer_row,
        "answer_pos": answer_pos,
        "question_tokens": [suffixes[q][:-4] for q in range(len(spans))],
        "attention_targets": torch.from_numpy(np.stack(targets_attn)),
        "categories": categories,
        "where": torch.from_numpy(np.stack(where)),
        "located": torch.tensor(located),
    }


# --- model pieces ----------------------------------------------------------------------------------
class AuxHeads(torch.nn.Module):
    """Training-only heads (never saved with the model): on the vision feature layer, on the projector's
    output and on the decoder's answer position."""

    def __init__(self, hidden: int, text_hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.presence = torch.nn.Linear(hidden, len(COLOR_INDEX) + len(SHAPE_INDEX))
        self.count = torch.nn.Linear(hidden, 9)
        self.colour = torch.nn.Linear(hidden, len(COLOR_INDEX) + 1)
        self.shape = torch.nn.Linear(hidden, len(SHAPE_INDEX) + 1)
        self.anchor = torch.nn.Linear(hidden, 1)
        # where the patch is: keeps the position embedding's information readable in the vision features
        self.coords = torch.nn.Linear(hidden, 2)
        # the same for the projector's output, the language model's input: the projector has no other
        # reason to keep position until position questions are answered, which needs position first
        self.embed_coords = torch.nn.Linear(text_hidden, 2)
        # where the question's objects are, read at the answer position after the supervised layer: with
        # attention alone, the heads found the objects but their values dropped the position
        self.where = torch.nn.Linear(text_hidden, 4)


def patch_coordinates(device: torch.device) -> torch.Tensor:
    """(576, 2): each patch's column and row, scaled to [-1, 1]."""
    index = torch.arange(scenes.GRID ** 2, device=device)
    grid = torch.stack([index % scenes.GRID, index // scenes.GRID], dim=-1).float()
    return grid / (scenes.GRID - 1) * 2 - 1


def sincos_position_table(hidden: int, grid: int = scenes.GRID) -> torch.Tensor:
    """(1 + grid * grid, hidden): a 2-D sine-cosine table (MAE's layout: half the channels encode the
    column, half the row, at frequencies from 1 to 1/100 per patch; the [CLS] row is zero), scaled to a
    mean square of 1 per patch, the scale of a LayerNorm-ed feature."""
    quarter = hidden // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    index = torch.arange(grid * grid)
    angles_x = (index % grid).double()[:, None] * frequencies
    angles_y = (index // grid).double()[:, None] * frequencies
    table = torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1) * math.sqrt(2)
    table = torch.cat([torch.zeros(1, 4 * quarter, dtype=torch.float64), table])
    return torch.nn.functional.pad(table, (0, hidden - 4 * quarter)).float()


def add_position_table(model, scale: float) -> None:
    """Add ``scale`` x a 2-D sine-cosine table to the vision tower's learned position embedding.

    CLIP's default initialisation (std 0.02) leaves position 25x weaker than patch content: trained that
    way, the features carried no linearly decodable patch position (a linear probe's R^2 for the column
    was < 0.1 on hidden state -2) and every position question stayed at chance, "which side is X on?"
    included. A table as strong as the content (``scale`` 1 from scratch; less when continuing a trained
    model, to disturb less of what it has learnt) makes where a patch is readable from the first step.
    The embedding stays a trainable parameter.
    """
    weight = clip_transformer(model).embeddings.position_embedding.weight
    with torch.no_grad():
        weight.add_(scale * sincos_position_table(weight.shape[1]).to(weight))


def clip_transformer(model) -> torch.nn.Module:
    """The CLIP vision transformer of a scenes model (embeddings, pre-norm, encoder layers)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)  # older transformers nest the transformer one level deeper


def vision_feature_states(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Hidden state ``vision_feature_layer`` (-2) of the CLIP tower, [CLS] included, without running the
    layers after it."""
    tower = clip_transformer(model)
    layer = model.config.vision_feature_layer
    n_layers = len(tower.encoder.layers)
    used = n_layers + 1 + layer if layer < 0 else layer  # hidden_states[i] is the output of i layers
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for block in tower.encoder.layers[:used]:
        hidden = block(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def training_forward(model, heads: AuxHeads | None, batch: dict, attn_layer: int | None = None) -> dict:
    """Logits for every question of the batch (and aux outputs), sharing each image's prefix.

    With ``attn_layer``, the questions' pass runs eager attention and returns that decoder layer's
    attention weights (questions, heads, question tokens, keys) as ``"attention"`` and its output
    hidden states as ``"layer_output"``.
    """
    states = vision_feature_states(model, batch["pixel_values"])
    image_embeds = model.model.multi_modal_projector(states[:, 1:])
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    n = image_embeds.shape[0]
    head_ids = torch.tensor([sm.BOS_ID, sm.vocabulary().index("USER"), sm.vocabulary().index(":")],
                            device=image_embeds.device)
    prefix = torch.cat([embed(head_ids).unsqueeze(0).expand(n, -1, -1), image_embeds], dim=1)
    out = lm(inputs_embeds=prefix, use_cache=True)
    captured = {}
    handles = []
    implementation = lm.config._attn_implementation
    if attn_layer is not None:
        lm.config._attn_implementation = "eager"
        handles.append(lm.layers[attn_layer].self_attn.register_forward_hook(
            lambda module, args, output: captured.__setitem__("attention", output[1])))
        handles.append(lm.layers[attn_layer].register_forward_hook(
            lambda module, args, output: captured.__setitem__(
                "layer_output", output[0] if isinstance(output, tuple) else output)))
    try:
        out = lm(input_ids=batch["tokens"], attention_mask=batch["mask"], past_key_values=out.past_key_values,
                 position_ids=batch["positions"], use_cache=True)
    finally:
        lm.config._attn_implementation = implementation
        for handle in handles:
            handle.remove()
    result = {"logits": model.lm_head(out.last_hidden_state), **captured}
    if heads is not None:
        cls = heads.norm(states[:, 0])
        patches = heads.norm(states[:, 1:])
        result.update(presence=heads.presence(cls), count=heads.count(cls), colour=heads.colour(patches),
                      shape=heads.shape(patches), anchor=heads.anchor(patches).squeeze(-1),
                      coords=heads.coords(patches), embed_coords=heads.embed_coords(image_embeds))
        if "layer_output" in captured:
            result["where"] = heads.where(captured["layer_output"][batch["answer_row"], batch["answer_pos"]])
    return result


def losses(result: dict, batch: dict, aux_weight: float, attn_weight: float = 0.0, coords_weight: float = 0.0,
           where_weight: float = 0.0) -> dict:
    logits = result["logits"]
    lm = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    out = {"lm": lm}
    total = lm
    if "presence" in result:
        out["presence"] = F.binary_cross_entropy_with_logits(result["presence"], batch["presence"])
        out["count"] = F.cross_entropy(result["count"], batch["count"])
        out["patch"] = 0.5 * (F.cross_entropy(result["colour"].flatten(0, 1), batch["patch_colour"].flatten())
                              + F.cross_entropy(result["shape"].flatten(0, 1), batch["patch_shape"].flatten()))
        anchor_weight = torch.tensor(20.0, device=result["anchor"].device)
        out["anchor"] = F.binary_cross_entropy_with_logits(result["anchor"], batch["patch_anchor"],
                                                           pos_weight=anchor_weight)
        target = patch_coordinates(result["coords"].device).expand_as(result["coords"])
        out["coords"] = F.mse_loss(result["coords"], target) + F.mse_loss(result["embed_coords"], target)
        total = total + aux_weight * (out["presence"] + 0.5 * out["count"] + out["patch"] + 0.5 * out["anchor"]
                                      + coords_weight * out["coords"])
    if "attention" in result and attn_weight > 0:
        target = batch["attention_targets"]  # (questions, 2, prefix keys)
        weights = result["attention"][batch["answer_row"], :2, batch["answer_pos"], : target.shape[-1]]
        out["attn"] = -(target * torch.log(weights + 1e-6)).sum(-1).mean()
        total = total + attn_weight * out["attn"]
    if "where" in result and where_weight > 0 and bool(batch["located"].any()):
        located = batch["located"]
        out["where"] = F.mse_loss(result["where"][located], batch["where"][located])
        total = total + where_weight * out["where"]
    out["total"] = total
    return out


@torch.no_grad()
def check_training_forward(model, tokenizer, processor, seed: int = 12345) -> float:
    """Largest |difference| between the training forward's answer logits and the model's own forward on
    the processor's inputs (the two must compute the same thing)."""
    was_training = model.training
    model.eval()
    batch = make_batch([seed, seed + 1], tokenizer, np.random.default_rng(0), rounds=3)
    result = training_forward(model, None, batch)
    worst = 0.0
    images = [scenes.make_scene(s)[0] for s in (seed, seed + 1)]
    for q, ids in enumerate(batch["question_tokens"]):
        row = int(batch["answer_row"][q])
        question = tokenizer.decode(ids)
        inputs = processor(images=images[row], text=sm.prompt(question), return_tensors="pt")
        full = model(**inputs).logits[0, -1]
        mine = result["logits"][row, int(batch["answer_pos"][q])]
        worst = max(worst, float((full - mine).abs().max()))
    model.train(was_training)
    return worst


# --- evaluation ------------------------------------------------------------------------------------
def evaluate(model, processor, items: list[dict], batch_size: int = 16) -> dict:
    """Held-out accuracy per category and overall (scored as ``vtoken eval`` scores), and ``n``."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        images = [scenes.make_scene(item["seed"])[0] for item in chunk]
        answers += sm.predict(model, processor, images, [item["question"] for item in chunk])
    return {**accuracy_by_category(items, answers), "n": len(items)}


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="assets/scenes-llava", help="checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8, help="question draws per image per step (duplicates dropped)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--coords-weight", type=float, default=1.0,
                   help="weight of the patch-coordinate heads on the vision features and the projector output")
    p.add_argument("--where-weight", type=float, default=1.0,
                   help="weight of the head that reads the named objects' centres at the answer position after "
                        "--attn-layer (needs --attn-weight > 0)")
    p.add_argument("--attn-weight", type=float, default=0.5,
                   help="weight of the attention supervision of two heads (0 turns it off)")
    p.add_argument("--attn-layer", type=int, default=1, help="decoder layer whose heads 0 and 1 are supervised")
    p.add_argument("--init", default=None,
                   help="continue from this checkpoint (a folder written by this script) instead of a random "
                        "init; its size options are then read from it")
    p.add_argument("--position-table", type=float, default=1.0,
                   help="add this times a 2-D sine-cosine table to the vision position embedding at step 0 (0: off; "
                        "continuing a checkpoint that already has one, pass 0)")
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--vision-mlp", type=int, default=512)
    p.add_argument("--text-hidden", type=int, default=192)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--text-heads", type=int, default=6)
    p.add_argument("--text-kv-heads", type=int, default=6)
    p.add_argument("--text-mlp", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-questions", type=int, default=250, help="held-out questions for periodic checks")
    p.add_argument("--final-questions", type=int, default=1000)
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the training process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0: render in the training process)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="train for this many minutes instead of --steps (the learning rate decays over the time)")
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    return p.parse_args(argv)


class StepBatches(torch.utils.data.Dataset):
    """Step ``i``'s batch: ``--images-per-step`` training scenes and their questions, a function of
    (seed, i) only."""

    def __init__(self, args, tokenizer, steps: int):
        self.args, self.tokenizer, self.steps = args, tokenizer, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        n = self.args.images_per_step
        seeds = [scenes.scene_seed("train", (self.args.seed * 7919 + step * n + i) % scenes.HELDOUT_BASE)
                 for i in range(n)]
        rng = np.random.default_rng([self.args.seed, step])
        return make_batch(seeds, self.tokenizer, rng, rounds=self.args.rounds)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def lr_at(step: int, args, progress: float | None = None) -> float:
    """Linear warm-up over ``--warmup`` steps, then cosine decay to 2% of ``--lr``; ``progress`` in [0, 1]
    (the fraction of the time budget used, with ``--minutes``) replaces the step-based progress."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if progress is None:
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    started = time.time()
    tokenizer = sm.build_tokenizer()
    processor = sm.build_processor(tokenizer)
    init_record = None
    if args.init:
        model, _ = sm.load(args.init)
        # how the checkpoint this run continues was made, read before anything is written
        previous = Path(args.init) / "accuracy.json"
        init_record = {"path": str(args.init),
                       "record": json.loads(previous.read_text()) if previous.is_file() else None}
    else:
        model = sm.build_model(sm.ModelSize(args.vision_hidden, args.vision_layers, args.vision_heads,
                                            args.vision_mlp, args.text_hidden, args.text_layers, args.text_heads,
                                            args.text_kv_heads, args.text_mlp), seed=args.seed)
    size = sm.ModelSize.of(model)
    if args.position_table:
        add_position_table(model, args.position_table)
    heads = AuxHeads(size.vision_hidden, size.text_hidden)
    device = torch.device(args.device)
    log(f"model {size.to_dict()} parameters {sm.parameter_counts(model)}")
    diff = check_training_forward(model, tokenizer, processor)
    log(f"training forward vs model forward: max |logit difference| {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError("the training forward does not match the model's forward")
    model.to(device).train()
    heads.to(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    decay, no_decay = [], []
    for name, param in list(model.named_parameters()) + list(heads.named_parameters()):
        (no_decay if param.ndim < 2 or "norm" in name or "embedding" in name else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    probe = scenes.heldout_set(args.eval_questions) if args.eval_questions else []
    steps = args.time_steps or (10**9 if args.minutes else args.steps)
    progress = None
    window: dict[str, list[float]] = {}
    data = StepBatches(args, tokenizer, steps)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None,
                                         persistent_workers=False)
    t_train = time.time()
    for step, batch in enumerate(loader):
        batch = to_device(batch, device)
        progress = (time.time() - t_train) / (60 * args.minutes) if args.minutes else None
        if progress is not None and progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args, progress)
        result = training_forward(model, heads, batch, attn_layer=args.attn_layer if args.attn_weight > 0 else None)
        loss = losses(result, batch, args.aux_weight, args.attn_weight, args.coords_weight, args.where_weight)
        optimizer.zero_grad(set_to_none=True)
        loss["total"].backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        optimizer.step()
        with torch.no_grad():
            predicted = result["logits"][batch["answer_row"], batch["answer_pos"]].argmax(-1)
            truth = batch["targets"][batch["answer_row"], batch["answer_pos"]]
            hits = (predicted == truth).tolist()
        for key, value in loss.items():
            window.setdefault(key, []).append(float(value.detach()))
        for category, hit in zip(batch["categories"], hits):
            window.setdefault("acc_" + category, []).append(hit)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            elapsed = time.time() - t_train
            summary = " ".join(f"{k}={np.mean(v):.3f}" for k, v in window.items())
            log(f"step {step + 1}/{steps} {elapsed / (step + 1):.2f}s/step elapsed {elapsed / 60:.1f}min "
                f"lr={optimizer.param_groups[0]['lr']:.2e} questions/step={len(hits)} {summary}")
            window = {}
        if probe and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            report = evaluate(model, processor, probe)
            log(f"held-out check at step {step + 1}: " + json.dumps({k: round(v, 3) for k, v in report.items()}))
            model.train()
    train_seconds = time.time() - t_train
    steps_done = step + 1 if progress is None or progress < 1 else step
    if args.time_steps:
        log(f"timed {steps} steps: {train_seconds / steps:.2f}s/step")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    dtype = getattr(torch, args.save_dtype)
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.1f} MB)")
    loaded, loaded_processor = sm.load(out, dtype=torch.float32, device=device)
    items = scenes.heldout_set(args.final_questions)
    report = evaluate(loaded, loaded_processor, items)
    total_seconds = time.time() - started
    log("held-out accuracy (full 576 tokens, loaded from disk, float32): "
        + json.dumps({k: round(v, 4) for k, v in report.items()}))
    record = {
        "accuracy": report,
        "decoding": "argmax of the first answer token's logits over the whole vocabulary (greedy), exact match",
        "command": "python scripts/train_scenes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "steps": steps_done,
        "minutes_budget": args.minutes or None,
        "images_per_step": args.images_per_step,
        "training_images": steps_done * args.images_per_step,
        "model_size": size.to_dict(),
        "parameters": sm.parameter_counts(loaded),
        "save_dtype": args.save_dtype,
        "train_minutes": round(train_seconds / 60, 1),
        "total_minutes": round(total_seconds / 60, 1),
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if init_record is not None:
        record["init"] = init_record
    (out / "accuracy.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
