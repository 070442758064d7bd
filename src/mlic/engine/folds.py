"""Out-of-fold scores for a whole training split: K fold runs, each scoring the fold it left out.

Every training image gets a probability from a model that never saw it. Two users:
``data.calibration=oof`` chooses the decision thresholds on all of them instead of a small
held-out slice, and ``mlic data issues`` ranks suspected label errors with them.

* Folds are stratified by label (iterative stratification, Sechidis, Tsoumakas & Vlahavas,
  ECML-PKDD 2011): each fold gets close to 1/K of every class's positives, rare classes
  included, which a plain random split does not give on small sets.
* A fold run is an ordinary run (``data.folds=K data.fold=i``) in ``<folder>/fold-i``: it
  trains on the other folds and validates, once, at its last epoch on its own fold
  (``train.eval_every`` = its epochs, so no epoch is chosen on the scored images). Those
  scores are its out-of-fold scores. The better of the model and its EMA at that epoch is
  still chosen on the fold, as for any run: a named, small optimism.
* Resumable: a finished fold is read, not repeated; an interrupted one resumes from its
  ``last.resume.pt``. Under torchrun every rank runs the same folds in the same order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import Config
from mlic.data import Annotations
from mlic.engine.checkpoint import read_metadata
from mlic.errors import DataError
from mlic.files import read_regular_text, write_text

__all__ = ["stratified_folds", "fold_split", "OutOfFold", "out_of_fold_scores"]

log = logging.getLogger("mlic")

#: Written in a fold run's folder at its start: which rows of the whole split it scores.
FOLD_RECORD = "fold.json"


def stratified_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id ``[N]`` in ``[0, k)`` for every row of ``targets`` ``[N, C]`` (1 = positive),
    by iterative stratification: the rarest class's images are dealt first, each to the fold
    that most lacks that class (then the fold that most lacks images, then at random)."""
    pos = np.asarray(targets) == 1  # [N, C]
    n, c = pos.shape
    if n < k:
        raise DataError(f"{n} training image(s) cannot be cut into {k} folds")
    rng = np.random.default_rng([seed, 0xF01D])
    want_label = np.tile(pos.sum(axis=0) / k, (k, 1)).astype(np.float64)  # [k, C]
    want_size = np.full(k, n / k)  # [k]
    fold = np.full(n, -1, dtype=np.int64)
    left = pos.copy()  # [N, C]: positives of rows not dealt yet
    while left.any():
        counts = left.sum(axis=0)  # [C]
        label = int(np.argmin(np.where(counts > 0, counts, n + 1)))
        rows = np.flatnonzero(left[:, label])
        for i in rng.permutation(rows):
            need = want_label[:, label]  # [k]
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                best = best[want_size[best] == want_size[best].max()]
            f = int(rng.choice(best))
            fold[i] = f
            want_label[f] -= pos[i]
            want_size[f] -= 1
            left[i] = False
    for i in rng.permutation(np.flatnonzero(fold < 0)):  # images without any label
        best = np.flatnonzero(want_size == want_size.max())
        f = int(rng.choice(best))
        fold[i] = f
        want_size[f] -= 1
    return fold


def fold_split(
    train: Annotations, folds: int, fold: int, seed: int
) -> tuple[Annotations, Annotations, np.ndarray]:
    """``(training part, held-out fold, the fold's row indices [M] in train)``."""
    ids = stratified_folds(train.targets, folds, seed)  # [N]
    held = np.flatnonzero(ids == fold)
    keep = np.flatnonzero(ids != fold)
    part, out = train.subset(keep), train.subset(held)
    part.warnings = list(train.warnings)
    out.source = f"{train.source} (fold {fold} of {folds})"
    return part, out, held


@dataclass
class OutOfFold:
    """Every training image's out-of-fold scores, in the split's order."""

    scores: np.ndarray  # [N, C]; NaN rows: images a fold left out as unreadable
    targets: np.ndarray  # [N, C] of the scored rows (-1 where not scored)
    fold: np.ndarray  # [N] fold id (-1 where not scored)
    names: list[str]
    folds: int
    epochs: int

    @property
    def scored(self) -> np.ndarray:
        """``[N]`` bool: rows that have scores."""
        return self.fold >= 0


def _fold_config(cfg: Config, folder: Path, k: int, i: int, epochs: int) -> Config:
    """The fold run's config: the run's recipe on all but fold ``i``, validated on fold
    ``i`` once, at its last epoch."""
    tr = cfg.train
    return replace(
        cfg,
        data=replace(cfg.data, folds=k, fold=i, calibration="none"),
        train=replace(
            tr,
            epochs=epochs,
            eval_every=epochs,
            select_on="val",
            head_warmup_epochs=min(tr.head_warmup_epochs, epochs),
        ),
        run=replace(
            cfg.run,
            output_dir=str(folder),
            name=f"fold-{i}",
            tensorboard=False,
            # a fold folder left without a resume point (killed at its start) is redone
            overwrite=(folder / f"fold-{i}").exists(),
        ),
    )


def _fold_done(run: Path) -> bool:
    """The fold's only evaluation (its last epoch) has written its scores."""
    return (run / FOLD_RECORD).exists() and (run / "best_val_scores.npy").exists()


def out_of_fold_scores(
    cfg: Config,
    folder: Path,
    train_fn: Callable[..., dict[str, Any]],
    folds: int,
    epochs: int | None = None,
) -> OutOfFold:
    """Run (or read, or resume) the ``folds`` fold runs of ``cfg`` in ``folder`` and gather
    their scores. ``train_fn`` is :func:`mlic.engine.trainer.train` (passed in: the trainer
    calls this for ``data.calibration=oof``)."""
    epochs = epochs or cfg.train.epochs
    folder = Path(folder)
    for i in range(folds):
        run = folder / f"fold-{i}"
        if _fold_done(run):
            log.info("fold %d/%d: done earlier, read from %s", i + 1, folds, run)
            continue
        log.info("fold %d/%d: training on the other folds for %d epoch(s)", i + 1, folds, epochs)
        if (run / "last.resume.pt").exists():
            train_fn(None, resume=run)
        else:
            train_fn(_fold_config(cfg, folder, folds, i, epochs))
    return _gather(folder, folds, epochs)


def _read_record(run: Path) -> dict[str, Any]:
    """A fold run's ``fold.json``, checked: it is read back from disk, so untrusted."""
    path = run / FOLD_RECORD
    try:
        rec = json.loads(read_regular_text(path, "fold record"))
        index = np.asarray(rec["index"], dtype=np.int64)
        size = int(rec["split_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a fold record ({e}); delete {run} to redo the fold") from e
    if index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= size)):
        raise DataError(f"{path}: row indices outside the split of {size} images")
    return {"index": index, "split_size": size}


def _gather(folder: Path, folds: int, epochs: int) -> OutOfFold:
    """Put each fold run's validation scores back at their rows of the split."""
    parts = []
    for i in range(folds):
        run = folder / f"fold-{i}"
        rec = _read_record(run)
        scores = np.load(run / "best_val_scores.npy", allow_pickle=False)  # [M, C]
        targets = np.load(run / "val_targets.npy", allow_pickle=False)  # [M, C]
        if not len(rec["index"]) == len(scores) == len(targets):
            raise DataError(f"{run}: fold record and scores differ in length; delete {run}")
        parts.append((i, rec, scores, targets))
    n = parts[0][1]["split_size"]
    c = parts[0][2].shape[1]
    names = list(read_metadata(folder / "fold-0" / "best.safetensors")["label_names"])
    out = OutOfFold(
        scores=np.full((n, c), np.nan, dtype=np.float32),
        targets=np.full((n, c), -1, dtype=np.int8),
        fold=np.full(n, -1, dtype=np.int64),
        names=names,
        folds=folds,
        epochs=epochs,
    )
    for i, rec, scores, targets in parts:
        index = rec["index"]
        if rec["split_size"] != n or scores.shape[1] != c:
            raise DataError(f"{folder}/fold-{i}: a different split than fold 0; delete {folder}")
        if (out.fold[index] >= 0).any():
            raise DataError(f"{folder}/fold-{i}: scores images another fold scored")
        out.scores[index], out.targets[index], out.fold[index] = scores, targets, i
    return out


def save_fold_record(run_dir: Path, index: np.ndarray, split_size: int) -> None:
    """The fold run's scored rows (indices into the whole split), written at its start."""
    record = {"split_size": int(split_size), "index": [int(i) for i in index]}
    write_text(Path(run_dir) / FOLD_RECORD, json.dumps(record))
