"""Checkpoints: one ``.safetensors`` file a user keeps, and a separate resume state.

* ``save_checkpoint`` writes tensors + JSON metadata (model name and kwargs, label names,
  input size, mean/std, thresholds, mlic version) so ``load_checkpoint`` rebuilds the model
  from the file alone. Loading is strict and names missing/unexpected keys.
* ``save_resume``/``load_resume``: optimizer, scheduler, EMA, scaler, RNG, epoch, step as
  plain tensors and containers, loaded with ``torch.load(weights_only=True)`` -- a file
  carrying a pickled object is refused, never executed.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mlic.engine.faults import maybe_kill
from mlic.errors import CheckpointError

__all__ = [
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "update_metadata",
    "save_resume",
    "load_resume",
    "unwrap_model",
]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        maybe_kill("kill_in_write", path.name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _mlic_version() -> str:
    from mlic import __version__

    return __version__


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    label_names: list[str],
    state_dict: dict[str, torch.Tensor] | None = None,
    **metadata: Any,
) -> Path:
    """Write ``model`` (or the given ``state_dict``, e.g. EMA weights) as one safetensors file.

    The model must come from :func:`mlic.create_model` (it carries its registry name and
    kwargs). Extra ``metadata`` (thresholds, metrics, epoch, ...) must be JSON-serialisable.
    """
    model = unwrap_model(model)
    name = getattr(model, "mlic_name", None)
    if name is None:
        raise CheckpointError("model was not built by mlic.create_model: no registry name to save")
    kwargs = dict(getattr(model, "mlic_kwargs", {}))
    kwargs.update(getattr(model, "rebuild_kwargs", {}))
    kwargs["pretrained"] = False  # the checkpoint holds the weights
    cfg = getattr(model, "default_cfg", {})
    meta = {
        "format": "mlic",
        "mlic_version": _mlic_version(),
        "model": name,
        "num_classes": len(label_names),
        "model_kwargs": kwargs,
        "label_names": list(label_names),
        "input_size": list(metadata.pop("input_size", cfg.get("input_size", (3, 448, 448)))),
        "mean": list(metadata.pop("mean", cfg.get("mean", (0.485, 0.456, 0.406)))),
        "std": list(metadata.pop("std", cfg.get("std", (0.229, 0.224, 0.225)))),
        **metadata,
    }
    try:
        encoded = {k: json.dumps(v) for k, v in meta.items()}
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    sd = state_dict if state_dict is not None else model.state_dict()
    # safetensors refuses shared storage and non-contiguous tensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=encoded))
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of an mlic safetensors checkpoint (no tensors loaded)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a safetensors checkpoint ({e}); mlic never unpickles files"
        ) from e
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not mlic JSON ({e})") from e
    for key in ("model", "num_classes", "label_names", "model_kwargs"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata has no {key!r}; not an mlic checkpoint")
    return meta


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the metadata and load its tensors strictly.

    ``path``: a ``.safetensors`` file or ``hf-hub:ORG/NAME`` (see :mod:`mlic.hub`).
    """
    from mlic.hub import resolve_checkpoint
    from mlic.models.registry import create_model, is_model

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    if not is_model(meta["model"]):
        raise CheckpointError(f"{path}: unknown model {meta['model']!r} in metadata")
    model = create_model(
        meta["model"], num_classes=int(meta["num_classes"]), **meta["model_kwargs"]
    )
    state = load_file(str(path), device="cpu")
    load_state_strict(model, state, str(path))
    model.to(device).eval()
    return model, meta


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming missing/unexpected/mismatched keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise CheckpointError(f"{where}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def update_metadata(path: str | Path, **updates: Any) -> dict[str, Any]:
    """Rewrite a checkpoint's metadata (e.g. tuned thresholds), tensors unchanged, atomically."""
    path = Path(path)
    meta = read_metadata(path)
    meta.update(updates)
    tensors = load_file(str(path))
    try:
        encoded = {k: json.dumps(v) for k, v in meta.items()}
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=encoded))
    return meta


def save_resume(state: dict[str, Any], path: str | Path) -> None:
    """Write the training resume state atomically (tensors and plain containers only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: str | Path) -> dict[str, Any]:
    """Load a resume state with ``weights_only=True``: pickled objects are refused, not run."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: resume state not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the file holds objects beyond plain tensors ({first})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable resume state ({e})") from e
