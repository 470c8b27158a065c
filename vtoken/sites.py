"""Sites: the places in a vision-language model where a stage can run.

- ``vision(L)``: after vision-encoder layer L (0-based; negative counts from the end).
- ``projector``: after the multimodal projector, before the language model.
- ``llm(K)``: after the first K decoder layers of the language model (layers 0..K-1 see every token,
  layers K.. see only the kept ones). FastV and DART call this "pruning after layer K".
- ``decode`` / ``decode(n)``: while generating, after every n-th cached decoding step (``decode`` is
  ``decode(1)``): the stages choose, from that step's signals, which visual entries of the KV cache the
  following steps keep; the others are removed from the cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SITE_KINDS = ("vision", "projector", "llm", "decode")
_PATTERN = re.compile(r"^\s*(vision|projector|llm|decode)\s*(?:\(\s*(-?\d+)\s*\))?\s*$")
#: the accepted forms, for messages
FORMS = "'vision(L)', 'projector', 'llm(K)', 'decode' or 'decode(n)'"


@dataclass(frozen=True)
class Site:
    """Where a stage runs: ``kind`` is one of SITE_KINDS; ``layer`` is set for vision and llm sites;
    ``every`` is the decode site's interval in decoding steps."""

    kind: str
    layer: int | None = None
    every: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; accepted: {', '.join(SITE_KINDS)}")
        if self.kind in ("projector", "decode") and self.layer is not None:
            raise ValueError(f"the {self.kind} site takes no layer: write '{self.kind}'")
        if self.every < 1 or (self.every != 1 and self.kind != "decode"):
            raise ValueError(f"decode(n) needs n >= 1 (a choice every n decoding steps); got {self.every}"
                             if self.kind == "decode" else f"only the decode site takes an interval, not {self.kind}")
        if self.kind not in ("projector", "decode") and self.layer is None:
            raise ValueError(f"the {self.kind} site needs a layer, e.g. '{self.kind}(2)'")
        if self.kind == "llm" and self.layer < 1:
            raise ValueError(f"llm(K) needs K >= 1 (prune after the first K decoder layers); got {self.layer}")

    @classmethod
    def parse(cls, spec: "str | Site") -> "Site":
        """Parse ``'vision(12)'``, ``'projector'``, ``'llm(2)'``, ``'decode'`` or ``'decode(4)'``."""
        if isinstance(spec, Site):
            return spec
        match = _PATTERN.match(str(spec))
        if not match:
            raise ValueError(f"cannot parse site {spec!r}; accepted forms: {FORMS}")
        kind, layer = match.group(1), match.group(2)
        if kind == "decode":
            return cls(kind, every=1 if layer is None else int(layer))
        return cls(kind, None if layer is None else int(layer))

    def sort_key(self) -> tuple[int, int]:
        """Order of execution in a forward pass. Negative vision layers sort by themselves; an
        integration resolves them to absolute layers before running (see ``resolved``)."""
        return (SITE_KINDS.index(self.kind), self.layer if self.layer is not None else 0)

    def resolved(self, num_layers: int) -> "Site":
        """The same site with a negative layer turned into an absolute one."""
        if self.layer is None or self.layer >= 0:
            return self
        return Site(self.kind, num_layers + self.layer)

    def __str__(self) -> str:
        if self.kind == "decode":
            return "decode" if self.every == 1 else f"decode({self.every})"
        return self.kind if self.layer is None else f"{self.kind}({self.layer})"
