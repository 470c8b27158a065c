"""Machinery shared by Hugging Face vision-language models that splice image features into the
language model's input at placeholder tokens (LLaVA, LLaVA-NeXT, Qwen2-VL...).

Prefill is intercepted before the model sees it:
- ``model(**inputs)``: a forward pre-hook turns ``input_ids + pixel_values`` into the shrunk
  ``inputs_embeds`` (and attention mask, position ids, labels) and calls the original forward.
- ``model.generate(**inputs)``: an instance-level ``generate`` does the same before the original
  ``generate`` starts, so its own bookkeeping (attention mask growth, position ids, cache length) is
  consistent from the first step; the returned sequences start with the caller's original input ids.
Nothing of the model's own code is copied; ``remove`` deletes the hook and the instance attribute.
The pure tensor code lives apart: ``visual_blocks`` (placeholders, units, assembly), ``vtoken.sequence``
(packing the shrunk rows), ``generation`` (generate's arguments and returned sequences).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from vtoken import signals
from vtoken.sequence import gather_sequence, mask_positions, pack_rows, padding_side
from vtoken.sites import Site
from vtoken.stats import Stats
from vtoken.tokens import TokenSet

from .base import Integration, removed_on_failure
from .decoder import DecoderSites
from .generation import (
    WrappedGenerate,
    bind_arguments,
    count_new_tokens_only,
    refuse_unsupported_generation,
    restore_prompt,
    wants_cache,
)
from .grouping import run_in_groups
from .projector_signals import prompt_text
from .visual_blocks import Encoded, Prefill, VisualBlock, VisualUnit, assemble_blocks, blocks_per_row
from .vit_sites import EncoderLayout, EncoderSites

# the family files build their visual layout with these; they are imported from here
__all__ = ["HFVisionLanguage", "Encoded", "Prefill", "VisualBlock", "VisualUnit", "POSITION_MODES"]

POSITION_MODES = ("compact", "original")


class HFVisionLanguage(Integration):
    options: ClassVar[dict[str, Any]] = {"positions": "compact"}
    #: the keyword arguments that carry images; they are consumed by the prefill step
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")

    # --- what a model family provides ------------------------------------------------------------
    def language_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def encoder_layout(self) -> "EncoderLayout":
        """The vision encoder as a batched ViT, for ``vision(L)`` sites."""
        raise ValueError(f"{self.name} has no vision(L) site")

    def make_encoder_sites(self, sites: list[Site]) -> Any:
        """The hooks for ``vision(L)`` sites (a batched ViT by default)."""
        return EncoderSites(self.pipeline, sites, self.key, self.end_call, layout=self.encoder_layout())

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        """Visual features after the projector, one unit per image (or clip/frame), in placeholder
        order, with the requested per-token signals."""
        raise NotImplementedError

    def default_positions(self, inputs: dict[str, Any], for_generate: bool) -> Tensor:
        """The position ids the unwrapped model would use for this input (1-D models)."""
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if for_generate and mask is not None:
            return mask_positions(mask)
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def compact_positions(self, mask: Tensor, inputs: dict[str, Any], for_generate: bool) -> Tensor | None:
        """Position ids for the shrunk sequence with positions='compact'; None lets the model count
        them itself (as it would for a prompt that simply had fewer tokens)."""
        if inputs.get("position_ids") is None:
            return None
        return mask_positions(mask)

    def after_prepare(self, prepared: dict[str, Any]) -> None:
        """Model-specific bookkeeping once the shrunk inputs are known (e.g. Qwen's rope deltas)."""

    def extra_sequence_inputs(self) -> tuple[str, ...]:
        """Other per-position inputs that shrink with the sequence (e.g. ``mm_token_type_ids``)."""
        return ()

    # --- install / remove ------------------------------------------------------------------------
    def install(self) -> None:
        if self.settings["positions"] not in POSITION_MODES:
            raise ValueError(f"positions={self.settings['positions']!r}; accepted: {', '.join(POSITION_MODES)}")
        self.check_pipeline()
        self._check_budget_fits()
        self.decoder, self.encoder_sites = None, None
        self._had_generate = "generate" in self.model.__dict__
        self._saved_generate = self.model.__dict__.get("generate")
        with removed_on_failure(self):
            self._install_hooks()

    def _install_hooks(self) -> None:
        self.hooks.add(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        # always_call: a call that raises still ends, so the next call in this thread starts clean
        self.hooks.add(self.model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True))
        self.model.__dict__["generate"] = WrappedGenerate(self)
        llm_sites = [site for site in self.pipeline.sites if site.kind in ("llm", "decode")]
        if llm_sites:
            self.decoder = DecoderSites(self.pipeline, llm_sites, self.key, self.end_call,
                                        language_model=self.language_model())
        vision_sites = [site for site in self.pipeline.sites if site.kind == "vision"]
        if vision_sites:
            self.encoder_sites = self.make_encoder_sites(vision_sites)

    def remove(self) -> None:
        self.hooks.remove_all()
        if self._had_generate:
            self.model.__dict__["generate"] = self._saved_generate
        else:
            self.model.__dict__.pop("generate", None)
        if self.decoder is not None:
            self.decoder.remove()
            self.decoder = None
        if self.encoder_sites is not None:
            self.encoder_sites.remove()
            self.encoder_sites = None

    def _check_budget_fits(self) -> None:
        """A budget above what every image gives (a fixed-size encoder) is refused now, not at the first
        call. Only the first site is checked: what later sites see depends on what earlier ones kept."""
        first = self.pipeline.sites[0]
        available = None if first.kind == "vision" else self.tokens_per_image()
        if available is None:
            return
        stages = [stage for stage in self.pipeline.stages_at(first) if stage.budgeted]
        if not stages:
            return
        keeps = [stage.keep for stage in stages] + [self.pipeline.site_keep(first)]
        for keep in keeps:
            if isinstance(keep, int) and not isinstance(keep, bool) and keep > available:
                raise ValueError(f"keep={keep} tokens per image exceeds the {available} visual tokens every image "
                                 f"gives this {self.family} model; use an int in [1, {available}] or a fraction "
                                 "in (0, 1]")

    def site_layers(self) -> dict[str, int]:
        return {"llm": len(self.language_model().layers)}

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("projector", "llm")

    def provided_signals(self, site: Site) -> frozenset[str]:
        offered = super().provided_signals(site)
        if site.kind == "llm":  # the projector's pins ride on the decoder's visual positions (decoder.py)
            offered = offered | {signals.PINNED}
        if site.kind == "projector" and any(s.kind == "vision" for s in self.pipeline.sites):
            # after vision(L) pruning, the encoder layers score a shorter sequence than the projector receives
            return offered - {signals.ENCODER_ATTN}
        return offered

    # --- a forward call ----------------------------------------------------------------------------
    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.current_call()
        if call is not None and call.kind == "generate":
            return self._generate_step(call, module, args, kwargs)
        call = self.begin_call("forward")  # ended by _after_forward, also when the forward raises
        inputs = bind_arguments(type(module).forward, module, args, kwargs)
        if not self._has_images(inputs):
            return None
        return (), self.prepare(inputs, for_generate=False, call=call)

    def _after_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.current_call()
        if call is None or call.kind != "forward":
            return None
        try:
            if output is not None and "labels" in call.parts:
                self._llm_site_loss(module, output, call)
        finally:
            self.end_call(call)
        return output

    def _llm_site_loss(self, module: Any, output: Any, call: Any) -> None:
        """The loss over the positions the language model kept: an llm(K) site shortens the sequence
        inside the decoder, so the logits come back shorter than the labels the caller gave. The
        labels are gathered at the kept positions (dropped slots ignored) and the model's own loss
        function is applied, as it would have been to a prompt that held only those positions."""
        labels = call.parts.pop("labels")
        kept = self.decoder.kept_positions(call)
        if kept is not None:
            index, dead = kept
            labels = labels.gather(1, index)
            if dead is not None:
                labels = labels.masked_fill(dead, -100)
        if not hasattr(output, "logits"):
            raise ValueError("labels with an llm(K) stage need return_dict=True (the default)")
        vocab = module.config.get_text_config().vocab_size
        output.loss = module.loss_function(logits=output.logits, labels=labels.to(output.logits.device),
                                           vocab_size=vocab)

    # --- a generate call ---------------------------------------------------------------------------
    def _original_generate(self) -> Callable:
        if self._had_generate:
            return self._saved_generate
        return type(self.model).generate.__get__(self.model)

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        original = self._original_generate()
        inputs = bind_arguments(type(self.model).generate, self.model, args, kwargs)
        if "inputs" in inputs:
            inputs["input_ids"] = inputs.pop("inputs")
        refuse_unsupported_generation(inputs)
        call = self.begin_call("generate")
        try:
            if not self._has_images(inputs):
                return original(**inputs)
            with torch.no_grad():  # generate() itself runs without gradients; so does its prefill here
                prepared = self.prepare(inputs, for_generate=True, call=call)
            if not wants_cache(self.model, inputs):
                # without a cache every step runs the whole sequence: generate gets the caller's text
                # alone, and _generate_step puts the prepared prompt in front of each step's new tokens
                if prepared.get("attention_mask") is None:
                    prepared["attention_mask"] = torch.ones_like(prepared["input_ids"])
                if prepared.get("position_ids") is None:
                    prepared["position_ids"] = mask_positions(prepared["attention_mask"])
                call.parts["recompute"] = (inputs["input_ids"].shape[1], prepared)
                text_only = {k: v for k, v in inputs.items() if k not in self.image_inputs and k != "position_ids"}
                return original(**text_only)
            original_ids = inputs["input_ids"]
            count_new_tokens_only(self.model, prepared, original_ids.shape[1])
            shrunk = prepared["input_ids"].shape[1]
            output = original(**prepared)
            return restore_prompt(output, original_ids, shrunk)
        finally:
            self.end_call(call)

    def _generate_step(self, call: Any, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A forward of our own generate without a cache: the whole sequence, the caller's prompt plus the
        tokens generated so far. The prompt runs exactly as it was prepared (its selection made once,
        before the first step), followed by the generated tokens, so the result equals cached generation."""
        recompute = call.parts.get("recompute")
        if recompute is None:
            return None
        length, prepared = recompute
        inputs = bind_arguments(type(module).forward, module, args, kwargs)
        ids = inputs["input_ids"]
        rows = ids.shape[0] // prepared["inputs_embeds"].shape[0]  # beams / returned sequences per prompt

        def prompt(name: str) -> Tensor:
            value = prepared[name]
            return value.repeat_interleave(rows, dim=-2 if name == "position_ids" and value.dim() == 3 else 0)

        new = ids[:, length:]
        call.parts["decoder_generated"] = new  # a decode site follows each sequence by its tokens
        out = {k: v for k, v in inputs.items() if k != "input_ids"}
        embeds = prompt("inputs_embeds")
        out["inputs_embeds"] = torch.cat([embeds, self.model.get_input_embeddings()(new).to(embeds.dtype)], dim=1)
        mask = inputs.get("attention_mask")
        generated_mask = torch.ones_like(new) if mask is None else mask[:, length:]
        prompt_mask = prompt("attention_mask")
        out["attention_mask"] = torch.cat([prompt_mask, generated_mask.to(prompt_mask.dtype)], dim=1)
        positions = prompt("position_ids")  # the generated tokens follow the prompt's last position
        step = torch.arange(1, new.shape[1] + 1, device=positions.device)
        out["position_ids"] = torch.cat([positions, positions[..., -1:] + step], dim=-1)
        for key in self.extra_sequence_inputs():
            if prepared.get(key) is not None:
                extra = prompt(key)
                out[key] = torch.cat([extra, extra.new_zeros(extra.shape[0], new.shape[1])], dim=-1)
        return (), out

    def _has_images(self, inputs: dict[str, Any]) -> bool:
        return any(inputs.get(key) is not None for key in self.image_inputs if key != "image_sizes")

    def prepare(self, inputs: dict[str, Any], for_generate: bool, call: Any) -> dict[str, Any]:
        """Encode the images, run the projector-site stages and shrink every per-position input."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("vtoken needs input_ids to locate the image tokens; pass input_ids, not inputs_embeds")
        projector = Site("projector")
        run_projector = projector in self.pipeline.sites
        wanted = self.pipeline.signals_at(projector) if run_projector else {}
        encoded = self.encode_images(inputs, wanted)
        texts = prompt_text(self.model, input_ids, inputs.get("attention_mask"), encoded) \
            if signals.PROMPT_TEXT in wanted else None
        pins: list[tuple[int, Tensor]] = []  # (unit, block slots) of the tokens the projector's stages pinned
        kept = self._run_projector(encoded, projector if run_projector else None, call.stats, texts, pins)

        embeds = self.model.get_input_embeddings()(input_ids).clone()
        seq_keep = torch.ones_like(input_ids, dtype=torch.bool)
        image_mask = torch.zeros_like(seq_keep)
        block_keep, block_values = assemble_blocks(encoded, kept)
        for token_id in dict.fromkeys(block.token_id for block in encoded.blocks):
            placeholders = input_ids == token_id
            mine = [i for i, block in enumerate(encoded.blocks) if block.token_id == token_id]
            keep_flat = torch.cat([block_keep[i] for i in mine])
            if int(placeholders.sum()) != keep_flat.numel():
                raise ValueError(
                    f"the prompt holds {int(placeholders.sum())} placeholder tokens (id {token_id}) but the visual "
                    f"inputs give {keep_flat.numel()} features; check that the processor and the model match"
                )
            seq_keep[placeholders] = keep_flat
            values = torch.cat([block_values[i][block_keep[i]] for i in mine])
            embeds[placeholders & seq_keep] = values.to(embeds.dtype)
            image_mask |= placeholders

        units = blocks_per_row(input_ids, encoded.blocks)
        out = {k: v for k, v in inputs.items() if k not in self.image_inputs and k != "input_ids"}
        mask = inputs.get("attention_mask")
        positions = self._positions(inputs, for_generate)
        if bool(seq_keep.all()):
            packing = None
            out.update(inputs_embeds=embeds, attention_mask=mask)
            visual = image_mask
            if positions is not None:
                out["position_ids"] = positions
        else:
            packing = pack_rows(seq_keep, mask)
            out["inputs_embeds"] = packing.gather(embeds)
            # always explicit: without a mask, models treat position ids with gaps as packed sequences
            out["attention_mask"] = packing.mask
            visual = packing.gather(image_mask, pad_value=False)
            if "labels" in inputs and inputs["labels"] is not None:
                out["labels"] = packing.gather(inputs["labels"], pad_value=-100)
            for key in self.extra_sequence_inputs():
                if inputs.get(key) is not None:
                    out[key] = gather_sequence(packing, inputs[key])
            if positions is not None:
                out["position_ids"] = gather_sequence(packing, positions, pad_value=0)
            else:
                compact = self.compact_positions(packing.mask, inputs, for_generate)
                if compact is not None:
                    out["position_ids"] = compact
        if out.get("position_ids") is None and padding_side(out.get("attention_mask")) == "left":
            # count positions from each row's first token, as generate does: signals that read absolute
            # positions (DART's rotated key norms) then see a row the same alone and in a padded batch
            out["position_ids"] = mask_positions(out["attention_mask"])
        if for_generate:
            pad = _pad_id(self.model, input_ids)
            out["input_ids"] = input_ids if packing is None else packing.gather(input_ids, pad_value=pad)
        self.after_prepare(out)
        if self.decoder is not None:
            if not for_generate and out.get("labels") is not None:
                call.parts["labels"] = out.pop("labels")  # the loss is taken after the decoder shrank the sequence
            self.decoder.expect_prefill(call, Prefill(visual=visual, units=units,
                                                      attention_mask=out.get("attention_mask")))
            if pins:  # the pins ride on the decoder-input positions to the llm(K) sites (the pinned signal)
                pinned = pinned_placeholders(input_ids, encoded, pins)
                call.parts["decoder"].pinned = pinned if packing is None else packing.gather(pinned, pad_value=False)
        return out

    def _run_projector(self, encoded: Encoded, site: Site | None, stats: Stats, texts: list[Tensor] | None = None,
                       pins: list[tuple[int, Tensor]] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per unit: the features that stay ``[K, D]`` and the block slots they go to ``[K]``.

        Units of the same size and grid (and instruction length, when ``texts`` holds each unit's
        ``prompt_text``) are selected together in one batch; stages treat rows independently, so this
        gives the same result as one unit at a time.
        """
        units = encoded.units
        if site is None:
            return [(u.features, u.slots()) for u in units]
        result: list[tuple[Tensor, Tensor] | None] = [None] * len(units)
        for i, unit in enumerate(units):
            if unit.budget == 0:  # a view whose share of a split budget is nothing
                result[i] = (unit.features[:0], unit.slots()[:0])
        keys = [None if unit.budget == 0 else (tuple(unit.features.shape), unit.grid, unit.budget,
                                               None if texts is None else texts[i].shape[0])
                for i, unit in enumerate(units)]

        def stacked(members: list[int]) -> TokenSet:
            return TokenSet(
                features=torch.stack([units[i].features for i in members]), grid=units[members[0]].grid,
                index=torch.stack([units[i].slots() for i in members]),
                signals={name: torch.stack([units[i].signals[name] for i in members])
                         for name in units[members[0]].signals},
                context={} if texts is None else {signals.PROMPT_TEXT: torch.stack([texts[i] for i in members])},
            )

        kept_record: list[Tensor | None] = [None] * len(units)
        merged_record: list[Tensor | None] = [None] * len(units)
        for members, after, keep in run_in_groups(self.pipeline, site, keys, stacked, stats, encoded.scoring_seconds,
                                                  total=lambda key: key[2]):
            counts = keep.kept_counts().tolist()  # an adaptive stage keeps a different count per unit
            for row, i in enumerate(members):
                result[i] = (after.features[row, :counts[row]], after.index[row, :counts[row]])
                kept_record[i] = after.index[row, :counts[row]]
                merged_record[i] = None if keep.assign is None else keep.assign[row]
                if pins is not None and after.pinned is not None:  # ``pins``: (unit, block slots) pinned here
                    pins.append((i, after.index[row][after.pinned[row]]))
        stats.kept[str(site)] = kept_record
        if any(m is not None for m in merged_record):
            stats.merged[str(site)] = merged_record
        return result

    def _positions(self, inputs: dict[str, Any], for_generate: bool) -> Tensor | None:
        """Original position ids to keep (positions='original'), or None to let the model count anew."""
        if self.settings["positions"] != "original":
            return None
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        return self.default_positions(inputs, for_generate)

def pinned_placeholders(input_ids: Tensor, encoded: Encoded, pins: list[tuple[int, Tensor]]) -> Tensor:
    """``[B, L]`` bool: the placeholders of the tokens pinned at the projector (``pins``: unit, block slots)."""
    marks = [torch.zeros(block.size, dtype=torch.bool, device=input_ids.device) for block in encoded.blocks]
    for unit, slots in pins:
        marks[encoded.units[unit].block][slots] = True
    pinned = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in dict.fromkeys(block.token_id for block in encoded.blocks):
        pinned[input_ids == token_id] = torch.cat([m for m, b in zip(marks, encoded.blocks) if b.token_id == token_id])
    return pinned


def _pad_id(model: Any, input_ids: Tensor) -> int:
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if pad is not None:
            return int(pad)
    return 0


