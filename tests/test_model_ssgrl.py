"""SSGRL's own mechanisms: word-guided attention, the GGNN on P(j|i), per-class classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.bench import count_params
from mlic.data.labels import LabelSet
from mlic.errors import ConfigError
from mlic.models.ssgrl import SSGRL, GatedGraphNetwork

C = 5
SIZE = 64


def labels() -> LabelSet:
    rng = np.random.default_rng(0)
    targets = (rng.random((40, C)) < 0.4).astype(np.int8)
    targets[:20, 1] = targets[:20, 0]  # a strong 0 -> 1 dependency
    out = LabelSet.from_targets([f"c{i}" for i in range(C)], targets)
    out.word_vectors = rng.standard_normal((C, 300)).astype(np.float32)
    return out


def build(**kw) -> SSGRL:
    torch.manual_seed(0)
    kw = {"low_rank_dim": 32, "attention_dim": 16, **kw}
    return mlic.create_model(
        "ssgrl", C, labels=labels(), backbone=TINY_BACKBONE, pretrained=False, **kw
    ).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_graph_buffer_is_the_conditional_matrix() -> None:
    model = build()
    expected = torch.from_numpy(labels().conditional)
    torch.testing.assert_close(model.adjacency, expected, rtol=0, atol=0)
    assert "adjacency" in dict(model.named_buffers())  # saved, not trained
    assert model.adjacency[0, 1] > 0.5  # P(1 | 0): the built-in 0 -> 1 dependency


def test_attention_maps_are_softmax_over_positions() -> None:
    model = build()
    with torch.no_grad():
        _, maps = model(images(), return_attention=True)
    h, w = maps.shape[-2:]
    assert (h, w) == (SIZE // 32, SIZE // 32)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, C))


def test_folded_score_equals_paper_formula() -> None:
    """f_a(P^T tanh((U^T f) * (V^T x)) + b_P) computed literally equals the folded form."""
    sd = build().decouple
    tokens = torch.randn(2, 7, sd.u.in_features)  # [B, N, D]
    words = torch.randn(C, sd.v.in_features)  # [C, 300]
    joint = torch.tanh(sd.u(tokens)[:, None] * sd.v(words)[None, :, None])  # [B, C, N, d1]
    literal = sd.f_a(sd.p(joint)).squeeze(-1)  # [B, C, N]
    with torch.no_grad():
        torch.testing.assert_close(sd.scores(tokens, words), literal, rtol=1e-5, atol=1e-5)
        feats, attn = sd(tokens, words)
    expected = torch.einsum("bcn,bnd->bcd", torch.softmax(literal, dim=-1), tokens)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert attn.shape == (2, C, 7)


def test_ggnn_zero_adjacency_keeps_nodes_independent() -> None:
    torch.manual_seed(0)
    ggnn = GatedGraphNetwork(8, steps=3)
    h = torch.randn(1, C, 8)
    h2 = h.clone()
    h2[0, 3] += 1.0  # perturb class 3's input only
    with torch.no_grad():
        a, b = ggnn(h, torch.zeros(C, C)), ggnn(h2, torch.zeros(C, C))
    others = [0, 1, 2, 4]
    torch.testing.assert_close(a[0, others], b[0, others], rtol=0, atol=0)
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_ggnn_propagates_along_edges_in_both_directions() -> None:
    torch.manual_seed(0)
    ggnn = GatedGraphNetwork(8, steps=1)
    adj = torch.zeros(C, C)
    adj[0, 1] = 0.8  # P(1 | 0): node 0 receives h_1 as incoming, node 1 receives h_0 as outgoing
    h = torch.randn(1, C, 8)

    def changed(node: int) -> set[int]:
        h2 = h.clone()
        h2[0, node] += 1.0
        with torch.no_grad():
            diff = (ggnn(h2, adj) - ggnn(h, adj)).abs().amax(dim=-1)[0]  # [C]
        return {c for c in range(C) if diff[c] > 0}

    assert changed(1) == {0, 1}
    assert changed(0) == {0, 1}
    assert changed(2) == {2}  # no edges: only itself


def test_ggnn_in_model_follows_the_label_graph() -> None:
    """A class's word vector moves only its own attention; other logits move only via the graph."""
    x = images()

    def logit_shift(model: SSGRL) -> torch.Tensor:
        with torch.no_grad():
            before = model(x)
            model.words.weight[0] += 1.0  # class 0's word vector
            after = model(x)
        return (after - before).abs().amax(dim=0)  # [C]

    isolated = build()
    isolated.adjacency.zero_()
    shift = logit_shift(isolated)
    assert shift[0] > 0 and torch.all(shift[1:] == 0)
    shift = logit_shift(build())
    assert shift[1] > 0  # 0 and 1 are linked in the graph


def test_time_steps_option_and_zero_steps() -> None:
    assert build(time_steps=5).ggnn.steps == 5
    h = torch.randn(2, C, 4)
    assert GatedGraphNetwork(4, steps=0)(h, torch.rand(C, C)) is h
    with pytest.raises(ConfigError, match="steps"):
        GatedGraphNetwork(4, steps=-1)
    model = build(time_steps=0)
    x = images()
    with torch.no_grad():
        logits = model(x)
        model.adjacency.copy_(torch.rand(C, C))  # with no steps the graph has no effect
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
        tokens = model.backbone(x)[-1].flatten(2).transpose(1, 2)  # [B, N, D]
        h0, _ = model.decouple(tokens, model.words())
        out = torch.tanh(model.fc_out(torch.cat([h0, h0], dim=-1)))  # o_c = f_o([h0, h0])
    torch.testing.assert_close(model.classifier(out), logits)


def test_classifier_is_per_class() -> None:
    model = build()
    x = images()
    with torch.no_grad():
        before = model(x)
        model.classifier.weight[2] += 0.5
        after = model(x)
    diff = (after - before).abs().amax(dim=0)  # [C]
    assert diff[2] > 0 and torch.all(diff[[0, 1, 3, 4]] == 0)
    assert model.classifier.weight.shape == (C, model.fc_out.out_features)


def test_dimensions_and_parameter_counts() -> None:
    model = build(feature_dim=24, output_dim=12)
    d = 24
    assert count_params(model.ggnn) == 9 * d * d + 3 * d  # W: 2D->3D (+bias), U: D->2D, D->D
    assert model.fc_out.in_features == 2 * d and model.fc_out.out_features == 12
    assert count_params(model.classifier) == C * 12 + C
    assert model.decouple.u.in_features == d
    logits, maps = model(images(), return_attention=True)
    assert logits.shape == (2, C) and maps.shape == (2, C, 2, 2)
    # default: no projection, the GGNN works on the backbone's own channels
    default = build()
    assert default.ggnn.dim == default.backbone.channels[-1]
    assert default.default_cfg["input_size"] == (3, 448, 448)
    assert default.default_cfg["paper"]["resolution"] == 576


def test_rebuild_without_labels_matches_kinds() -> None:
    """labels=None + rebuild_kwargs gives the same buffers/parameters (what load_checkpoint does)."""
    model = build()
    rebuilt = SSGRL(
        C,
        labels=None,
        backbone=TINY_BACKBONE,
        low_rank_dim=32,
        attention_dim=16,
        **model.rebuild_kwargs,
    )
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert dict(rebuilt.named_buffers()).keys() == dict(model.named_buffers()).keys()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images()), model(images()), rtol=0, atol=0)
