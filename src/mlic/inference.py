"""Predictor: a checkpoint -> labels, probabilities and (optionally) attention maps.

The model is rebuilt from the checkpoint's metadata alone (no config file), images are
pre-processed exactly as at evaluation time (resize to the checkpoint's input size,
normalise with its mean/std), and labels are chosen with the per-class thresholds stored
in the checkpoint by ``mlic eval --tune-thresholds`` unless a threshold is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlic.data.transforms import build_transform, load_image, to_rgb
from mlic.engine.checkpoint import load_checkpoint, validate_metadata
from mlic.errors import DataError

__all__ = ["Prediction", "Predictor", "OnnxPredictor", "ImageInput"]

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclass
class Prediction:
    """One image's result.

    Attributes:
        labels: names of the predicted labels, most probable first.
        scores: every label's probability, by name.
        probabilities: the same as an array [C] in the checkpoint's label order.
        attention: label-wise maps [C, h, w] when asked for (None otherwise).
        source: the file path, or ``"<array 3>"`` style for in-memory inputs.
        thresholds: the threshold each label's probability was compared with, by name.
    """

    labels: list[str]
    scores: dict[str, float]
    probabilities: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)
    attention: np.ndarray | None = None
    source: str = ""
    image: Image.Image | None = field(default=None, repr=False)


class Predictor:
    """Predict labels for images with a trained mlic model."""

    def __init__(
        self,
        model: torch.nn.Module,
        metadata: dict[str, Any],
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        """``precision``: ``fp32`` (default: the exported graph's numbers), ``bf16`` or ``auto``
        (bf16 autocast on a GPU or on a CPU with bf16 units, see :mod:`mlic.engine.precision`);
        the choice and its reason are ``self.precision``."""
        from mlic.engine.precision import resolve_precision

        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        validate_metadata(metadata, "checkpoint")  # bounds on every value used below
        self.meta = metadata
        self.names: list[str] = list(metadata["label_names"])
        self.image_size = int(metadata["input_size"][-1])
        self.transform = build_transform(
            self.image_size, metadata["mean"], metadata["std"], False, resize=metadata.get("resize")
        )
        stored = metadata.get("thresholds")
        self.thresholds = np.asarray(stored, dtype=np.float32) if stored is not None else None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> Predictor:
        model, meta = load_checkpoint(path)
        return cls(model, meta, device=device, precision=precision)

    # ------------------------------------------------------------------ input handling
    def _to_pil(self, item: ImageInput) -> tuple[Image.Image, str]:
        if isinstance(item, (str, Path)):
            return load_image(item, draft_size=self.image_size), str(item)
        if isinstance(item, Image.Image):
            return to_rgb(item), "<PIL image>"
        if isinstance(item, np.ndarray):
            arr = item
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
                raise DataError(
                    f"numpy image must be [H, W, 3] (or [H, W]), got shape {item.shape}"
                )
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
            return to_rgb(Image.fromarray(arr)), "<array>"
        raise DataError(f"unsupported input type {type(item).__name__}")

    def _tensor_batch(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (or [3, H, W]) uint8 or float in [0, 1] -> resized, normalised [B, 3, S, S]."""
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"tensor input must be [B, 3, H, W], got {tuple(images.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(
                x, size=(self.image_size,) * 2, mode="bilinear", antialias=True
            )
        mean = torch.tensor(self.meta["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.meta["std"]).view(1, 3, 1, 1)
        return (x - mean) / std

    # ------------------------------------------------------------------ prediction
    def _thresholds(self, threshold: float | None) -> np.ndarray:
        if threshold is not None:
            return np.full(len(self.names), float(threshold), dtype=np.float32)
        if self.thresholds is not None:
            return self.thresholds
        return np.full(len(self.names), 0.5, dtype=np.float32)

    @torch.inference_mode()
    def predict_tensor(
        self, batch: torch.Tensor, return_attention: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised batch [B, 3, S, S] -> (probabilities [B, C], maps [B, C, h, w] or None).

        Maps are the model's label-wise attention (or CAM), else Grad-CAM (:mod:`mlic.explain`).
        """
        from mlic.engine.precision import autocast

        batch = batch.to(self.device)
        with autocast(self.device, self.precision):
            if return_attention:
                from mlic.explain import label_maps

                logits, maps = label_maps(self.model, batch)  # [B, C], [B, C, h, w]
                return torch.sigmoid(logits.float()).cpu().numpy(), maps.float().cpu().numpy()
            return torch.sigmoid(self.model(batch).float()).cpu().numpy(), None

    def _results(
        self,
        probs: np.ndarray,
        maps: np.ndarray | None,
        sources: Sequence[str],
        threshold: float | None,
        top_k: int | None,
        images: Sequence[Image.Image | None],
    ) -> list[Prediction]:
        thr = self._thresholds(threshold)
        out = []
        for i, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")
            chosen = [j for j in order if p[j] >= thr[j]]
            if top_k is not None:
                chosen = chosen[:top_k]
            out.append(
                Prediction(
                    labels=[self.names[j] for j in chosen],
                    scores={n: float(v) for n, v in zip(self.names, p, strict=True)},
                    probabilities=p,
                    thresholds={n: float(t) for n, t in zip(self.names, thr, strict=True)},
                    attention=None if maps is None else maps[i],
                    source=sources[i],
                    image=images[i],
                )
            )
        return out

    def predict(
        self,
        inputs: ImageInput | Iterable[ImageInput],
        threshold: float | None = None,
        top_k: int | None = None,
        return_attention: bool = False,
        batch_size: int = 16,
        keep_images: bool = False,
    ) -> list[Prediction]:
        """Predict one input or many: paths, PIL images, numpy [H, W, 3] arrays, or a tensor batch.

        A tensor is a batch [B, 3, H, W] (uint8, or float in [0, 1]); any other single item is
        wrapped in a list. Returns one :class:`Prediction` per image, in input order.
        """
        if isinstance(inputs, torch.Tensor):
            probs, maps = self.predict_tensor(self._tensor_batch(inputs), return_attention)
            n = len(probs)
            return self._results(
                probs, maps, [f"<tensor {i}>" for i in range(n)], threshold, top_k, [None] * n
            )
        if isinstance(inputs, (str, Path, Image.Image, np.ndarray)):
            inputs = [inputs]
        items = list(inputs)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            pils, sources = zip(
                *(self._to_pil(it) for it in items[start : start + batch_size]), strict=True
            )
            batch = torch.stack([self.transform(im) for im in pils])  # [b, 3, S, S]
            probs, maps = self.predict_tensor(batch, return_attention)
            kept = list(pils) if keep_images else [None] * len(pils)
            results += self._results(probs, maps, sources, threshold, top_k, kept)
        return results


class OnnxPredictor(Predictor):
    """A :class:`Predictor` that runs an exported ONNX graph with ONNX Runtime.

    Same pre-processing, thresholds and outputs as the PyTorch predictor (no attention maps:
    the exported graph returns probabilities only). Built from an ``.onnx`` file written by
    ``mlic export``, or from a checkpoint, which is then exported once (verified against
    eager PyTorch) into the cache folder and reused while the checkpoint is unchanged.
    """

    def __init__(self, session: Any, metadata: dict[str, Any]) -> None:
        from mlic.engine.precision import ONNX_RUNTIME

        self.session = session
        self.device = torch.device("cpu")
        self.precision = ONNX_RUNTIME
        self.model = None  # type: ignore[assignment]
        check = {"model": metadata.get("mlic_model"), "model_kwargs": {}, **metadata}
        validate_metadata(check, "exported model")  # bounds on every value used below
        self.meta = metadata
        self.names = list(metadata["label_names"])
        self.image_size = int(metadata["input_size"][-1])
        self.transform = build_transform(
            self.image_size, metadata["mean"], metadata["std"], False, resize=metadata.get("resize")
        )
        stored = metadata.get("thresholds")
        self.thresholds = np.asarray(stored, dtype=np.float32) if stored is not None else None
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def from_checkpoint(cls, path: str | Path, threads: int | None = None) -> OnnxPredictor:  # type: ignore[override]
        import hashlib

        from mlic.export import export_checkpoint, onnx_session, read_export_metadata
        from mlic.models._pretrained import cache_dir

        path = Path(path)
        if path.suffix != ".onnx":
            stat = path.stat()
            key = hashlib.sha256(
                f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
            ).hexdigest()[:16]
            onnx_path = cache_dir() / "onnx" / f"{path.stem}-{key}.onnx"
            if not onnx_path.exists():
                onnx_path.parent.mkdir(parents=True, exist_ok=True)
                export_checkpoint(path, onnx_path, format="onnx")
            path = onnx_path
        return cls(onnx_session(path, threads=threads), read_export_metadata(path))

    def predict_tensor(
        self, batch: torch.Tensor, return_attention: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if return_attention:
            raise DataError(
                "the onnxruntime backend gives no attention maps; use --backend torch for heat maps"
            )
        probs = self.session.run(None, {self.input_name: batch.numpy().astype(np.float32)})[0]
        return np.asarray(probs, dtype=np.float32), None
