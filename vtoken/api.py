"""The user's API: wrap a loaded model in place, unwrap it, or wrap it for a ``with`` block."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from .pipeline import Pipeline, build_named, stages_from_names
from .registry import INTEGRATIONS, PIPELINES, list_models, load_builtin_integrations
from .stages.base import Stage
from .stats import Stats

ATTRIBUTE = "vtoken"


@dataclass
class WrapState:
    """What ``vtoken.wrap`` attached to a model, as ``model.vtoken``."""

    pipeline: Pipeline
    integration: Any

    @property
    def stats(self) -> Stats:
        """Tokens in/out and time per stage of the last call that finished (any thread)."""
        return self.integration.stats

    def __repr__(self) -> str:
        return f"vtoken({self.pipeline.describe()} on {self.integration.name}, keep={self.pipeline.keep!r})"


def wrap(model: Any, method: "str | Stage | Pipeline", keep: int | float | None = None, **options: Any) -> Any:
    """Make ``model`` run with fewer visual tokens, in place; returns the model.

    method:  a registered name (``vtoken.list_methods()``), ``"a+b"`` for a pipeline, a Stage, or a
             ``vtoken.Pipeline``.
    keep:    tokens per image (int) or fraction of the tokens (float in (0, 1]); stages may override it.
    options: stage options (applied to every stage that has them, or ``stage_name={...}`` for one stage)
             and integration options (e.g. ``positions="original"``).
    """
    if hasattr(model, ATTRIBUTE):
        raise ValueError(f"this model is already wrapped ({getattr(model, ATTRIBUTE)!r}); "
                         "call vtoken.unwrap(model) first")
    integration_cls = find_integration(model)
    integration_options = {name: options.pop(name) for name in list(options) if name in integration_cls.options}
    pipeline = build_pipeline(method, keep, options, integration_options=sorted(integration_cls.options))
    pipeline.check_budgets()
    pipeline.check_grids()
    integration = integration_cls(model, pipeline, **integration_options)
    integration.install()
    setattr(model, ATTRIBUTE, WrapState(pipeline=integration.pipeline, integration=integration))
    return model


def unwrap(model: Any) -> Any:
    """Remove everything ``wrap`` installed; the model is exactly the original again. Returns it."""
    state = getattr(model, ATTRIBUTE, None)
    if not isinstance(state, WrapState):
        raise ValueError("this model is not wrapped by vtoken (no model.vtoken); nothing to unwrap")
    state.integration.remove()
    delattr(model, ATTRIBUTE)
    return model


@contextlib.contextmanager
def wrapped(model: Any, method: "str | Stage | Pipeline", keep: int | float | None = None,
            **options: Any) -> Iterator[Any]:
    """``with vtoken.wrapped(model, "dart", keep=64): ...`` wraps for the block and unwraps after it."""
    wrap(model, method, keep=keep, **options)
    try:
        yield model
    finally:
        unwrap(model)


def find_integration(model: Any) -> type:
    load_builtin_integrations()
    for integration in INTEGRATIONS.values():
        if integration.matches(model):
            return integration
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ValueError(
        f"vtoken has no integration for {type(model).__name__} (model type {model_type!r}); "
        f"supported: {', '.join(list_models())}"
    )


def build_pipeline(method: "str | Stage | Pipeline", keep: int | float | None, options: dict[str, Any],
                   integration_options: list[str] | None = None) -> Pipeline:
    """Turn a method spec and options into a Pipeline of stage objects of its own.

    A string spec is ``name``, ``name@site`` or several joined by ``+`` (``"fastv@llm(2)"``,
    ``"cls_attn+kcenter"``): the grammar of ``vtoken bench --methods`` and ``vtoken eval --methods``.
    Stage and Pipeline objects are copied, so the caller's objects are never changed by ``wrap``.
    """
    options = dict(options)
    if isinstance(method, Pipeline):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be combined with a Pipeline object; "
                             "set them on its stages")
        return method.with_keep(keep).copy()
    if isinstance(method, Stage):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be combined with a Stage object; set them on it")
        return Pipeline([method], keep).copy()
    if not isinstance(method, str) or not method.strip():
        raise TypeError(f"method must be a registered name, 'a+b', 'name@site', a Stage or a Pipeline; got {method!r}")
    if method.strip() in PIPELINES:  # a named pipeline: its stages, keep split by its factors
        return build_named(method.strip(), keep, options, build_pipeline)
    parts = [split_site(part, method) for part in method.split("+")]
    names = [name for name, _ in parts]
    classes = stages_from_names(names)
    per_stage = {name: options.pop(name) for name in names if isinstance(options.get(name), dict)}
    used: set[str] = set()
    stages = []
    for (name, site), cls in zip(parts, classes):
        accepted = set(cls.option_names())
        kwargs = {key: value for key, value in options.items() if key in accepted}
        used.update(kwargs)
        own = per_stage.get(name, {})
        unknown = set(own) - accepted
        if unknown:
            raise ValueError(f"stage {name} has no option(s) {sorted(unknown)}; accepted: {sorted(accepted)}")
        kwargs.update(own)
        if site is not None:
            if kwargs.get("site") is not None or kwargs.get("layer") is not None:
                raise ValueError(f"{name}@{site} already names its site; drop the site=/layer= option for it")
            kwargs["site"] = site
        stages.append(cls(**kwargs))
    unused = set(options) - used
    if unused:
        accepted = sorted({opt for cls in classes for opt in cls.option_names()})
        extra = f"; the model's integration accepts: {integration_options}" if integration_options else ""
        raise ValueError(f"unknown option(s) {sorted(unused)} for {method!r}; the stages accept: {accepted}{extra}")
    return Pipeline(stages, keep)


def split_site(part: str, spec: str) -> tuple[str, str | None]:
    """``"dart@llm(2)"`` -> ``("dart", "llm(2)")``; ``"dart"`` -> ``("dart", None)``."""
    name, at, site = part.partition("@")
    name = name.strip()
    if at and not site.strip():
        raise ValueError(f"{part.strip()!r} in {spec!r} has '@' but no site; write e.g. 'dart@llm(2)', "
                         "'kcenter@projector' or 'pixel_shuffle@vision(1)'")
    return name, (site.strip() if at else None)

