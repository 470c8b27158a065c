"""The public API: specs, budgets, registries and the errors bad input gets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtoken
from tiny_models import TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava
from vtoken.budget import resolve_keep


def test_list_methods_and_models():
    assert {"cls_attn", "kcenter", "dart", "random", "pool", "fastv"} <= set(vtoken.list_methods())
    assert "llava" in vtoken.list_models()


def test_fraction_and_int_budgets():
    assert resolve_keep(64, 576) == 64
    assert resolve_keep(0.25, 576) == 144
    assert resolve_keep(16, 3 * 576, units=3) == 48
    assert resolve_keep(1.0, 576) == 576


@pytest.mark.parametrize("keep,error", [
    (0, "must be >= 1"), (-3, "must be >= 1"), (0.0, r"must be in \(0, 1\]"), (1.5, r"must be in \(0, 1\]"),
    (TOKENS_PER_IMAGE + 1, "exceeds the 144 visual tokens every image gives"),
])
def test_bad_budgets_are_named(keep, error):
    model = tiny_llava()
    with pytest.raises(ValueError, match=error):
        vtoken.wrap(model, "kcenter", keep=keep)
        with torch.no_grad():
            model(**llava_batch([prompt_ids([20], 1, [30])]))


def test_unknown_method_lists_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'; registered methods: .*kcenter"):
        vtoken.wrap(tiny_llava(), "kcenter+nope", keep=8)


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="no integration for Linear .*supported: .*llava"):
        vtoken.wrap(torch.nn.Linear(2, 2), "kcenter", keep=8)


def test_stage_at_a_site_it_cannot_run_at():
    with pytest.raises(ValueError, match="cannot run at llm\\(2\\); accepted sites: projector, vision\\(L\\)"):
        vtoken.wrap(tiny_llava(), "cls_attn", keep=8, site="llm(2)")


def test_site_the_model_does_not_have():
    from tiny_models import tiny_qwen3_vl

    with pytest.raises(ValueError, match="no vision site .* accepted: projector, llm\\(K\\)"):
        vtoken.wrap(tiny_qwen3_vl(False), "kcenter", keep=8, site="vision(1)")
    with pytest.raises(ValueError, match="vision\\(1\\) does not exist .*0 <= L < 1 \\(blocks before block 1, "
                                         "which produces the vision feature layer"):
        vtoken.wrap(tiny_llava(), "kcenter", keep=8, site="vision(1)")
    with pytest.raises(ValueError, match="llm\\(9\\) does not exist .* 1 <= K < 4"):
        vtoken.wrap(tiny_llava(), "kcenter", keep=8, site="llm(9)")


def test_unknown_option_lists_accepted_ones():
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['pivots'\\].*image_pivots"):
        vtoken.wrap(tiny_llava(), "dart", keep=8, pivots=3)


def test_bad_positions_option():
    with pytest.raises(ValueError, match="accepted: compact, original"):
        vtoken.wrap(tiny_llava(), "dart", keep=8, positions="shifted")


def test_wrapping_twice_and_unwrapping_unwrapped_models_are_errors():
    model = tiny_llava()
    vtoken.wrap(model, "dart", keep=8)
    with pytest.raises(ValueError, match="already wrapped"):
        vtoken.wrap(model, "dart", keep=8)
    vtoken.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        vtoken.unwrap(model)


def test_failed_wrap_leaves_model_untouched():
    from tiny_models import tiny_qwen

    model = tiny_llava()
    with pytest.raises(ValueError):
        vtoken.wrap(model, "kcenter", keep=8, site="llm(9)")
    assert not hasattr(model, "vtoken") and "generate" not in model.__dict__
    qwen = tiny_qwen("2")  # this combination fails after some hooks were already in place
    pipeline = vtoken.Pipeline([vtoken.PixelShuffle(layer=0), vtoken.ClsAttn(keep=2)])
    with pytest.raises(ValueError, match="cannot follow vision"):
        vtoken.wrap(qwen, pipeline)
    assert not hasattr(qwen, "vtoken") and "generate" not in qwen.__dict__
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in qwen.modules())


def test_pipeline_object_and_per_stage_options():
    model = tiny_llava()
    pipeline = vtoken.Pipeline([vtoken.ClsAttn(keep=10), vtoken.KCenter()])
    with vtoken.wrapped(model, pipeline, keep=30), torch.no_grad():
        model(**llava_batch([prompt_ids([20], 1, [30])]))
        assert [r.tokens_out for r in model.vtoken.stats.records] == [10, 20]
    with vtoken.wrapped(model, "cls_attn+kcenter", keep=30, cls_attn={"keep": 6}), torch.no_grad():
        model(**llava_batch([prompt_ids([20], 1, [30])]))
        assert [r.tokens_out for r in model.vtoken.stats.records] == [6, 24]


def test_pipeline_needs_a_budget():
    model = tiny_llava()
    with pytest.raises(ValueError, match="has no budget"):
        with vtoken.wrapped(model, "kcenter"), torch.no_grad():
            model(**llava_batch([prompt_ids([20], 1, [30])]))


def test_registering_a_third_party_stage():
    from dataclasses import dataclass

    @vtoken.register_stage("first_tokens_test")
    @dataclass
    class FirstTokens(vtoken.Stage):
        def select(self, tokens, k):
            return vtoken.Keep(indices=torch.arange(k).expand(tokens.batch_size, k))

    assert "first_tokens_test" in vtoken.list_methods()
    model = tiny_llava()
    with vtoken.wrapped(model, "first_tokens_test", keep=5), torch.no_grad():
        out = model(**llava_batch([prompt_ids([20], 1, [30])]))
    assert out.logits.shape[1] == 1 + 1 + 5 + 1 + 1


def test_register_stage_makes_the_options_dataclass_fields():
    from dataclasses import fields

    @vtoken.register_stage("first_n_test")
    class FirstN(vtoken.Stage):
        offset: int = vtoken.stages.base.option(0, "first position kept")

        def select(self, tokens, k):
            return vtoken.Keep(indices=(torch.arange(k) + self.offset).expand(tokens.batch_size, k))

    @vtoken.register_stage("first_n_shifted_test")
    class Shifted(FirstN):  # a registered subclass gets its own fields without decorating it again
        offset: int = vtoken.stages.base.option(2, "first position kept")

    assert [f.name for f in fields(FirstN)][-1] == "offset" and FirstN().offset == 0
    assert Shifted().offset == 2 and Shifted(offset=3).offset == 3
    assert dict((f.name, f.metadata["help"]) for f in fields(Shifted))["offset"] == "first position kept"
    model = tiny_llava()
    with vtoken.wrapped(model, "first_n_shifted_test", keep=5, first_n_shifted_test={"offset": 1}), \
            torch.no_grad():
        model(**llava_batch([prompt_ids([20], 1, [30])]))
        assert model.vtoken.stats is not None


def test_installed_layout_has_no_top_level_kernels_module(tmp_path):
    code = (
        "import importlib.util, vtoken, vtoken.kernels, vtoken.integrations, vtoken.eval\n"
        "from pathlib import Path\n"
        "root = Path(vtoken.__file__).resolve().parent.parent\n"
        "for name in ('kernels', 'integrations', 'eval'):\n"
        "    spec = importlib.util.find_spec(name) if name != 'eval' else None\n"
        "    assert spec is None or root not in Path(spec.origin or '').resolve().parents, name\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert Path(tmp_path).exists()


def test_methods_command_describes_a_method_and_its_options(capsys):
    from vtoken.cli import main

    assert main(["methods", "vscan"]) == 0
    shown = capsys.readouterr().out
    assert "vscan_scan@projector+fastv@llm(16)" in shown
    assert "global_share = 0.5: share of the budget chosen by the global scan" in shown
    assert "fastv: sites llm (default llm(2))" in shown
    assert main(["methods", "no_such_method"]) == 2
    assert "registered: cdpruner" in capsys.readouterr().err
