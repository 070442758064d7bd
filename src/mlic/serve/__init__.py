"""``mlic serve``: the API on LitServe (dynamic batching, worker processes), the page, validation.

Needs the ``serve`` extra (``pip install -e ".[serve]"``). Import :mod:`mlic.serve.app`
for the server itself; this package import stays light.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "serve"]


def __getattr__(name: str):  # lazy: LitServe and FastAPI load only when serving
    if name in __all__:
        from mlic.serve import app

        return getattr(app, name)
    raise AttributeError(name)
