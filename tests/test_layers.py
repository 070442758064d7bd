"""Shared layers: the oneDNN route of ``Linear`` is the same product as ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlic.host import CpuInfo, cpu_info, onednn_linear_min_rows
from mlic.models import _layers as layers
from mlic.models._layers import CrossAttention, Linear, linear

ONEDNN = torch.backends.mkldnn.is_available()


@pytest.fixture
def onednn_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN route on, whatever this CPU would choose (it is chosen per CPU)."""
    if not ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(layers, "_HAS_ONEDNN", True)
    monkeypatch.setattr(layers, "ONEDNN_LINEAR_MIN_ROWS", 256)


def _cpu(vendor: str, family: int, flags: str) -> CpuInfo:
    return CpuInfo(vendor, family, 0, frozenset(flags.split()))


def test_onednn_linear_rows_are_chosen_per_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("MLIC_ONEDNN_LINEAR", raising=False)
    zen5 = _cpu("AuthenticAMD", 26, "avx2 avx512f avx512_bf16")
    zen4 = _cpu("AuthenticAMD", 25, "avx2 avx512f avx512_bf16")
    zen3 = _cpu("AuthenticAMD", 25, "avx2")
    xeon = _cpu("GenuineIntel", 6, "avx2 avx512f amx_bf16")
    assert onednn_linear_min_rows(zen5) == 256  # full-width AVX-512, unused by MKL on AMD
    assert all(onednn_linear_min_rows(c) == 1024 for c in (zen4, zen3, xeon))
    monkeypatch.setenv("MLIC_ONEDNN_LINEAR", "1")
    assert onednn_linear_min_rows(zen3) == 256
    monkeypatch.setenv("MLIC_ONEDNN_LINEAR", "0")
    assert onednn_linear_min_rows(zen5) is None
    # /proc/cpuinfo as Linux writes it: the first processor's block
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "flags\t\t: fpu avx512f\n\nprocessor\t: 1\nvendor_id\t: Other\n"
    )
    assert cpu_info(str(info)) == CpuInfo("AuthenticAMD", 26, 2, frozenset({"fpu", "avx512f"}))
    assert cpu_info(str(tmp_path / "absent")) == CpuInfo("", -1, -1, frozenset())


@pytest.mark.parametrize("shape", [(300, 48), (2, 200, 48), (4, 3, 100, 48)])
def test_onednn_linear_matches_f_linear_forward_and_backward(
    shape: tuple[int, ...], onednn_route: None
) -> None:
    torch.manual_seed(0)
    assert layers._onednn_linear_applies(torch.zeros(shape)), "the oneDNN route must be taken"
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    g = torch.randn(*shape[:-1], 40)
    out = linear(x, w, b)
    (out * g).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = F.linear(x, w, b)
    (ref * g).sum().backward()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_onednn_linear_non_contiguous_input_and_no_bias(onednn_route: None) -> None:
    x = torch.randn(48, 600).t()  # [600, 48], not contiguous
    w = torch.randn(16, 48)
    torch.testing.assert_close(linear(x, w, None), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_onednn_linear_falls_back_where_it_does_not_pay(onednn_route: None) -> None:
    assert not layers._onednn_linear_applies(torch.zeros(8, 48))  # few rows: BLAS
    assert not layers._onednn_linear_applies(torch.zeros(1000, 48, dtype=torch.float64))
    assert not layers._onednn_linear_applies(torch.zeros(48))  # a vector


def test_linear_is_a_drop_in_nn_linear(onednn_route: None) -> None:
    torch.manual_seed(0)
    ours, ref = Linear(48, 40), torch.nn.Linear(48, 40)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 300, 48)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    # traced graphs (TorchScript/ONNX export) hold a plain linear, not the convolution view
    graph = torch.jit.trace(ours, x).inlined_graph
    kinds = {n.kind() for n in graph.nodes()}
    assert "aten::linear" in kinds and "aten::_convolution" not in kinds


def test_cross_attention_dropout_on_weights_only_in_training() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(32, num_heads=4, dropout=0.5)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    attn.eval()
    a, _ = attn(q, kv, kv)
    b, _ = attn(q, kv, kv)
    torch.testing.assert_close(a, b)
    attn.train()
    c, _ = attn(q, kv, kv)
    assert not torch.allclose(a, c), "dropout 0.5 on the attention weights changes the output"
