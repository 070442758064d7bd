"""Published results: what each model's paper reported (:class:`PaperResult` records).

Every model's registry entry (``@register_model(published=...)``) holds its published
results as :class:`PaperResult` rows: dataset, backbone, input size, mAP, CF1, OF1,
parameters and the source of each figure. That entry is the one place for these numbers:
``mlic models --paper`` lists them, and :mod:`mlic.models._comparison` puts the paper's
figure beside a run's (``mlic eval``'s report, the Hugging Face model card) and says what
differs (backbone weights, epochs, input size, model selection, evaluation split).
A value the paper does not give, or that our copy of it does not show (a table printed as
an image), is None: never estimated.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlic.config import DEFAULT_IMAGE_SIZE

__all__ = ["DATASETS", "TORCHVISION_R101", "PaperResult"]

#: dataset key -> (name, the split papers report on, a word naming that split in a config)
DATASETS: dict[str, tuple[str, str, str]] = {
    "coco2014": ("MS-COCO 2014", "val2014", "val2014"),
    "voc2007": ("PASCAL VOC 2007", "test", "test"),
    "voc2012": ("PASCAL VOC 2012", "test (the evaluation server's)", "test"),
    "vg500": ("Visual Genome 500", "test", "test"),
    "nuswide": ("NUS-WIDE", "test", "test"),
}

#: the ImageNet ResNet-101 the papers fine-tune: torchvision's weights (timm tag)
TORCHVISION_R101 = "resnet101.tv_in1k"


@dataclass(frozen=True)
class PaperResult:
    """One published result. Metrics in percent at threshold 0.5 (the papers' convention);
    None where the source does not give the value."""

    dataset: str  # a DATASETS key
    mAP: float | None
    source: str  # where the figures come from (paper section/table, official README)
    CF1: float | None = None
    OF1: float | None = None
    input_size: int | None = DEFAULT_IMAGE_SIZE
    backbone: str = "ResNet-101 (ImageNet)"
    weights: str | None = TORCHVISION_R101  # the timm tag of the paper's starting weights
    params_m: float | None = None
    epochs: int | None = None
    selection: str | None = None  # how the paper chose the weights it reports, when known
    note: str = ""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; one of {sorted(DATASETS)}")
        if not self.source:
            raise ValueError("a published result needs its source")
