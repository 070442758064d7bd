"""The ``mlic`` command line: demo, train, eval, predict, serve, export, data, push, bench, models.

Every user-facing failure is an :class:`~mlic.errors.MlicError` printed as one line
``mlic: error: ...`` with exit code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from mlic.errors import ConfigError, DataError, MlicError, missing_extra

__all__ = ["main", "resolve_config_path"]

log = logging.getLogger("mlic")


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a recipe shipped in ``mlic/configs`` (``demo``, ``msformer_coco2014``)."""
    p = Path(name)
    if p.exists():
        return p
    shipped = (
        resources.files("mlic") / "configs" / (name if name.endswith(".yaml") else f"{name}.yaml")
    )
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(
        f"{name}: config file not found (neither a path nor a shipped recipe; see `mlic configs`)"
    )


# ----------------------------------------------------------------------------- commands
def _name_run_after_its_data(cfg: Any, overrides: list[str]) -> None:
    """A recipe trained on other data without a run.name is named ``<model>-<data folder>``,
    not after the recipe (``demo`` on your photos is not the demo)."""
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    if "run.name" in given or not given & {"data.root", "data.train", "data.format"}:
        return
    where = Path(str(cfg.data.root or cfg.data.train or "data")).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{cfg.model.name}-{where}").strip("-.") or "run"
    logging.getLogger("mlic").info(
        "run.name not given for this data: the run is named %s (run.name=... to choose)", name
    )
    cfg.run.name = name


def cmd_train(args: argparse.Namespace) -> int:
    from mlic.config import load_config
    from mlic.engine.trainer import train

    t0 = time.perf_counter()
    if args.resume:
        overrides = list(args.overrides)
        if args.config is not None:  # `train --resume RUN train.epochs=5`: an override
            if "=" not in args.config:
                raise ConfigError(
                    f"{args.config}: give a CONFIG or --resume RUN_DIR, not both (a resumed run "
                    "keeps its own config; key=value overrides may follow)"
                )
            overrides.insert(0, args.config)
        result = train(None, resume=args.resume, overrides=overrides)  # type: ignore[arg-type]
        cfg = load_config(Path(args.resume) / "config.yaml")  # as the run saved it
    else:
        if args.config is None:
            raise ConfigError(
                "give a CONFIG (YAML path or shipped recipe name) or --resume RUN_DIR"
            )
        cfg = load_config(resolve_config_path(args.config), args.overrides)
        _name_run_after_its_data(cfg, args.overrides)
        result = train(cfg)
    from mlic.engine.distributed import cleanup, is_main

    main_rank = is_main()
    cleanup()
    if not main_rank:
        return 0
    print_final_table(cfg, result, "Trained", time.perf_counter() - t0)
    return 0


def _voc_folder(root: str) -> Path | None:
    """The VOC20xx folder at or under ``root`` (``.../VOC2007`` or a folder holding
    ``VOCdevkit/VOC2007``), or None when ``root`` is not a VOC tree."""
    p = Path(root).expanduser()
    for cand in (p, p / "VOC2007", p / "VOCdevkit" / "VOC2007", p / "VOCdevkit" / "VOC2012"):
        if (cand / "ImageSets" / "Main").is_dir() and (cand / "Annotations").is_dir():
            return cand
    return None


def demo_overrides(overrides: list[str]) -> list[str]:
    """The demo's overrides, with ``data.root=`` pointing at a PASCAL VOC folder turned into
    the same recipe on those real photographs: ``data.format=voc``, the official
    ``trainval``/``test`` lists when ``test.txt`` is there (the full VOC 2007 release), else
    ``train``/``val``; ``run.name=demo-voc``. Overrides the user gave win."""
    roots = [o.split("=", 1)[1] for o in overrides if o.startswith("data.root=")]
    voc = _voc_folder(roots[-1]) if roots else None
    if voc is None:
        return overrides
    main = voc / "ImageSets" / "Main"
    train, val = ("trainval", "test") if (main / "test.txt").exists() else ("train", "val")
    log.info("demo on the VOC photographs in %s (%s -> %s)", voc, train, val)
    ours = ["data.format=voc", f"data.train={train}", f"data.val={val}", "run.name=demo-voc"]
    return [*ours, *overrides, f"data.root={voc}"]


def cmd_demo(args: argparse.Namespace) -> int:
    from mlic.config import load_config
    from mlic.engine.trainer import train

    t0 = time.perf_counter()
    cfg = load_config(resolve_config_path("demo"), demo_overrides(args.overrides))
    result = train(cfg)
    print_final_table(cfg, result, "Demo", time.perf_counter() - t0)
    return 0


def print_final_table(cfg: Any, result: dict[str, Any], title: str, seconds: float) -> None:
    """The kept weights' metrics at 0.5 and at the stored thresholds, and which weights they are
    (the epoch, counted from 1 as in metrics.csv, and raw or EMA), as `mlic train` ends."""
    from mlic.thresholds import describe_stored
    from mlic.viz import metric_table

    if not result.get("history") or not result.get("best_epoch"):
        print(f"\nno epoch was evaluated; run in {result['run_dir']}")
        return
    from mlic.engine.checkpoint import read_metadata

    best = next(r for r in result["history"] if r["epoch"] == result["best_epoch"])
    meta = read_metadata(Path(result["run_dir"]) / "best.safetensors")
    weights = meta.get("weights")
    shown = (
        {k[4:]: v for k, v in best.items() if k.startswith("ema_")} if weights == "ema" else best
    )
    init = "ImageNet-pretrained" if cfg.model.pretrained else "random init"
    print(
        f"\n{title}: {cfg.model.name} on {cfg.model.backbone} ({init}), best epoch "
        f"{result['best_epoch']} of {len(result['history'])}, "
        f"{'the EMA weights' if weights == 'ema' else 'the raw weights'} kept, {seconds:.0f} s\n"
    )
    calibrated = {k[4:]: v for k, v in shown.items() if k.startswith("cal_")}
    if calibrated:  # what users get first: predict and serve use these thresholds
        print(
            f"At the per-class thresholds `mlic predict` and `serve` use "
            f"({describe_stored(meta)}):\n"
        )
        print(metric_table(calibrated))
        print()
    print("At threshold 0.5 (the papers' convention):\n")
    print(metric_table(shown))
    print(f"\nrun: {result['run_dir']}  report: {Path(result['run_dir']) / 'report.md'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from mlic.evaluate import evaluate_checkpoint
    from mlic.host import retain_freed_memory

    retain_freed_memory()  # this process is ours: no page faults per batch

    quiet = ["run.progress=false"] if args.quiet else []  # no progress bar
    tuning = [f"thresholds.{k}={v}" for k in ("objective", "rule") if (v := getattr(args, k))]
    if tuning and not args.tune_thresholds:
        raise ConfigError("--objective and --rule choose how --tune-thresholds tunes: add it")
    out = evaluate_checkpoint(
        args.target,
        [*args.overrides, *quiet, *tuning],
        output=args.output,
        split=args.split,
        tune_thresholds=args.tune_thresholds,
        precision=args.precision,
    )
    from mlic.viz import metric_table

    print(metric_table(out["metrics"]))
    print(f"\nprecision: {out['precision']}\nreport: {out['report']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mlic.evaluate import resolve_target
    from mlic.host import retain_freed_memory
    from mlic.inference import Predictor
    from mlic.predict import format_table, run_predict, write_predictions

    retain_freed_memory()  # this process is ours: no page faults per batch
    _check_predict_outputs(args)  # before the model is loaded
    if args.backend == "torch":
        from mlic.engine.precision import check_device

        check_device(args.device)
    ckpt, _ = resolve_target(args.checkpoint)
    if args.backend == "onnxruntime":
        from mlic.inference import OnnxPredictor

        predictor = OnnxPredictor.from_checkpoint(ckpt, threads=args.threads)
    else:
        predictor = Predictor.from_checkpoint(ckpt, device=args.device, precision=args.precision)
    heat = Path(args.heatmaps) if args.heatmaps else None
    summary = run_predict(
        predictor,
        args.inputs,
        batch_size=args.batch_size,
        threshold=args.threshold,
        top_k=args.top_k,
        heatmaps=heat,
        progress=not args.quiet,
    )
    if not summary.predictions and summary.failed:  # nothing to write: keep any old output
        kept = f"; {args.output} left unchanged" if args.output else ""
        raise DataError(
            f"no input could be predicted ({len(summary.failed)} failed, the first: "
            f"{summary.failed[0]}){kept}"
        )
    if not args.quiet:  # after the checks: a bad input still gives one error line
        print(f"mlic: precision {predictor.precision}", file=sys.stderr)
    if args.output:
        write_predictions(summary.predictions, predictor.names, Path(args.output))
        print(f"{len(summary.predictions)} predictions written to {args.output}")
    else:
        print(format_table(summary.predictions))
    if heat is not None:
        print(f"heat maps in {heat}")
    for problem in summary.failed:
        print(f"mlic: skipped: {problem}", file=sys.stderr)
    if summary.failed:
        print(f"mlic: {len(summary.failed)} input(s) failed", file=sys.stderr)
        return 1
    return 0


def _check_predict_outputs(args: argparse.Namespace) -> None:
    """``mlic predict``'s --output and --heatmaps, checked before any work."""
    from mlic.files import display_path, refuse_run_file

    if args.output:
        out = Path(args.output)
        if out.suffix not in (".csv", ".jsonl"):
            raise ConfigError(f"--output {display_path(out)}: must end in .csv or .jsonl")
        if out.is_dir():
            raise ConfigError(f"--output {display_path(out)}: is a folder, not a file name")
        refuse_run_file(out, "--output")
    if args.heatmaps and Path(args.heatmaps).exists() and not Path(args.heatmaps).is_dir():
        raise ConfigError(f"--heatmaps {display_path(args.heatmaps)}: exists and is not a folder")


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from mlic.serve.app import ServeConfig, serve
    except ImportError as e:
        raise (missing_extra(e.name, "mlic serve") or e) from e
    backend = args.backend or ("onnxruntime" if str(args.target).endswith(".onnx") else "torch")
    # The parser bounds each number (mlic.serve.SERVE_RANGES); ServeConfig.check (in serve)
    # checks what depends on several options, the host, the device and the port.
    # An explicit --token '' is refused (it would silently turn authentication off).
    token = args.token if args.token is not None else os.environ.get("MLIC_SERVE_TOKEN") or None
    config = ServeConfig(
        target=args.target,
        backend=backend,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        workers=args.workers,
        max_upload_mb=args.max_upload_mb,
        max_request_mb=args.max_request_mb,
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        token=token,
        timeout_s=args.timeout,
        read_timeout_s=args.read_timeout,
        drain_timeout_s=args.drain_timeout,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
    )
    return serve(config)


def cmd_export(args: argparse.Namespace) -> int:
    from mlic.evaluate import resolve_target
    from mlic.export import SUFFIXES, export_checkpoint
    from mlic.hub_files import in_hub_cache, is_hub_id

    if args.int8 and args.format != "onnx":  # before the export, not after it
        raise ConfigError("--int8 applies to --format onnx")
    # a downloaded model's config names no data mlic would read: calibration images needed
    needs_images = f"{args.checkpoint}: --int8 of a downloaded model needs --calibration DIR"
    if args.int8 and not args.calibration and is_hub_id(args.checkpoint):  # before a download
        raise ConfigError(needs_images)
    ckpt, _ = resolve_target(args.checkpoint)
    downloaded = is_hub_id(args.checkpoint) or in_hub_cache(ckpt)  # or a path into the cache
    if args.int8 and not args.calibration and downloaded:
        raise ConfigError(needs_images)
    output = Path(args.output) if args.output else None  # default: beside the checkpoint
    if output is None and is_hub_id(args.checkpoint):  # not into the Hugging Face cache
        output = Path(args.checkpoint.rsplit("/", 1)[-1].split("@")[0] + SUFFIXES[args.format])
    elif output is None and downloaded:
        output = Path(ckpt.stem + SUFFIXES[args.format])
    result = export_checkpoint(ckpt, output, format=args.format, image_size=args.image_size)
    print(
        f"exported {args.format} to {result.path}; max |p_export - p_eager| = {result.max_abs_diff:.2e}"
    )
    if args.int8:
        q = _quantize(ckpt, result.path, args)
        print(f"int8 model: {q}")
    return 0


def _quantize(ckpt: Path, onnx_path: Path, args: argparse.Namespace) -> Path:
    """Calibrate and write the int8 graph beside ``onnx_path`` (images: --calibration or the run's val split)."""
    import torch

    from mlic.data.transforms import build_transform, load_image
    from mlic.engine.checkpoint import read_metadata
    from mlic.export import quantize_onnx_int8
    from mlic.predict import expand_inputs

    if args.calibration:
        images, _ = expand_inputs([args.calibration])
    else:
        from mlic.config import load_config
        from mlic.data.dataset import load_split

        run_cfg = ckpt.parent / "config.yaml"
        if not run_cfg.exists():
            raise ConfigError(
                "--int8 needs --calibration DIR (no run config beside the checkpoint)"
            )
        images = load_split(load_config(run_cfg).data, "val").images
    if not images:
        raise ConfigError("no calibration images found")
    meta = read_metadata(ckpt)
    size = int(meta["input_size"][-1])
    tf = build_transform(size, meta["mean"], meta["std"], train=False)
    batch = torch.stack(
        [tf(load_image(p, draft_size=size)) for p in images[: args.calibration_images]]
    )
    return quantize_onnx_int8(onnx_path, onnx_path.with_suffix(".int8.onnx"), batch)


def cmd_push(args: argparse.Namespace) -> int:
    """``mlic push RUN_DIR REPO_ID`` uploads; ``mlic push --dry-run RUN_DIR OUT_DIR`` writes the
    folder it would upload (model.safetensors, config.json, config.yaml, README.md)."""
    from mlic.hub import push_run
    from mlic.hub_files import validate_repo_id

    if args.dry_run:
        repo_id = args.repo_id or f"ORG/{Path(args.run_dir).resolve().name}"
        try:
            validate_repo_id(repo_id)
        except MlicError:
            if args.repo_id:
                raise
            raise ConfigError(  # the default came from the folder's name: say what to give
                f"{Path(args.run_dir).resolve().name!r}: the run folder's name is not a Hub "
                "repository id; give --repo-id ORG/NAME"
            ) from None
        where = push_run(args.run_dir, repo_id, license=args.license, dry_run=args.target)
        print(f"wrote the folder `mlic push` would upload as {repo_id} to {where}")
        return 0
    url = push_run(args.run_dir, args.target, private=args.private, license=args.license)
    print(f"pushed {args.run_dir} to {url}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mlic.bench import benchmark
    from mlic.engine.precision import check_device

    check_device(args.device)
    if args.batch_size > 4096:  # a bench batch is allocated whole, at once
        raise ConfigError(f"--batch-size {args.batch_size}: must be <= 4096")
    r = benchmark(
        args.model,
        backbone=args.backbone,
        image_size=args.image_size,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        steps=args.steps,
        data=args.data,
        workers=args.workers,
    )
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    for k, v in r.items():
        print(f"{k:<28} {v:.4g}" if isinstance(v, float) else f"{k:<28} {v}")
    return 0


def _models_paper(names: list[str], json_path: str | None) -> int:
    """``mlic models --paper``: each model's published results from its registry entry."""
    from mlic.models._comparison import published_rows

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = published_rows(names)
    head = ("model", "dataset", "px", "mAP", "CF1", "OF1", "params")
    print("{:<10} {:<9} {:>4} {:>6} {:>6} {:>6} {:>6}  backbone; source".format(*head))
    for r in rows:
        px = "-" if r.get("input_size") is None else str(r["input_size"])
        figures = " ".join(f"{num(r.get(k)):>6}" for k in ("mAP", "CF1", "OF1", "params_m"))
        where = f"{r.get('backbone', '-')}; {r['source']}"
        print(f"{r['model']:<10} {r['dataset'] or '-':<9} {px:>4} {figures}  {where}")
    if json_path:
        from mlic.files import write_text

        write_text(json_path, json.dumps(rows, indent=1))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mlic.bench import model_summary
    from mlic.models import list_models

    if args.json:  # before the table is computed
        from mlic.files import refuse_run_file

        if Path(args.json).is_dir():
            raise ConfigError(f"--json {args.json}: is a folder, not a file name")
        refuse_run_file(args.json, "--json")
    names = [n for n in list_models() if not args.filter or args.filter in n]
    if args.paper:  # the registry's published results: no model is built
        return _models_paper(names, args.json)
    rows = []
    print(
        f"{'model':<12} {'params (M)':>11} {'GFLOPs':>8}   backbone={args.backbone}, {args.image_size} px, "
        f"{args.num_classes} classes"
    )
    for name in names:
        s = model_summary(
            name, args.backbone, args.image_size, args.num_classes, flops=not args.no_flops
        )
        rows.append(s)
        gf = f"{s['gflops']:8.2f}" if s["gflops"] is not None else "       -"
        print(f"{name:<12} {s['params_m']:11.2f} {gf}", flush=True)
    if args.json:
        from mlic.files import write_text

        write_text(args.json, json.dumps(rows, indent=1))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``mlic data check|stats``: read both splits of a config and check every image, without
    training; ``stats`` also writes stats.md + plots. Exit 1 when broken images were found."""
    from mlic.config import load_config
    from mlic.data.check import data_check
    from mlic.data.stats import write_stats

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.action == "issues":
        return _issues(cfg, args)
    if args.action == "pack":
        return _pack(cfg, args)
    if args.action == "show":
        return _show(cfg, args)
    if args.action == "check" and cfg.data.format == "wds":
        from mlic.data.wds import open_shards, verify_shards

        problems = []
        for split in (cfg.data.train, cfg.data.val):
            index = open_shards(split)
            found = verify_shards(index)
            print(
                f"{split}: {len(index.shards)} shards, {index.num_samples} samples, "
                f"{len(found)} problem(s)"
            )
            problems += found
        print("\n".join(problems))
        return 1 if problems else 0
    full = not args.fast
    if args.action == "check":
        report = data_check(cfg, full=full, workers=args.workers, progress=not args.quiet)
        print("\n".join(report.lines()))
        return 1 if report.num_problems else 0
    output = Path(args.output) if args.output else Path(cfg.run.output_dir) / "data-stats"
    from mlic.files import refuse_run_file

    refuse_run_file(output / "stats.md", "--output")  # not into a run's labels/ or tb/
    _, summary, report = write_stats(cfg, output, full=full, workers=args.workers)
    print(summary)
    return 1 if report.num_problems else 0


def _show(cfg, args: argparse.Namespace) -> int:
    """``mlic data show CONFIG``: a PNG grid of training images after the training
    augmentation, each titled with its labels (default ``data-show.png`` here)."""
    from mlic.data.show import show_batch
    from mlic.files import display_path, refuse_run_file

    output = Path(args.output or "data-show.png")
    if output.suffix.lower() != ".png":
        raise ConfigError(f"--output {display_path(output)}: must end in .png")
    if output.is_dir():
        raise ConfigError(f"--output {display_path(output)}: is a folder, not a file name")
    refuse_run_file(output, "--output")
    path, titles = show_batch(cfg.data, output, split=args.split, n=args.n, seed=cfg.train.seed)
    print(f"{len(titles)} {args.split} images after the training augmentation: {path}")
    return 0


def _issues(cfg, args: argparse.Namespace) -> int:
    """``mlic data issues CONFIG --folds K --output DIR``: suspected label errors of the
    training split from K fold runs' out-of-fold scores (:mod:`mlic.label_issues`)."""
    from mlic.engine.trainer import train
    from mlic.files import display_path
    from mlic.label_issues import (
        WEAK_SEPARATION,
        annotation_files,
        check_fixed_target,
        find_label_issues,
        write_fixed,
    )

    if (args.write_fixed is None) != (args.top is None):
        raise ConfigError("--write-fixed FILE and --top N go together (flip the top N suspects)")
    if args.write_fixed is not None:  # refused before hours of training, not after
        check_fixed_target(args.write_fixed, annotation_files(cfg.data))
    output = Path(args.output) if args.output else Path(cfg.run.output_dir) / "label-issues"
    result = find_label_issues(cfg, output, args.folds, train, args.fold_epochs)
    if result is None:  # a torchrun rank other than 0: it trained its share
        return 0
    issues, names, classes = result.issues, result.names, result.ann.names
    print(
        f"{len(issues)} suspected label errors among {int(result.oof.scored.sum())} training "
        f"images ({result.oof.folds} fold runs of {result.oof.epochs} epoch(s), "
        f"{result.seconds:.0f} s) in {display_path(output)}: issues.csv, summary.csv, "
        "index.html, oof_scores.npy"
    )
    if len(issues):
        print(f"{'rank':>5}  {'score':>6}  {'label':<8} {'class':<16} image")
        for i in range(min(10, len(issues))):
            kind = "missing" if issues.given[i] == 0 else "extra"
            print(
                f"{i + 1:>5}  {issues.score[i]:>6.3f}  {kind:<8} "
                f"{classes[issues.cls[i]]:<16} {names[issues.row[i]]}"
            )
    weak = [s["class"] for s in issues.summary if s["separation"] < WEAK_SEPARATION]
    if weak:
        print(
            f"{len(weak)} class(es) the fold models barely separate (separation < "
            f"{WEAK_SEPARATION} in summary.csv), their suspects are mostly noise: "
            f"{', '.join(weak[:8])}{' ...' if len(weak) > 8 else ''} (more --fold-epochs?)"
        )
    if args.write_fixed is not None:
        path, n = write_fixed(args.write_fixed, result, args.top, annotation_files(cfg.data))
        print(
            f"{display_path(path)}: the training labels with the top {n} suspects flipped "
            f"(train on it with data.format=csv data.train={display_path(path)} "
            f"data.train_images={display_path(result.image_base)}; data.val must then be a CSV too)"
        )
    return 0


def _pack(cfg, args: argparse.Namespace) -> int:
    """``mlic data pack CONFIG --split train --out DIR``: WebDataset shards + dataset.json."""
    from mlic.data.dataset import load_split
    from mlic.data.wds import pack_shards

    if not args.out:
        raise ConfigError("mlic data pack needs --out DIR (the folder for the shards)")
    t0 = time.perf_counter()
    train_names = None
    if args.split == "val":  # the val split in the training split's class order
        train_names = load_split(cfg.data, "train").names
    ann = load_split(cfg.data, args.split, class_names=train_names)
    index = pack_shards(
        ann,
        args.out,
        shard_size=args.shard_size,
        max_samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        progress=not args.quiet,
    )
    secs = time.perf_counter() - t0
    size = sum(s["bytes"] for s in index["shards"])
    print(
        f"{index['num_samples']} samples in {len(index['shards'])} shards ({size / 1e6:.1f} MB) "
        f"in {args.out}; {secs:.1f} s ({1000 * secs / max(index['num_samples'], 1):.2f} s per 1,000 images)"
    )
    return 0


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with mlic's one-line error form: ``mlic: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        command = self.prog.removeprefix("mlic").strip()
        hint = f" (see `mlic {command} --help`)" if command else " (see `mlic --help`)"
        print(f"mlic: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2)


def _bounded(kind: type, low: float | None = None, high: float | None = None) -> Callable:
    """An argparse ``type`` that parses ``kind`` and checks ``low <= value <= high``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _bounded(int, 1)
NUM_CLASSES = _bounded(int, 1, 100_000)  # as a checkpoint's (engine.checkpoint.MAX_CLASSES)
PROBABILITY = _bounded(float, 0.0, 1.0)
IMAGE_SIZE = _bounded(int, 16, 4096)
PRECISION_ARG: dict = {
    "choices": ["auto", "fp32", "bf16"],
    "default": "auto",
    "help": "auto (default): bf16 on a GPU or a CPU with AMX-BF16/AVX512-BF16, else fp32",
}
#: predict and serve: fp32 unless asked, so their probabilities are the exported graph's
#: (to 1e-4); what bf16 gains and moves: BENCHMARKS section 3.1
PREDICT_PRECISION_ARG: dict = {
    **PRECISION_ARG,
    "default": "fp32",
    "help": "fp32 (default: the numbers of the exported ONNX graph), bf16 (faster where the "
    "CPU has bf16 units), or auto (bf16 where the device has the units)",
}


def _add_demo(sub: Any) -> None:
    s = sub.add_parser("demo", help="generate the demo set, fine-tune the baseline, print metrics")
    s.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    s.set_defaults(func=cmd_demo)


def _add_train(sub: Any) -> None:
    s = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    s.add_argument("config", nargs="?", help="YAML path or shipped recipe name (e.g. demo)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    s.set_defaults(func=cmd_train)


def _add_eval(sub: Any) -> None:
    s = sub.add_parser(
        "eval", help="evaluate a run folder or checkpoint; writes metrics + report.md"
    )
    s.add_argument(
        "target", help="run folder (uses its config), .safetensors checkpoint or hf-hub:ORG/NAME"
    )
    s.add_argument(
        "overrides", nargs="*", help="data.* overrides, e.g. data.format=voc data.root=..."
    )
    s.add_argument(
        "--split", default="val", choices=["train", "val"], help="which split of the data config"
    )
    s.add_argument(
        "--output", help="folder for metrics.json and report.md (default: beside the target)"
    )
    s.add_argument(
        "--tune-thresholds",
        action="store_true",
        help="choose per-class thresholds on this split (thresholds.* of the run's config: "
        "rule shrunk, objective f1 by default) and store them in the checkpoint",
    )
    s.add_argument(
        "--objective",
        help="with --tune-thresholds: f1, precision:P or recall:R (= thresholds.objective=...)",
    )
    s.add_argument(
        "--rule", help="with --tune-thresholds: a thresholds.rule (shrunk, global, best_f1, ...)"
    )
    s.add_argument("--precision", **PRECISION_ARG)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)


def _add_predict(sub: Any) -> None:
    s = sub.add_parser("predict", help="predict labels for image files, folders or globs")
    s.add_argument("checkpoint", help=".safetensors checkpoint, run folder or hf-hub:ORG/NAME")
    s.add_argument("inputs", nargs="+", help="image files, folders (recursive) or globs")
    s.add_argument(
        "--threshold",
        type=PROBABILITY,
        help="one threshold for all labels (default: tuned, else 0.5)",
    )
    s.add_argument("--top-k", type=POSITIVE_INT, help="at most this many labels per image")
    s.add_argument("--output", help="write results to a .csv or .jsonl file instead of a table")
    s.add_argument(
        "--heatmaps", metavar="DIR", help="write attention overlays per predicted label + a grid"
    )
    s.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    s.add_argument("--precision", **PREDICT_PRECISION_ARG)
    s.add_argument("--threads", type=POSITIVE_INT, help="intra-op threads for onnxruntime")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_predict)


def _add_serve(sub: Any) -> None:
    from mlic.serve import SERVE_RANGES  # light: LitServe loads only when serving

    s = sub.add_parser("serve", help="serve a model over HTTP: API with dynamic batching + a page")
    s.add_argument("target", help="run folder, .safetensors checkpoint or exported .onnx model")
    s.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        help="default: onnxruntime for .onnx, else torch",
    )
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), 0.0.0.0 or ::")

    def serve_num(option: str, default: Any, what: str) -> None:
        s.add_argument(option, type=_bounded(*SERVE_RANGES[option]), default=default, help=what)

    serve_num("--port", 8000, "1024-65535; refused when in use")
    serve_num("--max-batch-size", 16, "requests per dynamic batch (1: no batching)")
    serve_num("--max-wait-ms", 10.0, "how long a batch waits to fill")
    serve_num("--workers", 1, "inference worker processes")
    serve_num("--max-upload-mb", 10.0, "largest image file")
    serve_num("--max-request-mb", None, "largest request body (default: 64 or 2x upload)")
    serve_num("--max-images", 32, "most images in one request")
    serve_num("--max-pixels", 40_000_000, "largest image (w x h)")
    serve_num("--max-queue", 64, "requests admitted at once; more get 503 + Retry-After")
    s.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or MLIC_SERVE_TOKEN)")
    serve_num("--timeout", 60.0, "seconds a request may wait for its answer")
    serve_num("--read-timeout", 30.0, "seconds for a request's head or body to arrive (408)")
    serve_num("--drain-timeout", 30.0, "on SIGTERM: seconds to answer admitted requests")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--precision", **PREDICT_PRECISION_ARG)
    serve_num("--threads", None, "intra-op threads per worker")
    s.set_defaults(func=cmd_serve)


def _add_export(sub: Any) -> None:
    s = sub.add_parser(
        "export", help="export a checkpoint to ONNX, TorchScript or an ExportedProgram"
    )
    s.add_argument("checkpoint", help=".safetensors checkpoint, run folder or hf-hub:ORG/NAME")
    s.add_argument("--format", choices=["onnx", "torchscript", "exported-program"], default="onnx")
    s.add_argument("--output", help="output file (default: beside the checkpoint)")
    s.add_argument("--image-size", type=IMAGE_SIZE, help="input size (default: the checkpoint's)")
    s.add_argument(
        "--int8", action="store_true", help="also write a statically quantized int8 ONNX graph"
    )
    s.add_argument(
        "--calibration", help="images (folder/glob) to calibrate int8 on (default: run's val split)"
    )
    s.add_argument("--calibration-images", type=POSITIVE_INT, default=32)
    s.set_defaults(func=cmd_export)


def _add_data(sub: Any) -> None:
    s = sub.add_parser(
        "data",
        help="check a data config's images and annotations, describe it, "
        "show augmented images, or pack it into WebDataset shards",
    )
    s.add_argument(
        "action",
        choices=["check", "stats", "pack", "show", "issues"],
        help="check: list every broken image; "
        "stats: also write stats.md, class_frequency.png, cooccurrence.png; "
        "pack: write one split as WebDataset tar shards + dataset.json (--out); "
        "show: a PNG grid of images after the training augmentation, titled with their labels; "
        "issues: rank suspected label errors of the training split from --folds K fold runs "
        "(K trainings) into --output DIR",
    )
    s.add_argument("config", help="YAML path or shipped recipe name (its data.* section is used)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=...")
    s.add_argument("--fast", action="store_true", help="read image headers only (no decode)")
    s.add_argument("--workers", type=POSITIVE_INT, help="checking threads (default: CPU count)")
    s.add_argument(
        "--output",
        help="stats: output folder (default: <run.output_dir>/data-stats); "
        "show: the PNG (default: data-show.png); "
        "issues: output folder (default: <run.output_dir>/label-issues)",
    )
    s.add_argument(
        "--split", default="train", choices=["train", "val"], help="pack, show: which split"
    )
    s.add_argument("--n", type=POSITIVE_INT, default=16, help="show: how many images (<= 64)")
    s.add_argument("--out", help="pack: folder for the shards and dataset.json")
    s.add_argument("--shard-size", default="1GB", help="pack: bytes per shard (1GB, 500MB, ...)")
    s.add_argument("--samples-per-shard", type=int, help="pack: also cap samples per shard")
    s.add_argument("--seed", type=int, default=0, help="pack: seed of the sample order")
    s.add_argument(
        "--folds", type=_bounded(int, 2, 100), default=5, help="issues: fold runs (default 5)"
    )
    s.add_argument(
        "--fold-epochs", type=POSITIVE_INT, help="issues: epochs per fold (default: train.epochs)"
    )
    s.add_argument(
        "--write-fixed",
        metavar="FILE",
        help="issues: a new CSV of the labels, top suspects flipped",
    )
    s.add_argument(
        "--top", type=_bounded(int, 0), help="issues: how many suspects --write-fixed flips"
    )
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_data)


def _add_push(sub: Any) -> None:
    s = sub.add_parser(
        "push", help="upload a run's best checkpoint + model card to the Hugging Face Hub"
    )
    s.add_argument("run_dir", help="run folder (best.safetensors, config.yaml, ...)")
    s.add_argument("target", metavar="REPO_ID|OUT_DIR", help="ORG/NAME; with --dry-run: a folder")
    s.add_argument("--private", action="store_true", help="create the repository as private")
    s.add_argument("--license", default="other", help="licence field of the model card")
    s.add_argument("--dry-run", action="store_true", help="only write the folder to OUT_DIR")
    s.add_argument("--repo-id", help="--dry-run: the ORG/NAME the card names")
    s.set_defaults(func=cmd_push)


def _add_bench(sub: Any) -> None:
    from mlic.config import DEFAULT_IMAGE_SIZE

    s = sub.add_parser("bench", help="training/inference speed, latency, memory, FLOP utilisation")
    s.add_argument("model")
    s.add_argument("--backbone", default="resnet101")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    s.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    s.add_argument("--image-size", type=IMAGE_SIZE, default=DEFAULT_IMAGE_SIZE)
    s.add_argument("--num-classes", type=NUM_CLASSES, default=80)
    s.add_argument("--steps", type=POSITIVE_INT, default=5, help="timed steps after one warm-up")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--data", help="folder of JPEGs: also time the data pipeline")
    s.add_argument(
        "--workers", type=_bounded(int, 0), default=2, help="data-loader workers for --data"
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_bench)


def _add_models(sub: Any) -> None:
    from mlic.config import DEFAULT_IMAGE_SIZE

    s = sub.add_parser("models", help="list registered models with parameters and GFLOPs")
    s.add_argument("filter", nargs="?", help="only names containing this")
    s.add_argument("--backbone", default="resnet101")
    s.add_argument("--image-size", type=IMAGE_SIZE, default=DEFAULT_IMAGE_SIZE)
    s.add_argument("--num-classes", type=NUM_CLASSES, default=80)
    s.add_argument("--no-flops", action="store_true", help="skip the FLOP count (fast)")
    s.add_argument(
        "--paper", action="store_true", help="list the published results (mAP, CF1, OF1, source)"
    )
    s.add_argument("--json", help="also write the table as JSON here")
    s.set_defaults(func=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    from mlic import __version__

    p = _Parser(prog="mlic", description="Multi-label image classification.")
    p.add_argument("--version", action="version", version=f"mlic {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_demo,
        _add_train,
        _add_eval,
        _add_predict,
        _add_serve,
        _add_export,
        _add_data,
        _add_push,
        _add_bench,
        _add_models,
    ):
        add(sub)
    return p


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (torch's CPU/CUDA allocators or Python's)."""
    text = str(e)
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`eval RUN --output X data.root=Y`) are overrides too
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    if extra and takes_overrides and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name prints as \xNN, not a traceback
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        return int(args.func(args) or 0)
    except MlicError as e:
        if args.verbose:
            raise
        print(f"mlic: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("mlic: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional extra not installed: say which, and how
        error = missing_extra(e.name, f"mlic {args.command}")
        if error is None or args.verbose:
            raise
        print(f"mlic: error: {error}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused something not wrapped above: one line too
        if args.verbose:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"mlic: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # out of memory (sizes asked for): one line
        if args.verbose or not _out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "ask for a smaller batch, image size or model"
        print(f"mlic: error: out of memory ({first}); {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
