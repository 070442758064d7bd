"""What a run reports while it trains: the time left for the whole run (the epoch log line's
ETA) and the TensorBoard board (per-step loss and learning rate, per-class PR curves and a
few validation images with their true and predicted labels at each epoch end).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mlic.data import Annotations
from mlic.data.transforms import decode_image

__all__ = [
    "EtaClock",
    "format_duration",
    "RunBoard",
    "board_sample",
    "MAX_BOARD_IMAGES",
    "MAX_PR_CLASSES",
]

MAX_BOARD_IMAGES = 8  # validation images shown with their labels at each epoch end
MAX_PR_CLASSES = 100  # PR curves of the first this many classes (VG500: not 500 per epoch)
_STEP_FLUSH = 100  # per-step scalars wait on the device this many steps (one sync per flush)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``2h05m``: a duration as a person reads it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EtaClock:
    """The time left for the whole run: epochs left x the mean epoch time of this process
    (training, evaluation and checkpointing; a resumed run counts from its resume)."""

    def __init__(self, first_epoch: int) -> None:
        self.start = time.perf_counter()
        self.first_epoch = first_epoch  # epochs already done when this process started

    def eta(self, epochs_done: int, epochs_total: int) -> float:
        """Seconds left once ``epochs_done`` of ``epochs_total`` epochs are done."""
        done_here = max(epochs_done - self.first_epoch, 1)
        per_epoch = (time.perf_counter() - self.start) / done_here
        return per_epoch * max(epochs_total - epochs_done, 0)


def _board_tag(name: str) -> str:
    from mlic.viz import file_slug  # distinct, readable tag parts for any label name

    return file_slug(name)


class RunBoard:
    """A run's TensorBoard writer (main rank) with the per-step and per-epoch additions.

    ``sample``: up to :data:`MAX_BOARD_IMAGES` validation images (uint8 [K, 3, S, S]) and
    their targets [K, C], or None (streamed formats: no file list to take them from).
    """

    def __init__(
        self,
        log_dir: Path,
        names: Sequence[str],
        sample: tuple[torch.Tensor, np.ndarray] | None,
        norm: tuple[Sequence[float], Sequence[float]],
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.names = list(names)
        self.sample = sample
        self.norm = norm
        self._steps: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on device, lr)

    # the existing per-epoch scalars go straight to the writer
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Record optimiser step ``step``'s mean loss (a device scalar: no sync here) and rate."""
        self._steps.append((step, loss.detach(), lr))
        if len(self._steps) >= _STEP_FLUSH:
            self.flush_steps()

    def flush_steps(self) -> None:
        """Write the buffered ``train/loss`` and ``train/lr`` points (one host sync)."""
        if not self._steps:
            return
        losses = torch.stack([loss.double() for _, loss, _ in self._steps]).cpu().tolist()
        for (step, _, lr), loss in zip(self._steps, losses, strict=True):
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        self._steps.clear()

    def epoch_end(
        self, epoch: int, module: nn.Module, scores: np.ndarray, targets: np.ndarray
    ) -> None:
        """Per-class PR curves of the val ``scores`` [N, C] against ``targets`` [N, C] (-1:
        ignored) and the sample images with their true and ``module``'s predicted labels."""
        self.flush_steps()
        for c, name in enumerate(self.names[:MAX_PR_CLASSES]):
            keep = targets[:, c] >= 0
            if keep.any():
                self.writer.add_pr_curve(
                    f"pr/{_board_tag(name)}", targets[keep, c] == 1, scores[keep, c], epoch
                )
        if self.sample is not None:
            self.writer.add_figure("val/predictions", self._figure(module), epoch)

    @torch.inference_mode()
    def _probabilities(self, module: nn.Module) -> np.ndarray:
        """The sample's probabilities [K, C] from ``module`` (fp32, eval mode, its device)."""
        images, _ = self.sample  # type: ignore[misc]
        device = next(module.parameters()).device
        mean = torch.tensor(self.norm[0], device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.norm[1], device=device).view(1, 3, 1, 1)
        x = (images.to(device).float() / 255 - mean) / std  # [K, 3, S, S]
        was_training = module.training
        module.eval()
        probs = torch.sigmoid(module(x).float()).cpu().numpy()  # [K, C]
        module.train(was_training)
        return probs

    def _figure(self, module: nn.Module) -> Any:
        """A grid of the sample, each titled ``true: ...`` and ``pred: ...`` (p >= 0.5)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        images, targets = self.sample  # type: ignore[misc]
        probs = self._probabilities(module)
        k = len(images)
        fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.8), squeeze=False)
        for i, ax in enumerate(axes.flat):
            true = [self.names[c] for c in np.nonzero(targets[i] == 1)[0]]
            pred = [f"{self.names[c]} {probs[i, c]:.2f}" for c in np.nonzero(probs[i] >= 0.5)[0]]
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            ax.set_title(
                f"true: {', '.join(true) or '-'}\npred: {', '.join(pred) or '-'}", fontsize=7
            )
            ax.axis("off")
        fig.tight_layout()
        return fig  # add_figure renders and closes it

    def flush(self) -> None:
        self.flush_steps()
        self.writer.flush()

    def close(self) -> None:
        self.flush_steps()
        self.writer.close()


def board_sample(
    val: Annotations | None, transform: Any, size: int
) -> tuple[torch.Tensor, np.ndarray] | None:
    """The first :data:`MAX_BOARD_IMAGES` images of the val split through the eval
    ``transform`` (uint8 [K, 3, S, S]) and their targets [K, C]; None without a file list
    or when an image cannot be read (the board then shows no images, the run goes on)."""
    from mlic.errors import DataError

    if val is None or len(val) == 0:
        return None
    k = min(MAX_BOARD_IMAGES, len(val))
    try:
        images = torch.stack([transform(decode_image(val.images[i], size)) for i in range(k)])
    except DataError:
        return None
    return images, np.asarray(val.targets[:k])
