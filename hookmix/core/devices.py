"""Where hookmix runs: ``"auto"`` picks CUDA, then Apple's MPS, then the CPU; named devices are checked.

Used by :meth:`~hookmix.FeatureCache.extract`, :func:`~hookmix.fit` and :func:`~hookmix.headonly.training.predict`,
and by ``hookmix finetune --device``. On a GPU the backbone runs under autocast (bfloat16 where the card
supports it, else float16): the cache stores half-precision features anyway.

This module is also the one answer to "which device is this module on" (:func:`module_device`) and to
"run this module there" (:func:`place_module`) for the mixer, the extraction, ``fit`` and the heads.
"""

from __future__ import annotations

import itertools
import re

import torch
from torch import nn

from hookmix.core.errors import UsageError

__all__ = ["DEVICES", "autocast_dtype", "module_device", "place_module", "resolve_device"]

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


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` is: the device of its first parameter, else of its first buffer, else the CPU."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def place_module(module: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where ``module`` runs: ``None`` — where it is (:func:`module_device`) — or ``device`` resolved
    (:func:`resolve_device`), to which it is moved in place."""
    if device is None:
        return module_device(module)
    target = resolve_device(device)
    module.to(target)
    return target
