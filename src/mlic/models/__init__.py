"""Model families, one per module. Importing this package registers every model variant.

Every module here whose name does not start with ``_`` is a model family whose
``@register_model`` functions run on import; ``_``-prefixed modules are infrastructure
(registry, base class, backbone, layers, pretrained weights, published results), as in timm.
"""

from __future__ import annotations

import importlib
import pkgutil

from mlic.models._registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "is_model"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
