"""The zero-overhead oracle: what an implementation with free scoring and selection would cost.

The vision part runs on the pixels in full, as the method runs it (``Integration.run_vision``); the
language model and the LM head run on the exact input the wrapped model fed its language model
(captured once by a forward pre-hook). For ``llm(K)`` pipelines the decoder is pruned at layer K by a
fixed stage that replays the selection the method made (no signals, no selection work); for
``vision(L)`` pipelines the tower is, in the same way: it runs with the method's kept tokens from block L
on and computes no signal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from vtoken.stages.base import Stage
from vtoken.tokens import Keep, TokenSet

from .timing import prefill


def pre_llm_oracle(family: Any, inputs: dict[str, Any], lm_kwargs: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Vision + projector on the pixels; then the language model and LM head on the captured input.
    ``family``: the model's integration (``Integration.for_model``)."""
    model, lm = family.model, family.language_model()

    def vision() -> Any:
        return family.run_vision(inputs)

    def llm() -> Any:
        return run_language_model(model, lm, lm_kwargs)

    return {"vision": vision, "llm": llm}


def llm_oracle(family: Any, inputs: dict[str, Any], lm_kwargs: dict[str, Any], call: Any, kept: dict[str, list],
               llm_sites: list) -> dict[str, Callable[[], Any]]:
    """As the pre-LLM oracle, with the decoder pruned at llm(K) by a fixed stage replaying the
    selection the method made: the deeper layers see exactly the method's tokens, and no signal is
    computed and nothing is selected. Its decoder hooks stay installed next to the method's for the
    timing (each set is inert outside its own calls); ``remove`` takes them away.

    call: the decoder's record of the method's prefill; kept: the kept positions per site (``stats.kept``)."""
    import vtoken
    from vtoken.calls import CallKey
    from vtoken.integrations.decoder import DecoderSites
    from vtoken.integrations.hf_vlm import Prefill

    if call is None:
        raise RuntimeError("the llm(K) site recorded no prefill; cannot build its oracle")
    visual, units, mask = call.visual, call.units, call.attention_mask
    fixed = replay_stages(kept, llm_sites, units_per_row=max(int(units.max()), 1))
    model, lm = family.model, family.language_model()
    sites = DecoderSites(vtoken.Pipeline(fixed), llm_sites, CallKey(), language_model=lm)

    def vision() -> Any:
        return family.run_vision(inputs)

    def llm() -> Any:
        with sites.prefill_scope(Prefill(visual=visual, units=units, attention_mask=mask)):
            return run_language_model(model, lm, lm_kwargs)

    return {"vision": vision, "llm": llm, "remove": sites.remove}


def vision_oracle(family: Any, inputs: dict[str, Any], lm_kwargs: dict[str, Any], kept: dict[str, list],
                  vision_sites: list, method: Any) -> dict[str, Any]:
    """A pipeline of ``vision(L)`` sites only: the vision part runs on the model wrapped with fixed stages
    that replay, at each site, the positions the method kept there (the encoder from block L on sees
    exactly the method's tokens; nothing is scored or selected); the language model and LM head run on
    the captured input. ``around`` swaps the method's wrap for the fixed one around each vision run,
    outside the timed part. ``method``: a context-manager factory that re-wraps the model as the method
    (the bench's ``unpruned``)."""
    import vtoken

    fixed = vtoken.Pipeline(replay_stages(kept, vision_sites))
    model, lm = family.model, family.language_model()

    @contextlib.contextmanager
    def replayed() -> Iterator[None]:
        with method():  # the method's hooks off ...
            vtoken.wrap(model, fixed)  # ... the replay's on
            try:
                yield
            finally:
                vtoken.unwrap(model)

    def vision() -> Any:  # the replay's integration: its sites run the tower as the method's did
        return model.vtoken.integration.run_vision(inputs)

    def llm() -> Any:
        return run_language_model(model, lm, lm_kwargs)

    return {"vision": vision, "llm": llm, "around_vision": replayed}


def replay_stages(kept: dict[str, list], sites: list, units_per_row: int = 1) -> list["FixedKeep"]:
    """One fixed stage per site replaying the positions the method kept there (``stats.kept``: one entry
    per row); its budget is per unit, so a row holding ``units_per_row`` images divides its count."""
    stages = []
    for site in sites:
        indices = kept.get(str(site))
        if not indices or any(i is None for i in indices):
            raise RuntimeError(f"no kept positions recorded at {site}")
        rows = torch.stack(list(indices))
        stages.append(FixedKeep(keep=int(rows.shape[1]) // units_per_row, site=str(site), indices=rows))
    return stages


def run_language_model(model: Any, lm: torch.nn.Module, lm_kwargs: dict[str, Any]) -> Tensor:
    """The language model on captured inputs, fresh cache, then the LM head on the last position:
    logits ``[B, 1, V]`` (the prefill of ``generate()``)."""
    kwargs = dict(lm_kwargs)
    kwargs.pop("past_key_values", None)  # a fresh cache: the language model makes one (named ``cache``
    kwargs.pop("cache", None)  # from transformers 5.24 on)
    kwargs["use_cache"] = True
    with torch.no_grad():
        hidden = lm(**kwargs).last_hidden_state
        return model.get_output_embeddings()(hidden[:, -1:])


@dataclass
class FixedKeep(Stage):
    """Keeps positions chosen in advance (the oracle's selection): ``indices`` ``[B, k]`` per row."""

    indices: Any = None

    name: ClassVar[str] = "fixed"
    site_kinds: ClassVar[tuple[str, ...]] = ("vision", "projector", "llm")
    default_site: ClassVar[str | None] = "projector"

    def select(self, tokens: TokenSet, k: int) -> Keep:
        indices = self.indices.to(tokens.features.device)
        if indices.shape != (tokens.batch_size, k):
            raise RuntimeError(f"fixed selection holds {tuple(indices.shape)} positions; the site asks for "
                               f"{(tokens.batch_size, k)}")
        return Keep(indices=indices)


class LMInputs:
    """Records the keyword arguments of the next call of the language model (its prefill) in ``kwargs``;
    ``remove()`` takes the hook away."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.kwargs: dict[str, Any] = {}
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self.kwargs:
            self.kwargs = dict(kwargs)
            if args:
                self.kwargs["input_ids"] = args[0]

    def remove(self) -> None:
        self.handle.remove()


def oracle_inputs(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the (wrapped or not) model feeds its language model for ``inputs``: the oracle's input."""
    from vtoken.integrations.base import Integration

    seen = LMInputs(Integration.for_model(model).language_model())
    try:
        with torch.no_grad():
            prefill(model, inputs)
    finally:
        seen.remove()
    return seen.kwargs
