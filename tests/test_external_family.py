"""A model family registered from outside the package gets everything a built-in family gets: wrap
(forward and generate with pruning), FLOPs, a ``vtoken bench`` run and the demo's kept-token overlay.

``MyVLM`` is a LLaVA-shaped model of its own type (``model_type='my_vlm'``, which no built-in integration
matches); its integration is defined here, subclassing vtoken's LLaVA integration, and registered with
the public decorator. Nothing in vtoken knows it: the bench, ``vtoken.flops`` and the demo find it
through the registry and ask it. The registration is removed after the module's tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtoken
from tiny_models import IMAGE_TOKEN, TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava
from vtoken import flops
from vtoken.registry import INTEGRATIONS, load_builtin_integrations

NAME = "my_vlm"


def my_vlm_classes():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    class MyVLMConfig(LlavaConfig):
        model_type = NAME

    class MyVLM(LlavaForConditionalGeneration):
        config_class = MyVLMConfig

    return MyVLMConfig, MyVLM


@pytest.fixture(scope="module")
def family():
    """Register the integration for the module's tests; unregister it after them."""
    from vtoken.integrations.llava import LlavaIntegration

    load_builtin_integrations()
    assert NAME not in INTEGRATIONS

    @vtoken.register_integration(NAME)
    class MyVLMIntegration(LlavaIntegration):
        model_types = (NAME,)
        asked: list[str] = []  # what the bench, FLOPs and the demo asked this family

        def model_dims(self):
            self.asked.append("model_dims")
            return super().model_dims()

        def synthetic_inputs(self, *args, **kwargs):
            self.asked.append("synthetic_inputs")
            return super().synthetic_inputs(*args, **kwargs)

        def run_vision(self, inputs):
            self.asked.append("run_vision")
            return super().run_vision(inputs)

        def unit_grids(self, inputs):
            self.asked.append("unit_grids")
            return super().unit_grids(inputs)

    try:
        yield MyVLMIntegration
    finally:
        INTEGRATIONS.pop(NAME, None)
    assert NAME not in vtoken.list_models()


@pytest.fixture
def model(family):
    """A tiny MyVLM: tiny_llava's configuration under the new model type, its own random weights."""
    config_cls, model_cls = my_vlm_classes()
    settings = tiny_llava().config.to_dict()
    settings.pop("model_type", None)
    config = config_cls(**settings)
    torch.manual_seed(1)
    built = model_cls(config).eval()
    built.generation_config.pad_token_id = 0
    built.generation_config.eos_token_id = None
    family.asked.clear()
    return built


def test_the_new_family_is_registered_and_matched(family, model):
    assert model.config.model_type == NAME and NAME in vtoken.list_models()
    from vtoken.integrations.base import Integration

    assert type(Integration.for_model(model)) is family
    assert not any(cls.matches(model) for name, cls in INTEGRATIONS.items() if name != NAME)


def test_wrap_prunes_forward_and_generate(family, model):
    batch = llava_batch([prompt_ids([20, 21], 1, [30, 31, 32])])
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with vtoken.wrapped(model, "kcenter", keep=16), torch.no_grad():
            assert isinstance(model.vtoken.integration, family)
            logits = model(**batch).logits
            output = model.generate(**batch, max_new_tokens=3, do_sample=False)
            stats = model.vtoken.stats
    finally:
        handle.remove()
    length = batch["input_ids"].shape[1]
    assert seen[0] == length - TOKENS_PER_IMAGE + 16 and logits.shape[1] == seen[0]
    assert output.shape == (1, length + 3) and torch.equal(output[:, :length], batch["input_ids"])
    assert stats.records[0].tokens_in == TOKENS_PER_IMAGE and stats.records[0].tokens_out == 16
    assert not hasattr(model, "vtoken")


def test_flops_come_from_the_new_integration(family, model):
    dims = flops.dims_from_model(model)
    assert family.asked == ["model_dims"]
    assert dims == flops.dims_from_model(tiny_llava())  # the same shapes as the LLaVA it is built like
    split = flops.prefill_flops(dims, patches=TOKENS_PER_IMAGE, images=1, text_tokens=7,
                                layer_visual_tokens=[16] * dims.llm.layers)
    assert split["total"] == split["vision"] + split["projector"] + split["llm"] > 0


def test_bench_runs_the_new_family(family, model, tmp_path):
    from vtoken.eval import bench

    result = bench.run_bench(model, methods=["kcenter"], budgets=[16], runs=1, warmup=0, decode_tokens=1,
                             text_tokens=8, out=tmp_path, plots=False, progress=False)
    assert {"synthetic_inputs", "model_dims", "run_vision"} <= set(family.asked)
    assert result["model_type"] == NAME and result["visual_tokens_per_image"] == TOKENS_PER_IMAGE
    base, kcenter = result["rows"]
    assert (base["visual_tokens"], kcenter["visual_tokens"]) == (TOKENS_PER_IMAGE, 16)
    assert kcenter["oracle_kind"] == "shrunk LLM input" and kcenter["oracle_ms"] is not None
    assert kcenter["gflops_llm"] < base["gflops_llm"] and kcenter["gflops_vision"] == base["gflops_vision"]
    assert (tmp_path / "results.csv").exists()


def test_demo_draws_the_kept_tokens_of_the_new_family(family, model):
    pytest.importorskip("gradio")
    from tiny_processors import tiny_llava_processor
    from vtoken.demo import Comparer

    comparer = Comparer(model, tiny_llava_processor(), max_new_tokens=2,
                        prompt_template="USER: {image}\n{question} ASSISTANT:")
    assert comparer.tokens_per_image() == TOKENS_PER_IMAGE
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8))
    result = comparer.compare(image, "what is the color", "kcenter", 16)
    assert "unit_grids" in family.asked
    assert result["grid"] == [12, 12] and result["visual_tokens"] == {"in": TOKENS_PER_IMAGE, "kept": 16}
    owner = np.array(result["patch_tokens"])
    assert owner.shape == (TOKENS_PER_IMAGE,) and (owner >= 0).sum() == 16 and owner.max() == 15
    assert result["overlay"] is not None and "16 of 144 visual tokens" in result["legend"]
    assert int((comparer.processor(images=image, text=result["prompt"], return_tensors="pt")["input_ids"]
                == IMAGE_TOKEN).sum()) == TOKENS_PER_IMAGE
    assert not hasattr(model, "vtoken")
