"""Model families, one per module. Importing this package registers every model variant.

Every module here other than the infrastructure ones (registry, backbone, layers,
pretrained, papers) is a model family whose ``@register_model`` functions run on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from mlic.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "is_model"]

_INFRASTRUCTURE = {"registry", "backbone", "layers", "pretrained", "papers"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_mod}")
