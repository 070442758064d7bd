"""``mlic serve``: the API on LitServe (dynamic batching, worker processes), the page, validation.

Needs the ``serve`` extra (``pip install -e ".[serve]"``). Import :mod:`mlic.serve.app`
for the server itself; this package import stays light (the command line reads
:data:`SERVE_RANGES` to build its parser without loading LitServe).
"""

from __future__ import annotations

__all__ = ["SERVE_RANGES", "ServeConfig", "serve"]

# Every numeric option of ``mlic serve``: option -> (type, lowest, highest). nan and inf are
# refused too (the parser and :meth:`ServeConfig.check` both read this table).
SERVE_RANGES: dict[str, tuple[type, float, float]] = {
    "--port": (int, 1024, 65535),  # LitServe listens on 1024-65535 only
    "--max-batch-size": (int, 1, 4096),
    "--max-wait-ms": (float, 0.0, 60_000.0),
    "--workers": (int, 1, 64),
    "--max-upload-mb": (float, 0.001, 1024.0),
    "--max-request-mb": (float, 0.001, 4096.0),
    "--max-images": (int, 1, 1024),
    "--max-pixels": (int, 1, 178_956_970),  # mlic.data.transforms.MAX_IMAGE_PIXELS
    "--max-queue": (int, 1, 100_000),
    "--timeout": (float, 0.1, 86_400.0),
    "--read-timeout": (float, 0.1, 3_600.0),
    "--drain-timeout": (float, 0.0, 3_600.0),
    "--threads": (int, 1, 1024),
}


def __getattr__(name: str):  # lazy: LitServe and FastAPI load only when serving
    if name in ("ServeConfig", "serve"):
        from mlic.serve import app

        return getattr(app, name)
    raise AttributeError(name)
