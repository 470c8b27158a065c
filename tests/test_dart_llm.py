"""DART in its paper form at ``llm(2)``: 4 image pivots and 4 text pivots (the text after the image), each
pivot keeping its share of the visual tokens least similar to it. The selection made through the wrapped
model equals a slow reference written here from the unwrapped model's own hidden states and KV cache, for
a sample alone and in every row of padded batches (left and right padding)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tiny_models import IMAGE_TOKEN, llava_batch, prompt_ids, tiny_llava

K = 2
KEEP = 24
PROMPTS = [
    prompt_ids([20, 21], 1, [30, 31, 32, 33, 34, 35]),
    prompt_ids([22], 1, [36, 37, 38, 39, 40]),
    prompt_ids([23, 24, 25, 26], 1, [41, 42, 43, 44, 45, 46, 47]),
]


def reference_dart(model, prompt: list[int], pixels: torch.Tensor, keep: int, image_pivots=4, text_pivots=4):
    """The kept visual tokens (indices among the sample's visual tokens) computed the slow, obvious way."""
    batch = llava_batch([prompt])
    batch["pixel_values"] = pixels
    with torch.no_grad():
        out = model(**batch, use_cache=True, output_hidden_states=True)
    ids = batch["input_ids"][0]
    lm = model.model.language_model
    with torch.no_grad():
        hidden = lm.norm(out.hidden_states[K])[0].double()  # the input of layer K, normalised
    keys = out.past_key_values.layers[K - 1].keys[0]  # [heads, L, d], after the rotary embedding
    key_norm = keys.double().abs().sum(dim=(0, 2))  # L1 norm over heads and channels, per position
    visual = [p for p in range(len(ids)) if ids[p] == IMAGE_TOKEN]
    text = [p for p in range(visual[-1] + 1, len(ids))]

    def top(positions, count):
        ranked = sorted(positions, key=lambda p: (-float(key_norm[p]), p))
        return ranked[:count]

    pivots_image = top(visual, image_pivots)
    pivots = pivots_image + top(text, text_pivots)
    kept = set(pivots_image)
    rest = keep - len(pivots_image)
    for rank, pivot in enumerate(pivots):
        share = rest // len(pivots) + (1 if rank < rest % len(pivots) else 0)
        candidates = [p for p in visual if p not in kept]
        similarity = {p: float(torch.nn.functional.cosine_similarity(hidden[p], hidden[pivot], dim=0))
                      for p in candidates}
        kept.update(sorted(candidates, key=lambda p: (similarity[p], p))[:share])
    return sorted(visual.index(p) for p in kept)


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=4)


@pytest.fixture(scope="module")
def pixels():
    return llava_batch(PROMPTS, seed=11)["pixel_values"]


@pytest.fixture(scope="module")
def references(model, pixels):
    return [reference_dart(model, prompt, pixels[row : row + 1], KEEP) for row, prompt in enumerate(PROMPTS)]


def kept_through_wrap(model, batch) -> list[list[int]]:
    # positions as generate counts them, so that a left-padded row sees the positions it has alone
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with vtoken.wrapped(model, "dart@llm(2)", keep=KEEP), torch.no_grad():
        model(**batch, position_ids=positions)
        return [row.tolist() for row in model.vtoken.stats.kept["llm(2)"]]


def test_dart_uses_text_pivots_from_the_question(model, pixels):
    """Without its text pivots the selection differs: the text after the image reaches the stage."""
    batch = llava_batch(PROMPTS[:1])
    batch["pixel_values"] = pixels[:1]
    with_text = kept_through_wrap(model, batch)[0]
    with vtoken.wrapped(model, "dart@llm(2)", keep=KEEP, text_pivots=0), torch.no_grad():
        model(**batch)
        without = model.vtoken.stats.kept["llm(2)"][0].tolist()
    assert with_text == reference_dart(model, PROMPTS[0], pixels[:1], KEEP)
    assert without == reference_dart(model, PROMPTS[0], pixels[:1], KEEP, text_pivots=0)
    assert with_text != without, "4 text pivots must change what a 24-token budget keeps"


@pytest.mark.parametrize("row", range(len(PROMPTS)))
def test_dart_alone_equals_the_reference(model, pixels, references, row):
    batch = llava_batch([PROMPTS[row]])
    batch["pixel_values"] = pixels[row : row + 1]
    assert kept_through_wrap(model, batch)[0] == references[row]


@pytest.mark.parametrize("side", ["left", "right"])
def test_dart_in_a_padded_batch_equals_each_row_alone(model, pixels, references, side):
    batch = llava_batch(PROMPTS, side=side)
    batch["pixel_values"] = pixels
    kept = kept_through_wrap(model, batch)
    for row, expected in enumerate(references):
        assert kept[row] == expected, f"row {row} ({side} padding) keeps another set than the reference"


def test_dart_on_identical_rows_keeps_the_same_set(model, pixels, references):
    """Four copies of one sample: every row keeps the sample's own set (a flattened batch index once
    gave the third row another text set)."""
    batch = llava_batch([PROMPTS[2]] * 4)
    batch["pixel_values"] = pixels[2:3].expand(4, -1, -1, -1)
    assert kept_through_wrap(model, batch) == [references[2]] * 4
