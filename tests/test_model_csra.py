"""CSRA's own mechanisms: average + residual attention pooling of class score maps, heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mlic
from conftest import TINY_BACKBONE
from mlic.models.csra import PAPER_TEMPERATURES, CSRAHead

NUM_CLASSES = 5
SIZE = 128  # test_resnet: stride 32 -> a 4 x 4 map


def build(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mlic.create_model("csra", NUM_CLASSES, backbone=TINY_BACKBONE, pretrained=False, **kw)
    return model.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build(num_heads=4, lam=0.5)  # the paper's COCO setting


@pytest.fixture(scope="module")
def feat(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(images())[-1]  # [B, D, 4, 4]


def head_like(head: CSRAHead, **kw) -> CSRAHead:
    """A head with ``head``'s classifier and other temperature / lambda / normalisation."""
    args = {"temperature": head.temperature, "lam": head.lam, "normalize": head.normalize, **kw}
    c, d = head.classifier.weight.shape[:2]
    new = CSRAHead(d, c, **args)
    new.load_state_dict(head.state_dict())
    return new.eval()


def normalised_scores(head: CSRAHead, feat: torch.Tensor) -> torch.Tensor:
    w = head.classifier.weight.flatten(1)  # [C, D]
    return torch.einsum("bdhw,cd->bchw", feat, w / w.norm(dim=1, keepdim=True))


def test_lam_zero_is_the_gap_classifier(feat: torch.Tensor) -> None:
    model = build(lam=0.0)
    with torch.no_grad():
        logits = model.forward_head([feat])
        head = model.heads[0]
        scores = normalised_scores(head, feat)  # [B, C, h, w]
        w = head.classifier.weight.flatten(1)
        gap = F.linear(feat.mean(dim=(2, 3)), w / w.norm(dim=1, keepdim=True))  # [B, C]
    torch.testing.assert_close(logits, scores.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, gap)


def test_attention_term_is_softmax_weighted_score(model, feat) -> None:
    base, res = head_like(model.heads[0], lam=0.0), head_like(model.heads[0], lam=0.3)
    with torch.no_grad():
        att = (res(feat)[0] - base(feat)[0]) / 0.3
        s = normalised_scores(base, feat).flatten(2)  # [B, C, hw]
        expected = (torch.softmax(s, dim=-1) * s).sum(-1)  # T = 1
    torch.testing.assert_close(att, expected, rtol=1e-4, atol=1e-5)


def test_large_temperature_tends_to_max_pooling(model, feat) -> None:
    lam = 1.0
    with torch.no_grad():
        logits = {
            t: head_like(model.heads[0], temperature=t, lam=lam)(feat)[0] for t in (1, 1e4, 99)
        }
        s = normalised_scores(model.heads[0], feat)
    expected = s.mean(dim=(2, 3)) + lam * s.amax(dim=(2, 3))
    torch.testing.assert_close(logits[99], expected)  # T = 99: exact max (paper's notation)
    torch.testing.assert_close(logits[1e4], expected, rtol=1e-3, atol=1e-3)  # softmax limit
    assert (logits[1] < expected - 1e-4).any()  # a soft attention is not the max


def test_attention_maps_are_distributions(model) -> None:
    x = images(2)
    with torch.no_grad():
        logits, maps = model(x, return_attention=True)
        feat = model.backbone(x)[-1]
        s = normalised_scores(model.heads[0], feat)
        _, max_attn = model.heads[3](feat)
    assert maps.shape == (2, NUM_CLASSES, SIZE // 32, SIZE // 32)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, NUM_CLASSES))
    # the first head's attention: softmax(T_1 * s) over positions with T_1 = 1
    torch.testing.assert_close(maps.flatten(2), torch.softmax(s.flatten(2), dim=-1))
    torch.testing.assert_close(logits, model(x))
    # the max-pooling head's attention is one-hot on the arg-max
    assert ((max_attn == 0) | (max_attn == 1)).all() and (max_attn.sum(dim=(2, 3)) == 1).all()


def test_multi_head_sums_heads_with_paper_temperatures(model, feat) -> None:
    assert [h.temperature for h in model.heads] == list(PAPER_TEMPERATURES[4])
    assert [h.max_pool for h in model.heads] == [False, False, False, True]
    assert len({h.classifier.weight.data_ptr() for h in model.heads}) == 4  # own classifiers
    with torch.no_grad():
        total = model.forward_head([feat])
        per_head = torch.stack([head(feat)[0] for head in model.heads])  # [H, B, C]
        # each head is a single-head CSRA with that temperature and that classifier
        single = head_like(model.heads[0], temperature=4.0)
        single.load_state_dict(model.heads[2].state_dict())
        torch.testing.assert_close(single(feat)[0], per_head[2])
    torch.testing.assert_close(total, per_head.sum(dim=0))


def test_normalised_scores_ignore_classifier_scale(model, feat) -> None:
    norm = head_like(model.heads[0], lam=0.2)
    raw = head_like(model.heads[0], lam=0.0, normalize=False)  # raw scores scale with weights
    with torch.no_grad():
        before, raw_before = norm(feat)[0], raw(feat)[0]
        norm.classifier.weight[1] *= 7.0
        raw.classifier.weight[1] *= 7.0
        after, raw_after = norm(feat)[0], raw(feat)[0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw_after[:, 1], 7.0 * raw_before[:, 1], rtol=1e-4, atol=1e-5)


def test_options(model) -> None:
    with pytest.raises(mlic.errors.ConfigError, match="num_heads"):
        build(num_heads=3)
    with pytest.raises(mlic.errors.ConfigError, match="2 temperatures for num_heads=1"):
        build(temperatures=[1.0, 2.0])
    with pytest.raises(mlic.errors.ConfigError, match="temperature must be > 0"):
        CSRAHead(8, NUM_CLASSES, temperature=0.0)
    assert [h.temperature for h in build(num_heads=3, temperatures=[1, 2, 99]).heads] == [1, 2, 99]
    n_head = sum(p.numel() for p in model.heads.parameters())
    assert n_head == 4 * NUM_CLASSES * model.backbone.channels[-1]  # bias-free 1x1 convs
