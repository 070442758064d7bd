"""Exception types with messages that name the culprit (file, line, key or value)."""

from __future__ import annotations


class MlicError(Exception):
    """Base class of every error mlic raises on purpose; the message is one line for the user."""


class ConfigError(MlicError):
    """A config key or value is unknown or invalid."""


class DataError(MlicError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(MlicError):
    """A checkpoint or resume file is missing, untrusted, or does not match its model."""


class WriteError(MlicError):
    """A file mlic writes could not be written (disk full, permission); the previous one is kept."""


class RunBusyError(MlicError):
    """A run folder is being written by another mlic process (its lock is held)."""


#: the top-level modules each optional extra of pyproject.toml installs
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("litserve", "multipart", "python_multipart", "prometheus_client"),
    "hf": ("datasets",),
}


def missing_extra(module: str | None, what: str) -> ConfigError | None:
    """The error for ``what`` needing the extra that installs ``module``; None when ``module``
    belongs to no extra (then the import failure is a bug, not a missing install)."""
    top = (module or "").split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return ConfigError(
                f"{what} needs the {extra} extra ({top} is not installed): "
                f"pip install 'mlic[{extra}]' (from a checkout: pip install -e \".[{extra}]\")"
            )
    return None


def require_extra(what: str, *modules: str) -> None:
    """Import ``modules`` now, so a missing extra is named before any work starts."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise (missing_extra(module, what) or e) from None
