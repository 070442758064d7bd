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
import math
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mlic.config import DEFAULT_IMAGE_SIZE
from mlic.errors import CheckpointError
from mlic.files import atomic_write, display_path, require_regular_file

__all__ = [
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "update_metadata",
    "save_resume",
    "load_resume",
    "unwrap_model",
    "validate_metadata",
]


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
        "input_size": list(
            metadata.pop(
                "input_size", cfg.get("input_size", (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
            )
        ),
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
    require_regular_file(path, "checkpoint", error=CheckpointError)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # a name from another system (surrogate escapes)
        raise CheckpointError(
            f"{display_path(path)}: the file name is not UTF-8, which safetensors cannot open; "
            "rename the file or link to it under a UTF-8 name"
        ) from None
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
    validate_metadata(
        meta, str(path), label_count=False
    )  # load_checkpoint checks it after the shapes
    return meta


#: Bounds on values read from a checkpoint's metadata (a file may come from anyone).
MAX_CLASSES = 100_000
MAX_LABEL_CHARS = 1_000
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 4_096


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plain_kwarg(x: Any) -> bool:
    """A model option value as mlic saves them: a short string, a bool, a bounded number or null."""
    if x is None or isinstance(x, bool):
        return True
    if isinstance(x, str):
        return len(x) <= 256
    return _finite_number(x) and abs(x) <= 1_000_000


def validate_metadata(meta: dict[str, Any], where: str, label_count: bool = True) -> None:
    """Check every metadata value mlic uses, with bounds, before anything uses it.

    Raises CheckpointError ``"<where>: metadata <key> ..."`` naming the key and the bound:
    a hostile or damaged file can not make mlic allocate without bound (``input_size``),
    mis-read labels (a string ``label_names`` split into characters, duplicate names
    collapsing a score column) or divide by zero (``std``). ``label_count=False`` leaves
    the names-vs-``num_classes`` check to :func:`load_checkpoint`, which first compares the
    model's shapes with the file's tensors (the more telling message).
    """

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: metadata {key} {why}; refusing this checkpoint")

    if not isinstance(meta.get("model"), str) or not meta["model"]:
        raise bad("model", "must be a model name (a non-empty string)")
    n = meta.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CLASSES:
        raise bad("num_classes", f"must be an integer in [1, {MAX_CLASSES}], got {n!r:.60}")
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise bad("label_names", f"must be a list of strings, got {type(names).__name__}")
    if label_count and len(names) != n:
        raise bad("label_names", f"has {len(names)} names but num_classes is {n}")
    if any(not x or len(x) > MAX_LABEL_CHARS for x in names):
        raise bad(
            "label_names", f"must be non-empty strings of at most {MAX_LABEL_CHARS} characters"
        )
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})[:5]
        raise bad("label_names", f"has duplicates {dup}")
    kwargs = meta.get("model_kwargs")
    if not isinstance(kwargs, dict):
        raise bad("model_kwargs", "must be a JSON object")
    for k, v in kwargs.items():
        items = v if isinstance(v, list) else [v]
        if len(items) > 64 or not all(_plain_kwarg(x) for x in items):
            raise bad(f"model_kwargs.{k}", f"is not a plain option value ({v!r:.60})")
    if kwargs.get("pretrained") not in (None, False):  # weights come from the file, nothing else
        raise bad("model_kwargs.pretrained", "must be false (a checkpoint holds its weights)")
    size = meta.get("input_size", [3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE])
    if (
        not isinstance(size, list)
        or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        or size[0] != 3
        or not all(MIN_INPUT_SIZE <= v <= MAX_INPUT_SIZE for v in size[1:])
    ):
        raise bad(
            "input_size",
            f"must be [3, H, W] with H, W in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}], got {size!r:.60}",
        )
    resize = meta.get("resize")  # data.resize: warp to this side, then the centre crop
    if resize is not None and (
        not isinstance(resize, int)
        or isinstance(resize, bool)
        or not max(size[1:]) <= resize <= MAX_INPUT_SIZE
    ):
        raise bad(
            "resize",
            f"must be an integer in [{max(size[1:])}, {MAX_INPUT_SIZE}], got {resize!r:.60}",
        )
    for key, positive in (("mean", False), ("std", True)):
        v = meta.get(key, [0.5, 0.5, 0.5])
        if (
            not isinstance(v, list)
            or len(v) != 3
            or not all(_finite_number(x) and (x > 0 if positive else abs(x) <= 1e3) for x in v)
        ):
            what = "3 finite numbers > 0" if positive else "3 finite numbers"
            raise bad(key, f"must be {what}, got {v!r:.60}")
    thr = meta.get("thresholds")
    if thr is not None and (
        not isinstance(thr, list)
        or len(thr) != n
        or not all(_finite_number(t) and 0.0 <= t <= 1.0 for t in thr)
    ):
        raise bad("thresholds", f"must be {n} numbers in [0, 1] (one per label)")


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the metadata and load its tensors strictly.

    ``path``: a ``.safetensors`` file or ``hf-hub:ORG/NAME`` (see :mod:`mlic.hub_files`).
    """
    from mlic.hub_files import resolve_checkpoint
    from mlic.models import create_model, is_model

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    if not is_model(meta["model"]):
        raise CheckpointError(f"{path}: unknown model {meta['model']!r} in metadata")
    # Build the model on the meta device first (no memory) and compare its tensor shapes
    # with the file's header: metadata asking for a model larger than the file is refused
    # before any real allocation.
    try:
        with torch.device("meta"):
            skeleton = create_model(
                meta["model"], num_classes=int(meta["num_classes"]), **meta["model_kwargs"]
            )
    except Exception as e:  # noqa: BLE001 -- untrusted kwargs: any failure is the file's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: cannot build model {meta['model']!r} from the metadata's model_kwargs ({first})"
        ) from e
    with safe_open(str(path), framework="pt") as f:
        header = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    load_state_strict(skeleton, header, str(path), check_only=True)
    del skeleton, header
    model = create_model(
        meta["model"], num_classes=int(meta["num_classes"]), **meta["model_kwargs"]
    )
    state = load_file(str(path), device="cpu")
    load_state_strict(model, state, str(path))
    if len(meta["label_names"]) != meta["num_classes"]:
        raise CheckpointError(
            f"{path}: metadata label_names has {len(meta['label_names'])} names but the model "
            f"has {meta['num_classes']} outputs; refusing this checkpoint"
        )
    model.to(device).eval()
    return model, meta


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], where: str, check_only: bool = False
) -> None:
    """``load_state_dict(strict=True)`` with an error naming missing/unexpected/mismatched keys.

    ``check_only``: compare keys and shapes, load nothing (e.g. meta-device tensors)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise CheckpointError(f"{where}: weights do not match the model: " + "; ".join(parts))
    if not check_only:
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
    require_regular_file(path, "resume state", error=CheckpointError)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the file holds objects beyond plain tensors ({first})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable resume state ({e})") from e
