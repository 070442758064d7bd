"""AAMN: the categorical memory (moves only in training, only for present classes, survives
checkpoints), the zero-initialised relation modules and the channel attention.

Small models (timm's ``test_resnet``, 64 px, 5 classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.data.labels import LabelSet
from mlic.models.aamn import AAMN, ChannelRelation, SpatialRelation

C = 5
SIZE = 64


def build(**kw) -> AAMN:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = LabelSet.from_targets(
        [f"c{i}" for i in range(C)], (rng.random((30, C)) < 0.4).astype(np.int8)
    )
    return mlic.create_model("aamn", C, labels=labels, backbone=TINY_BACKBONE, **kw)


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def fill_memory(model: AAMN, seed: int = 2) -> None:
    """Random prototypes, all marked initialised, so any update is visible and uses momentum."""
    g = torch.Generator().manual_seed(seed)
    model.memory.memory.copy_(torch.randn(model.memory.memory.shape, generator=g))
    model.memory.initialized.fill_(True)


# batch targets: class 0 in images 0 and 1; class 1 only "ignore"; class 2 absent;
# class 3 in image 2 (image 3 ignored); class 4 absent
TARGETS = torch.tensor(
    [
        [1, -1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [0, -1, 0, 1, 0],
        [0, 0, 0, -1, 0],
    ],
    dtype=torch.float32,
)


def test_memory_unchanged_without_training_update() -> None:
    model = build()
    fill_memory(model)
    before = model.memory.memory.clone()
    model.eval()
    with torch.no_grad():
        model(images())
    model.on_train_batch_end(TARGETS)  # eval mode: nothing cached, no-op
    torch.testing.assert_close(model.memory.memory, before, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        model(images())  # training forward alone only caches the features
    torch.testing.assert_close(model.memory.memory, before, rtol=0, atol=0)
    model.eval()
    model.on_train_batch_end(TARGETS)  # hook called after switching to eval: no-op
    torch.testing.assert_close(model.memory.memory, before, rtol=0, atol=0)


def test_memory_moves_by_momentum_for_present_classes_only() -> None:
    model = build(memory_momentum=0.9)
    fill_memory(model)
    before = model.memory.memory.clone()
    model.train()
    with torch.no_grad():
        model(images())
    feats = model._last_label_features.clone()  # [B, C, d]
    model.on_train_batch_end(TARGETS)
    after = model.memory.memory
    expected0 = 0.9 * before[0] + 0.1 * feats[:2, 0].mean(dim=0)
    expected3 = 0.9 * before[3] + 0.1 * feats[2, 3]
    torch.testing.assert_close(after[0], expected0)
    torch.testing.assert_close(after[3], expected3)
    for c in (1, 2, 4):  # only ignored / absent in this batch
        torch.testing.assert_close(after[c], before[c], rtol=0, atol=0)
    # the cache is consumed: a second call does not move the memory again
    moved = after.clone()
    model.on_train_batch_end(TARGETS)
    torch.testing.assert_close(model.memory.memory, moved, rtol=0, atol=0)


def test_first_sighting_sets_the_prototype() -> None:
    model = build()
    assert not model.memory.initialized.any() and (model.memory.memory == 0).all()
    model.train()
    with torch.no_grad():
        model(images())
    feats = model._last_label_features.clone()
    model.on_train_batch_end(TARGETS)
    torch.testing.assert_close(model.memory.memory[0], feats[:2, 0].mean(dim=0))
    assert model.memory.initialized.tolist() == [True, False, False, True, False]
    assert (model.memory.memory[[1, 2, 4]] == 0).all()


def test_memory_read_changes_the_logits() -> None:
    model = build().eval()
    x = images()
    with torch.no_grad():
        empty = model(x)
        fill_memory(model)
        filled = model(x)
    assert not torch.allclose(empty, filled)


def test_memory_survives_checkpoint(tmp_path: Path) -> None:
    model = build()
    model.train()
    with torch.no_grad():
        model(images())
    model.on_train_batch_end(TARGETS)
    model.eval()
    assert model.memory.memory.abs().sum() > 0
    path = mlic.save_checkpoint(model, tmp_path / "aamn.safetensors", [f"c{i}" for i in range(C)])
    loaded, _ = mlic.load_checkpoint(path)
    torch.testing.assert_close(loaded.memory.memory, model.memory.memory, rtol=0, atol=0)
    assert torch.equal(loaded.memory.initialized, model.memory.initialized)
    x = images(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_relation_modules_start_as_identity() -> None:
    model = build().eval()
    assert model.channel_relation.gamma.item() == 0.0
    assert model.spatial_relation.gamma.item() == 0.0
    with torch.no_grad():
        feat = model.backbone(images())[-1]
        reduced = model.reduce(feat)
        torch.testing.assert_close(model.enhance(feat), reduced, rtol=0, atol=0)


def test_channel_attention_rows_sum_to_one_and_match_forward() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6)
    module = ChannelRelation()
    attn = module.attention(x)  # [B, D, D]
    assert attn.shape == (2, 16, 16) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 16))
    with torch.no_grad():
        module.gamma.fill_(0.5)
        out = module(x)
    expected = 0.5 * (attn @ x.flatten(2)).view_as(x) + x  # DANet CAM with residual weight
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_spatial_attention_is_over_all_pixel_pairs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6)
    module = SpatialRelation(16, reduction=4)
    attn = module.attention(x)
    assert attn.shape == (2, 30, 30)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 30))
    with torch.no_grad():
        module.gamma.fill_(1.0)
        out = module(x)
    v = module.value(x).flatten(2)  # [B, D, N]
    torch.testing.assert_close(out, (v @ attn.transpose(1, 2)).view_as(x) + x, rtol=1e-5, atol=1e-5)


def test_dim_none_keeps_backbone_width_and_maps_normalised() -> None:
    model = build(dim=None).eval()
    assert model.dim == model.backbone.channels[-1]
    with torch.no_grad():
        logits, maps = model(images(2), return_attention=True)
    assert logits.shape == (2, C)
    torch.testing.assert_close(maps.flatten(2).sum(-1), torch.ones(2, C))
