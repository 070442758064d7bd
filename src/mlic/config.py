"""Dataclass configs loaded from YAML with dotted ``key=value`` overrides (OmegaConf structured).

An unknown key, a value of the wrong type or a value outside a key's allowed choices is a
:class:`~mlic.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import difflib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from mlic.errors import ConfigError
from mlic.files import read_regular_text
from mlic.thresholds import (
    DEFAULT_MIN_POSITIVES,
    DEFAULT_RULE,
    DEFAULT_SHRINK,
    RULES,
    parse_objective,
)

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "save_config",
    "RESUME_OVERRIDES",
    "check_resume_overrides",
    "to_dict",
    "DEFAULT_IMAGE_SIZE",
]

#: The input side (pixels) a model uses unless told otherwise: the papers' common 448.
DEFAULT_IMAGE_SIZE = 448


@dataclass
class DataConfig:
    """Where the data is and how it is fed.

    ``format`` picks the reader; paths are relative to ``root``:

    - ``voc``: ``root`` = the VOC20xx folder, ``train``/``val`` = image-set names.
    - ``coco``: ``train``/``val`` = instances JSON files, ``train_images``/``val_images`` =
      image folders.
    - ``csv``: ``train``/``val`` = CSV files, images relative to ``train_images``/
      ``val_images`` (default: the CSV's folder).
    - ``vg500`` (SSGRL / C-Tran / Query2Label VG-500): ``root`` = the folder holding
      ``train_list_500.txt``, ``test_list_500.txt`` and ``vg_category_500_labels_index.json``;
      ``train``/``val`` = split names (``train``, ``test``) or list-file names;
      ``train_images``/``val_images`` = image folder (default: ``VG_100K`` then
      ``VG_100K_2``); ``classes`` = optional category-name file (default: indices 0-499).
    - ``nuswide``: ``root`` = the NUS-WIDE folder (``Concepts81.txt``, ``ImageList/``,
      ``Groundtruth/``); ``train``/``val`` = ``train``, ``test`` or ``all`` (the official
      split); ``train_images``/``val_images`` = image folder (default ``Flickr``).
    - ``openimages``: ``train``/``val`` = human-verified label CSVs
      (``ImageID,Source,LabelName,Confidence``), ``train_images``/``val_images`` = folders of
      ``<ImageID>.jpg``, ``classes`` = a class-descriptions CSV (``LabelName,DisplayName``;
      default: the label names seen in the training file).
    - ``demo``: the generated demo set under ``root``, generated when absent.
    - ``wds``: WebDataset tar shards written by ``mlic data pack`` (see :mod:`mlic.data.wds`):
      ``train``/``val`` = a shard folder (holding ``dataset.json``), a brace pattern
      (``/data/coco-train/shard-{000000..000127}.tar``) or an ``https://`` / ``s3://`` URL
      pattern, streamed; ``index`` = where the training shards' ``dataset.json`` is when it
      is not beside them. ``root`` is ignored. Each rank reads its own shards; see the module docstring
      for how ranks get equal step counts and how resume finds its place.
    - ``hf``: a Hugging Face ``datasets`` set (see :mod:`mlic.data.hf`): ``root`` = a
      ``save_to_disk`` folder, a folder/glob of parquet files, or (online) a Hub dataset id;
      ``train``/``val`` = split names; ``image_column`` and ``label_column`` name the columns
      (labels: a list of class ids (``Sequence(ClassLabel)``), of class names, or a
      multi-hot / 1,0,-1 vector); ``classes`` = optional class-name file;
      ``streaming`` = read it as a stream (sets that do not fit on disk).

    ``image_check`` is what ``mlic train`` verifies of every image before training:
    ``fast`` (default: the file exists and its header is a readable image of acceptable
    size), ``full`` (decode every image, at reduced scale; what ``mlic data check`` does) or
    ``off``. Broken images stop the run with the list of all of them, unless
    ``skip_bad_images`` is true: then they are left out, logged and listed in the run's
    ``bad_images.txt`` -- as is an image that fails to load mid-run (skipped and counted).

    ``crop`` is the training crop: ``none`` resizes the whole image to S x S (no labelled
    object is cut away); ``multiscale`` is ML-GCN's MultiScaleCrop (from TSN): a crop whose
    sides are drawn from ``crop_scales`` x the short side (width and height at most
    ``crop_max_distort`` scale steps apart), at one of 13 fixed positions (corners, centre,
    edge middles, quarter points), resized to S x S; ``square`` is SSGRL's: a square crop of
    side ``crop_scales`` x ``resize`` at a random position of the ``resize`` x ``resize``
    warp, resized to S x S (needs ``resize``).

    ``resize`` (SSGRL's test protocol): images are first warped to ``resize`` x ``resize``;
    evaluation then takes the centre S x S crop (``mlic eval`` too), and ``crop=square``
    trains on random square crops of that warp. None (default): images are resized straight
    to S x S. SSGRL: ``resize=640``, S = 576, ``crop_scales`` 1, .9, .8, .6, .5.

    ``calibration`` says which scores the per-class decision thresholds stored in the
    checkpoint are chosen on (by ``thresholds.rule``): ``holdout`` (default) keeps
    ``calibration_fraction`` of the training split out of training (a seeded draw); ``val``
    uses the validation split, for runs whose val split is *not* the split results are
    reported on (a dev split before a separate test set), or when in-sample figures on val
    are acceptable (the paper recipes, which train on the whole training split as the papers
    did); ``oof`` trains ``calibration_folds`` short fold runs first (``RUN/folds``, each on
    the other folds for ``calibration_fold_epochs`` epochs, default ``train.epochs``) and
    uses every training image's out-of-fold score, then trains on the whole split; ``none``
    stores none (predictions then use 0.5).

    ``folds`` / ``fold`` make this run one fold run: the training split is cut into
    ``folds`` label-stratified folds (seeded by ``train.seed``), the run trains on all but
    fold ``fold`` and validates on it (what ``data.calibration=oof`` and ``mlic data
    issues`` set for their fold runs).
    """

    format: str = "demo"
    root: str = "data/demo"
    train: str = "train"
    val: str = "val"
    train_images: str | None = None
    val_images: str | None = None
    image_size: int | None = None  # None: the model's default input size
    batch_size: int = 32
    eval_batch_size: int | None = None
    workers: int = 2
    randaugment: bool = True
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0  # Cutout-style erasing probability
    hflip: bool = True
    classes: str | None = None  # vg500 / openimages: class-name file (see above)
    image_check: str = "fast"  # fast | full | off (see above)
    skip_bad_images: bool = False
    # Decode plain baseline JPEGs on the training device (torchvision.io.decode_jpeg, nvJPEG
    # on CUDA) a batch at a time; every other file (and a JPEG the CPU path would decode at a
    # DCT-reduced scale) is decoded by the CPU decoder in the workers, so pixels are the same.
    # Then resize, flip and normalise on the device. RandAugment and erasing do not apply.
    gpu_decode: bool = False
    max_train_images: int | None = None
    max_val_images: int | None = None
    crop: str = "none"  # none | multiscale | square (see above)
    crop_scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66, 0.5])
    crop_max_distort: int = 2
    resize: int | None = None  # warp to this side first; eval: centre crop (see above)
    calibration: str = "holdout"  # holdout | val | oof | none (see above)
    calibration_fraction: float = 0.1
    calibration_folds: int = 5
    calibration_fold_epochs: int | None = None
    folds: int | None = None  # this run is fold `fold` of `folds` (see above)
    fold: int | None = None
    index: str | None = None  # wds: dataset.json location when not beside the shards
    image_column: str = "image"  # hf: the image column
    label_column: str = "labels"  # hf: the label column
    streaming: bool = False  # hf: stream the set instead of reading it from disk


@dataclass
class ModelConfig:
    """Model name from the registry, its backbone and model-specific options (``kwargs``)."""

    name: str = "baseline"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    pretrained_file: str | None = None  # explicit local ImageNet weights
    word_vectors: str = "glove"  # "glove" (shipped VOC/COCO), a .npy path, or "learnable"
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "asl"
    gamma_pos: float = 0.0
    gamma_neg: float = 4.0
    clip: float = 0.05
    focal_gamma: float = 2.0
    focal_alpha: float | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only; ML-GCN, CSRA and SSGRL use plain momentum
    backbone_lr_mult: float = 1.0  # ML-GCN and SSGRL train the backbone at 0.1x; 0 freezes it
    grad_clip: float | None = None
    # false: no weight decay on biases and 1-D parameters (norms, embeddings' scales); true:
    # decay every parameter, as ML-GCN's SGD and Query2Label's AdamW did
    decay_norm_and_bias: bool = False


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    pct_start: float = 0.2  # one-cycle only


@dataclass
class TrainConfig:
    epochs: int = 10
    accum_steps: int = 1
    # auto: bf16 autocast on a GPU, or on a CPU with AMX-BF16/AVX512-BF16, else fp32
    # (mlic.engine.precision); off = fp32 = no autocast
    amp: str = "auto"
    ema: bool = True
    ema_decay: float = 0.999
    # EMA warm-up (timm ModelEmaV3): decay_t = min(ema_decay, 1 - (1 + t)^-power), so the
    # average forgets the early, near-initial weights in short runs; false: ema_decay from step 1
    ema_warmup: bool = True
    ema_warmup_power: float = 0.75
    # keep the backbone's BatchNorm running statistics as pretrained (its BN layers in eval
    # mode; their scale and shift still learn), as detection fine-tuning does with small
    # batches; each demo recipe says whether it helped that model (BENCHMARKS.md 9.3)
    freeze_bn_stats: bool = False
    # train the head alone for this many first epochs (backbone weights and BatchNorm
    # statistics as pretrained), then everything: linear probing before fine-tuning (LP-FT,
    # Kumar et al., ICLR 2022), so a randomly initialised deep head does not send its early,
    # meaningless gradients into the pretrained features. 0: fine-tune from the first step
    head_warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    threads: int | None = None
    # keep memory freed by tensors in the process (no munmap/page faults per step): 1.2x on CPU
    retain_freed_memory: bool = True
    eval_every: int = 1
    max_steps_per_epoch: int | None = None
    # which data picks the kept weights (best epoch, and the better of raw and EMA): `val`
    # (the validation split, in the paper recipes the split results are reported on, as the
    # papers' code did: optimistic) or `holdout` (the held-out part of train that
    # data.calibration=holdout keeps for thresholds; val is then only reported)
    select_on: str = "val"


@dataclass
class ThresholdConfig:
    """How the per-class decision thresholds are chosen on the calibration scores
    (``data.calibration``); see :mod:`mlic.thresholds` and BENCHMARKS.md, "Decision
    thresholds on real photos", for the evidence behind the default.

    ``rule``: shrunk | global | best_f1 | best_f1_mid | platt | fixed. ``objective``: f1,
    ``precision:P`` or ``recall:R``. ``shrink``: pseudo-positives of the shrunk rule.
    ``min_positives``: classes with fewer calibration positives take the global threshold.
    ``per_class``: other objectives for some classes, e.g. ``{person: precision:0.95}``
    (on the command line ``thresholds.per_class.person=precision:0.95``).
    """

    rule: str = DEFAULT_RULE
    objective: str = "f1"
    shrink: float = DEFAULT_SHRINK
    min_positives: int = DEFAULT_MIN_POSITIVES
    per_class: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    # An existing run folder is never overwritten unless this is true (then it is replaced,
    # after the new run has validated its config and data).
    overwrite: bool = False
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "data.format": ("voc", "coco", "csv", "demo", "vg500", "nuswide", "openimages", "wds", "hf"),
    "loss.name": ("bce", "asl", "focal"),
    "optim.name": ("adamw", "sgd"),
    "schedule.name": ("cosine", "onecycle", "constant"),
    "train.amp": ("auto", "off", "fp32", "bf16", "fp16"),
    "data.crop": ("none", "multiscale", "square"),
    "train.select_on": ("val", "holdout"),
    "data.calibration": ("holdout", "val", "oof", "none"),
    "thresholds.rule": RULES,
}

POSITIVE: tuple[str, ...] = (
    "data.batch_size",
    "train.epochs",
    "train.accum_steps",
    "optim.lr",
    "train.eval_every",
)


#: Optional counts that, when set, must be at least 1 (0 or -1 would mean "no data").
AT_LEAST_ONE: tuple[str, ...] = (
    "data.max_train_images",
    "data.max_val_images",
    "data.eval_batch_size",
    "train.max_steps_per_epoch",
    "train.threads",
)


#: Keys ``mlic train --resume RUN key=value`` may change: the run's length and how it is
#: shown or run -- nothing the saved weights, optimiser state, data or labels depend on.
RESUME_OVERRIDES: tuple[str, ...] = (
    "train.epochs",
    "train.eval_every",
    "train.threads",
    "train.retain_freed_memory",
    "data.workers",
    "data.eval_batch_size",
    "run.progress",
    "run.tensorboard",
)


def check_resume_overrides(overrides: list[str], run_dir: str | Path) -> None:
    """Refuse, by name, an override that a resumed run cannot honour (see ``RESUME_OVERRIDES``).

    Call after :func:`load_config` has accepted the overrides, so that an unknown key gets
    the usual unknown-key error first.
    """
    refused = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_OVERRIDES:
            refused.append(key)
    if refused:
        raise ConfigError(
            f"{', '.join(refused)}: cannot change when resuming {run_dir} (the run's model, data "
            f"and optimiser are fixed); on --resume only {', '.join(RESUME_OVERRIDES)} may be "
            "given -- start a new run (another run.name) to change the others"
        )


def _check(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
    if not 0.0 <= cfg.data.random_erasing <= 1.0:
        raise ConfigError(f"data.random_erasing={cfg.data.random_erasing} must be in [0, 1]")
    for key in AT_LEAST_ONE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value!r} must be >= 1 (or unset)")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers={cfg.data.workers} must be >= 0")
    if cfg.data.image_size is not None and not 16 <= cfg.data.image_size <= 4096:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be in [16, 4096] (or unset)")
    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(
            f"run.name={name!r} must be a plain folder name (no '/', not '.' or '..')"
        )
    if not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in (0, 1)")
    if not 0 <= cfg.train.head_warmup_epochs <= cfg.train.epochs:
        raise ConfigError(
            f"train.head_warmup_epochs={cfg.train.head_warmup_epochs} must be in "
            f"[0, train.epochs={cfg.train.epochs}]"
        )
    if not cfg.train.ema_warmup_power > 0:
        raise ConfigError(f"train.ema_warmup_power={cfg.train.ema_warmup_power} must be > 0")
    if not 0.0 < cfg.data.calibration_fraction < 1.0:
        raise ConfigError(
            f"data.calibration_fraction={cfg.data.calibration_fraction} must be in (0, 1)"
        )
    _check_calibration(cfg)
    scales = list(cfg.data.crop_scales)
    if not scales or any(not 0.0 < float(x) <= 1.0 for x in scales):
        raise ConfigError(f"data.crop_scales={scales} must be fractions in (0, 1]")
    if cfg.data.crop_max_distort < 0:
        raise ConfigError(f"data.crop_max_distort={cfg.data.crop_max_distort} must be >= 0")
    _check_protocol(cfg)


def _check_calibration(cfg: DictConfig) -> None:
    """The calibration source, the threshold rule's numbers and a fold run's fold."""
    d, t = cfg.data, cfg.thresholds
    parse_objective(t.objective)
    for name, objective in t.per_class.items():
        parse_objective(objective, f"thresholds.per_class.{name}")
    if not t.shrink >= 0:
        raise ConfigError(f"thresholds.shrink={t.shrink} must be >= 0")
    if t.min_positives < 0:
        raise ConfigError(f"thresholds.min_positives={t.min_positives} must be >= 0")
    if not 2 <= d.calibration_folds <= 20:
        raise ConfigError(f"data.calibration_folds={d.calibration_folds} must be in [2, 20]")
    if d.calibration_fold_epochs is not None and d.calibration_fold_epochs < 1:
        raise ConfigError(
            f"data.calibration_fold_epochs={d.calibration_fold_epochs} must be >= 1 (or unset)"
        )
    if (d.folds is None) != (d.fold is None):
        raise ConfigError("data.folds and data.fold are set together (a fold run) or not at all")
    if d.folds is not None:
        if not 2 <= d.folds <= 20 or not 0 <= d.fold < d.folds:
            raise ConfigError(
                f"data.fold={d.fold} of data.folds={d.folds}: folds in [2, 20], fold in [0, folds)"
            )
        if d.calibration not in ("none", "val"):
            raise ConfigError(
                f"a fold run (data.folds={d.folds}) validates on its held-out fold and "
                f"cannot also calibrate on data.calibration={d.calibration}; set "
                "data.calibration=none"
            )


def _check_protocol(cfg: DictConfig) -> None:
    """Combinations of data and selection keys that would silently do something else."""
    d = cfg.data
    if d.resize is not None:
        if not 16 <= d.resize <= 4096:
            raise ConfigError(f"data.resize={d.resize} must be in [16, 4096] (or unset)")
        if d.image_size is not None and d.resize < d.image_size:
            raise ConfigError(
                f"data.resize={d.resize} is smaller than data.image_size={d.image_size}: "
                "the centre crop must fit in the warped image"
            )
    if d.crop == "square" and d.resize is None:
        raise ConfigError(
            "data.crop=square crops a data.resize x data.resize warp: set data.resize"
        )
    # the device decoder resizes whole images only: it can neither crop nor warp-then-crop
    if d.gpu_decode and d.crop != "none":
        raise ConfigError(
            f"data.gpu_decode=true cannot do data.crop={d.crop} (the device path only resizes); "
            "set data.crop=none or data.gpu_decode=false"
        )
    if d.gpu_decode and d.resize is not None:
        raise ConfigError(
            f"data.gpu_decode=true cannot do data.resize={d.resize} (warp, then centre crop); "
            "unset data.resize or set data.gpu_decode=false"
        )
    if cfg.train.select_on == "holdout" and d.calibration != "holdout":
        raise ConfigError(
            f"train.select_on=holdout selects on the training images data.calibration=holdout "
            f"keeps out, but data.calibration={d.calibration}"
        )


def _explain(e: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "not in" in msg or "Key" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        schema = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else None
        allowed = (
            sorted(schema.keys())
            if isinstance(schema, DictConfig)
            else sorted(Config.__dataclass_fields__)
        )
        name = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        hint = (
            f"did you mean {'.'.join([parent, close[0]]) if parent else close[0]!r}? "
            if close
            else ""
        )
        return ConfigError(
            f"{origin}: unknown config key {key!r}; {hint}allowed keys here: {allowed}"
        )
    return ConfigError(f"{origin}: bad value for {key!r}: {msg}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. Returns a typed :class:`Config`."""
    base = OmegaConf.structured(Config)
    layers = []
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        origin = str(p)
        try:
            text = read_regular_text(p, "config file", 64 << 20, error=ConfigError)
            layer = OmegaConf.load(io.StringIO(text))
        except ConfigError:
            raise
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(layer, DictConfig):
            raise ConfigError(
                f"{p}: a config is a mapping of sections (data:, model:, train:, ...), "
                f"not a {type(layer).__name__}"
            )
        layers.append(layer)
    try:
        cfg = OmegaConf.merge(base, *layers)
    except OmegaConfBaseException as e:
        raise _explain(e, origin) from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {item!r}") from e
        except UnicodeError:  # a file name that is not UTF-8 (surrogate escapes)
            raise ConfigError(
                f"override {item!r}: not UTF-8 text; a config value cannot hold this file "
                "name (rename the file or folder, or link to it under a UTF-8 name)"
            ) from None
    try:  # ${...} interpolations resolve here: a missing variable or key is one line too
        for section, key in (("data", "image_check"), ("train", "amp")):
            if cfg[section][key] in ("False", "false"):  # YAML 1.1 reads a bare `off` as false
                cfg[section][key] = "off"
        _check(cfg)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except InterpolationResolutionError as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{origin}: cannot resolve {key!r} ({str(e).splitlines()[0]})") from e
    except OmegaConfBaseException as e:
        raise _explain(e, origin) from e


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what `mlic train` saves beside every run)."""
    from mlic.files import write_text

    write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
