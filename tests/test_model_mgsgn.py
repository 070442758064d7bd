"""MGSGN: cross-layer level weights, global/local fusion weights, the per-image multi-perspective
cosine graph, the static ML-GCN graph buffer and the class-wise attention maps.

Small models (timm's ``test_resnet``, 64 px, 5 classes) built from a LabelSet with a strong
0 -> 1 dependency, so the static graph has off-diagonal edges.
"""

from __future__ import annotations

import numpy as np
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.data.labels import LabelSet
from mlic.models.mgsgn import MGSGN

C = 5
SIZE = 64


def labelset() -> LabelSet:
    rng = np.random.default_rng(0)
    targets = (rng.random((60, C)) < 0.35).astype(np.int8)
    targets[:30, 1] = targets[:30, 0]  # P(1 | 0) high: an edge 0 -> 1
    return LabelSet.from_targets([f"c{i}" for i in range(C)], targets)


def build(labels: LabelSet | None = None, **kw) -> MGSGN:
    torch.manual_seed(0)
    labels = labelset() if labels is None else labels
    return mlic.create_model("mgsgn", C, labels=labels, backbone=TINY_BACKBONE, **kw)


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def label_features(model: MGSGN, x: torch.Tensor) -> torch.Tensor:
    feats = model.backbone(x)
    fused, _ = model.cross_layer(feats)
    v, _ = model.class_attention(model.dual_branch(fused))
    return v  # [B, C, d]


def test_static_graph_buffer_is_the_mlgcn_adjacency() -> None:
    labels = labelset()
    model = build(labels)
    expected = torch.from_numpy(labels.mlgcn_adjacency(tau=0.4, p=0.2))
    torch.testing.assert_close(model.static_adjacency, expected, rtol=0, atol=0)
    assert model.static_adjacency[0, 1] > 0  # the planted dependency is an edge
    assert "static_adjacency" in dict(model.named_buffers())
    other = build(labels, tau=0.2, p=0.3)
    torch.testing.assert_close(
        other.static_adjacency, torch.from_numpy(labels.mlgcn_adjacency(tau=0.2, p=0.3))
    )


def test_dynamic_graph_is_per_image_symmetric_and_weighted() -> None:
    model = build().eval()
    with torch.no_grad():
        model.dynamic_graph.omega.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
        v = label_features(model, images(2))
        raw = model.dynamic_graph.similarity(v)  # [B, C, C]
        norm = model.dynamic_graph(v)
        mixed = model.adjacency(v)
    w = model.dynamic_graph.perspective_weights
    assert w.shape == (4,) and (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert raw.shape == (2, C, C)
    torch.testing.assert_close(raw, raw.transpose(1, 2))
    torch.testing.assert_close(norm, norm.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(raw, dim1=1, dim2=2), torch.ones(2, C))
    assert (raw <= 1 + 1e-5).all() and (raw >= -1 - 1e-5).all()
    assert not torch.allclose(raw[0], raw[1], atol=1e-4), "the graph must depend on the image"
    # the mix is convex between the static and the normalised dynamic graph (s = 0.5 at init)
    torch.testing.assert_close(mixed, 0.5 * model.static_adjacency + 0.5 * norm)


def test_centring_keeps_the_graph_from_collapsing() -> None:
    """Label features of one image share a common component: uncentred, every cosine is ~1."""
    off_diagonal = ~torch.eye(C, dtype=torch.bool)
    x = images(2)
    with torch.no_grad():
        plain = build(center_graph=False).eval()
        centred = build().eval()
        raw_plain = plain.dynamic_graph.similarity(label_features(plain, x))
        raw_centred = centred.dynamic_graph.similarity(label_features(centred, x))
    assert raw_plain[:, off_diagonal].min() > 0.99  # the degenerate all-to-all graph
    assert raw_centred[:, off_diagonal].mean() < 0.5


def test_weighted_cosine_matches_definition() -> None:
    model = build()
    g = model.dynamic_graph
    v = torch.randn(1, C, model.class_attention.score.in_channels)
    with torch.no_grad():
        g.omega.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
        got = g.similarity(v)[0]
    w = g.perspective_weights
    u = g.perspectives(v[0]).view(C, g.k, -1)  # [C, K, d']
    u = u - u.mean(dim=0, keepdim=True)  # centred over the labels (center_graph=True)
    expected = torch.zeros(C, C)
    for k in range(g.k):
        for i in range(C):
            for j in range(C):
                expected[i, j] += w[k] * torch.cosine_similarity(u[i, k], u[j, k], dim=0)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)


def test_cross_layer_weights_sum_to_one_per_position() -> None:
    model = build().eval()
    with torch.no_grad():
        feats = model.backbone(images(2))
        fused, weights = model.cross_layer(feats)
    assert len(feats) == 3
    middle = feats[1].shape[-2:]
    assert weights.shape == (2, 3, *middle) and fused.shape[-2:] == middle
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, *middle))
    assert (weights > 0).all()


def test_fusion_weights_and_maps_are_normalised() -> None:
    model = build().eval()
    fw = model.dual_branch.fusion_weights
    torch.testing.assert_close(fw, torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        logits, maps = model(images(2), return_attention=True)
    assert logits.shape == (2, C) and maps.shape[:2] == (2, C)
    torch.testing.assert_close(maps.flatten(2).sum(-1), torch.ones(2, C))
    assert (maps >= 0).all()


def test_graph_changes_the_logits() -> None:
    model = build().eval()
    x = images(2)
    with torch.no_grad():
        base = model(x)
        model.static_adjacency.copy_(torch.ones(C, C) / C)  # a different static graph
        other = model(x)
    assert not torch.allclose(base, other)
