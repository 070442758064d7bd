"""MSFormer's own mechanisms: parameter count, shared branches, hierarchical scale attention,
decoders without self-attention, normalised attention maps, interpolated positional encodings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mlic
from conftest import TINY_BACKBONE
from mlic.bench import count_params
from mlic.config import load_config
from mlic.errors import ConfigError
from mlic.models._layers import LabelQueryDecoderLayer, TransformerEncoderLayer
from mlic.models.msformer import (
    INTERPOLATION_MODES,
    HierarchicalScaleAttention,
    MSFormer,
)

C = 5
SMALL = {"d_model": 32, "num_heads": 4, "ffn_dim": 64}  # a fast head for the CPU tests
CONFIGS = Path(mlic.__file__).parent / "configs"


def build(**kw) -> MSFormer:
    torch.manual_seed(0)
    opts = {**SMALL, **kw}
    return mlic.create_model("msformer", C, backbone=TINY_BACKBONE, pretrained=False, **opts).eval()


def images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_parameter_count_matches_paper() -> None:
    # ResNet-101, 448 px, 80 classes: the paper reports 69.5 M (Section 4.3)
    with torch.device("meta"):
        model = mlic.create_model("msformer", 80, backbone="resnet101", pretrained=False)
    n = count_params(model)
    assert abs(n / 69.5e6 - 1) < 0.02, f"{n / 1e6:.2f} M parameters"
    assert [tuple(p.shape[-2:]) for p in model.pos_embed] == [(28, 28), (14, 14), (7, 7)]
    assert [c.out_channels for c in model.branch_convs] == [512, 512, 512]
    assert model.branch_convs[2].stride == (2, 2) and model.branch_convs[2].kernel_size == (3, 3)
    assert len(model.encoders) == 2 and len(model.decoders) == 3
    assert model.class_weight.shape == (80, 3 * 512)


@pytest.mark.parametrize("setting", [False, True, "first", "rest"])
def test_decoder_self_attention_flag(setting: bool | str) -> None:
    model = build(decoder_self_attention=setting)
    has = [layer.self_attn is not None for layer in model.decoders]
    expected = {
        False: [False] * 3,
        True: [True] * 3,
        "first": [True, False, False],
        "rest": [False, True, True],
    }[setting]
    assert has == expected
    names = [n for n, _ in model.decoders.named_parameters() if ".self_attn." in n]
    assert bool(names) == any(expected)
    d = SMALL["d_model"]
    per_block = 4 * (d * d + d) + 2 * d  # q, k, v, proj + LayerNorm
    extra = count_params(model) - count_params(build(decoder_self_attention=False))
    assert extra == sum(expected) * per_block
    assert model(images()).shape == (2, C)
    with pytest.raises(ConfigError, match="decoder_self_attention"):
        build(decoder_self_attention="sometimes")


def test_branches_share_encoders_and_decoders() -> None:
    model = build()
    calls: dict[str, list] = {"enc": [], "dec": []}

    def hook(kind: str):
        return lambda _m, args, kwargs, _out: calls[kind].append(kwargs["segments"])

    for layer in model.encoders:
        assert isinstance(layer, TransformerEncoderLayer)
        layer.register_forward_hook(hook("enc"), with_kwargs=True)
    for layer in model.decoders:
        assert isinstance(layer, LabelQueryDecoderLayer)
        layer.register_forward_hook(hook("dec"), with_kwargs=True)
    with torch.no_grad():
        model(images())
    # every layer object runs once over the three branches packed: 64 px on the tiny
    # backbone gives grids of 4x4, 2x2 and 1x1 tokens, and C label queries per branch
    assert calls["enc"] == [[16, 4, 1]] * 2
    assert calls["dec"] == [([C] * 3, [16, 4, 1])] * 3
    # the parameters are those of one stack, not three
    one_enc = count_params(TransformerEncoderLayer(32, 4, 64))
    one_dec = count_params(LabelQueryDecoderLayer(32, 4, 64, self_attention=False))
    assert count_params(model.encoders) == 2 * one_enc
    assert count_params(model.decoders) == 3 * one_dec
    assert model.label_embed.weight.shape == (C, 32)  # one query set for all branches


def test_hierarchical_scale_attention_follows_eqs_2_to_5() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, s, s, generator=g) for s in (8, 4, 2)]
    out = HierarchicalScaleAttention("bilinear", gate_init=None)(xs)  # the paper's weight 1
    up = [F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False) for x in xs[1:]]
    m = xs[0] * up[0] * up[1]
    torch.testing.assert_close(out[0], xs[0] + m)  # x1 keeps its size
    for i, (u, s) in enumerate(zip(up, (4, 2), strict=True), start=1):
        back = F.interpolate(u + m, size=(s, s), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i], back)
        assert out[i].shape == xs[i].shape


def test_gated_scale_attention_starts_as_identity_and_reaches_the_paper() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, s, s, generator=g) for s in (8, 4, 2)]
    gated = HierarchicalScaleAttention("bilinear")  # default: learnable gamma from 0
    assert gated.gamma is not None and float(gated.gamma) == 0.0
    torch.testing.assert_close(gated(xs)[0], xs[0])  # gamma 0: the identity on x1
    with torch.no_grad():
        gated.gamma.fill_(1.0)
    paper = HierarchicalScaleAttention("bilinear", gate_init=None)
    for a, b in zip(gated(xs), paper(xs), strict=True):
        torch.testing.assert_close(a, b)  # gamma 1: exactly Eqs. 2-5


def test_scale_fusion_none_leaves_branches_alone() -> None:
    model = build(scale_fusion="none")
    assert model.scale_attention is None
    feats = model.backbone(images())
    xs = model.scale_features(feats)
    torch.testing.assert_close(xs[0], model.branch_convs[0](feats[0]))
    torch.testing.assert_close(xs[2], model.branch_convs[2](feats[1]))
    fused = build(scale_gate_init=None).scale_features(feats)
    assert not torch.allclose(fused[0], xs[0])  # the hierarchical model does change them


@pytest.mark.parametrize("mode", INTERPOLATION_MODES)
def test_interpolation_modes_run(mode: str) -> None:
    model = build(interpolation=mode)
    with torch.no_grad():
        logits, maps = model(images(96), return_attention=True)
    assert logits.shape == (2, C) and torch.isfinite(logits).all()
    assert maps.shape == (2, C, 6, 6) and torch.isfinite(maps).all()


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="interpolation"):
        build(interpolation="lanczos")
    with pytest.raises(ConfigError, match="scale_fusion"):
        build(scale_fusion="concat")
    with pytest.raises(ConfigError, match="num_decoders"):
        build(num_decoders=0)


def test_attention_maps_are_normalised_per_branch() -> None:
    model = build()
    x = images(96)  # branches 6x6, 3x3, 2x2
    with torch.no_grad():
        zs, maps = model.forward_branches(model.backbone(x), need_weights=True)
        logits, fused = model(x, return_attention=True)
    assert [z.shape for z in zs] == [(2, C, 32)] * 3
    assert [tuple(m.shape[-2:]) for m in maps] == [(6, 6), (3, 3), (2, 2)]
    for m in maps:
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(dim=(2, 3)), torch.ones(2, C))
    assert fused.shape == (2, C, 6, 6) and (fused >= 0).all()
    torch.testing.assert_close(fused, MSFormer.fuse_attention(maps))
    torch.testing.assert_close(fused.sum(dim=(2, 3)), torch.ones(2, C))
    torch.testing.assert_close(logits, model(x))  # asking for maps does not change the logits


def test_positional_encoding_is_interpolated_for_other_sizes() -> None:
    model = build()
    # sized for the default 448 px input: 28, 14, 7 cells on test_resnet's strides 16 and 32
    assert [tuple(p.shape) for p in model.pos_embed] == [
        (1, 32, 28, 28),
        (1, 32, 14, 14),
        (1, 32, 7, 7),
    ]
    torch.testing.assert_close(model.positional_encoding(0, 28, 28), model.pos_embed[0])
    small = model.positional_encoding(1, 3, 5)
    expected = F.interpolate(model.pos_embed[1], size=(3, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small, expected)
    with torch.no_grad():
        assert model(images(64)).shape == (2, C)  # 4x4, 2x2, 1x1 branches
        assert model(images(128)).shape == (2, C)
    sized = build(pos_image_size=64)
    assert [tuple(p.shape[-2:]) for p in sized.pos_embed] == [(4, 4), (2, 2), (1, 1)]


def test_per_class_classifier_and_ablation_variants() -> None:
    model = build()
    x = images()
    with torch.no_grad():
        before = model(x)
        # a random direction: a constant one is invisible, as each branch's Z_i comes out of a
        # LayerNorm (zero mean over its D features, so adding c to all weights adds ~0)
        model.class_weight[2].add_(torch.randn(3 * 32, generator=torch.Generator().manual_seed(0)))
        after = model(x)
    changed = (after - before).abs() > 1e-6
    assert changed[:, 2].all() and not changed[:, [0, 1, 3, 4]].any()  # one linear per class
    for kw in ({"classifier": "shared"}, {"num_encoders": 0}, {"num_decoders": 1}):
        with torch.no_grad():
            assert build(**kw)(x).shape == (2, C)
    assert build(num_encoders=0).encoders.__len__() == 0


def test_paper_settings_and_configs() -> None:
    paper = build().default_cfg["paper"]
    assert paper["loss"] == "asl" and paper["gamma_neg"] == 4.0 and paper["gamma_pos"] == 0.0
    assert paper["optimizer"] == "adamw" and paper["lr"] == 1e-4 and paper["weight_decay"] == 1e-2
    assert paper["epochs"] == 80 and paper["params_m"] == 69.5
    for name in ("voc2007", "coco2014"):
        cfg = load_config(CONFIGS / f"msformer_{name}.yaml")
        assert cfg.model.name == "msformer" and cfg.model.backbone == "resnet101.tv_in1k"
        assert cfg.data.image_size == 448 and cfg.data.randaugment and cfg.data.random_erasing > 0
        assert (cfg.loss.name, cfg.loss.gamma_neg, cfg.loss.gamma_pos) == ("asl", 4.0, 0.0)
        assert cfg.loss.clip == 0.0 and not cfg.data.hflip  # Eq. 12: no shift; no flip
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-4, 1e-2)
        assert cfg.train.epochs == 80
    demo = load_config(CONFIGS / "msformer_demo.yaml")
    assert demo.run.name == "msformer_demo" and demo.data.image_size == 192


def test_attention_weight_dropout_is_off_by_default_and_configurable() -> None:
    from mlic.models._layers import CrossAttention

    def rates(model: MSFormer) -> tuple[set[float], set[float]]:
        attn = {m.dropout for m in model.modules() if isinstance(m, CrossAttention)}
        other = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        return attn, other

    assert rates(build()) == ({0.0}, {0.1})  # fused CPU flash kernel; FFN/residual keep 0.1
    assert rates(build(attn_dropout=0.1, dropout=0.2)) == ({0.1}, {0.2})


def test_packed_branches_equal_a_loop_over_branches() -> None:
    """The packed forward (all branches' tokens in one sequence, attention per branch) gives
    what running the shared layers on each branch separately gives, attention maps too."""
    for self_attention in (False, "all"):
        model = build(decoder_self_attention=self_attention)
        x = images(96)
        with torch.no_grad():
            feats = model.backbone(x)
            zs, maps = model.forward_branches(feats, need_weights=True)
            for i, branch in enumerate(model.scale_features(feats)):
                b, _, h, w = branch.shape
                tokens = (branch + model.positional_encoding(i, h, w)).flatten(2).transpose(1, 2)
                for layer in model.encoders:
                    tokens = layer(tokens)
                q = model.label_embed.weight.unsqueeze(0).repeat(b, 1, 1)
                for j, layer in enumerate(model.decoders):
                    q, attn = layer(q, tokens, need_weights=j == len(model.decoders) - 1)
                torch.testing.assert_close(zs[i], q, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(maps[i], attn.reshape(b, C, h, w), rtol=1e-4, atol=1e-6)
