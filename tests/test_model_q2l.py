"""Query2Label's own mechanisms: label queries, decoder self-attention, group FC, attention maps."""

from __future__ import annotations

import copy

import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.errors import ConfigError
from mlic.models._layers import sine_position_encoding

NUM_CLASSES = 5
SIZE = 96  # test_resnet: stride 32 -> a 3 x 3 map


def build(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mlic.create_model("q2l", NUM_CLASSES, backbone=TINY_BACKBONE, pretrained=False, **kw)
    return model.eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build()


@pytest.fixture(scope="module")
def model_no_sa() -> torch.nn.Module:
    return build(decoder_self_attention=False)


@pytest.fixture(scope="module")
def feat(model: torch.nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.backbone(images(3))  # [[B, D, 3, 3]]


def test_paper_defaults_follow_the_backbone(model: torch.nn.Module) -> None:
    channels = model.backbone.channels[-1]
    assert model.hidden_dim == channels  # d = backbone channels, as 2048 for ResNet-101
    assert isinstance(model.input_proj, torch.nn.Identity)  # no projection needed
    assert len(model.encoder) == 1 and len(model.decoder) == 2
    layer = model.decoder[0]
    assert layer.cross_attn.num_heads == 4
    assert layer.ffn[0].out_features == 4 * channels
    assert model.query_embed.shape == (NUM_CLASSES, channels)


def test_input_projection_only_when_widths_differ() -> None:
    model = build(hidden_dim=64)
    assert isinstance(model.input_proj, torch.nn.Conv2d)
    assert model.input_proj.kernel_size == (1, 1) and model.input_proj.out_channels == 64
    assert model(images()).shape == (2, NUM_CLASSES)
    with pytest.raises(mlic.errors.ConfigError, match="input_proj=False"):
        build(hidden_dim=64, input_proj=False)


def test_decoders_have_self_attention_parameters(model, model_no_sa) -> None:
    with_sa, without_sa = model, model_no_sa
    d = with_sa.hidden_dim
    assert all(layer.self_attn is not None for layer in with_sa.decoder)
    assert all(layer.self_attn is None for layer in without_sa.decoder)
    per_layer = 4 * (d * d + d) + 2 * d  # q, k, v, out projections + LayerNorm
    n_with = sum(p.numel() for p in with_sa.parameters())
    n_without = sum(p.numel() for p in without_sa.parameters())
    assert n_with - n_without == len(with_sa.decoder) * per_layer


def test_queries_interact_only_through_self_attention(model, model_no_sa, feat) -> None:
    for self_attention, base in ((False, model_no_sa), (True, model)):
        m = copy.deepcopy(base)
        with torch.no_grad():
            before = m.forward_head(feat)
            m.query_embed[2] += 1.0
            after = m.forward_head(feat)
        changed = (after - before).abs().amax(dim=0) > 1e-6  # [C]
        assert changed[2]
        others = changed[torch.arange(NUM_CLASSES) != 2]
        # without self-attention each label query is decoded independently of the others
        assert others.any() == self_attention


def test_group_fc_gives_one_logit_per_class_from_its_own_weights(model, feat) -> None:
    m = copy.deepcopy(model)
    with torch.no_grad():
        before = m.forward_head(feat)
        m.fc.weight[3] *= -2.0
        after = m.forward_head(feat)
    assert m.fc.weight.shape == (NUM_CLASSES, m.hidden_dim)
    assert m.fc.bias.shape == (NUM_CLASSES,)
    diff = (after - before).abs()
    assert (diff[:, 3] > 1e-6).all()
    torch.testing.assert_close(after[:, [0, 1, 2, 4]], before[:, [0, 1, 2, 4]], rtol=0, atol=0)


def test_cross_attention_maps_are_distributions_over_positions(model) -> None:
    x = images(3)
    with torch.no_grad():
        logits, maps = model(x, return_attention=True)
        plain = model(x)
    assert maps.shape == (3, NUM_CLASSES, SIZE // 32, SIZE // 32)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, NUM_CLASSES))
    torch.testing.assert_close(logits, plain)  # the explicit-weights path = the fused SDPA path


def test_sine_position_encoding() -> None:
    h, w, d = 3, 4, 16
    pos = sine_position_encoding(h, w, d).view(h, w, d)
    assert pos.abs().max() <= 1.0
    # first half encodes the row only, second half the column only
    torch.testing.assert_close(pos[:, :1, : d // 2].expand(h, w, d // 2), pos[..., : d // 2])
    torch.testing.assert_close(pos[:1, :, d // 2 :].expand(h, w, d // 2), pos[..., d // 2 :])
    # every position gets a distinct code; sin/cos pairs share a frequency (sin^2 + cos^2 = 1)
    flat = pos.reshape(h * w, d)
    assert torch.cdist(flat, flat).add(torch.eye(h * w)).min() > 1e-3
    torch.testing.assert_close(pos[..., 0::2] ** 2 + pos[..., 1::2] ** 2, torch.ones(h, w, d // 2))
    with pytest.raises(ConfigError, match="divisible by 4"):
        sine_position_encoding(2, 2, 10)


def test_positions_reach_the_output(model) -> None:
    # the same features at permuted positions give different logits: positions are encoded
    feat = torch.randn(1, model.backbone.channels[-1], 3, 3)
    perm = feat.flatten(2)[..., torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        a = model.forward_head([feat])
        b = model.forward_head([perm.view_as(feat)])
    assert not torch.allclose(a, b, atol=1e-5)
