"""``mlic push``: a run as a Hugging Face Hub repository, with its model card.

A pushed repository holds exactly four files:

* ``model.safetensors`` -- the run's ``best.safetensors``, unchanged (tensors + mlic metadata),
* ``config.json`` -- model name and options, labels, input size, normalisation, thresholds,
  metrics, the data it was trained on (readable without mlic),
* ``config.yaml`` -- the run's resolved training config,
* ``README.md`` -- the model card: metric table, per-class AP, training data, usage, licence.

Reading ``hf-hub:ORG/NAME`` back is :mod:`mlic.hub_files`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlic.errors import CheckpointError
from mlic.hub_files import shown, validate_repo_id
from mlic.thresholds import META_KEYS, describe_stored

__all__ = ["PUSH_FILES", "validate_license", "build_push_folder", "push_run"]

PUSH_FILES = ("model.safetensors", "config.json", "config.yaml", "README.md")

#: A model card's licence: an identifier as the Hub lists them (apache-2.0, cc-by-4.0, other).
_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


def validate_license(license: str) -> str:
    """``license`` if it is a plain licence identifier (``apache-2.0``, ``mit``, ``other``)."""
    if not _LICENSE.fullmatch(license):
        raise CheckpointError(
            f"--license {shown(license)}: not a licence identifier (letters, digits, '.', '+', "
            "'_', '-'; e.g. apache-2.0, mit, cc-by-4.0, other)"
        )
    return license


# ----------------------------------------------------------------------------- push


def _threshold_metrics(meta: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """The card's first table: the metrics at the thresholds users get from predict."""
    from mlic.viz import metric_table

    cal = {k[4:]: v for k, v in metrics.items() if k.startswith("cal_")}
    if meta.get("thresholds") is None or not cal:
        return []
    return [
        "At the per-class thresholds `mlic predict` and `serve` use (included in this "
        f"repository; {describe_stored(meta)}):",
        "",
        metric_table(cal),
        "",
    ]


def _per_class_table(per_class: list[tuple[str, float | None]], meta: dict[str, Any]) -> list[str]:
    """Per-class AP with each class's threshold and the calibration positives behind it."""
    if not per_class:
        return []
    thr = meta.get("thresholds") or [None] * len(per_class)
    n_pos = meta.get("threshold_n_pos") or [None] * len(per_class)
    lines = ["## Per-class AP", "", "| label | AP | threshold | calibration positives |"]
    lines.append("|---|---:|---:|---:|")
    for (n, a), t, k in zip(per_class, thr, n_pos, strict=False):
        ap = "-" if a is None else f"{100 * a:.2f}"
        lines.append(
            f"| {_cell(n)} | {ap} | {'-' if t is None else f'{t:.3f}'} | {'-' if k is None else k} |"
        )
    return [*lines, ""]


def _per_class_ap(run_dir: Path, names: list[str]) -> list[tuple[str, float | None]]:
    scores, targets = run_dir / "best_val_scores.npy", run_dir / "val_targets.npy"
    if not (scores.exists() and targets.exists()):
        return []
    from mlic.metrics import average_precision_per_class

    ap = average_precision_per_class(
        np.load(scores, allow_pickle=False), np.load(targets, allow_pickle=False)
    )
    return [(n, None if np.isnan(a) else float(a)) for n, a in zip(names, ap, strict=True)]


def _cell(text: str) -> str:
    """A label name as one Markdown table cell: no line breaks, ``|`` escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _hub_config(meta: dict[str, Any], cfg: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json``: what a user (or another library) needs to run the model."""
    data = (cfg or {}).get("data", {})
    return {
        "library_name": "mlic",
        "mlic_version": meta.get("mlic_version"),
        "model": meta["model"],
        "model_kwargs": meta["model_kwargs"],
        "num_classes": meta["num_classes"],
        "label_names": meta["label_names"],
        "input_size": meta["input_size"],
        "mean": meta["mean"],
        "std": meta["std"],
        "thresholds": meta.get("thresholds"),
        **{k: meta.get(k) for k in META_KEYS if k in meta},
        "metrics": meta.get("metrics"),
        "weights": meta.get("weights"),
        "epoch": meta.get("epoch"),
        "dataset": {k: data.get(k) for k in ("format", "root", "train", "val") if k in data},
    }


def _public(value: Any) -> str:
    """A data location as a card may show it: its last part only (no local folders)."""
    return _cell(Path(str(value)).name or str(value))


def _model_index(title: str, metrics: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The Hub's ``model-index`` entry: the run's validation metrics, in percent."""
    shown = [("mAP", "mAP"), ("CF1", "F1 (per-class)"), ("OF1", "F1 (overall)")]
    return {
        "name": title,
        "results": [
            {
                "task": {
                    "type": "image-classification",
                    "name": "Multi-label image classification",
                },
                "dataset": {
                    "name": str(data.get("format", "custom")),
                    "type": str(data.get("format", "custom")),
                    "split": _public(data.get("val", "val")),
                },
                "metrics": [
                    {"type": key, "name": label, "value": round(100 * float(metrics[key]), 2)}
                    for key, label in shown
                    if isinstance(metrics.get(key), (int, float))
                ],
            }
        ],
    }


def _model_card(
    repo_id: str,
    meta: dict[str, Any],
    cfg: dict[str, Any] | None,
    per_class: list[tuple[str, float | None]],
    license: str,
    num_train: int | None,
) -> str:
    import yaml

    from mlic.models._comparison import paper_comparison
    from mlic.viz import METRIC_KEYS, metric_table

    metrics = meta.get("metrics") or {}
    data = (cfg or {}).get("data", {})
    model_cfg = (cfg or {}).get("model", {})
    name = meta["model"]
    backbone = meta["model_kwargs"].get("backbone", "?")
    size = meta["input_size"][-1]
    title = repo_id.split("/")[-1]
    front = {
        "library_name": "mlic",
        "license": validate_license(license),
        "pipeline_tag": "image-classification",
        "tags": ["mlic", "multi-label-image-classification", name],
        "model-index": [_model_index(title, metrics, data)],
    }  # dumped, not formatted: no value can add a key
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"`{name}` (backbone `{backbone}`, {size} x {size} px) for multi-label image "
        f"classification of {meta['num_classes']} labels, trained with "
        f"[mlic](https://pypi.org/project/mlic/) {meta.get('mlic_version', '')}.",
        "",
        "## Intended use and limitations",
        "",
        f"Given a photo, it says which of its {meta['num_classes']} labels are present, each "
        "with a probability and a per-class threshold. It knows only these labels and the kind "
        "of photos it was trained on (below): on other kinds of images, or for labels that "
        "were rare in training, check it on your own photos before relying on it. Its "
        "probabilities are scores, not calibrated frequencies.",
        "",
        "## Metrics",
        "",
        f"Validation split (`{_public(data.get('val', '?'))}`), percent; "
        f"{meta.get('weights', 'model')} weights of epoch {meta.get('epoch', '?')}.",
        "",
        *_threshold_metrics(meta, metrics),
        "At threshold 0.5 (the papers' convention):",
        "",
        metric_table(metrics) if any(k in metrics for k in METRIC_KEYS) else "No metrics recorded.",
        "",
    ]
    lines += paper_comparison(name, cfg, metrics, size, data.get("val"))  # the paper's row
    lines += _per_class_table(per_class, meta)
    trained = f"`data.format={data.get('format', '?')}`"
    for key in ("train", "val"):  # names only: a local folder is nobody else's business
        if data.get(key):
            trained += f", `data.{key}={_public(data[key])}`"
    lines += [
        "## Training data",
        "",
        f"{trained}" + (f"; {num_train:,} training images." if num_train else "."),
        f"Labels: {', '.join(meta['label_names'])}.",
        f"Model options: `model.name={model_cfg.get('name', name)}`, `model.backbone={backbone}`; "
        "the full recipe is `config.yaml` in this repository.",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install mlic",
        f"mlic predict hf-hub:{repo_id} photo.jpg more/*.jpg",
        f"mlic eval hf-hub:{repo_id} data.format=... data.root=...   # your own copy of the data",
        f"mlic export hf-hub:{repo_id} --format onnx --output {repo_id.split('/')[-1]}.onnx",
        "```",
        "",
        "```python",
        "import mlic",
        "",
        f'predictor = mlic.Predictor.from_checkpoint("hf-hub:{repo_id}")  # safetensors: no pickle',
        'for p in predictor.predict(["photo.jpg"]):',
        "    print(p.labels, p.scores)  # labels above their thresholds; every probability",
        "```",
        "",
        "`config.json` holds the labels, input size, normalisation and thresholds for use "
        "without mlic.",
        "",
        "## Licence",
        "",
        f"`{license}`. The weights derive from the training data above and the backbone's "
        "pre-trained weights; check that their terms allow your use.",
        "",
    ]
    return "\n".join(lines)


def build_push_folder(
    run_dir: str | Path, repo_id: str, out: str | Path, license: str = "other"
) -> Path:
    """Write the exact folder ``mlic push`` uploads for ``run_dir`` into ``out``."""
    import yaml

    from mlic.engine.checkpoint import read_metadata
    from mlic.files import read_regular_text

    validate_repo_id(repo_id)
    validate_license(license)
    run_dir, out = Path(run_dir), Path(out)
    ckpt = run_dir / "best.safetensors"
    if not ckpt.exists():
        raise CheckpointError(f"{run_dir}: run folder has no best.safetensors")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(ckpt)
    cfg = None
    if (run_dir / "config.yaml").exists():
        cfg = yaml.safe_load(read_regular_text(run_dir / "config.yaml", "config file", 64 << 20))
        shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    shutil.copyfile(ckpt, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(_hub_config(meta, cfg), indent=1))
    num_train = None
    labels_json = run_dir / "labels" / "labels.json"
    if labels_json.exists():
        num_train = json.loads(read_regular_text(labels_json, "labels file")).get("num_images")
    card = _model_card(
        repo_id, meta, cfg, _per_class_ap(run_dir, list(meta["label_names"])), license, num_train
    )
    (out / "README.md").write_text(card)
    return out


def push_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    license: str = "other",
    dry_run: str | Path | None = None,
) -> str:
    """Upload a run to ``repo_id`` (or, with ``dry_run=DIR``, only write the folder there).

    Returns the repository URL, or the dry-run folder.
    """
    validate_repo_id(repo_id)
    validate_license(license)
    if dry_run is not None:
        return str(build_push_folder(run_dir, repo_id, dry_run, license=license))
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_push_folder(run_dir, repo_id, Path(tmp) / "push", license=license)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=f"mlic push {Path(run_dir).name}",
        )
    return str(url)
