"""The integration contract.

An Integration knows one model family's layout. It checks that the pipeline's sites exist in the model,
installs hooks at those sites, computes the signals the stages ask for (through ``vtoken.kernels``), and
applies each Keep to the model's tensors. ``remove`` takes every hook away again.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import Stats


class Integration:
    name: ClassVar[str] = ""
    #: model types (``model.config.model_type``) this integration handles
    model_types: ClassVar[tuple[str, ...]] = ()
    #: integration options accepted by ``vtoken.wrap`` with their defaults
    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def matches(cls, model: Any) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    def __init__(self, model: Any, pipeline: Pipeline, stats: Stats, **options: Any) -> None:
        self.model = model
        self.pipeline = pipeline
        self.stats = stats
        self.settings = {**self.options, **options}

    def site_layers(self) -> dict[str, int]:
        """Number of layers at each layered site kind (``vision``, ``llm``) this model offers."""
        raise NotImplementedError

    def supported_site_kinds(self) -> tuple[str, ...]:
        raise NotImplementedError

    def check_sites(self) -> None:
        """Resolve negative layers and refuse sites the model does not have, naming the accepted ones."""
        layers = self.site_layers()
        self.pipeline.resolve_sites(layers)
        kinds = self.supported_site_kinds()
        accepted = ", ".join(_describe(kind, layers.get(kind)) for kind in kinds)
        for stage in self.pipeline.stages:
            site: Site = stage.site
            if site.kind not in kinds:
                raise ValueError(f"{self.name} has no {site.kind} site for stage {stage.name}; accepted: {accepted}")
            limit = layers.get(site.kind)
            if site.layer is not None and not (_lowest(site.kind) <= site.layer < limit):
                raise ValueError(f"{site} does not exist in this {self.name} model; accepted: {accepted}")

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


def _lowest(kind: str) -> int:
    return 1 if kind == "llm" else 0


def _describe(kind: str, layers: int | None) -> str:
    if kind == "projector":
        return "projector"
    if kind == "llm":
        return f"llm(K) with 1 <= K < {layers}"
    return f"vision(L) with 0 <= L < {layers}"
