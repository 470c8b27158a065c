"""vLLM's entry point (``vllm.general_plugins``): registers vtoken's pruning architectures.

vLLM calls ``register`` in every process it starts; registration is lazy (``"module:Class"``), so the
model module, and with it vLLM's model code, is imported only when a server asks for the architecture.
Select one with ``--hf-overrides '{"architectures": ["VtokenQwen2_5_VLForConditionalGeneration"],
"vtoken": {"method": "kcenter", "keep": 0.25}}'`` (or ``VtokenQwen3VLForConditionalGeneration``,
``VtokenLlavaForConditionalGeneration``; docs/serving.md).
"""

from __future__ import annotations

#: architecture name -> "module:Class" of the pruning model
ARCHITECTURES = {
    "VtokenQwen2_5_VLForConditionalGeneration":
        "vtoken.serving.vllm_qwen2_5_vl:VtokenQwen2_5_VLForConditionalGeneration",
    "VtokenQwen3VLForConditionalGeneration": "vtoken.serving.vllm_qwen3_vl:VtokenQwen3VLForConditionalGeneration",
    "VtokenLlavaForConditionalGeneration": "vtoken.serving.vllm_llava:VtokenLlavaForConditionalGeneration",
}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name, target in ARCHITECTURES.items():
        if name not in supported:  # vLLM may call a plugin more than once per process
            ModelRegistry.register_model(name, target)
