"""LLaVA-NeXT / LLaVA-1.6 (transformers' ``LlavaNextForConditionalGeneration``, AnyRes).

Map of the model:
- Each image is cut into views: a base view (the whole image at the tower's resolution) and the
  crops of a high-resolution canvas (``image_grid_pinpoints``); the CLIP tower and projector run on
  all views as one batch (hidden state ``vision_feature_layer``, [CLS] dropped: h x w patches each).
- ``pack_image_features`` lays an image's placeholders out as: the base view's h*w tokens, then the
  crop canvas row by row, unpadded to the image's aspect ratio, each row ended by ``image_newline``.
  vtoken learns that layout from the model itself: it packs token ids instead of features, so the
  unpadding is exactly the model's.
- Budgets (integration option ``anyres_budget``):
  ``global`` (default): one budget over all of an image's tokens, base and crops together;
  ``view``: the base view and each crop get shares proportional to their token counts;
  ``guided``: the base view keeps its proportional share and the crops share the rest in proportion
  to the importance the base view gives their region (GlobalCom^2, "Compression with Global
  Guidance"): the base-view scores (the [CLS] attention when a stage asks for it, else feature norms)
  summed over the part of the base grid each crop covers. An int keep is per image in every mode.
- ``image_newline`` tokens are structure, not budget: a row's newline is kept, still at the end of
  the row's kept tokens, while the row keeps any token, and is dropped with the row otherwise.
- The language model is LLaVA's (Llama/Mistral/Vicuna...): the ``llm(K)`` site works as for LLaVA.
  ``vision(L)``: every view pruned in the tower, each kept token at its place in the model's own packing
  (``llava_next_vision.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken.registry import register_integration
from vtoken.stats import clock

from .base import captured_inputs
from .hf_vlm import Encoded, VisualBlock, VisualUnit
from .llava import LlavaIntegration
from .llava_next_vision import check_vision_options, kept_places, scatter_to_grid
from .projector_signals import clip_received_attention, projection_hooks

ANYRES_BUDGETS = ("global", "view", "guided")


@register_integration("llava_next")
class LlavaNextIntegration(LlavaIntegration):
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    options: ClassVar[dict[str, Any]] = {"positions": "compact", "anyres_budget": "global"}

    def install(self) -> None:
        if self.settings["anyres_budget"] not in ANYRES_BUDGETS:
            raise ValueError(f"anyres_budget={self.settings['anyres_budget']!r}; accepted: {', '.join(ANYRES_BUDGETS)}")
        gridded = [stage.name for stage in self.pipeline.stages if stage.needs_grid and stage.site.kind == "projector"]
        if gridded and self.settings["anyres_budget"] == "global":
            raise ValueError(f"{', '.join(gridded)} at the projector need(s) each view on its patch grid, which an "
                             "image's tokens as one unit (anyres_budget='global') do not form; pass "
                             "anyres_budget='view' or 'guided'")
        check_vision_options(self)
        super().install()

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("vision", "projector", "llm")

    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        config = self.model.config
        layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError("vtoken supports LLaVA-NeXT with vision_feature_select_strategy='default'")
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them)")
        wanted_layers = self._cls_layers(signals, layer)
        attn_blocks = self._encoder_attn_blocks(signals, layer)
        guided = self.settings["anyres_budget"] == "guided"
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        packing = []
        if self.encoder_sites is not None:  # vision(L): the packing gets every view's full grid back
            self._check_vision_sites(layer)
            packing.append(self.model.model.multi_modal_projector.register_forward_hook(
                scatter_to_grid(self.encoder_sites, patches)))
        projected, hooks = projection_hooks(self.vision_layers(), attn_blocks)
        with captured_inputs(self.vision_layers(), wanted_layers + attn_blocks, *packing, *hooks) as captured:
            output = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=image_sizes, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True,
            )
        packed = list(output.pooler_output)
        kept = None if self.encoder_sites is None else kept_places(self.encoder_sites, patches)
        layouts = self._layouts(packed, image_sizes)
        start = clock(packed[0].device)
        scores = None
        if wanted_layers:
            scores = torch.stack([self._cls_row(self.vision_layers()[i], captured[i]) for i in wanted_layers]).mean(0)
            scores = scores[:, 1:]  # [views in the batch, h*w]
        attn = None
        if attn_blocks:  # HiPrune's object and deep layers: [views in the batch, h*w, 2]
            attn = torch.stack([clip_received_attention(self.vision_layers()[i], captured[i], projected.get(i))
                                for i in attn_blocks], -1)[:, 1:]
        scoring = clock(packed[0].device) - start

        side = config.vision_config.image_size // config.vision_config.patch_size
        blocks, units = [], []
        view_offset = 0
        for image, (features, layout) in enumerate(zip(packed, layouts)):
            views = int(layout.max()) // (side * side) + 1
            tokens = (layout >= 0).nonzero()[:, 0]
            if kept is not None:  # vision(L): the slots of the tokens the tower kept
                tokens = tokens[kept[view_offset + layout[tokens] // patches, layout[tokens] % patches]]
            view_of = layout[tokens] // (side * side)
            patch_of = layout[tokens] % (side * side)
            signal = None if scores is None else scores[view_offset + view_of, patch_of]
            attn_signal = None if attn is None else attn[view_offset + view_of, patch_of]
            blocks.append(VisualBlock(token_id=self.image_token_id(), size=features.shape[0], fill=features,
                                      finalize=_newline_rule(layout, side)))
            groups = [tokens] if self.settings["anyres_budget"] == "global" else [
                tokens[view_of == v] for v in range(views) if bool((view_of == v).any())
            ]
            budgets = self._split(groups, layout, side, signal if signal is not None else features[tokens].norm(dim=-1),
                                  tokens, guided) if len(groups) > 1 else [None]
            for slots, budget in zip(groups, budgets):
                positions = torch.searchsorted(tokens, slots)
                grid = _view_grid(layout[slots] % (side * side), side) if len(groups) > 1 else None
                units.append(VisualUnit(
                    block=image, features=features[slots], grid=grid, index=slots, budget=budget,
                    signals={} if signal is None else {"cls_attn": signal[positions]},
                ))
                if attn_signal is not None:
                    units[-1].signals["encoder_attn"] = attn_signal[positions]
            view_offset += views
        return Encoded(blocks=blocks, units=units, scoring_seconds=scoring)

    def _layouts(self, packed: list[Tensor], image_sizes: Tensor) -> list[Tensor]:
        """For every packed slot of every image: the view * h*w + patch it came from, or -1 for a newline,
        obtained by running the model's own packing on token ids."""
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        ids = []
        for size in image_sizes:
            views = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            ids.append(torch.arange(views * side * side, dtype=torch.float64).view(views, side * side, 1))
        layouts, _ = self.model.model.pack_image_features(
            ids, image_sizes.cpu(), vision_feature_select_strategy="default",
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        out = [layout[:, 0].round().long().to(packed[0].device) for layout in layouts]
        for layout, features in zip(out, packed):
            if layout.numel() != features.shape[0]:
                raise RuntimeError("LLaVA-NeXT packing layout does not match the packed features")
        return out

    def _split(self, groups: list[Tensor], layout: Tensor, side: int, scores: Tensor, tokens: Tensor,
               guided: bool, canvas: tuple[int, int] | None = None) -> list[int] | None:
        """Per-view budgets for 'view' and 'guided' modes (None lets each view keep a fraction itself).
        ``canvas``: the crop grid's (rows, cols) where the caller knows it (else read from the layout)."""
        projector = next((s for s in self.pipeline.sites if s.kind == "projector"), None)
        if projector is None:  # no stage at the projector (e.g. vision(L) only): nothing to split
            return [None] * len(groups)
        keep = self.pipeline.site_keep(projector)
        sizes = [int(g.numel()) for g in groups]
        total = sum(sizes)
        if isinstance(keep, float) and not guided:
            return [None] * len(groups)
        from vtoken.budget import resolve_keep

        budget = resolve_keep(keep, total, 1, "keep per image")
        weights = [float(s) for s in sizes]
        if guided and len(groups) > 1:
            base_scores = scores[: sizes[0]].float().view(side, side)
            crop_weights = _crop_importance(base_scores, layout, groups[1:], side, canvas)
            base_share = budget * sizes[0] / total
            weights = [base_share] + [w * (budget - base_share) / max(sum(crop_weights), 1e-12) for w in crop_weights]
        return split_budget(budget, weights, sizes)

    # --- what bench, FLOPs and the demo ask a family ---
    # model_dims and run_vision are LLaVA's (the same tower, projector and decoder); the token counts are not
    def tokens_per_image(self) -> int | None:
        """None: an image's views and row-end newlines depend on its size (AnyRes)."""
        return None

    def synthetic_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                         visual_tokens: int | None = None) -> dict[str, Any]:
        raise NotImplementedError(f"synthetic inputs for {self.family} are not implemented: an AnyRes image's "
                                  "token count depends on its size and views (vtoken bench supports llava, "
                                  "qwen2_vl and qwen2_5_vl)")

    def visual_counts(self, inputs: dict[str, Any]) -> Any:
        raise NotImplementedError(f"visual counts for {self.family} are not implemented: an AnyRes image runs "
                                  "several views through the tower and packs them with row-end newlines, which "
                                  "one patches-per-image count does not describe")

    def unit_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int] | None]:
        """With ``anyres_budget='global'`` (the default) a unit is a whole image: its base view, crops and
        newlines form no single grid, so one None per image."""
        if self.settings["anyres_budget"] != "global":
            raise NotImplementedError(f"unit grids for {self.family} with anyres_budget="
                                      f"{self.settings['anyres_budget']!r} are not implemented (accepted: 'global')")
        return [None] * len(inputs["image_sizes"])

    def overlay_view(self, image: Any, processor: Any) -> Any:
        raise NotImplementedError(f"{self.family} has no single patch grid per image to draw over the image")


def split_budget(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder), each at most its cap
    and at least 1 where the cap allows; what a capped share cannot take goes to the others."""
    shares = [0] * len(weights)
    open_ = [i for i in range(len(weights)) if caps[i] > 0]
    left = total
    while left > 0 and open_:
        mass = sum(max(weights[i], 1e-12) for i in open_)
        raw = {i: left * max(weights[i], 1e-12) / mass for i in open_}
        grant = {i: min(int(raw[i]), caps[i] - shares[i]) for i in open_}
        given = sum(grant.values())
        if given < left:
            for i in sorted(open_, key=lambda i: (-(raw[i] - int(raw[i])), i)):
                if given == left:
                    break
                if shares[i] + grant[i] < caps[i]:
                    grant[i] += 1
                    given += 1
        for i in open_:
            shares[i] += grant[i]
        left -= given
        open_ = [i for i in open_ if shares[i] < caps[i]]
        if given == 0:
            break
    return shares


def _crop_importance(base: Tensor, layout: Tensor, crops: list[Tensor], side: int,
                     canvas: tuple[int, int] | None = None) -> list[float]:
    """Score mass of the base-view region each crop covers. The crop canvas is a rows x cols grid of
    views; crop v (1-based in the layout) covers canvas cell ((v-1) // cols, (v-1) % cols)."""
    views = [int(layout[c[0]]) // (side * side) for c in crops]
    count = int(layout.max()) // (side * side)  # number of crops
    rows, cols = canvas or _canvas_shape(layout, side, count)
    weights = []
    for view in views:
        r, c = divmod(view - 1, cols)
        region = base[r * side // rows:(r + 1) * side // rows, c * side // cols:(c + 1) * side // cols]
        weights.append(float(region.sum()))
    return weights


def _canvas_shape(layout: Tensor, side: int, crops: int) -> tuple[int, int]:
    """Rows and columns of the crop canvas, read from the packed order: the first canvas row visits
    the crops of the first canvas row of views left to right."""
    canvas = layout[side * side:]
    first_row_end = int((canvas < 0).nonzero()[0, 0]) if bool((canvas < 0).any()) else canvas.numel()
    cols = len({int(v) // (side * side) for v in canvas[:first_row_end]})
    return crops // cols, cols


def _view_grid(patches: Tensor, side: int) -> tuple[int, int] | None:
    rows, cols = (patches // side).unique().numel(), (patches % side).unique().numel()
    return (rows, cols) if rows * cols == patches.numel() else None


def _newline_rule(layout: Tensor, side: int):
    """A newline stays while the row it ends keeps any token (a base view alone is one row)."""
    newlines = (layout < 0).nonzero()[:, 0].tolist()
    has_crops = bool((layout[side * side:] >= 0).any())

    def finalize(mask: Tensor) -> Tensor:
        mask = mask.clone()
        start = side * side if has_crops else 0
        for position in newlines:
            row = mask[start:position]
            mask[position] = bool(row.any()) if row.numel() else True
            start = position + 1
        return mask

    return finalize
