"""The ``llm(K)`` site (placeholder until the in-decoder machinery lands)."""

from __future__ import annotations


class DecoderSites:
    def __init__(self, integration, language_model, sites) -> None:
        raise ValueError("the llm(K) site is not available yet")
