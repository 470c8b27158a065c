"""vision(L) on LLaVA-NeXT: every view pruned in the CLIP tower, each kept token at its packed place.

The reference runs the tower's layers by hand on each view (all tokens up to block L, then [CLS] and the
kept tokens), projects them, puts them on each view's full grid with NaN at the dropped places, packs
that with the model's own ``pack_image_features``, drops the NaN slots and the newlines of rows left
empty, splices the rest into the prompt and runs the language model on it."""

from __future__ import annotations

import pytest
import torch

import vtoken
from contract_models import CASES_BY_NAME

CASE = CASES_BY_NAME["llava_next"]


def _tower_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def reference_logits(model, single, layer, kept, merge=False):
    """The logits of ``single`` (one row, no padding) with ``kept[v]`` (original patch indices) surviving
    block ``layer`` in view v; ``merge``: each kept index stands for its 2x2 cell, averaged."""
    vision = _tower_layers(model)
    size = single["image_sizes"][0]
    pack = model.model.pack_image_features  # the model's own packing is the definition of the layout
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    views = image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    count = len(vision.encoder.layers)
    feature_block = count + model.config.vision_feature_layer  # hidden state -2 comes out of block count-2
    with torch.no_grad():
        hidden = vision.pre_layrnorm(vision.embeddings(single["pixel_values"][0, :views]))
        for number in range(feature_block + 1):
            out = vision.encoder.layers[number](hidden, attention_mask=None)
            hidden = out[0] if isinstance(out, tuple) else out
            if number == layer:
                patches = hidden[:, 1:]
                if merge:  # 2x2 cells, row-major, averaged
                    d = patches.shape[-1]
                    cells = patches.view(views, side // 2, 2, side // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
                    patches = cells.reshape(views, -1, 4, d).mean(2)
                else:
                    patches = torch.stack([patches[v, kept[v]] for v in range(views)])
                hidden = torch.cat([hidden[:, :1], patches], 1)
        projected = model.model.multi_modal_projector(hidden[:, 1:])
        grid = torch.full((views, side * side, projected.shape[-1]), float("nan"))
        for v in range(views):
            grid[v, kept[v]] = projected[v]
        packed = pack([grid], single["image_sizes"], "default", image_newline=model.model.image_newline)[0][0]
        newline = (packed == model.model.image_newline).all(-1)
        token = ~newline & ~packed.isnan().any(-1)
        keep = token.clone()
        start = side * side if views > 1 else 0
        for position in newline.nonzero()[:, 0].tolist():
            keep[position] = bool(token[start:position].any()) if position > start else True
            start = position + 1
        ids = single["input_ids"][0]
        places = (ids == model.config.image_token_id).nonzero()[:, 0]
        embeds = model.get_input_embeddings()(ids)
        sequence = torch.cat([embeds[: places[0]], packed[keep], embeds[places[-1] + 1 :]])
        out = model.model.language_model(inputs_embeds=sequence[None])
        return model.lm_head(out.last_hidden_state)


def run_wrapped(model, single, method, options):
    with vtoken.wrapped(model, method, **options), torch.no_grad():
        logits = model(**single).logits
        kept = next(iter(model.vtoken.stats.kept.values()))
    return logits, [index.tolist() for index in kept]


@pytest.mark.parametrize("row", range(len(CASE.rows)))
@pytest.mark.parametrize("method,options", [("cls_attn", dict(keep=5, site="vision(0)")),
                                            ("kcenter", dict(keep=0.5, site="vision(0)"))])
def test_selection_reaches_the_language_model_at_its_packed_places(row, method, options):
    model = CASE.model()
    single = CASE.singles()[row]
    logits, kept = run_wrapped(model, single, method, options)
    assert all(len(index) == len(kept[0]) for index in kept), "every view keeps the same count"
    expected = reference_logits(model, single, 0, kept)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", range(len(CASE.rows)))
def test_pixel_shuffle_merged_tokens_sit_at_their_representatives(row):
    model = CASE.model()
    single = CASE.singles()[row]
    logits, kept = run_wrapped(model, single, "pixel_shuffle", dict(layer=0))
    expected = reference_logits(model, single, 0, kept, merge=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_keep_all_equals_unwrapped_and_refusals_name_the_reason():
    model = CASE.model()
    batch = CASE.batch("left")
    with torch.no_grad():
        expected = model(**batch).logits
        for method, options in [("pixel_shuffle", dict(layer=0, ratio=1)),
                                ("kcenter", dict(keep=1.0, site="vision(0)")),
                                ("cls_attn", dict(keep=1.0, site="vision(0)", anyres_budget="view"))]:
            with vtoken.wrapped(model, method, **options):
                torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="anyres_budget='guided' reads the base view's full grid"):
        vtoken.wrap(model, "kcenter", keep=4, site="vision(0)", anyres_budget="guided")
    pipeline = vtoken.Pipeline([vtoken.KCenter(keep=8, site="vision(0)"), vtoken.ClsAttn(keep=4)])
    with pytest.raises(ValueError, match="cls_attn at the projector cannot follow vision"):
        vtoken.wrap(model, pipeline)


def test_view_budget_at_the_projector_after_vision_pruning():
    """pixel_shuffle in the tower, then kcenter per view at the projector: each view's merged tokens
    form its 2x2 grid again, and each view keeps its share."""
    model = CASE.model()
    single = CASE.singles()[0]
    pipeline = vtoken.Pipeline([vtoken.PixelShuffle(layer=0), vtoken.KCenter(keep=6)])
    with vtoken.wrapped(model, pipeline, anyres_budget="view"), torch.no_grad():
        model(**single)
        kept = {site: [index.tolist() for index in value] for site, value in model.vtoken.stats.kept.items()}
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    representatives = [r * side + c for r in range(0, side, 2) for c in range(0, side, 2)]
    assert kept["vision(0)"] == [representatives] * 5, "the base view and 4 crops, on their 2x2 merged grids"
    assert sum(len(index) for index in kept["projector"]) == 6, "keep=6 per image, split over its views"
