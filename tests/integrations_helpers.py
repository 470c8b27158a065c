"""Small helpers shared by integration tests."""

from __future__ import annotations

import torch


def lm_image_tokens(model, batch) -> list[int]:
    """Run a forward and return, per row, how many non-text positions the language model received
    (its attended length minus the row's text tokens)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    image_token = model.config.image_token_id
    text = ((batch["input_ids"] != image_token) & batch["attention_mask"].bool()).sum(1)
    return (seen[0].sum(1) - text).tolist()


def lm_inputs(model):
    """Record the keyword arguments the language model receives on each call: ``(seen, hook handle)``."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen, handle
