"""ML-GCN and attn_gcn: the graph buffers, the GCN classifier generator, attention and fusion.

Small models (timm's ``test_resnet``, 64 px, 5 classes) built from a LabelSet with a strong
0 -> 1 dependency, so the ML-GCN graph has off-diagonal edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.data.labels import LabelSet
from mlic.errors import ConfigError
from mlic.models._layers import GlobalPool
from mlic.models.gcn import MLGCN, AttnGCN, GCNClassifierGenerator

C = 5
SIZE = 64
MODELS = ["mlgcn", "attn_gcn"]


def labelset(word_vectors: bool = True) -> LabelSet:
    rng = np.random.default_rng(0)
    targets = (rng.random((60, C)) < 0.35).astype(np.int8)
    targets[:30, 1] = targets[:30, 0]  # P(1 | 0) high: an edge 0 -> 1
    targets[:30, 3] = 1 - targets[:30, 4]
    labels = LabelSet.from_targets([f"c{i}" for i in range(C)], targets)
    if word_vectors:
        labels.word_vectors = rng.standard_normal((C, 300)).astype(np.float32)
    return labels


def build(name: str, labels: LabelSet | None = None, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    labels = labelset() if labels is None else labels
    return mlic.create_model(name, C, labels=labels, backbone=TINY_BACKBONE, **kw)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tau, p", [(0.4, 0.2), (0.25, 0.35)])
def test_adjacency_buffer_is_the_labelsets_mlgcn_graph(name: str, tau: float, p: float) -> None:
    labels = labelset()
    model = build(name, labels, tau=tau, p=p)
    adj = model.classifiers.adjacency
    assert "classifiers.adjacency" in dict(model.named_buffers())
    expected = torch.from_numpy(labels.mlgcn_adjacency(tau=tau, p=p))
    torch.testing.assert_close(adj, expected, rtol=0, atol=0)
    assert (adj - torch.diag(torch.diagonal(adj))).abs().sum() > 0, "test graph has no edges"


def test_graph_matters_and_identity_graph_decouples_classes() -> None:
    gen = GCNClassifierGenerator(C, out_dim=16, labels=labelset(), hidden_dim=32).eval()
    with torch.no_grad():
        # trained weights are non-zero (the last layer starts at 0, see test_paper_recipes)
        torch.nn.init.normal_(gen.gcn.layers[-1].linear.weight, std=0.1)
        graph_w = gen()  # [C, 16]
        gen.adjacency.copy_(torch.eye(C))
        eye_w = gen()
    assert not torch.allclose(graph_w, eye_w), "the adjacency does not change the classifiers"
    # identity graph: classifier c is a function of word vector c alone
    with torch.no_grad():
        gen.embedding.weight[2] += 1.0
        moved = gen()
    changed = (moved - eye_w).abs().amax(dim=1)  # [C]
    assert changed[2] > 1e-3
    torch.testing.assert_close(moved[[0, 1, 3, 4]], eye_w[[0, 1, 3, 4]], rtol=0, atol=0)
    # the real graph propagates: perturbing class 0 moves its neighbour 1
    with torch.no_grad():
        gen.adjacency.copy_(torch.from_numpy(labelset().mlgcn_adjacency()))
        before = gen()
        gen.embedding.weight[0] += 1.0
        after = gen()
    assert (after[1] - before[1]).abs().amax() > 1e-4


def test_gcn_shape_and_parameter_count() -> None:
    model = build("mlgcn")
    d = model.backbone.channels[-1]
    gcn_params = sum(p.numel() for p in model.classifiers.parameters())
    assert gcn_params == 300 * 1024 + 1024 * d  # two bias-free layers, word vectors a buffer
    assert model.classifiers().shape == (C, d)
    attn = build("attn_gcn")
    extra = sum(p.numel() for p in attn.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == d * C + C  # 1x1 attention conv (no bias) + per-class gate


def perturb_last_gcn_layer(model: torch.nn.Module) -> None:
    """As after training: the GCN's last layer starts at 0, so the classifiers would be 0."""
    with torch.no_grad():
        torch.nn.init.normal_(model.classifiers.gcn.layers[-1].linear.weight, std=0.1)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_mlgcn_logits_are_pooled_feature_times_classifiers(pool: str) -> None:
    model = build("mlgcn", pool=pool).eval()
    perturb_last_gcn_layer(model)
    x = images()
    with torch.no_grad():
        feat = model.backbone(x)[-1]  # [B, D, h, w]
        pooled = feat.amax(dim=(2, 3)) if pool == "max" else feat.mean(dim=(2, 3))  # [B, D]
        expected = pooled @ model.classifiers().t()
        assert expected.abs().max() > 1e-3  # not the trivial all-zero start
        logits, cam = model(x, return_attention=True)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # CAM = the generated classifiers applied at every position of the last map
    torch.testing.assert_close(
        cam, torch.einsum("bdhw,cd->bchw", feat, model.classifiers()), rtol=1e-5, atol=1e-5
    )


def test_attn_gcn_maps_are_softmax_over_positions() -> None:
    model = build("attn_gcn").eval()
    x = images(3)
    with torch.no_grad():
        logits, maps = model(x, return_attention=True)
        fast = model(x)
    feat_hw = model.backbone(x)[-1].shape[-2:]
    assert maps.shape == (3, C, *feat_hw)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, C), rtol=0, atol=1e-5)
    assert not torch.allclose(maps[:, 0], maps[:, 1]), "classes share one map"
    # the SDPA path (no maps) computes the same attention as the explicit softmax path
    torch.testing.assert_close(fast, logits, rtol=1e-4, atol=1e-5)


def test_attn_gcn_fusion_gate_is_learned_and_interpolates() -> None:
    model = build("attn_gcn")
    assert isinstance(model.gate, torch.nn.Parameter) and model.gate.shape == (C,)
    assert build("attn_gcn", gate="scalar").gate.shape == (1,)
    x = images()
    perturb_last_gcn_layer(model)
    model.train()
    model(x).sum().backward()
    assert model.gate.grad is not None and model.gate.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        feat = model.backbone(x)[-1]  # [B, D, h, w]
        weight = model.classifiers()  # [C, D]
        _, maps = model(x, return_attention=True)
        local = torch.einsum("bchw,bdhw->bcd", maps, feat)  # [B, C, D]
        model.gate.fill_(30.0)  # alpha -> 1: attention features only
        torch.testing.assert_close(model(x), (local * weight).sum(-1), rtol=1e-4, atol=1e-4)
        model.gate.fill_(-30.0)  # alpha -> 0: ML-GCN's max-pooled feature
        torch.testing.assert_close(
            model(x), feat.amax(dim=(2, 3)) @ weight.t(), rtol=1e-4, atol=1e-4
        )
        model.pool = GlobalPool("avg")  # pool="avg": the average-pooled feature instead
        torch.testing.assert_close(
            model(x), feat.mean(dim=(2, 3)) @ weight.t(), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("name", MODELS)
def test_word_vectors_buffer_or_learnable_and_survive_checkpoint(name: str, tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(C)]
    fixed = build(name)
    learned = build(name, labelset(word_vectors=False))
    emb_key = "classifiers.embedding.weight"
    assert emb_key in dict(fixed.named_buffers()) and emb_key not in dict(fixed.named_parameters())
    assert emb_key in dict(learned.named_parameters()) and emb_key not in dict(
        learned.named_buffers()
    )
    torch.testing.assert_close(
        fixed.classifiers.embedding.weight, torch.from_numpy(labelset().word_vectors)
    )
    for model, is_buffer in ((fixed, True), (learned, False)):
        path = mlic.save_checkpoint(model, tmp_path / f"{is_buffer}.safetensors", names)
        loaded, _ = mlic.load_checkpoint(path)  # rebuilt with labels=None
        assert (emb_key in dict(loaded.named_buffers())) is is_buffer
        assert (emb_key in dict(loaded.named_parameters())) is not is_buffer
        torch.testing.assert_close(loaded.classifiers.adjacency, model.classifiers.adjacency)
        torch.testing.assert_close(
            loaded.classifiers.embedding.weight, model.classifiers.embedding.weight
        )


def test_forced_learnable_word_vectors_start_from_glove_rows() -> None:
    model = build("mlgcn", learn_word_vectors=True)
    emb = dict(model.named_parameters())["classifiers.embedding.weight"]
    torch.testing.assert_close(emb.detach(), torch.from_numpy(labelset().word_vectors))


def test_classes_and_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="gate='softmax'"):
        build("attn_gcn", gate="softmax")
    for name in MODELS:
        with pytest.raises(ConfigError, match="pool='mean'"):
            build(name, pool="mean")
    assert isinstance(build("mlgcn"), MLGCN) and isinstance(build("attn_gcn"), AttnGCN)
