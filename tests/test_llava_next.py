"""LLaVA-NeXT (AnyRes): base view + crops, per-view/global/guided budgets, image_newline handling."""

from __future__ import annotations

import pytest
import torch

import vtoken
from integrations_helpers import lm_image_tokens
from tiny_models import IMAGE_TOKEN, NEXT_SIDE, llava_next_batch, tiny_llava_next
from vtoken.integrations.llava_next import _newline_rule, split_budget

ROWS = [([20], (60, 110), [30, 31]), ([21, 22], (100, 40), [32])]
MODES = ["global", "view", "guided"]


@pytest.mark.parametrize("mode", MODES)
def test_keep_all_matches_unwrapped_logits(mode, attn_implementation):
    model = tiny_llava_next(attn_implementation)
    batch = llava_next_batch(model, ROWS)
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "cls_attn+kcenter", keep=1.0, anyres_budget=mode):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["cls_attn", "kcenter", "dart", "random", "cls_attn+kcenter"])
def test_quarter_budget_feeds_expected_counts(mode, method):
    model = tiny_llava_next()
    batch = llava_next_batch(model, ROWS)
    with vtoken.wrapped(model, method, keep=0.25, anyres_budget=mode), torch.no_grad():
        image_tokens = lm_image_tokens(model, batch)
        kept = model.vtoken.stats.kept["projector"]
    # one unit per image in global mode, one per view otherwise; units come in image order
    per_image = _group_units(model, batch, kept, mode)
    for row, (units, image_tokens_row) in enumerate(zip(per_image, image_tokens)):
        visual = sum(int(k.numel()) for k in units)
        total = int((batch["input_ids"][row] == IMAGE_TOKEN).sum())
        newlines = image_tokens_row - visual
        assert 0 < newlines <= total - visual, f"row {row}: {newlines} newlines kept"
        assert abs(visual - 0.25 * (total - _count_newlines(model, batch, row))) <= len(units), (
            f"row {row}: {visual} visual tokens kept, expected a quarter"
        )


def test_int_budget_is_exact_per_image_in_every_mode():
    model = tiny_llava_next()
    batch = llava_next_batch(model, ROWS)
    for mode in MODES:
        with vtoken.wrapped(model, "kcenter", keep=10, anyres_budget=mode), torch.no_grad():
            lm_image_tokens(model, batch)
            kept = model.vtoken.stats.kept["projector"]
        per_image = _group_units(model, batch, kept, mode)
        assert [sum(int(k.numel()) for k in units) for units in per_image] == [10, 10], mode


@pytest.mark.parametrize("mode", MODES)
def test_generate_padded_batch_equals_singles(mode):
    model = tiny_llava_next()
    batch = llava_next_batch(model, ROWS, seed=3)
    with vtoken.wrapped(model, "dart", keep=12, anyres_budget=mode):
        together = model.generate(**batch, max_new_tokens=5, do_sample=False)
        for row, spec in enumerate(ROWS):
            alone = llava_next_batch(model, [spec], seed=3)
            alone["pixel_values"] = batch["pixel_values"][row : row + 1, : alone["pixel_values"].shape[1]]
            single = model.generate(**alone, max_new_tokens=5, do_sample=False)
            assert torch.equal(together[row, -5:], single[0, -5:]), f"row {row} differs from its run alone"


def test_llm_site_on_llava_next():
    model = tiny_llava_next()
    batch = llava_next_batch(model, ROWS)
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with vtoken.wrapped(model, "fastv", keep=1.0, site="llm(2)"):
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), expected)


def test_newline_follows_its_row():
    # base view of 4 tokens alone, then a canvas of two rows of 2 tokens, each ended by a newline (-1)
    layout = torch.tensor([0, 1, 2, 3, 4, 5, -1, 6, 7, -1])
    finalize = _newline_rule(layout, side=2)
    mask = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert finalize(mask).tolist() == [True, False, False, False, False, True, True, False, False, False]
    base_only = _newline_rule(torch.tensor([0, 1, 2, 3, -1]), side=2)
    assert base_only(torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool)).tolist()[-1] is True


def test_split_budget_is_proportional_capped_and_exact():
    assert split_budget(10, [1, 1], [100, 100]) == [5, 5]
    assert split_budget(10, [3, 1], [100, 100]) == [8, 2] or split_budget(10, [3, 1], [100, 100]) == [7, 3]
    assert sum(split_budget(17, [0.2, 5.0, 1.3], [4, 100, 100])) == 17
    assert split_budget(10, [100, 1], [3, 100]) == [3, 7], "a capped share passes its excess on"


def test_guided_mode_gives_more_to_the_crop_the_base_view_finds_important():
    from vtoken.integrations.llava_next import _crop_importance

    side = 2
    # base (4 tokens), then a 1 x 2 canvas of crops: canvas row 0 = crop1 cols + crop2 cols, etc.
    layout = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, -1, 6, 7, 10, 11, -1])
    base = torch.tensor([[0.0, 5.0], [0.0, 5.0]])  # the right half of the image matters
    crops = [torch.tensor([4, 5, 9, 10]), torch.tensor([6, 7, 11, 12])]
    first, second = _crop_importance(base, layout, crops, side)
    assert second > first


def _count_newlines(model, batch, row):
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=batch["pixel_values"][row : row + 1],
                                                image_sizes=batch["image_sizes"][row : row + 1]).pooler_output[0]
    newline = model.model.image_newline.detach()
    return int((packed == newline).all(-1).sum())


def _group_units(model, batch, kept, mode):
    """Split the per-unit kept lists into per-image lists."""
    if mode == "global":
        return [[k] for k in kept]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    per_image, cursor = [], 0
    for size in batch["image_sizes"]:
        views = image_size_to_num_patches(size, model.config.image_grid_pinpoints, NEXT_SIDE * 14)
        per_image.append(kept[cursor : cursor + views])
        cursor += views
    return per_image
