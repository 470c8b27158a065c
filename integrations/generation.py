"""``generate()`` on a wrapped Hugging Face model: the pieces that are about generation arguments.

The wrapped model's prompt is shorter than the caller's (pruned visual tokens), and generate's own
bookkeeping runs on that shorter prompt. Beam search and several returned sequences expand the batch
before the prefill; the sites expand their per-call state the same way (see ``decoder.py``), and the
caller's prompt is put back in front of every returned sequence (``hf_vlm._restore_prompt``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor

#: generation modes whose extra forward passes vtoken does not follow: refused with this message
UNSUPPORTED = {
    "assistant_model": "assisted generation (assistant_model)",
    "prompt_lookup_num_tokens": "prompt-lookup decoding (prompt_lookup_num_tokens)",
    "assistant_early_exit": "self-speculative decoding (assistant_early_exit)",
    "custom_generate": "custom generation methods (custom_generate)",
}


class WrappedGenerate:
    """``model.generate`` while the model is wrapped. An object bound to its integration rather than a
    closure: ``copy.deepcopy`` of the model copies it with the integration, so the copy's ``generate``
    runs the copy (a closure would keep calling the original)."""

    def __init__(self, integration: Any) -> None:
        self.integration = integration

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.integration._generate(*args, **kwargs)

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return ("generate() of the model wrapped by vtoken: the visual tokens are pruned before the first step; "
                "returns what the model's own generate returns, each sequence starting with the caller's prompt")


def refuse_unsupported_generation(kwargs: dict[str, Any]) -> None:
    """Refuse generation modes that run extra models or forward passes vtoken does not follow."""
    config = kwargs.get("generation_config")
    for name, what in UNSUPPORTED.items():
        value = kwargs.get(name, getattr(config, name, None) if config is not None else None)
        if value is not None:
            raise ValueError(f"vtoken does not support {what} on a wrapped model; supported: greedy, sampling, "
                             "beam search, num_return_sequences, use_cache=False; or call vtoken.unwrap(model) first")


def count_new_tokens_only(model: Any, kwargs: dict[str, Any], prompt_length: int) -> None:
    """Turn ``max_length``/``min_length`` (which count the prompt) into ``max_new_tokens``/``min_new_tokens``
    measured on the caller's prompt: the prompt the model sees is shorter, so a total length would
    otherwise buy extra new tokens. Returned sequences then have the lengths the unwrapped model gives."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
        total = kwargs.get("max_length")
        total = total if total is not None else getattr(config, "max_length", None)
        if total is not None and total > prompt_length:
            kwargs.pop("max_length", None)
            kwargs["max_new_tokens"] = total - prompt_length
    if kwargs.get("min_new_tokens") is None and getattr(config, "min_new_tokens", None) is None:
        total = kwargs.pop("min_length", None)
        total = total if total is not None else getattr(config, "min_length", None)
        if total and total > prompt_length:
            kwargs["min_new_tokens"] = total - prompt_length


def wants_cache(model: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this generate call uses a KV cache (``use_cache`` as generate resolves it)."""
    if kwargs.get("use_cache") is not None:
        return bool(kwargs["use_cache"])
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    value = getattr(config, "use_cache", None)
    return True if value is None else bool(value)


def restore_prompt(output: Any, original_ids: Tensor, shrunk_length: int) -> Any:
    """Put the caller's original prompt back in front of the generated tokens (each prompt repeated for
    its several returned sequences, as generate returns them: a prompt's sequences are adjacent)."""
    sequences = output if isinstance(output, Tensor) else getattr(output, "sequences", None)
    if sequences is None:
        return output
    prompts = original_ids.to(sequences.device).repeat_interleave(sequences.shape[0] // original_ids.shape[0], dim=0)
    restored = torch.cat([prompts, sequences[:, shrunk_length:]], dim=1)
    if isinstance(output, Tensor):
        return restored
    output.sequences = restored
    return output


def bind_arguments(function: Callable, owner: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (``**kwargs`` flattened in), as ``function`` would receive them."""
    inputs = _signature(function).bind_partial(owner, *args, **kwargs).arguments
    inputs.pop("self", None)
    inputs.update(inputs.pop("kwargs", {}))
    return inputs


@functools.lru_cache(maxsize=64)
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)
