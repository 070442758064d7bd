"""Shared layers: the oneDNN route of ``Linear`` is the same product as ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlic.models import layers
from mlic.models.layers import CrossAttention, Linear, linear


@pytest.mark.parametrize("shape", [(300, 48), (2, 200, 48), (4, 3, 100, 48)])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape: tuple[int, ...]) -> None:
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


def test_onednn_linear_non_contiguous_input_and_no_bias() -> None:
    x = torch.randn(48, 600).t()  # [600, 48], not contiguous
    w = torch.randn(16, 48)
    torch.testing.assert_close(linear(x, w, None), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_onednn_linear_falls_back_where_it_does_not_pay() -> None:
    assert not layers._onednn_linear_applies(torch.zeros(8, 48))  # few rows: BLAS
    assert not layers._onednn_linear_applies(torch.zeros(1000, 48, dtype=torch.float64))
    assert not layers._onednn_linear_applies(torch.zeros(48))  # a vector


def test_linear_is_a_drop_in_nn_linear() -> None:
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
