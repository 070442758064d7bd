"""One sweep over every registered model at a small size (timm's tiny ``test_resnet``, 64 px, 5 classes).

Each model must: build from a LabelSet, give finite logits [B, C], back-propagate into every
trainable parameter it uses, lower the loss on a fixed batch in a few optimiser steps,
return attention maps [B, C, h, w] when it has them, and survive save -> load with
identical logits (rebuilt from the checkpoint's metadata alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.data.labels import LabelSet
from mlic.errors import CheckpointError, ConfigError
from mlic.losses import build_loss
from mlic.models import register_model

NUM_CLASSES = 5
SIZE = 64


def tiny_labels(word_dim: int = 300) -> LabelSet:
    rng = np.random.default_rng(0)
    targets = (rng.random((40, NUM_CLASSES)) < 0.4).astype(np.int8)
    targets[:20, 1] = targets[:20, 0]  # a strong 0 -> 1 dependency for the graphs
    labels = LabelSet.from_targets([f"c{i}" for i in range(NUM_CLASSES)], targets)
    labels.word_vectors = rng.standard_normal((NUM_CLASSES, word_dim)).astype(np.float32)
    return labels


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return mlic.create_model(
        name, NUM_CLASSES, labels=tiny_labels(), backbone=TINY_BACKBONE, pretrained=False, **kw
    )


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, SIZE, SIZE, generator=g)
    y = (torch.rand(4, NUM_CLASSES, generator=g) < 0.5).float()
    y[0, 2] = -1  # an ignored entry
    return x, y


def test_registry_lists_the_model_cards() -> None:
    expected = {
        "baseline",
        "msformer",
        "attn_gcn",
        "ssgrl",
        "aamn",
        "mgsgn",
        "mlgcn",
        "q2l",
        "csra",
    }
    missing = expected - set(mlic.list_models())
    assert not missing, f"models not registered: {sorted(missing)}"


def test_duplicate_registration_refused() -> None:
    def baseline(num_classes: int, labels=None, **kw):  # noqa: ANN001
        raise AssertionError

    with pytest.raises(ValueError, match="'baseline' is already registered"):
        register_model(baseline)


def test_unknown_model_and_option() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet_gcn_9000'"):
        mlic.create_model("resnet_gcn_9000", 5)
    with pytest.raises(ConfigError, match="model 'baseline'.*no_such_option"):
        mlic.create_model("baseline", 5, backbone=TINY_BACKBONE, no_such_option=1)


@pytest.mark.parametrize("name", mlic.list_models())
def test_forward_backward_attention(name: str) -> None:
    model = build(name)
    x, y = fixed_batch()
    model.train()
    logits = model(x)
    assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()
    build_loss("bce")(logits, y).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), (
        "a parameter got no/NaN gradient"
    )
    model.eval()
    with torch.no_grad():
        out, maps = model(x, return_attention=True)
    assert out.shape == (4, NUM_CLASSES)
    assert maps.ndim == 4 and maps.shape[:2] == (4, NUM_CLASSES) and torch.isfinite(maps).all()
    assert model.default_cfg["input_size"][0] == 3


@pytest.mark.parametrize("name", mlic.list_models())
def test_few_steps_lower_the_loss(name: str) -> None:
    model = build(name)
    x, y = fixed_batch()
    loss_fn = build_loss("bce")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()  # fixed BN statistics: the loss must fall because the weights fit the batch
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    for _ in range(8):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
    assert after < before * 0.9, f"{name}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", mlic.list_models())
def test_save_load_identical_logits(name: str, tmp_path: Path) -> None:
    model = build(name).eval()
    x, _ = fixed_batch()
    path = mlic.save_checkpoint(
        model, tmp_path / "m.safetensors", [f"c{i}" for i in range(NUM_CLASSES)]
    )
    loaded, meta = mlic.load_checkpoint(path)
    assert meta["model"] == name and meta["label_names"][0] == "c0"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_load_checkpoint_names_mismatched_keys(tmp_path: Path) -> None:
    model = build("baseline")
    sd = model.state_dict()
    sd["fc.extra"] = torch.zeros(1)
    del sd["fc.bias"]
    path = mlic.save_checkpoint(model, tmp_path / "m.safetensors", list("abcde"), state_dict=sd)
    with pytest.raises(
        CheckpointError, match=r"missing keys \['fc.bias'\]; unexpected keys \['fc.extra'\]"
    ):
        mlic.load_checkpoint(path)


def test_baseline_cam_is_classifier_on_feature_map() -> None:
    model = build("baseline").eval()
    x, _ = fixed_batch()
    with torch.no_grad():
        logits, cam = model(x, return_attention=True)
    # GAP is linear, so the mean of the CAM plus the bias is exactly the logit
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + model.fc.bias, logits, rtol=1e-4, atol=1e-5)


def test_class_log_odds_values() -> None:
    from mlic.models._base import class_log_odds

    # p = (n + 0.5) / (N + 1): 0 of 9 -> 0.05, 9 of 9 -> 0.95, 4.5 of 9 would be 0.5
    out = class_log_odds([0, 9, 3], 9)
    expected = torch.tensor([np.log(0.05 / 0.95), np.log(0.95 / 0.05), np.log(0.35 / 0.65)])
    torch.testing.assert_close(out, expected.float())
    with pytest.raises(ConfigError, match="num_images=0"):
        class_log_odds([1], 0)


@pytest.mark.parametrize("name", ["baseline", "csra", "mlgcn", "msformer"])
def test_prior_bias_starts_at_class_log_odds_and_survives_save_load(
    name: str, tmp_path: Path
) -> None:
    from mlic.models._base import class_log_odds

    labels = tiny_labels()
    plain, prior = build(name), build(name, prior_bias=True)  # same seed: same other weights
    assert plain.prior_bias is None
    expected = class_log_odds(labels.counts, labels.num_images)
    torch.testing.assert_close(prior.prior_bias.data, expected)
    x, _ = fixed_batch()
    plain.eval(), prior.eval()
    with torch.no_grad():
        offset = prior(x) - plain(x)  # [B, C]: exactly the prior, for every image
        _, maps_plain = plain(x, return_attention=True)
        _, maps_prior = prior(x, return_attention=True)
    torch.testing.assert_close(offset, expected.expand_as(offset), rtol=0, atol=1e-5)
    torch.testing.assert_close(maps_prior, maps_plain)  # the maps are the head's, unshifted
    # trained like any head parameter (no weight decay: a 1-d tensor)
    groups = prior.param_groups(1e-3, 0.1, 0.05)
    (group,) = [g for g in groups if any(p is prior.prior_bias for p in g["params"])]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.0
    # the checkpoint rebuilds the offset (zeros without labels) and fills it from the state
    with torch.no_grad():
        prior.prior_bias.add_(0.25)
    path = mlic.save_checkpoint(prior, tmp_path / "m.safetensors", labels.names)
    loaded, _ = mlic.load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), prior(x), rtol=0, atol=1e-6)


def test_prior_bias_bad_value() -> None:
    with pytest.raises(ConfigError, match="prior_bias='yes'"):
        build("baseline", prior_bias="yes")
