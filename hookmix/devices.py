"""Where hookmix runs: ``"auto"`` picks CUDA, then Apple's MPS, then the CPU; named devices are checked.

Used by :meth:`~hookmix.FeatureCache.extract`, :func:`~hookmix.fit` and :func:`~hookmix.finetune.predict`,
and by ``hookmix finetune --device``. On a GPU the backbone runs under autocast (bfloat16 where the card
supports it, else float16): the cache stores half-precision features anyway.
"""

from __future__ import annotations

import re

import torch

from hookmix._errors import UsageError

__all__ = ["DEVICES", "autocast_dtype", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda", "mps")
_NAME = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for ``device``: ``"auto"`` / ``None`` — CUDA, else MPS, else the CPU — or a
    name such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, refused when this machine lacks it."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str) and _NAME.fullmatch(device):
        name = device
    else:
        raise UsageError(f"device={device!r} is not one of {DEVICES} (or 'cuda:N'); e.g. device='auto'.")
    resolved = torch.device(name)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name!r} but this machine has no CUDA device; use device='cpu' or 'auto'.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(
            f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}."
        )
    if resolved.type == "mps" and not _mps_available():
        raise UsageError(f"device={name!r} but MPS is not available here; use device='cpu' or 'auto'.")
    return resolved


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The half precision to run a frozen backbone in on ``device`` (``None`` on the CPU: full precision)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else None
