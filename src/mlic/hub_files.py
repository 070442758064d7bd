"""``hf-hub:ORG/NAME`` references: parsed, validated and resolved to local files.

:func:`resolve_checkpoint` is the one resolver: ``hf-hub:ORG/NAME`` (optionally ``@REVISION``)
becomes a local file through ``huggingface_hub.hf_hub_download`` (the local cache when
``HF_HUB_OFFLINE=1``). :func:`mlic.load_checkpoint`, ``Predictor.from_checkpoint`` and
:func:`mlic.evaluate.resolve_target` all go through it. What was downloaded is someone else's
file: only safetensors and JSON/YAML are read, and a downloaded config's data locations are
refused (:func:`check_downloaded_config`). Pushing a run is :mod:`mlic.hub`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mlic.errors import CheckpointError

__all__ = [
    "HUB_PREFIX",
    "is_hub_id",
    "parse_hub_id",
    "validate_repo_id",
    "check_downloaded_config",
    "in_hub_cache",
    "resolve_checkpoint",
    "resolve_hub_file",
    "shown",
]

HUB_PREFIX = "hf-hub:"


def is_hub_id(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(HUB_PREFIX)


#: The Hub's own rule for a repository id (huggingface_hub ``validate_repo_id``), with the
#: namespace required: ``namespace/name``, each part [A-Za-z0-9._-] not starting or ending
#: with ``.`` or ``-``, no ``--`` or ``..``, at most 96 characters.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,256}")


def shown(text: str) -> str:
    """``text`` for an error line: newlines and other control characters escaped."""
    return repr(text)[1:-1] if not text.isprintable() else text


def validate_repo_id(repo_id: str, what: str = "repository id") -> str:
    """``repo_id`` if it is a Hub id ``namespace/name``; else CheckpointError naming it."""
    parts = repo_id.split("/")
    ok = (
        len(parts) == 2
        and len(repo_id) <= 96
        and all(_REPO_PART.fullmatch(p) for p in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
    )
    if not ok:
        raise CheckpointError(
            f"{shown(repo_id)}: not a Hugging Face {what}; expected NAMESPACE/NAME, each part "
            "letters, digits, '.', '_' or '-' (no '..' or '--', at most 96 characters)"
        )
    return repo_id


def parse_hub_id(target: str) -> tuple[str, str | None]:
    """``"hf-hub:org/name@rev"`` -> ``("org/name", "rev")``; a malformed id is an error."""
    body = target[len(HUB_PREFIX) :]
    repo, at, rev = body.partition("@")
    if not repo or "/" not in repo:
        raise CheckpointError(f"{shown(target)}: expected hf-hub:ORG/NAME (optionally @REVISION)")
    validate_repo_id(repo)
    if at and (not _REVISION.fullmatch(rev) or ".." in rev.split("/")):
        raise CheckpointError(
            f"{shown(target)}: bad revision {shown(rev)} (a branch, tag or commit: letters, "
            "digits, '.', '_', '-', '/')"
        )
    return repo, rev or None


def in_hub_cache(path: str | Path) -> bool:
    """Whether ``path`` is a file of a Hugging Face cache (``models--ORG--NAME/snapshots/...``
    or ``.../blobs/...``): a downloaded file, however the user named it."""
    for p in (Path(os.path.abspath(path)), Path(path).resolve()):
        parts = p.parts
        for i in range(len(parts) - 1):
            if parts[i].startswith("models--") and parts[i + 1] in ("snapshots", "blobs"):
                return True
    return False


#: ``data.*`` keys that name places: read from a downloaded config they are never used.
DATA_LOCATION_KEYS = ("root", "train", "val", "train_images", "val_images", "classes", "index")


def check_downloaded_config(data: Any, target: str, overrides: list[str] | None) -> None:
    """Refuse the ``data.*`` locations of a downloaded ``config.yaml``, loaded as ``data``.

    A repository's config is someone else's file: its ``data.val`` may be ``pipe:CMD``, an
    ``s3://`` URL pasted into a shell command, ``/etc/...`` or ``../..``. Every location key
    the user did not set on the command line must be a plain relative path
    (:func:`mlic.files.location_problem`), checked after the merge so that YAML tricks
    (anchors, ``${oc.env:...}`` interpolation) are seen as they would be used; otherwise
    one line names the keys and the repo.
    """
    from mlic.files import location_problem

    given = {o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o}
    bad = []
    for key in DATA_LOCATION_KEYS:
        value = getattr(data, key, None)
        if value is None or f"data.{key}" in given:
            continue
        why = location_problem(str(value))
        if why is not None:
            bad.append((key, why))
    if bad:
        listed = ", ".join(f"data.{k} {why}" for k, why in bad)
        typed = " ".join(f"data.{k}=..." for k, _ in bad)
        raise CheckpointError(
            f"{target}: config.yaml of this downloaded repository sets data locations that are "
            f"never used from a downloaded file ({listed}); give your own on the command "
            f"line: {typed}"
        )


def resolve_hub_file(target: str, filename: str, required: bool = True) -> Path | None:
    """Local path of ``filename`` in the Hub repository ``target`` (cache or download)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, rev = parse_hub_id(target)
    try:
        return Path(hf_hub_download(repo, filename, revision=rev, library_name="mlic"))
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError in recent versions)
        if not required:
            return None
        raise CheckpointError(
            f"{target}: {filename} is not in the local Hugging Face cache and the Hub cannot be "
            "reached (offline?)"
        ) from e
    except EntryNotFoundError as e:
        if not required:
            return None
        raise CheckpointError(f"{target}: the repository has no {filename}") from e
    except Exception as e:  # RepositoryNotFound, HTTP errors, ...: one line naming the repo
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{target}: cannot fetch {filename} ({first})") from e


def resolve_checkpoint(target: str | Path) -> Path:
    """A local checkpoint path for ``target``: a path as given, a run folder's
    ``best.safetensors``, or the ``model.safetensors`` of an ``hf-hub:ORG/NAME`` repository."""
    if is_hub_id(target):
        return resolve_hub_file(str(target), "model.safetensors")  # type: ignore[return-value]
    path = Path(target)
    if path.is_dir():  # a run folder, as every command takes it
        if not (path / "best.safetensors").is_file():
            raise CheckpointError(f"{path}: run folder has no best.safetensors")
        return path / "best.safetensors"
    return path
