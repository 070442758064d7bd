"""Model registry: variants register with a decorator, duplicates are refused.

Each registered entry is a factory ``fn(num_classes, labels=None, **kwargs) -> nn.Module``
and the model's published results (``@register_model(published=(PaperResult(...), ...))``,
see :mod:`mlic.models._papers`): the one place for the papers' figures.
Models carry ``default_cfg`` (input size, normalisation, paper training settings) as data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from mlic.errors import ConfigError
from mlic.models._papers import PaperResult

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "is_model",
    "model_entrypoint",
    "published_results",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PUBLISHED: dict[str, tuple[PaperResult, ...]] = {}

Factory = Callable[..., nn.Module]


def register_model(
    fn: Factory | None = None, *, published: Sequence[PaperResult] = ()
) -> Factory | Callable[[Factory], Factory]:
    """Register ``fn`` under its function name; a second registration of a name is an error.

    ``@register_model`` or ``@register_model(published=...)``: ``published`` are the
    model's results as its paper (or a peer's) reports them, each with its source.
    """

    def add(f: Factory) -> Factory:
        name = f.__name__
        if name in _MODELS:
            raise ValueError(
                f"model {name!r} is already registered (by {_MODELS[name].__module__})"
            )
        if not all(isinstance(r, PaperResult) for r in published):
            raise TypeError(f"model {name!r}: published results must be PaperResult rows")
        _MODELS[name] = f
        _PUBLISHED[name] = tuple(published)
        return f

    return add if fn is None else add(fn)


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


def published_results(name: str) -> tuple[PaperResult, ...]:
    """The published results recorded in ``name``'s registry entry (empty if none)."""
    model_entrypoint(name)  # an unknown name is a ConfigError listing the registered ones
    return _PUBLISHED[name]


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
            :meth:`~mlic.models._layers.MultiLabelModel.add_prior_bias`).
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
