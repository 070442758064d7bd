"""Models on the Hugging Face Hub: ``mlic push`` and ``hf-hub:ORG/NAME`` everywhere a
checkpoint is accepted.

A pushed repository holds exactly four files:

* ``model.safetensors`` -- the run's ``best.safetensors``, unchanged (tensors + mlic metadata),
* ``config.json`` -- model name and options, labels, input size, normalisation, thresholds,
  metrics, the data it was trained on (readable without mlic),
* ``config.yaml`` -- the run's resolved training config,
* ``README.md`` -- the model card: metric table, per-class AP, training data, usage, licence.

:func:`resolve_checkpoint` is the one resolver: ``hf-hub:ORG/NAME`` (optionally
``@REVISION``) becomes a local file through ``huggingface_hub.hf_hub_download`` -- from the
local cache when ``HF_HUB_OFFLINE=1``, downloading otherwise. :func:`mlic.load_checkpoint`,
``Predictor.from_checkpoint`` and :func:`mlic.evaluate.resolve_target` (so ``predict``,
``eval`` and ``export``) all go through it. Only safetensors and JSON/YAML are read: nothing
downloaded is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlic.errors import CheckpointError

__all__ = [
    "HUB_PREFIX",
    "is_hub_id",
    "parse_hub_id",
    "validate_repo_id",
    "validate_license",
    "check_downloaded_config",
    "in_hub_cache",
    "resolve_checkpoint",
    "resolve_hub_file",
    "build_push_folder",
    "push_run",
]

HUB_PREFIX = "hf-hub:"
PUSH_FILES = ("model.safetensors", "config.json", "config.yaml", "README.md")


def is_hub_id(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(HUB_PREFIX)


#: The Hub's own rule for a repository id (huggingface_hub ``validate_repo_id``), with the
#: namespace required: ``namespace/name``, each part [A-Za-z0-9._-] not starting or ending
#: with ``.`` or ``-``, no ``--`` or ``..``, at most 96 characters.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,256}")
#: A model card's licence: an identifier as the Hub lists them (apache-2.0, cc-by-4.0, other).
_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


def _shown(text: str) -> str:
    """``text`` for an error line: newlines and other control characters escaped."""
    return repr(text)[1:-1] if not text.isprintable() else text


def validate_repo_id(repo_id: str, what: str = "repository id") -> str:
    """``repo_id`` if it is a Hub id ``namespace/name``; else CheckpointError naming it."""
    parts = repo_id.split("/")
    ok = (
        len(parts) == 2
        and len(repo_id) <= 96
        and all(_REPO_PART.fullmatch(p) for p in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
    )
    if not ok:
        raise CheckpointError(
            f"{_shown(repo_id)}: not a Hugging Face {what}; expected NAMESPACE/NAME, each part "
            "letters, digits, '.', '_' or '-' (no '..' or '--', at most 96 characters)"
        )
    return repo_id


def validate_license(license: str) -> str:
    """``license`` if it is a plain licence identifier (``apache-2.0``, ``mit``, ``other``)."""
    if not _LICENSE.fullmatch(license):
        raise CheckpointError(
            f"--license {_shown(license)}: not a licence identifier (letters, digits, '.', '+', "
            "'_', '-'; e.g. apache-2.0, mit, cc-by-4.0, other)"
        )
    return license


def parse_hub_id(target: str) -> tuple[str, str | None]:
    """``"hf-hub:org/name@rev"`` -> ``("org/name", "rev")``; a malformed id is an error."""
    body = target[len(HUB_PREFIX) :]
    repo, at, rev = body.partition("@")
    if not repo or "/" not in repo:
        raise CheckpointError(f"{_shown(target)}: expected hf-hub:ORG/NAME (optionally @REVISION)")
    validate_repo_id(repo)
    if at and (not _REVISION.fullmatch(rev) or ".." in rev.split("/")):
        raise CheckpointError(
            f"{_shown(target)}: bad revision {_shown(rev)} (a branch, tag or commit: letters, "
            "digits, '.', '_', '-', '/')"
        )
    return repo, rev or None


def in_hub_cache(path: str | Path) -> bool:
    """Whether ``path`` is a file of a Hugging Face cache (``models--ORG--NAME/snapshots/...``
    or ``.../blobs/...``): a downloaded file, however the user named it."""
    for p in (Path(os.path.abspath(path)), Path(path).resolve()):
        parts = p.parts
        for i in range(len(parts) - 1):
            if parts[i].startswith("models--") and parts[i + 1] in ("snapshots", "blobs"):
                return True
    return False


#: ``data.*`` keys that name places: read from a downloaded config they are never used.
DATA_LOCATION_KEYS = ("root", "train", "val", "train_images", "val_images", "classes", "index")


def check_downloaded_config(data: Any, target: str, overrides: list[str] | None) -> None:
    """Refuse the ``data.*`` locations of a downloaded ``config.yaml``, loaded as ``data``.

    A repository's config is someone else's file: its ``data.val`` may be ``pipe:CMD``, an
    ``s3://`` URL pasted into a shell command, ``/etc/...`` or ``../..``. Every location key
    the user did not set on the command line must be a plain relative path
    (:func:`mlic.files.location_problem`), checked after the merge so that YAML tricks
    (anchors, ``${oc.env:...}`` interpolation) are seen as they would be used; otherwise
    one line names the keys and the repo.
    """
    from mlic.files import location_problem

    given = {o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o}
    bad = []
    for key in DATA_LOCATION_KEYS:
        value = getattr(data, key, None)
        if value is None or f"data.{key}" in given:
            continue
        why = location_problem(str(value))
        if why is not None:
            bad.append((key, why))
    if bad:
        listed = ", ".join(f"data.{k} {why}" for k, why in bad)
        typed = " ".join(f"data.{k}=..." for k, _ in bad)
        raise CheckpointError(
            f"{target}: config.yaml of this downloaded repository sets data locations that are "
            f"never used from a downloaded file ({listed}); give your own on the command "
            f"line: {typed}"
        )


def resolve_hub_file(target: str, filename: str, required: bool = True) -> Path | None:
    """Local path of ``filename`` in the Hub repository ``target`` (cache or download)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, rev = parse_hub_id(target)
    try:
        return Path(hf_hub_download(repo, filename, revision=rev, library_name="mlic"))
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError in recent versions)
        if not required:
            return None
        raise CheckpointError(
            f"{target}: {filename} is not in the local Hugging Face cache and the Hub cannot be "
            "reached (offline?)"
        ) from e
    except EntryNotFoundError as e:
        if not required:
            return None
        raise CheckpointError(f"{target}: the repository has no {filename}") from e
    except Exception as e:  # RepositoryNotFound, HTTP errors, ...: one line naming the repo
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{target}: cannot fetch {filename} ({first})") from e


def resolve_checkpoint(target: str | Path) -> Path:
    """A local checkpoint path for ``target``: a path as given, or the ``model.safetensors``
    of an ``hf-hub:ORG/NAME`` repository."""
    if is_hub_id(target):
        return resolve_hub_file(str(target), "model.safetensors")  # type: ignore[return-value]
    return Path(target)


# ----------------------------------------------------------------------------- push
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
        "thresholds_from": meta.get("thresholds_from"),
        "metrics": meta.get("metrics"),
        "weights": meta.get("weights"),
        "epoch": meta.get("epoch"),
        "dataset": {k: data.get(k) for k in ("format", "root", "train", "val") if k in data},
    }


def _model_card(repo_id: str, meta: dict[str, Any], cfg: dict[str, Any] | None,
                per_class: list[tuple[str, float | None]], license: str,
                num_train: int | None) -> str:  # fmt: skip
    import yaml

    from mlic.models.papers import paper_comparison
    from mlic.viz import METRIC_KEYS, metric_table

    metrics = meta.get("metrics") or {}
    data = (cfg or {}).get("data", {})
    model_cfg = (cfg or {}).get("model", {})
    name = meta["model"]
    backbone = meta["model_kwargs"].get("backbone", "?")
    size = meta["input_size"][-1]
    front = {
        "library_name": "mlic",
        "license": validate_license(license),
        "pipeline_tag": "image-classification",
        "tags": ["mlic", "multi-label-image-classification", name],
    }  # dumped, not formatted: no value can add a key
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"`{name}` (backbone `{backbone}`, {size} x {size} px) for multi-label image "
        f"classification of {meta['num_classes']} labels, trained with "
        f"[mlic](https://pypi.org/project/mlic/) {meta.get('mlic_version', '')}.",
        "",
        "## Metrics",
        "",
        f"Validation split (`{data.get('val', '?')}`), threshold 0.5, percent; "
        f"{meta.get('weights', 'model')} weights of epoch {int(meta.get('epoch', 0)) + 1}.",
        "",
        metric_table(metrics) if any(k in metrics for k in METRIC_KEYS) else "No metrics recorded.",
        "",
    ]
    lines += paper_comparison(name, cfg, metrics, size, data.get("val"))  # the paper's row
    if meta.get("thresholds") is not None:
        lines += [f"Per-class thresholds are included (calibrated on `{meta.get('thresholds_from')}`) "
                  "and used by `mlic predict` unless `--threshold` is given.", ""]  # fmt: skip
    if per_class:
        lines += ["## Per-class AP", "", "| label | AP |", "|---|---:|"]
        lines += [
            f"| {_cell(n)} | {'-' if a is None else f'{100 * a:.2f}'} |" for n, a in per_class
        ]
        lines.append("")
    trained = f"`data.format={data.get('format', '?')}`"
    for key in ("root", "train", "val"):
        if data.get(key):
            trained += f", `data.{key}={data[key]}`"
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
        f'model, meta = mlic.load_checkpoint("hf-hub:{repo_id}")  # safetensors: no pickle',
        f'predictor = mlic.Predictor.from_checkpoint("hf-hub:{repo_id}")',
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


def build_push_folder(run_dir: str | Path, repo_id: str, out: str | Path,
                      license: str = "other") -> Path:  # fmt: skip
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
    card = _model_card(repo_id, meta, cfg, _per_class_ap(run_dir, list(meta["label_names"])),
                       license, num_train)  # fmt: skip
    (out / "README.md").write_text(card)
    return out


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, license: str = "other",
             dry_run: str | Path | None = None) -> str:  # fmt: skip
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
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message=f"mlic push {Path(run_dir).name}")  # fmt: skip
    return str(url)
