"""Export a checkpoint to a deployable graph (ONNX, TorchScript, ``torch.export``), verified.

Every exported graph has the same contract, whatever the model:

* input ``images``: a normalised float32 batch [B, 3, S, S] (mean/std from the checkpoint,
  stored with the export) whose batch axis B is dynamic;
* output ``probabilities``: [B, C], the sigmoid of the model's logits, computed inside the
  graph so a deployed model needs no post-processing to be thresholded.

Each export is checked against eager PyTorch at two batch sizes (1 and 3 by default, the
traced example uses 2, so a graph that baked its batch size in fails the check) and the
largest absolute difference of the probabilities is reported. Above ``atol`` (1e-4, fp32)
the export is refused with an :class:`ExportError` naming the model and the difference.

Formats:

* ``onnx``: the graph is captured with ``torch.export.export`` (non-strict, dynamic batch
  ``Dim``) and converted by ``torch.onnx.export(..., dynamo=True)``, the
  ``torch.export``-based exporter (the default since PyTorch 2.9; the TorchScript-based
  one is deprecated), with the batch axis named ``batch``, the onnxscript optimiser on
  (it halves the node count for little time), weights inside the one ``.onnx`` file, and
  verification with onnxruntime's CPU provider. The checkpoint's label
  names, mean/std, input size and thresholds go into the model's ``metadata_props`` as
  JSON strings (:func:`read_export_metadata`), so the ``.onnx`` file describes itself.
* ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save`` with the metadata as the extra
  file ``mlic.json``. TorchScript is deprecated upstream; prefer the other two.
* ``exported-program``: ``torch.export.export`` with a dynamic batch ``Dim``, saved with
  ``torch.export.save`` (``.pt2``) with the metadata as the extra file ``mlic.json``.

Security: an ``.onnx`` file is protobuf and is loaded without executing Python. A ``.pt2``
file is NOT safe to load from an untrusted source: ``torch.export.load`` unpickles its
tensors with ``torch.load(weights_only=False)``, which can run arbitrary code. A
TorchScript file runs the TorchScript code it carries. Load both only from sources you
trust. :func:`read_export_metadata` reads their metadata from the zip archive without
loading them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from mlic.config import DEFAULT_IMAGE_SIZE
from mlic.errors import MlicError, require_extra
from mlic.files import atomic_write, refuse_run_file
from mlic.thresholds import META_KEYS

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "ExportError",
    "ExportResult",
    "FORMATS",
    "ProbabilityModel",
    "export_checkpoint",
    "export_model",
    "verify_onnx",
    "onnx_session",
    "read_export_metadata",
    "quantize_onnx_int8",
]

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
ATOL = 1e-4  # fp32 agreement required between the exported graph and eager PyTorch
EXAMPLE_BATCH = 2  # the traced example: not 0/1 (torch.export specialises those) nor a tested size
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in exporter messages


class ExportError(MlicError):
    """A model could not be exported, or its export disagrees with eager PyTorch."""


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and how well it matched eager PyTorch.

    ``max_abs_diff`` is the largest absolute difference of the probabilities over the
    verified batch sizes (``None`` when ``verify=False``).
    """

    path: Path
    format: str
    max_abs_diff: float | None = None
    verified: bool = False
    notes: list[str] = field(default_factory=list)


class ProbabilityModel(nn.Module):
    """Wraps an mlic model so the graph maps ``images`` [B, 3, S, S] to ``probabilities`` [B, C]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images))  # [B, C]


def _describe(error: BaseException) -> str:
    """One line saying why an export failed: the root cause and, if named, the failing op.

    Exporters wrap the real error (e.g. ``AssertionError: only 4D query, key, and value are
    supported``) in pages of advice; the innermost cause is what a user can act on.
    """
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    lines = [ln.strip() for ln in _ANSI.sub("", str(root)).splitlines() if ln.strip()]
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    if len(lines) > 1 and lines[0].startswith("Constraints violated"):
        text += " " + lines[1].lstrip("- ")  # e.g. "You marked batch as dynamic but ..."
    for e in chain:
        op = re.search(r"target=(torch\.ops\.[\w.]+)", str(e))
        if op:
            return f"{text} (in {op.group(1)})"
    return text


#: the loggers of the exporters and the graph optimiser: dozens of INFO lines per export
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "onnx")
_CAPTURED_LINES = 2000  # a failure's log keeps the last this many lines


@contextlib.contextmanager
def _exporter_quiet(log_file: Path) -> Iterator[None]:
    """Capture what the exporters print, warn and log while the block runs; on an
    :class:`ExportError` write it to ``log_file`` and name that file in the error (one line
    on the command line, the exporter's whole account on disk). With ``mlic -v`` (debug
    logging) nothing is captured: the chatter is what the user asked to see."""
    if logging.getLogger("mlic").isEnabledFor(logging.DEBUG):
        yield
        return
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:  # kept from the root handler (the CLI's stderr) for the block
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                buffer.writelines(f"{w.category.__name__}: {w.message}\n" for w in caught)
    except ExportError as e:
        raise ExportError(f"{e}{_keep_log(buffer.getvalue(), log_file)}") from e
    finally:
        for lg, propagate in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate


def _keep_log(text: str, log_file: Path) -> str:
    """Write a failed export's captured messages to ``log_file``; the note naming it."""
    lines = _ANSI.sub("", text).splitlines()[-_CAPTURED_LINES:]
    if not lines:
        return ""
    try:
        log_file.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="replace")
    except OSError:
        return ""  # the error itself is what matters
    return f"; the exporter's messages are in {log_file}"


def _example_images(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible normalised-looking batch [batch, 3, S, S]."""
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, 3, image_size, image_size, generator=g)


@torch.inference_mode()
def _eager_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model(images)).float()  # [B, C]


def _compare(
    name: str, run: Any, model: nn.Module, image_size: int, batch_sizes: Sequence[int]
) -> float:
    """Max |run(x) - sigmoid(model(x))| over one batch per size; ``run`` returns a tensor or array."""
    worst = 0.0
    for batch in batch_sizes:
        x = _example_images(batch, image_size)
        expected = _eager_probabilities(model, x)  # [B, C]
        try:
            got = torch.as_tensor(run(x)).float()
        except Exception as e:  # noqa: BLE001 -- any runtime failure is reported the same way
            raise ExportError(
                f"{name}: the exported graph failed at batch size {batch}: {_describe(e)}"
            ) from e
        if got.shape != expected.shape:
            raise ExportError(
                f"{name}: the exported graph gave shape {tuple(got.shape)} at batch size "
                f"{batch}, eager gives {tuple(expected.shape)}"
            )
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def _model_name(model: nn.Module) -> str:
    return getattr(model, "mlic_name", type(model).__name__)


def _metadata(model: nn.Module, meta: dict[str, Any], image_size: int) -> dict[str, str]:
    """What a deployed graph needs to describe itself, each value a JSON string."""
    from mlic import __version__

    num_classes = len(meta.get("label_names", ())) or None
    resize = meta.get("resize")  # data.resize, scaled with the input when exported at another size
    if resize is not None:
        resize = max(image_size, round(resize * image_size / meta["input_size"][-1]))
    out: dict[str, Any] = {
        "mlic_version": __version__,
        "mlic_model": meta.get("model", _model_name(model)),
        "label_names": meta.get("label_names"),
        "num_classes": meta.get("num_classes", num_classes),
        "input_size": [3, image_size, image_size],
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "resize": resize,  # warp side before the centre crop
        "input": f"{INPUT_NAME}: float32 [B, 3, {image_size}, {image_size}], normalised with mean/std",
        "output": f"{OUTPUT_NAME}: float32 [B, C], sigmoid of the logits",
    }
    if meta.get("thresholds") is not None:  # with how they were chosen (mlic.thresholds)
        out.update({k: meta[k] for k in META_KEYS if k in meta})
    return {k: json.dumps(v) for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- ONNX


def onnx_session(
    path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None
) -> onnxruntime.InferenceSession:
    """An onnxruntime session for ``path`` (CPU provider unless ``providers`` says otherwise).

    ``threads`` sets the intra-op thread count (``None``: onnxruntime's default, all cores);
    benchmarks pass it to compare like with like against PyTorch's thread count.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(
        str(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )


def verify_onnx(
    onnx_path: str | Path,
    model: nn.Module,
    image_size: int,
    batch_sizes: Sequence[int] = (1, 3),
    session: onnxruntime.InferenceSession | None = None,
) -> float:
    """Max absolute difference between the ONNX graph's probabilities and ``sigmoid(model(x))``.

    ``model`` is the eager mlic model (it returns logits; put it in eval mode). One random
    batch per size in ``batch_sizes`` is run through onnxruntime (CPU) and through PyTorch.
    Raises :class:`ExportError` if the graph fails or gives the wrong shape at some size.
    """
    session = session or onnx_session(onnx_path)
    graph_input = session.get_inputs()[0]
    fixed = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None
    if fixed is not None and any(b != fixed for b in batch_sizes):
        raise ExportError(
            f"{_model_name(model)}: {onnx_path}: the graph's batch axis is fixed at {fixed}, "
            f"cannot run batch sizes {list(batch_sizes)}"
        )
    input_name = graph_input.name

    def run(x: torch.Tensor) -> Any:
        return session.run(None, {input_name: x.numpy()})[0]

    return _compare(_model_name(model), run, model, image_size, batch_sizes)


def _capture(wrapped: ProbabilityModel, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) with a dynamic batch axis: the graph ONNX and
    ``.pt2`` exports are made from. A model that fixes its batch size fails here, clearly."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(
        wrapped, (example,), dynamic_shapes={INPUT_NAME: {0: batch}}, strict=False
    )


def _export_onnx(
    wrapped: ProbabilityModel,
    example: torch.Tensor,
    output: Path,
    opset: int | None,
    metadata: dict[str, str],
) -> list[str]:
    """ONNX from the captured program through the ``torch.export``-based exporter.

    The program is captured here rather than by ``torch.onnx.export`` so that a model whose
    batch size cannot stay dynamic fails with ``torch.export``'s message instead of the
    exporter falling back to other capture strategies that may fix the batch size.
    """
    program = torch.onnx.export(
        _capture(wrapped, example),
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={INPUT_NAME: {0: "batch"}},  # names the program's batch symbol "batch"
        opset_version=opset,
        optimize=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns an ONNXProgram
    program.model.metadata_props.update(metadata)
    # One self-contained file (the exporter would switch to external data above 2 GB).
    program.save(output, external_data=False)
    return [f"torch.onnx.export(dynamo=True), opset {program.model.opset_imports.get('', '?')}"]


# ----------------------------------------------------------------------------- TorchScript


def _export_torchscript(
    wrapped: ProbabilityModel, example: torch.Tensor, output: Path, metadata: dict[str, str]
) -> list[str]:
    """``torch.jit.trace``: shapes read in Python (``int(x.shape[0])``) may become constants."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation and tracer warnings
        traced = torch.jit.trace(wrapped, (example,), check_trace=False)
        torch.jit.save(traced, str(output), _extra_files={"mlic.json": json.dumps(metadata)})
    return ["torch.jit.trace (TorchScript is deprecated upstream; prefer onnx or exported-program)"]


def _load_torchscript(path: Path) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


# ----------------------------------------------------------------------------- torch.export


def _export_program(
    wrapped: ProbabilityModel, example: torch.Tensor, output: Path, metadata: dict[str, str]
) -> list[str]:
    """``torch.export.export`` with a dynamic batch ``Dim``, saved as a ``.pt2`` archive."""
    program = _capture(wrapped, example)
    torch.export.save(program, output, extra_files={"mlic.json": json.dumps(metadata)})
    return ["torch.export.export + torch.export.save; load only trusted .pt2 files (pickle)"]


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata an mlic export carries (label names, mean/std, thresholds...).

    ONNX: the model's ``metadata_props``. TorchScript / ``.pt2``: the ``extra/mlic.json``
    entry, read straight from the zip archive, so nothing in the file is unpickled or run.
    """
    from mlic.files import require_regular_file

    path = Path(path)
    require_regular_file(path, "exported model", error=ExportError)  # never a FIFO
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            entries = [n for n in archive.namelist() if n.endswith("/extra/mlic.json")]
            if not entries:
                raise ExportError(f"{path}: no mlic metadata (extra/mlic.json) in the archive")
            raw = json.loads(archive.read(entries[0]))
    else:
        raw = dict(onnx_session(path, threads=1).get_modelmeta().custom_metadata_map)
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value  # written by another tool: keep the string
    return decoded


# ----------------------------------------------------------------------------- entry points


def _verify(
    format: str, path: Path, model: nn.Module, image_size: int, batch_sizes: Sequence[int]
) -> float:
    """Max probability difference between the file at ``path`` and eager ``model``."""
    if format == "onnx":
        return verify_onnx(path, model, image_size, batch_sizes)
    if format == "exported-program":
        loaded = torch.export.load(path).module()  # our own file, written just now
        return _compare(_model_name(model), loaded, model, image_size, batch_sizes)
    try:
        return _compare(_model_name(model), _load_torchscript(path), model, image_size, batch_sizes)
    except ExportError as e:
        raise ExportError(
            f"{e} -- most likely torch.jit.trace recorded the example batch size "
            f"({EXAMPLE_BATCH}) as a constant (the model reads the batch size as a Python int); "
            "the exported-program format keeps the batch dynamic or names the line that fixes it"
        ) from e


def export_model(
    model: nn.Module,
    output: str | Path,
    format: str = "onnx",
    image_size: int = DEFAULT_IMAGE_SIZE,
    meta: dict[str, Any] | None = None,
    opset: int | None = None,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = ATOL,
) -> ExportResult:
    """Export an eager mlic ``model`` (logits) as a graph giving probabilities; see the module doc.

    ``meta`` is the checkpoint metadata (label names, mean/std, thresholds) written into the
    exported file. ``model`` is put in eval mode and fp32 in place (the graph is fp32).
    Raises :class:`ExportError` when export fails, the graph fails at some batch size, or
    its probabilities differ from eager PyTorch by more than ``atol`` (the refused file is
    deleted).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    name = _model_name(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    wrapped = ProbabilityModel(model).eval()
    example = _example_images(EXAMPLE_BATCH, image_size)
    metadata = _metadata(model, meta or {}, image_size)

    result = ExportResult(path=output, format=format, notes=[])
    diffs: list[float] = []

    def write(tmp: Path) -> None:
        """Export to ``tmp`` and verify it there: only a verified file is renamed into place."""
        if format == "onnx":  # torch.onnx needs both; name the extra, not a traceback
            require_extra("ONNX export", "onnx", "onnxscript")
        try:
            if format == "onnx":
                result.notes += _export_onnx(wrapped, example, tmp, opset, metadata)
            elif format == "torchscript":
                result.notes += _export_torchscript(wrapped, example, tmp, metadata)
            else:
                result.notes += _export_program(wrapped, example, tmp, metadata)
        except Exception as e:  # noqa: BLE001 -- exporters raise many types; the user needs one
            raise ExportError(f"{name}: {format} export failed: {_describe(e)}") from e
        if not verify:
            return
        try:
            diff = _verify(format, tmp, model, image_size, batch_sizes)
            if not diff < atol:  # also catches NaN
                raise ExportError(
                    f"{name}: {format} export disagrees with eager PyTorch: max |probability "
                    f"difference| {diff:.3g} >= {atol:g} at batch sizes {list(batch_sizes)}"
                )
        except ExportError as e:
            # a refused export must not be picked up by mistake; verify=False keeps it for debugging
            raise ExportError(
                f"{e} (the refused export was removed, {output} not written; export with "
                "verify=False to keep it)"
            ) from e
        diffs.append(diff)

    with _exporter_quiet(output.with_name(output.name + ".log")):
        atomic_write(output, write)  # temporary file + rename: never a half-written export
    if not verify:
        result.notes.append("not verified")
        return result
    diff = diffs[0]
    result.max_abs_diff = diff
    result.verified = True
    result.notes.append(f"verified at batch sizes {list(batch_sizes)}: max abs diff {diff:.3g}")
    return result


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path | None = None,
    format: str = "onnx",
    image_size: int | None = None,
    opset: int | None = None,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = ATOL,
) -> ExportResult:
    """Export an mlic ``.safetensors`` checkpoint; the graph maps ``images`` to ``probabilities``.

    Args:
        checkpoint: a file written by :func:`mlic.save_checkpoint`.
        output: where to write; default: the checkpoint's path with ``.onnx``/``.ts``/``.pt2``.
        format: ``"onnx"``, ``"torchscript"`` or ``"exported-program"``.
        image_size: S of the [B, 3, S, S] input; default: the checkpoint's input size.
        opset: ONNX opset (``None``: the exporter's default, 20 with torch 2.14). Below 18
            the exporter converts from 18 and may keep 18; the result's notes say which.
        verify: run the exported graph at each of ``batch_sizes`` and compare with eager.
        atol: the largest probability difference accepted.

    Raises:
        ExportError: the model cannot be exported (the exporter's first error line is in
            the message), or the export disagrees with eager PyTorch.
    """
    from mlic.engine.checkpoint import load_checkpoint

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if output is None:
        output = Path(checkpoint).with_suffix(SUFFIXES[format])
    # never over the checkpoint itself or a file its training run owns (before any work)
    refuse_run_file(output, "--output", inputs=(checkpoint,))
    if Path(output).is_dir():
        raise ExportError(f"--output {output}: is a folder; give the file to write")
    model, meta = load_checkpoint(checkpoint)
    size = int(
        image_size or meta.get("input_size", (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))[-1]
    )
    return export_model(model, output, format, size, meta, opset, verify, batch_sizes, atol)


# ----------------------------------------------------------------------------- int8
def quantize_onnx_int8(
    onnx_path: str | Path,
    output: str | Path,
    calibration: torch.Tensor,
    per_channel: bool = True,
) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) of an exported mlic ONNX graph.

    ``calibration`` is a normalised batch [N, 3, S, S] of real validation images (a few
    dozen suffice): activation ranges are calibrated on it with min-max statistics. The
    metadata of the float graph is carried over. Returns the int8 model's path.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    onnx_path, output = Path(onnx_path), Path(output)
    batches = [calibration[i : i + 1].numpy().astype(np.float32) for i in range(len(calibration))]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            nxt = next(self._it, None)
            return None if nxt is None else {INPUT_NAME: nxt}

    prepared = output.with_suffix(".prep.onnx")
    staged = output.with_suffix(".staged.onnx")  # renamed into place only once complete
    try:
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(staged),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        src = onnx.load(str(onnx_path), load_external_data=False)
        q = onnx.load(str(staged))
    except Exception as e:  # the quantizer's errors are deep and long: name the model and cause
        raise ExportError(f"{onnx_path}: int8 quantization failed: {_describe(e)}") from e
    finally:
        prepared.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    del q.metadata_props[:]
    for prop in src.metadata_props:
        q.metadata_props.add(key=prop.key, value=prop.value)
    q.metadata_props.add(key="quantization", value='"int8 static QDQ, per-channel weights"')
    atomic_write(output, lambda tmp: onnx.save(q, str(tmp)))
    return output
