"""Label statistics of a training split: counts, co-occurrence, graphs, word vectors.

Everything is derived from the *training* targets only (using validation labels to
build the graph would leak them), and saved as JSON + ``.npy`` without pickle.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mlic.data import read_json
from mlic.errors import ConfigError, DataError

__all__ = [
    "ADJACENCY_VARIANTS",
    "MAX_CLASSES",
    "MAX_INFERRED_CLASSES",
    "LabelSet",
    "check_class_names",
    "mlgcn_adjacency",
    "normalize_adjacency",
    "load_word_vectors",
]


#: Most classes a label set may have (class ids and name lists read from data files are
#: bounded by it: one hostile id must not build billions of names). Open Images' full label
#: space (19,957) fits; the [C, C] co-occurrence statistics of 20,000 classes take 3.2 GB.
MAX_CLASSES = 20_000
#: Most classes inferred from bare class ids when no names are given (``"0" .. "N-1"``).
MAX_INFERRED_CLASSES = 10_000
#: Longest class name accepted (characters).
MAX_NAME_CHARS = 1_000


def _name_key(name: str) -> str:
    """What two names must not share: the same text up to case, Unicode form and
    surrounding whitespace ("Person", "person ", "PERSON" are one class to a reader)."""
    return unicodedata.normalize("NFC", name).strip().casefold()


def check_class_names(names: Sequence[object], where: str = "class names") -> list[str]:
    """``names`` as a list of str, or a DataError naming ``where`` and the culprit.

    Refused: more than :data:`MAX_CLASSES` names, a name that is not a string, is empty or
    longer than :data:`MAX_NAME_CHARS`, and two names that differ only by case or surrounding
    whitespace (two columns a reader takes for one class; both are named).
    """
    if len(names) > MAX_CLASSES:
        raise DataError(f"{where}: {len(names):,} classes (at most {MAX_CLASSES:,})")
    seen: dict[str, str] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise DataError(f"{where}: class #{i} is {type(name).__name__}, not a name")
        if not name.strip() or len(name) > MAX_NAME_CHARS:
            what = "empty" if not name.strip() else f"longer than {MAX_NAME_CHARS} characters"
            raise DataError(f"{where}: class #{i} name {name[:60]!r} is {what}")
        key = _name_key(name)
        if key in seen:
            other = seen[key]
            how = (
                "are the same name twice"
                if other == name
                else "differ only by case or surrounding whitespace"
            )
            raise DataError(
                f"{where}: class names {other!r} and {name!r} {how}; rename or merge them"
            )
        seen[key] = name
    return list(names)  # type: ignore[arg-type]


def _positive(targets: np.ndarray) -> np.ndarray:
    """Present-labels as float64 [N, C]; ignore (-1) counts as not present."""
    return (np.asarray(targets) == 1).astype(np.float64)


@dataclass
class LabelSet:
    """Ordered class names and the label statistics of a training split.

    Attributes:
        names: class names, in model output order.
        counts: [C] number of training images in which each class is present.
        cooccurrence: [C, C] number of images in which both i and j are present, i != j
            (diagonal 0).
        num_images: number of training images the statistics come from.
        word_vectors: optional [C, D] float32 label embeddings, rows in ``names`` order.
    """

    names: list[str]
    counts: np.ndarray
    cooccurrence: np.ndarray
    num_images: int = 0
    word_vectors: np.ndarray | None = None
    # why word_vectors is None when they were asked for; told by a model that would use them
    word_vectors_missing: str | None = None

    def __post_init__(self) -> None:
        # every format's training labels pass here: case twins are refused, whatever the loader
        self.names = check_class_names(self.names, "training split")

    @classmethod
    def from_targets(cls, names: list[str], targets: np.ndarray) -> LabelSet:
        """Statistics of the given (training) target matrix [N, C] of 1/0/-1."""
        y = _positive(targets)  # [N, C]
        if y.shape[1] != len(names):
            raise DataError(f"{len(names)} class names but targets have {y.shape[1]} columns")
        co = y.T @ y  # [C, C]
        counts = np.diag(co).copy()
        np.fill_diagonal(co, 0)
        return cls(
            names=list(names),
            counts=counts.astype(np.int64),
            cooccurrence=co.astype(np.int64),
            num_images=int(y.shape[0]),
        )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def conditional(self) -> np.ndarray:
        """[C, C] P(j | i) = cooccurrence[i, j] / counts[i]; rows of absent classes are 0."""
        denom = np.maximum(self.counts, 1).astype(np.float64)[:, None]
        return (self.cooccurrence / denom).astype(np.float32)

    def mlgcn_adjacency(
        self, tau: float = 0.4, p: float = 0.2, variant: str = "paper"
    ) -> np.ndarray:
        """ML-GCN's re-weighted, normalised adjacency of this label set (see :func:`mlgcn_adjacency`)."""
        return mlgcn_adjacency(self.conditional, tau=tau, p=p, variant=variant)

    def with_word_vectors(self, source: str | Path | None) -> LabelSet:
        """Attach word vectors: ``"glove"`` (shipped VOC/COCO GloVe, matched by name), a ``.npy`` path, or None."""
        if source is None or source == "" or source == "learnable":
            self.word_vectors = None
        else:
            self.word_vectors = load_word_vectors(source, self.names)
        return self

    # --- persistence (no pickle) -------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``labels.json`` (names, counts, num_images) and ``cooccurrence.npy`` (+ word vectors)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"names": self.names, "counts": self.counts.tolist(), "num_images": self.num_images}
        from mlic.files import save_npy, write_text

        write_text(d / "labels.json", json.dumps(meta, indent=1))
        save_npy(d / "cooccurrence.npy", self.cooccurrence)
        if self.word_vectors is not None:
            save_npy(d / "word_vectors.npy", self.word_vectors.astype(np.float32))

    @classmethod
    def load(cls, directory: str | Path) -> LabelSet:
        d = Path(directory)
        if not (d / "labels.json").exists():
            raise DataError(f"{d / 'labels.json'}: not found")
        meta = read_json(d / "labels.json")
        for key in ("names", "counts"):
            if key not in meta:
                raise DataError(f"{d / 'labels.json'}: missing key {key!r}")
        co = np.load(d / "cooccurrence.npy", allow_pickle=False)
        wv_path = d / "word_vectors.npy"
        wv = np.load(wv_path, allow_pickle=False) if wv_path.exists() else None
        return cls(
            names=list(meta["names"]),
            counts=np.asarray(meta["counts"], dtype=np.int64),
            cooccurrence=co.astype(np.int64),
            num_images=int(meta.get("num_images", 0)),
            word_vectors=wv,
        )


ADJACENCY_VARIANTS = ("paper", "official")


def mlgcn_adjacency(
    conditional: np.ndarray, tau: float = 0.4, p: float = 0.2, variant: str = "paper"
) -> np.ndarray:
    """ML-GCN (Chen et al., CVPR 2019) adjacency from conditional probabilities P(j|i).

    ``variant="paper"`` (Eqs. 7-8 of the paper):

    1. binarise: A_ij = 1 if P(j|i) >= tau (removes noisy rare edges);
    2. re-weight against over-smoothing: each row's neighbours share p (row sums), self loop
       weight 1 - p;
    3. symmetric normalisation D^-1/2 A D^-1/2.

    ``variant="official"`` (``gen_A`` + ``gen_adj`` of the official code, which the published
    numbers come from; it uses p = 0.25): binarise as above, divide each *column* by its
    sum times p, add a self loop of weight 1 (not 1 - p), then ``D^-1/2 A^T D^-1/2`` with D
    the row sums -- a transposed, column-normalised graph.

    Returns float32 [C, C].
    """
    if variant not in ADJACENCY_VARIANTS:
        raise ConfigError(
            f"adjacency variant {variant!r}: choose one of {list(ADJACENCY_VARIANTS)}"
        )
    a = (np.asarray(conditional, dtype=np.float64) >= tau).astype(np.float64)
    np.fill_diagonal(a, 0.0)
    eye = np.eye(a.shape[0])
    if variant == "official":
        a = a * p / (a.sum(axis=0, keepdims=True) + 1e-6) + eye  # column sums, self loop 1
        deg = a.sum(axis=1)
        inv = 1.0 / np.sqrt(deg)
        return (inv[:, None] * a.T * inv[None, :]).astype(np.float32)  # D^-1/2 A^T D^-1/2
    row = a.sum(axis=1, keepdims=True)
    a = np.where(row > 0, a * p / np.maximum(row, 1e-6), 0.0)
    a = a + eye * (1.0 - p)
    # a class with no neighbours keeps only its self loop of weight (1 - p); normalisation
    # below rescales it to 1 so no node is silenced.
    return normalize_adjacency(a).astype(np.float32)


def normalize_adjacency(a: np.ndarray) -> np.ndarray:
    """Symmetric normalisation D^-1/2 A D^-1/2 with D the row-sum degree (zero rows stay zero)."""
    a = np.asarray(a, dtype=np.float64)
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    return (inv[:, None] * a * inv[None, :]).astype(np.float32)


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


# VOC and COCO name the same classes differently; the shipped files are matched through these.
_ALIASES = {
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
}


def _shipped_vectors() -> dict[str, np.ndarray]:
    """Name -> 300-d GloVe vector from the shipped VOC 2007 and COCO 2014 files."""
    table: dict[str, np.ndarray] = {}
    root = resources.files("mlic") / "assets" / "wordvec"
    for sub in ("coco2014", "voc2007"):
        names = (root / sub / "labels.txt").read_text().splitlines()
        with (root / sub / "glove_300d.npy").open("rb") as f:
            vecs = np.load(f, allow_pickle=False)
        for name, vec in zip(names, vecs, strict=True):
            table.setdefault(_normalise_name(name), vec)
    return table


def load_word_vectors(source: str | Path, names: list[str]) -> np.ndarray:
    """Word vectors [C, D] float32 for ``names``.

    ``source`` is ``"glove"`` for the shipped GloVe vectors of VOC/COCO (matched by name, so
    COCO's alphabetical file order does not matter), or a ``.npy`` file whose rows follow
    ``names``. An unmatched name or a row-count mismatch is an error naming it.
    """
    if str(source) == "glove":
        table = _shipped_vectors()
        out = []
        for name in names:
            key = _normalise_name(name)
            key = _ALIASES.get(key, key) if key not in table else key
            if key not in table:
                raise DataError(
                    f"no shipped GloVe vector for class {name!r}; give a .npy file "
                    "(model.word_vectors=PATH) or use model.word_vectors=learnable"
                )
            out.append(table[key])
        return np.stack(out).astype(np.float32)
    path = Path(source)
    if path.suffix != ".npy":
        raise DataError(f"{path}: word vectors must be a .npy file (no pickle)")
    from mlic.files import MAX_ANNOTATION_BYTES, require_regular_file

    require_regular_file(path, "word-vector file", MAX_ANNOTATION_BYTES)  # never a FIFO
    try:
        vecs = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a plain .npy array ({e})") from e
    if vecs.ndim != 2 or vecs.shape[0] != len(names):
        raise DataError(f"{path}: expected [{len(names)}, D] word vectors, got shape {vecs.shape}")
    return vecs.astype(np.float32)
