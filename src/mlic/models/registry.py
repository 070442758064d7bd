"""Model registry: variants register with a decorator, duplicates are refused.

Each registered entry is a factory ``fn(num_classes, labels=None, **kwargs) -> nn.Module``.
Models carry ``default_cfg`` (input size, normalisation, paper settings) as data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from mlic.errors import ConfigError

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entrypoint"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name; a second registration of a name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def _import_all() -> None:
    # Importing the package runs every model file's @register_model.
    import mlic.models  # noqa: F401


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    _import_all()
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    _import_all()
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    _import_all()
    if name not in _MODELS:
        raise ConfigError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}"
        )
    return _MODELS[name]


def create_model(
    name: str, num_classes: int, labels: Any | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered model name (see :func:`list_models`).
        num_classes: number of labels C; the model returns logits [B, C].
        labels: the training split's :class:`~mlic.data.labels.LabelSet` for models that
            need a label graph or word vectors; optional for the others.
        **kwargs: model options (``backbone=``, ``pretrained=``, model-specific keys).
            ``prior_bias=True``, for every model, adds a learnable per-class logit offset
            started at the training split's class log-odds (taken from ``labels``; see
            :meth:`~mlic.models.layers.MultiLabelModel.add_prior_bias`).
    """
    fn = model_entrypoint(name)
    if labels is not None and labels.num_classes != num_classes:
        raise ConfigError(f"labels has {labels.num_classes} classes but num_classes={num_classes}")
    options = dict(kwargs)
    prior_bias = options.pop("prior_bias", False)
    if not isinstance(prior_bias, bool):
        raise ConfigError(f"model {name!r}: prior_bias={prior_bias!r}, expected true or false")
    try:
        model = fn(num_classes=num_classes, labels=labels, **options)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}") from e
    if prior_bias:
        if not hasattr(model, "add_prior_bias"):
            raise ConfigError(f"model {name!r} does not support prior_bias")
        model.add_prior_bias(labels)
    model.mlic_name = name  # type: ignore[attr-defined]
    model.mlic_kwargs = dict(kwargs)  # type: ignore[attr-defined]
    return model
