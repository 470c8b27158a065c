"""Registries of stages and integrations. Built-ins register with the same decorators as third parties."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from .stages.base import Stage

T = TypeVar("T")

STAGES: dict[str, type["Stage"]] = {}
INTEGRATIONS: dict[str, type] = {}


@dataclass(frozen=True)
class NamedPipeline:
    """A method that is a pipeline of registered stages under one name (``vtoken.wrap(model, name)``).

    spec:     the stages, ``"a@site+b@site"``; a user's ``b={"site": ...}`` replaces b's site.
    factors:  each stage's budget as a multiple of the user's ``keep`` (the count after the last stage),
              non-increasing, the last 1 (see ``vtoken.budget.scaled_budgets``).
    depths:   per stage, None or a share of the model's decoder depth: that stage's ``llm(K)`` becomes
              ``llm(round(share * layers))`` of the wrapped model (the spec's K is the full-size default).
    """

    spec: str
    factors: tuple[float, ...]
    depths: tuple[float | None, ...] = ()


PIPELINES: dict[str, NamedPipeline] = {}


def register_stage(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a Stage available as ``vtoken.wrap(model, name)``. The class becomes a
    dataclass (its annotated fields are the stage's options) unless it already is one."""
    if "+" in name or "@" in name or not name.isidentifier():
        raise ValueError(f"stage name {name!r} must be an identifier (no '+' or '@': they join a method spec)")
    register = _registrar(STAGES, "stage", name)

    def as_dataclass(cls: type[T]) -> type[T]:
        # a subclass that is not decorated itself would silently keep its parent's fields and __init__
        return register(cls if "__dataclass_fields__" in cls.__dict__ else dataclass(cls))
    return as_dataclass


def register_pipeline(name: str, spec: str, factors: tuple[float, ...],
                      depths: tuple[float | None, ...] = ()) -> None:
    """Register ``spec`` (registered stages joined by '+') as the method ``name``, each stage keeping
    ``factors[i]`` times the user's ``keep``: ``register_pipeline("vscan", "vscan_scan+fastv@llm(16)", (3, 1),
    depths=(None, 0.5))`` (``depths``: see ``NamedPipeline``)."""
    if "+" in name or "@" in name or not name.isidentifier():
        raise ValueError(f"pipeline name {name!r} must be an identifier (no '+' or '@': they join a method spec)")
    factors = tuple(float(f) for f in factors)
    if len(factors) != len(spec.split("+")):
        raise ValueError(f"pipeline {name!r}: {len(factors)} budget factor(s) for the {len(spec.split('+'))} "
                         f"stage(s) of {spec!r}; give one per stage")
    if factors[-1] != 1.0 or any(a < b for a, b in zip(factors, factors[1:])):
        raise ValueError(f"pipeline {name!r}: factors {factors} must not increase and must end with 1 "
                         "(the last stage keeps the user's keep)")
    depths = tuple(depths)
    if depths and (len(depths) != len(factors) or not all(d is None or 0.0 < d < 1.0 for d in depths)):
        raise ValueError(f"pipeline {name!r}: depths {depths} need one entry per stage, each None or in (0, 1)")
    named = NamedPipeline(spec, factors, depths)
    if name in STAGES or (name in PIPELINES and PIPELINES[name] != named):
        raise ValueError(f"a method named {name!r} is already registered")
    PIPELINES[name] = named


def register_integration(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register an Integration (it says itself which models it ``matches``)."""
    return _registrar(INTEGRATIONS, "integration", name)


def _registrar(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorator(cls: type[T]) -> type[T]:
        if table is STAGES and name in PIPELINES:
            raise ValueError(f"a pipeline named {name!r} is already registered")
        if name in table and table[name] is not cls:
            raise ValueError(f"a {kind} named {name!r} is already registered ({table[name].__qualname__})")
        cls.name = name
        table[name] = cls
        return cls

    return decorator


def load_builtin_integrations() -> None:
    """Import the built-in integrations (they import transformers, so only when a model is wrapped)."""
    importlib.import_module("vtoken.integrations")


def list_methods() -> list[str]:
    """Names of the registered stages and named pipelines; combine stages with '+' into a pipeline."""
    return sorted({*STAGES, *PIPELINES})


def list_models() -> list[str]:
    """Model families the registered integrations support (e.g. Hugging Face ``model_type`` values)."""
    load_builtin_integrations()
    names: set[str] = set()
    for integration in INTEGRATIONS.values():
        names.update(integration.model_types)
    return sorted(names)
