"""Checks of the paths a command reads and writes, made before its long work.

A missing input or an unwritable output then answers at once, in one line naming the flag, instead of as
a ``PermissionError`` traceback after minutes of extraction or prediction. An output is probed with a
temporary file in its directory, or in the nearest existing parent of a directory still to be created
(permission bits alone do not tell: root ignores them, while a read-only mount or a path under a regular
file fails for everyone). Imports no torch, so the command line runs these checks before it loads a model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hookmix.core.errors import UsageError
from hookmix.headonly.store import check_location, is_remote, local_path

__all__ = ["cache_location", "existing_dir", "existing_file", "writable_dir", "writable_file"]


_SAID = {"file": "it is a file", "directory": "it is a directory", "missing": "it does not exist"}


def _kind(path: Path) -> str:
    """What is at ``path``: ``"directory"``, ``"file"``, ``"missing"``, or why that cannot be told (a parent
    that may not be searched: ``"Permission denied"``)."""
    try:
        return "directory" if path.is_dir() else "file" if path.exists() else "missing"
    except OSError as exc:
        return exc.strerror or str(exc)


def existing_dir(flag: str, path: Path, fix: str) -> Path:
    """``path`` when it is a directory; else a ``UsageError`` naming ``flag``, what is there, and ``fix``."""
    kind = _kind(path)
    if kind != "directory":
        raise UsageError(f"{flag} {path} is not a directory ({_SAID.get(kind, kind)}); {fix}.")
    return path


def existing_file(flag: str, path: Path, fix: str) -> Path:
    """``path`` when it is a file; else a ``UsageError`` naming ``flag``, what is there, and ``fix``."""
    kind = _kind(path)
    if kind != "file":
        raise UsageError(f"{flag} {path} is not a file ({_SAID.get(kind, kind)}); {fix}.")
    return path


def _cannot_write(directory: Path) -> str:
    """Why nothing could be written in ``directory``, ``""`` when it could: a file in the way, or a failed
    probe (a temporary file, deleted at once) in ``directory`` or, where it is missing, in its nearest
    existing parent, in which the command creates it. Nothing is created."""
    for place in (directory, *directory.parents):
        kind = _kind(place)
        if kind == "file":
            return f"{place} is a file, not a directory"
        if kind == "directory":
            try:
                with tempfile.TemporaryFile(dir=place, prefix=".hookmix-probe-"):
                    return ""
            except OSError as exc:
                return exc.strerror or str(exc)
        if kind != "missing":
            return kind
    return f"no part of {directory} exists"


def writable_dir(flag: str, path: Path) -> Path:
    """``path`` when the command can create it (parents included) or write in it; else a ``UsageError``
    naming ``flag``, the path and why. Creates nothing, so a command refused later leaves nothing behind."""
    if _kind(path) == "file":
        raise UsageError(f"{flag} {path} is a file; give a directory (it is created when missing).")
    reason = _cannot_write(path)
    if reason:
        raise UsageError(f"{flag} {path} cannot be written ({reason}); give a directory you can write to.")
    return path


def writable_file(flag: str, path: Path, example: str) -> Path:
    """``path`` when the command can write it (its directory created when missing); else a ``UsageError``
    naming ``flag``, the path and why. ``example`` is a file name for the message. Creates nothing."""
    if _kind(path) == "directory":
        raise UsageError(f"{flag} {path} is a directory; give a file name, e.g. {example}.")
    reason = _cannot_write(path.parent)
    if reason:
        raise UsageError(f"{flag} {path} cannot be written ({reason}); give a file in a directory you can write to.")
    return path


def cache_location(flag: str, given: str | None) -> str | Path | None:
    """Where ``--cache`` keeps features: a URL (``s3://bucket/prefix``, any fsspec store) whose storage library is
    installed, or a directory the command can write (:func:`writable_dir`); ``None`` when not given. The store
    itself answers later, at its first request (credentials, endpoint), in one line naming the object."""
    if not given:
        return None
    if is_remote(given):
        check_location(flag, given)
        return given
    return writable_dir(flag, local_path(given))
