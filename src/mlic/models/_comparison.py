"""A run's figures beside its paper's: ``mlic models --paper`` rows, the eval report and the
Hugging Face model card's comparison (the figures are the registry's :class:`PaperResult` rows)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import PurePath
from typing import Any

from mlic.models._papers import DATASETS, PaperResult
from mlic.models._registry import is_model, list_models, published_results

__all__ = ["dataset_of", "paper_comparison", "published_rows"]


def published_rows(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every registered model's published results as plain dicts (``model`` added), sorted
    by model; models without any are listed with one row of None figures."""
    rows: list[dict[str, Any]] = []
    for name in names if names is not None else list_models():
        results = published_results(name)
        if not results:
            none = "none recorded (the model's docstring says why)"
            rows.append({"model": name, "dataset": None, "mAP": None, "source": none})
        rows += [{"model": name, **asdict(r)} for r in results]
    return rows


def _parts(value: Any) -> list[str]:
    return [p.lower() for p in PurePath(str(value or "")).parts]


def dataset_of(data: Mapping[str, Any]) -> str | None:
    """The DATASETS key a config's ``data`` section points at, or None (own data, shards...).

    VOC: the year in the root folder's name (``.../VOC2007``); COCO: ``2014`` in the root,
    annotation files or image folders; ``vg500`` and ``nuswide`` by their format.
    """
    fmt = data.get("format")
    if fmt in ("vg500", "nuswide"):
        return str(fmt)
    if fmt == "voc":
        for part in reversed(_parts(data.get("root"))):
            year = re.search(r"(2007|2012)", part)
            if year:
                return f"voc{year.group(1)}"
        return None
    if fmt == "coco":
        keys = ("root", "train", "val", "train_images", "val_images")
        if any("2014" in p for k in keys for p in _parts(data.get(k))):
            return "coco2014"
    return None


def _pick(results: Sequence[PaperResult], dataset: str, size: int | None) -> PaperResult | None:
    """The published row for ``dataset``: the one at the run's input size, else the first."""
    rows = [r for r in results if r.dataset == dataset]
    same = [r for r in rows if r.input_size == size]
    return (same or rows or [None])[0]


def _pct(value: Any, fraction: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{100 * value:.2f}" if fraction else f"{value:.2f}"


def _code(value: Any) -> str:
    """A config value as inline Markdown code, unable to break out of it or of a table."""
    text = re.sub(r"[`|\x00-\x1f\x7f]", " ", str(value))[:120]
    return f"`{text}`"


def _section(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = cfg.get(key)
    return value if isinstance(value, Mapping) else {}


def _differences(
    paper: PaperResult, cfg: Mapping[str, Any], size: int | None, split: str | None
) -> list[str]:
    """One line per way the run departs from what the paper did."""
    model, data, train = (_section(cfg, k) for k in ("model", "data", "train"))
    out = []
    backbone = model.get("backbone")
    if model.get("pretrained") is False:
        out.append(f"backbone {_code(backbone)} from scratch; the paper's: {paper.backbone}")
    elif model.get("pretrained_file"):
        out.append(f"backbone weights from a local file; the paper's: {paper.backbone}")
    elif paper.weights and backbone and backbone != paper.weights:
        out.append(f"backbone {_code(backbone)}; the paper's: {paper.backbone} (`{paper.weights}`)")
    epochs = train.get("epochs")
    if paper.epochs is not None and epochs is not None and epochs != paper.epochs:
        out.append(f"{_code(epochs)} epochs; the paper's: {paper.epochs}")
    for section, key in ((data, "max_train_images"), (train, "max_steps_per_epoch")):
        if section.get(key):
            out.append(f"trained on part of the data ({_code(f'{key}={section[key]}')})")
    if paper.input_size is not None and size is not None and size != paper.input_size:
        out.append(f"input {_code(size)} px; the paper's: {paper.input_size} px")
    select_on = train.get("select_on", "val")
    chosen = (
        "held-out training images (`train.select_on=holdout`)"
        if select_on == "holdout"
        else "the validation split, the one reported here (optimistic; "
        "`train.select_on=holdout` avoids it)"
    )
    out.append(
        f"weights (best epoch, raw or EMA) selected on {chosen}; the paper: "
        f"{paper.selection or 'does not say'}"
    )
    _, wanted, word = DATASETS[paper.dataset]
    if split is not None and word not in PurePath(str(split)).stem.lower():
        out.append(f"evaluated on {_code(split)}; the paper's figure is on {wanted}")
    return out


def paper_comparison(
    model_name: str,
    cfg: Mapping[str, Any] | None,
    metrics: Mapping[str, float],
    image_size: int | None = None,
    split: str | None = None,
    params_m: float | None = None,
) -> list[str]:
    """Markdown lines putting the paper's figure beside a run's, or [] when the model has no
    published result on the run's dataset.

    ``cfg``: the run's config as a plain dict (``config.yaml``); ``metrics``: the run's
    metrics as fractions (``mAP``, ``CF1``, ``OF1``); ``image_size``: the run's input side;
    ``split``: the evaluated split's name (e.g. ``test``, ``annotations/instances_val2014.json``);
    ``params_m``: the run's parameter count in millions, when known.
    """
    if not isinstance(cfg, Mapping) or not isinstance(model_name, str) or not is_model(model_name):
        return []
    metrics = metrics if isinstance(metrics, Mapping) else {}
    dataset = dataset_of(_section(cfg, "data"))
    paper = None if dataset is None else _pick(published_results(model_name), dataset, image_size)
    if paper is None:
        return []
    name = DATASETS[dataset][0]
    params = "-" if params_m is None else f"{params_m:.2f}"
    lines = [
        "## The paper's result beside this run",
        "",
        "| | mAP | CF1 | OF1 | params (M) |",
        "|---|---:|---:|---:|---:|",
        f"| this run ({name}) | {_pct(metrics.get('mAP'), True)} | "
        f"{_pct(metrics.get('CF1'), True)} | {_pct(metrics.get('OF1'), True)} | {params} |",
        f"| paper ({paper.backbone}, {paper.input_size or '?'} px) | {_pct(paper.mAP)} | "
        f"{_pct(paper.CF1)} | {_pct(paper.OF1)} | {_pct(paper.params_m)} |",
        "",
        f"Paper figures: {paper.source}." + (f" {paper.note}" if paper.note else ""),
        "Threshold 0.5 for CF1 and OF1, as the papers. What differs from the paper's run:",
        "",
    ]
    lines += [f"- {d}" for d in _differences(paper, cfg, image_size, split)]
    return lines + [""]
