"""File and state I/O shared by the library: atomic writes (a reader sees the old file or the new one, never a
torn one) and loading a state dict with an error that names what does not fit."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hookmix.core.errors import UsageError

if TYPE_CHECKING:  # only annotations: the command line's path checks (hookmix.headonly.store) load no torch
    import torch
    from torch import nn

__all__ = ["atomic_write", "load_state"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync and ``os.replace``.

    The file gets the permissions a plain ``open(path, "w")`` would (0o666 less the umask), not the
    owner-only 0o600 of the temp file.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """``model.load_state_dict(state)``, with a one-line ``ValueError`` naming ``source``, the first
    mismatch (missing / unexpected key, or shape) and ``fix`` when the state does not fit the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # torch lists every mismatch on its own line, after a title line
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        first = (details[0] if details else str(exc)).rstrip(".")
        first = first if len(first) <= 300 else first[:300] + " ..."
        raise UsageError(f"{source} does not fit this {type(model).__name__}: {first}; {fix}.") from None
