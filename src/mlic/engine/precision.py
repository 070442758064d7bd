"""Which floating-point precision a run computes in, and why.

``train.amp`` (and the ``--precision`` of ``predict``, ``eval`` and ``serve``) may be
``auto``. On a CUDA device ``auto`` is bf16 autocast where the GPU supports it. On a CPU it
is bf16 autocast only where the CPU has bf16 units: Intel AMX-BF16 (Sapphire Rapids and
later) or AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later), whose bf16
dot-product instructions oneDNN uses for convolutions and matmuls. Elsewhere bf16 is
emulated in fp32 arithmetic plus conversions and is slower than fp32, so ``auto`` stays fp32.

Autocast keeps the master weights, the optimiser state and the loss in fp32; only the
matmuls and convolutions (and what autocast lists with them) run in bf16. Why bf16 on such
CPUs: the same mAP within the seed-to-seed spread and a faster step (BENCHMARKS.md 10.2).

The CPU's flags are read from ``/proc/cpuinfo`` (Linux). Where that is absent the CPU is
treated as having no bf16 units (``auto`` = fp32); ``bf16`` can still be asked for.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from mlic.errors import ConfigError
from mlic.host import cpu_info

__all__ = [
    "BF16_UNITS",
    "ONNX_RUNTIME",
    "Precision",
    "autocast",
    "check_device",
    "cpu_bf16_units",
    "cpu_flags",
    "resolve_precision",
]

# /proc/cpuinfo flag -> the name users know
BF16_UNITS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
CHOICES = ("auto", "off", "fp32", "bf16", "fp16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where ``/proc/cpuinfo`` is absent)."""
    return cpu_info(cpuinfo).flags


def cpu_bf16_units(flags: frozenset[str] | None = None) -> list[str]:
    """The bf16 units this CPU has, by their usual names (``["AMX-BF16", "AVX512-BF16"]``)."""
    flags = cpu_flags() if flags is None else flags
    return [name for flag, name in BF16_UNITS.items() if flag in flags]


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the autocast dtype (None = fp32) and the reason it was chosen."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


# what an exported ONNX graph computes in: ONNX Runtime runs it as exported
ONNX_RUNTIME = Precision(None, "the ONNX Runtime graph runs as exported")


def resolve_precision(
    setting: str, device: torch.device | str, flags: frozenset[str] | None = None
) -> Precision:
    """``auto`` / ``off`` / ``fp32`` / ``bf16`` / ``fp16`` on ``device`` -> a :class:`Precision`.

    ``off`` and ``fp32`` are the same: no autocast. ``flags`` (default: this CPU's) exists so
    that the choice can be tested for other CPUs.
    """
    if setting not in CHOICES:
        raise ValueError(f"precision {setting!r} is not one of {list(CHOICES)}")
    device = torch.device(device)
    if setting in ("off", "fp32"):
        return Precision(None, f"{setting} asked for")
    if setting in ("bf16", "fp16"):
        dtype = torch.bfloat16 if setting == "bf16" else torch.float16
        return Precision(dtype, f"{setting} asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "auto: the CUDA device supports bf16")
        return Precision(None, "auto: this CUDA device has no bf16 support")
    if device.type != "cpu":
        return Precision(None, f"auto: fp32 on {device.type}")
    units = cpu_bf16_units(flags)
    if units:
        return Precision(torch.bfloat16, f"auto: the CPU has {' and '.join(units)}")
    return Precision(None, "auto: the CPU has no bf16 units (AMX-BF16 or AVX512-BF16)")


def autocast(device: torch.device | str, precision: Precision):
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    if precision.dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=precision.dtype)


def check_device(name: str, option: str = "--device", types: tuple[str, ...] | None = None) -> None:
    """ConfigError unless ``name`` is a torch device present on this machine (``cpu``,
    ``cuda``, ``cuda:N`` with N below the device count); ``types`` limits the kinds."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if types is not None and dev.type not in types:
        raise ConfigError(f"{option} {name!r}: this command runs on {' or '.join(types)}")
    if dev.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{option} {name}: no CUDA device on this machine")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"{option} {name}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        )
