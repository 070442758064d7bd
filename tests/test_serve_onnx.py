"""The ONNX Runtime backend of ``mlic serve``: the same answers as ``mlic predict
--backend onnxruntime``, through the serving code (validation + batched worker predict),
in-process (the HTTP layer is the one tested in test_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlic.cli import main
from serve_fixtures import NAMES, make_checkpoint, photo_jpeg, require_serve_extra

require_serve_extra()
pytest.importorskip("onnxruntime")


def test_onnx_backend_batches_equal_mlic_predict(tmp_path: Path) -> None:
    from mlic.serve.app import MlicAPI, ServeConfig, resolve_model
    from mlic.serve.validation import ImagePreparer, Limits, Options, PreparedRequest

    ckpt = make_checkpoint(tmp_path / "model.safetensors")
    assert main(["export", str(ckpt), "--format", "onnx"]) == 0
    onnx = ckpt.with_suffix(".onnx")
    files = []
    for name in ("chelsea", "astronaut", "coffee"):
        files.append(tmp_path / f"{name}.jpg")
        files[-1].write_bytes(photo_jpeg(name))
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "predict",
                str(onnx),
                *map(str, files),
                "--backend",
                "onnxruntime",
                "--output",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    expected = [json.loads(x) for x in out.read_text().splitlines()]

    config = ServeConfig(target=str(onnx), backend="onnxruntime", max_batch_size=4)
    path, meta = resolve_model(config)
    config.model_path = str(path)
    assert meta["label_names"] == NAMES
    import multiprocessing as mp

    api = MlicAPI(config, mp.Array("q", 12), mp.Array("q", 12))
    api.setup("cpu")
    prep = ImagePreparer(64, Limits())
    # two requests in one dynamic batch: [image 0, image 1] and [image 2]
    reqs = [
        PreparedRequest(
            [prep.prepare(p.name, p.read_bytes(), False) for p in files[:2]], Options(scores=True)
        ),
        PreparedRequest(
            [prep.prepare(files[2].name, files[2].read_bytes(), False)], Options(scores=True)
        ),
    ]
    answers = api.unbatch(api.predict(api.batch(reqs)))
    results = answers[0]["results"] + answers[1]["results"]
    assert [a["batch_size"] for a in answers] == [2, 2]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(
            [got["scores"][n] for n in NAMES], [want["scores"][n] for n in NAMES], atol=1e-6, rtol=0
        )
        assert [x["label"] for x in got["labels"]] == want["labels"]
    assert api.batch_requests[1] == 1  # one batch of 2 requests counted (bucket "<= 2")
    # an .onnx model is refused with the torch backend, by name
    from mlic.errors import ConfigError

    with pytest.raises(ConfigError, match="model.onnx"):
        resolve_model(ServeConfig(target=str(onnx), backend="torch"))
