"""Backend choice: VTOKEN_KERNELS, the CPU default, routing, and importing without triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vtoken.kernels as K
from vtoken.kernels import dispatch, reference


def test_cpu_default_is_torch(monkeypatch):
    monkeypatch.delenv("VTOKEN_KERNELS", raising=False)
    assert K.backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("VTOKEN_KERNELS", "auto")
    assert K.backend_for(torch.zeros(1)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_is_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("VTOKEN_KERNELS", raising=False)
    assert K.backend_for(torch.zeros(1, device="cuda")) == "triton"


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("VTOKEN_KERNELS", "torch")
    assert K.backend_for(torch.zeros(1)) == "torch"
    pytest.importorskip("triton")
    monkeypatch.setenv("VTOKEN_KERNELS", " Triton ")  # case and surrounding blanks do not matter
    assert K.backend_for(torch.zeros(1)) == "triton"


def test_invalid_value_names_the_accepted_ones(monkeypatch):
    monkeypatch.setenv("VTOKEN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="accepted: auto, torch, triton"):
        K.backend_for(torch.zeros(1))
    with pytest.raises(ValueError, match="VTOKEN_KERNELS"):
        K.cosine_to_pivots(torch.randn(1, 3, 4), torch.randn(1, 1, 4))


def test_forcing_triton_without_triton_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # find_spec reports a None entry as absent
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    with pytest.raises(ValueError, match="not installed"):
        K.backend_for(torch.zeros(1))
    monkeypatch.setenv("VTOKEN_KERNELS", "auto")
    assert K.backend_for(torch.zeros(1)) == "torch"


def test_import_and_torch_path_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
        "import torch, vtoken.kernels as K\n"
        "out = K.kcenter_select(torch.randn(1, 9, 4), 3)\n"
        "assert out.shape == (1, 3), out\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_routing(monkeypatch):
    """Each op goes to the reference under 'torch' and to its Triton launcher under 'triton'."""
    calls = []
    for name in ("attention_rows", "cosine_to_pivots", "kcenter_select"):
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **kw: calls.append(("torch", _n)))
    monkeypatch.setenv("VTOKEN_KERNELS", "torch")
    q, k, x = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 5, 4)
    K.attention_rows(q, k)
    K.cosine_to_pivots(x, x[:, :2])
    K.kcenter_select(x, 2)
    assert calls == [("torch", "attention_rows"), ("torch", "cosine_to_pivots"), ("torch", "kcenter_select")]

    pytest.importorskip("triton")
    from vtoken.kernels import attention, kcenter, similarity

    calls.clear()
    for module, name in ((attention, "attention_rows_triton"), (similarity, "cosine_to_pivots_triton"),
                         (kcenter, "kcenter_select_triton")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **kw: calls.append(("triton", _n)))
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    K.attention_rows(q, k)
    K.cosine_to_pivots(x, x[:, :2])
    K.kcenter_select(x, 2)
    assert [c[0] for c in calls] == ["triton"] * 3


def test_kernel_modules_do_not_shadow_the_api():
    """Importing a kernel module binds its name on the package: it must not replace an exported op."""
    pytest.importorskip("triton")
    import vtoken.kernels.attention
    import vtoken.kernels.kcenter
    import vtoken.kernels.similarity  # noqa: F401

    for name in K.__all__:
        assert callable(getattr(K, name)) and getattr(K, name) is getattr(dispatch, name), name
