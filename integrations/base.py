"""The integration contract.

An Integration knows one model family's layout. At ``wrap`` it checks the pipeline against the model
(sites, layer ranges, the signals each site provides), installs hooks at those sites, computes the
signals the stages ask for (through ``vtoken.kernels``) and applies each Keep to the model's tensors.
``remove`` takes every hook away again.

Everything one call computes lives in that call (``vtoken.calls``): the integration object only holds
what ``wrap`` decided, so one wrapped model serves several threads, and ``copy.deepcopy`` of a wrapped
model gives an independent wrapped model. Pickling is refused with a message (hooks are not data).
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from vtoken import calls, signals
from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import Stats


class HookSet:
    """Hook handles installed by one owner: add them as they are made, remove them all at once."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        self.handles.append(handle)
        return handle

    def remove_all(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []


@contextmanager
def removed_on_failure(owner: Any) -> Iterator[None]:
    """Installing hooks: if anything fails half-way, ``owner.remove()`` takes back what was put in place,
    so a refused or failed wrap leaves no trace, and the error goes on."""
    try:
        yield
    except BaseException:
        owner.remove()
        raise


class SiteHooks:
    """The hooks of one kind of site in one model. Every kind is built the same way: the wrap's pipeline,
    its sites of this kind, the integration's call key (``vtoken.calls``), and how the integration ends
    (and publishes the stats of) a call that the hooked part ran alone in; then the model part it hooks,
    by keyword. ``remove`` takes every hook away."""

    def __init__(self, pipeline: Pipeline, sites: list[Site], key: calls.CallKey,
                 end_call: Callable[[calls.Call], None] | None = None) -> None:
        self.pipeline, self.key = pipeline, key
        self.end_call = end_call if end_call is not None else partial(calls.end, key)
        self.sites = {site.layer: site for site in sites}
        self.hooks = HookSet()

    def remove(self) -> None:
        self.hooks.remove_all()


class Integration:
    name: ClassVar[str] = ""
    #: model types (``model.config.model_type``) this integration handles
    model_types: ClassVar[tuple[str, ...]] = ()
    #: integration options accepted by ``vtoken.wrap`` with their defaults
    options: ClassVar[dict[str, Any]] = {}
    #: what the image stands for in a chat message's text (``{image}``: the processor's image token)
    chat_content: ClassVar[str] = "{image}\n{question}"
    #: why a site kind this family lacks cannot be offered, for the refusal's message (kind -> reason)
    unsupported_sites: ClassVar[dict[str, str]] = {}
    #: the signals each site kind provides (``vtoken.signals``); refine per model in ``provided_signals``
    site_signals: ClassVar[dict[str, frozenset[str]]] = {}

    @classmethod
    def matches(cls, model: Any) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    def __init__(self, model: Any, pipeline: Pipeline, **options: Any) -> None:
        self.model = model
        self.pipeline = pipeline
        self.settings = {**self.options, **options}
        #: the stats of the last call that finished (``model.vtoken.stats``)
        self.stats = Stats()
        #: the last call that finished, for tools that inspect it (the bench's oracle)
        self.last_call: calls.Call | None = None
        self.hooks = HookSet()
        self.key = calls.CallKey()

    # --- naming ----------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """The model's own family name for messages (its ``model_type``, e.g. 'qwen2_5_vl')."""
        return str(getattr(getattr(self.model, "config", None), "model_type", None) or self.name)

    # --- per-call state --------------------------------------------------------------------------
    def current_call(self) -> calls.Call | None:
        return calls.current(self.key)

    def begin_call(self, kind: str) -> calls.Call:
        return calls.begin(self.key, calls.Call(kind=kind))

    def end_call(self, call: calls.Call) -> None:
        calls.end(self.key, call)
        self.last_call = call
        self.stats = call.stats  # one assignment: readers see the old or the new stats, never a mix

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError("a model wrapped by vtoken cannot be pickled (its hooks are code, not data): call "
                        "vtoken.unwrap(model) first and wrap it again after loading; model.state_dict() "
                        "saves as usual while wrapped")

    def __deepcopy__(self, memo: dict) -> "Integration":
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            setattr(twin, name, copy.deepcopy(value, memo))
        return twin

    # --- the model's sites -----------------------------------------------------------------------
    def site_layers(self) -> dict[str, int]:
        """Number of layers at each layered site kind (``vision``, ``llm``): negative layers count
        back from it."""
        raise NotImplementedError

    def layer_range(self, kind: str) -> range:
        """The layers where a ``kind`` site may run (default: 0.. for vision, 1.. for llm, up to the count)."""
        return range(1 if kind == "llm" else 0, self.site_layers()[kind])

    def supported_site_kinds(self) -> tuple[str, ...]:
        raise NotImplementedError

    def provided_signals(self, site: Site) -> frozenset[str]:
        """The signals this model computes at ``site``."""
        if site.kind == "decode":  # computed by the decoder's own hooks (integrations/decoder.py)
            return signals.DECODE
        return self.site_signals.get(site.kind, frozenset())

    def site_kinds(self) -> tuple[str, ...]:
        """``supported_site_kinds()`` plus ``decode`` wherever ``llm`` is offered: both run in the decoder's
        hooks (``integrations/decoder.py``), so a family with ``llm(K)`` has the decode site too."""
        kinds = self.supported_site_kinds()
        return (*kinds, "decode") if "llm" in kinds and "decode" not in kinds else kinds

    def check_pipeline(self) -> None:
        """Resolve negative layers and refuse, naming the accepted values, sites the model does not
        have and signals a site does not provide. Called by ``install`` before any hook exists."""
        self.pipeline = self.pipeline.resolved(self.site_layers())
        kinds = self.site_kinds()
        accepted = self.describe_sites()
        for stage in self.pipeline.stages:
            site: Site = stage.site
            if site.kind not in kinds:
                reason = self.unsupported_sites.get(site.kind)
                because = f": {reason}" if reason else ""
                raise ValueError(f"{self.family} has no {site.kind} site for stage {stage.name}{because}; "
                                 f"accepted: {accepted}")
            if site.layer is not None and site.layer not in self.layer_range(site.kind):
                raise ValueError(f"{site} does not exist in this {self.family} model; accepted: {accepted}")
        for site in self.pipeline.sites:
            needed = set(self.pipeline.signals_at(site))
            offered = self.provided_signals(site)
            missing = needed - offered
            if missing:
                names = ", ".join(stage.name for stage in self.pipeline.stages_at(site))
                raise ValueError(
                    f"{names} at {site} need(s) the signal(s) {signals.describe(missing)}, which {self.family} "
                    f"does not provide there; {site} provides: {signals.describe(offered) or 'no signals'}"
                )
            self.check_signal_options(site, self.pipeline.signals_at(site))

    def check_signal_options(self, site: Site, wanted: dict[str, dict]) -> None:
        """Refuse at ``wrap`` signal parameters this model cannot honour (e.g. a ``cls_attn`` layer its
        tower does not have), rather than on the first call; by default there is nothing to check."""

    def describe_sites(self) -> str:
        parts = []
        for kind in self.site_kinds():
            if kind in ("projector", "decode"):
                parts.append("decode or decode(n)" if kind == "decode" else kind)
                continue
            layers = self.layer_range(kind)
            letter = "K" if kind == "llm" else "L"
            if len(layers) == 0:
                parts.append(f"no {kind}({letter}) site (this model has {self.site_layers()[kind]} {kind} layer(s))")
            else:
                note = self.layer_note(kind)
                note = f" ({note})" if note else ""
                parts.append(f"{kind}({letter}) with {layers.start} <= {letter} < {layers.stop}{note}")
        return ", ".join(parts)

    def layer_note(self, kind: str) -> str:
        """Why ``layer_range(kind)`` stops where it does, when that is not the model's depth."""
        return ""

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    # --- what bench, FLOPs and the demo ask a family ---
    # These read the model and run parts of it; none installs a hook. Ask them through ``for_model``,
    # on a wrapped model or not: the bench, ``vtoken.flops`` and the demo hold no family knowledge.
    @classmethod
    def for_model(cls, model: Any, **options: Any) -> "Integration":
        """The integration ``vtoken.wrap`` would pick for ``model`` (the first registered one that
        matches it), built with no pipeline (``pipeline`` is None) and no hooks, to answer the questions
        below. ``options``: integration options, as ``vtoken.wrap`` takes them (defaults otherwise)."""
        from vtoken.api import find_integration

        return find_integration(model)(model, None, **options)

    def plain_prompt(self) -> tuple[str, str] | None:
        """The family's documented plain prompt, for the demo when the processor has no usable chat
        template: (a name for messages, a template with ``{image}`` and ``{question}``); None: none."""
        return None

    def _lacks(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"the {self.name or type(self).__name__} integration ({self.family}) does "
                                   f"not provide {what}")

    def language_model(self) -> Any:
        """The decoder module the ``llm(K)`` site hooks: called with the embeddings the model feeds it,
        it returns the last hidden states (the bench's oracle runs it alone)."""
        raise self._lacks("its language model")

    def model_dims(self) -> Any:
        """The model's dimensions for ``vtoken.flops`` (a ``vtoken.flops.ModelDims``), read from its config."""
        raise self._lacks("model dimensions for FLOPs")

    def synthetic_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                         visual_tokens: int | None = None) -> dict[str, Any]:
        """Model inputs for the bench: ``batch`` identical rows, each one image of random pixels
        (``dtype``) and ``text_tokens`` random text ids around its placeholders, on ``device``; the same
        for the same ``seed``. ``visual_tokens``: the image's visual-token count where the family can set
        it (through the image size), None for the family's usual count; a count it cannot give raises
        ValueError naming the ones it can."""
        raise self._lacks("synthetic inputs for the bench")

    def visual_counts(self, inputs: dict[str, Any]) -> Any:
        """What the visual part of one sample of ``inputs`` holds (every row alike, as the bench's rows
        are): images per sample, patches per image entering the vision tower, visual tokens per image in
        the language model's input, as a ``vtoken.flops.VisualCounts``."""
        raise self._lacks("the visual token counts of its inputs")

    def run_vision(self, inputs: dict[str, Any]) -> Any:
        """The vision part alone (encoder and projector, as the unwrapped model runs them) on the images of
        ``inputs``, without gradients; returns the projector's output."""
        raise self._lacks("a way to run its vision part alone")

    def tokens_per_image(self) -> int | None:
        """Visual tokens every image gives when the count does not depend on the image (a fixed-size
        encoder, such as LLaVA-1.5's 576), None when it does."""
        raise self._lacks("its visual tokens per image")

    def unit_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int] | None]:
        """For each visual unit of ``inputs`` (the budget unit: an image, or a view, clip or frame), in
        placeholder order: the (rows, columns) grid its visual tokens form at the projector, row-major,
        or None where they form no single grid."""
        raise self._lacks("the patch grids of its visual units")

    def overlay_view(self, image: Any, processor: Any) -> Any:
        """The part of ``image`` (a PIL image) that a unit's grid covers once ``processor`` has prepared
        it (resized, cropped): what the demo draws the kept tokens over."""
        raise self._lacks("the image region its patch grid covers")

    def placeholder_prompt(self, placeholders: int, text_tokens: int, batch: int, generator: Any, device: Any,
                           avoid: Any = ()) -> Any:
        """A LLaVA-style synthetic prompt ``[batch, L]``: ``<bos>``, half of ``text_tokens - 1`` random ordinary
        ids, ``placeholders`` image tokens, the other half (no id of ``avoid`` among the random ones)."""
        text_config = self.model.config.text_config
        image = self.image_token_id()
        bos = getattr(text_config, "bos_token_id", None)
        bos = 1 if bos is None else int(bos)
        text = self.random_text_ids(int(text_config.vocab_size), text_tokens - 1, generator, avoid=[image, bos, *avoid])
        ids = [bos] + text[:len(text) // 2] + [image] * placeholders + text[len(text) // 2:]
        return torch.tensor([ids] * batch, device=device)

    @staticmethod
    def random_text_ids(vocab: int, count: int, generator: Any, avoid: Any = ()) -> list[int]:
        """``count`` random ordinary token ids below ``vocab`` (none of ``avoid``), for synthetic prompts."""
        import torch

        low, high = min(100, vocab // 4), min(vocab, 30000)
        ids = torch.randint(low, high, (count * 2,), generator=generator).tolist()
        skip = set(avoid)
        return [i for i in ids if i not in skip][:count]


@contextmanager
def captured_inputs(layers: Any, wanted: Any, *extra: Any) -> Iterator[dict[int, Tensor]]:
    """Inside, a forward of this thread stores the input of each wanted layer (``layers[i]``, each index once)
    in the dict it yields; on the way out, also when the forward raises, those hooks and the ``extra``
    handles are removed."""
    captured: dict[int, Tensor] = {}
    handles = [layers[i].register_forward_pre_hook(capture_in_this_thread(captured, i), with_kwargs=True)
               for i in dict.fromkeys(wanted)]
    try:
        yield captured
    finally:
        for handle in [*handles, *extra]:
            handle.remove()


def capture_in_this_thread(store: dict[int, Tensor], index: int):
    """A forward pre-hook storing a layer's input in ``store[index]``, only for forwards of the thread that
    made it: the hook sits on a module every thread shares, and another thread's images must not land in
    this call's store."""
    owner = threading.get_ident()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() == owner:
            store[index] = args[0] if args else kwargs["hidden_states"]

    return hook
