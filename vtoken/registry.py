"""Registries of stages and integrations. Built-ins register with the same decorators as third parties."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from .stages.base import Stage

T = TypeVar("T")

STAGES: dict[str, type["Stage"]] = {}
INTEGRATIONS: dict[str, type] = {}


def register_stage(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a Stage available as ``vtoken.wrap(model, name)``."""
    if "+" in name or "@" in name or not name.isidentifier():
        raise ValueError(f"stage name {name!r} must be an identifier (no '+' or '@': they join a method spec)")
    return _registrar(STAGES, "stage", name)


def register_integration(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register an Integration (it says itself which models it ``matches``)."""
    return _registrar(INTEGRATIONS, "integration", name)


def _registrar(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorator(cls: type[T]) -> type[T]:
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
    """Names of the registered stages; combine them with '+' into a pipeline."""
    return sorted(STAGES)


def list_models() -> list[str]:
    """Model families the registered integrations support (e.g. Hugging Face ``model_type`` values)."""
    load_builtin_integrations()
    names: set[str] = set()
    for integration in INTEGRATIONS.values():
        names.update(integration.model_types)
    return sorted(names)
