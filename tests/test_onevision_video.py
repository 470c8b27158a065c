"""DyCoke and HoliTom on LLaVA-OneVision videos: a clip's unit is its frames' pooled tokens on their
(frames, h, w) layout, the clip's final newline outside the unit (it always stays).

On a tiny LLaVA-OneVision with clips of 4 frames (3 x 3 pooled tokens each) whose frames repeat with
small changes: the language model receives exactly the budget plus the newline, the kept tokens equal
the slow references of tests/test_video_stages.py run on the model's own pooled video features, and the
features placed at the kept slots are the stage's (HoliTom: its merged means); keep-all equals the
unwrapped logits (eager and sdpa); a padded batch equals its rows alone (the logits of the row's tokens
and the kept tokens, left and right padding); cached generation equals generation without a cache. The
contract clauses run on ``contract_models.ONEVISION_VIDEO_CASES`` (random 4-frame clips, three rows).
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from contract_models import onevision_inputs
from integrations_helpers import lm_inputs
from test_video_stages import dycoke_reference, holitom_reference
from tiny_models import OV_SIDE, OV_VIDEO, tiny_llava_onevision

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LlavaOnevisionForConditionalGeneration"):
    pytest.skip("LLaVA-OneVision needs a transformers with LlavaOnevisionForConditionalGeneration",
                allow_module_level=True)

FRAMES, KEEP = 4, 12
SIDE = -(-OV_SIDE // 2)  # pooled frame side: 3
POOLED = SIDE * SIDE
ROWS = [[20, ("video", FRAMES, 0), 30, 31], [22, 23, 24, ("video", FRAMES, 0), 33]]
METHODS = ["dycoke", "holitom"]


def clip_pixels(seed: int) -> torch.Tensor:
    """``[FRAMES, 3, 84, 84]``: frame 0 random, each later frame the one before plus a little noise with
    one 28 x 28 patch of new content (at a place that moves), so some pooled places repeat and some change."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(3, OV_SIDE * 14, OV_SIDE * 14, generator=g)]
    for f in range(1, FRAMES):
        frame = frames[-1] + 0.02 * torch.randn(frames[-1].shape, generator=g)
        row, col = divmod((3 * f + seed) % POOLED, SIDE)
        frame[:, row * 28:(row + 1) * 28, col * 28:(col + 1) * 28] = torch.randn(3, 28, 28, generator=g)
        frames.append(frame)
    return torch.stack(frames)


def video_inputs(model, rows: list, side: str = "left", seeds: tuple[int, ...] = (1, 2)) -> dict:
    inputs = onevision_inputs(model, rows, side)
    inputs["pixel_values_videos"] = torch.stack([clip_pixels(seed) for seed in seeds[: len(rows)]])
    return inputs


def pooled_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The model's own projected, pooled features of one clip ``[FRAMES * POOLED, D]`` (newline dropped)."""
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=pixels[None], vision_feature_layer=-1,
                                             vision_feature_select_strategy="full", return_dict=True)
    features = out.pooler_output[0]
    assert features.shape[0] == FRAMES * POOLED + 1
    return features[:-1]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision("eager", seed=1)


@pytest.mark.parametrize("method", METHODS)
def test_language_model_receives_the_budget_and_the_reference_selection(model, method):
    inputs = video_inputs(model, ROWS[:1])
    features = pooled_features(model, inputs["pixel_values_videos"][0])
    with vtoken.wrapped(model, method, keep=KEEP), torch.no_grad():
        seen, handle = lm_inputs(model)
        model(**inputs)
        handle.remove()
        kept = model.vtoken.stats.kept["projector"][0].tolist()
    if method == "dycoke":
        expected, merged = dycoke_reference(features.float(), FRAMES, SIDE, SIDE, KEEP), None
    else:
        expected, merged, _ = holitom_reference(features.float(), FRAMES, SIDE, SIDE, KEEP)
    assert kept == expected, f"{method} kept {kept}, the reference {expected}"
    video = inputs["input_ids"][0] == OV_VIDEO
    text = int((~video & inputs["attention_mask"][0].bool()).sum())
    assert int(seen[0]["attention_mask"].sum()) == text + KEEP + 1, "the budget plus the clip's newline"
    embeds = seen[0]["inputs_embeds"][0]
    start = int(video.nonzero()[0])
    placed = embeds[start: start + KEEP + 1]
    wanted = features[expected] if merged is None else merged
    torch.testing.assert_close(placed[:KEEP].float(), wanted.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(placed[KEEP], model.model.image_newline.to(placed.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_equals_the_unwrapped_logits(method, attn):
    model = tiny_llava_onevision(attn, seed=1)
    inputs = video_inputs(model, ROWS)
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtoken.wrapped(model, method, keep=1.0):
            torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5, rtol=0)
        with vtoken.wrapped(model, method, keep=FRAMES * POOLED):
            torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5, rtol=0)
    assert not hasattr(model, "vtoken") or model.vtoken is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_its_rows_alone(model, method, side):
    inputs = video_inputs(model, ROWS, side)
    with vtoken.wrapped(model, method, keep=KEEP), torch.no_grad():
        together = model(**inputs).logits
        kept_together = model.vtoken.stats.kept["projector"]
        for row in range(len(ROWS)):
            single = video_inputs(model, ROWS[row:row + 1], side, seeds=((1, 2)[row],))
            alone = model(**single).logits
            assert model.vtoken.stats.kept["projector"][0].tolist() == kept_together[row].tolist()
            # the logits follow the pruned sequence: compare every position of the row's own tokens
            length = int(inputs["attention_mask"][row].sum()) - (FRAMES * POOLED - KEEP)
            assert alone.shape[1] == length
            got = together[row, -length:] if side == "left" else together[row, :length]
            torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS + ["dycoke+dycoke_kv@decode"])
def test_cached_generation_equals_recomputation(model, method):
    """With DyCoke's KV pruning after its merging too (4 entries per clip kept after the first step)."""
    inputs = video_inputs(model, ROWS)
    options = dict(keep=4, dycoke={"keep": KEEP}) if "+" in method else dict(keep=KEEP)
    with vtoken.wrapped(model, method, **options):
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        kept = model.vtoken.stats.kept
        recomputed = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
        assert str(model.vtoken.stats.kept) == str(kept)
    assert torch.equal(cached, recomputed)
    if "+" in method:
        assert [[k.numel() for _, k in row] for row in kept["decode"]] == [[4, 4, 4]] * 2


# --- the contract clauses on clips (contract_models.ONEVISION_VIDEO_CASES) ----------------------------------
import test_contract as contract  # noqa: E402
from contract_models import ONEVISION_VIDEO_CASES  # noqa: E402

VIDEO_STAGES = [pytest.param(case, stage, id=f"{case.name}-{stage.id}") for case in ONEVISION_VIDEO_CASES
                for stage in case.stages]


@pytest.mark.parametrize("case,stage", VIDEO_STAGES)
def test_video_contract(case, stage):
    """Keep-all equals the unwrapped logits (eager and sdpa), unwrap restores, cached generation equals
    recomputation, a padded batch of clips equals each clip alone, threads, deepcopy and pickle."""
    contract.run_clauses_without_labels(case, stage)
