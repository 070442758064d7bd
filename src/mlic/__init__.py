"""mlic: multi-label image classification -- one registry, one trainer, one set of metrics.

The public names are imported lazily, so ``import mlic.data`` does not pay for timm.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "mlic.models",
    "list_models": "mlic.models",
    "register_model": "mlic.models",
    "save_checkpoint": "mlic.engine.checkpoint",
    "load_checkpoint": "mlic.engine.checkpoint",
    "Predictor": "mlic.inference",
    "LabelSet": "mlic.data.labels",
    "Annotations": "mlic.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("data", "models", "metrics", "losses", "engine", "config"):
        return import_module(f"mlic.{name}")
    raise AttributeError(f"module 'mlic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
