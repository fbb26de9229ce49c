"""Walk nested layer outputs (tensors inside tuples, lists, dicts and dataclasses).

Many modules return more than one tensor: timm ViT blocks may return tuples, HuggingFace models return
dataclasses, detection backbones return dicts. These helpers rebuild such a structure with every
tensor leaf passed through a function, keeping the container types.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

__all__ = ["first_tensor", "map_tensors", "tensor_leaves"]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Return ``obj`` rebuilt with ``fn`` applied to every tensor leaf (containers keep their type)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor leaf of a nested structure, in traversal order."""
    leaves: list[torch.Tensor] = []

    def collect(t: torch.Tensor) -> torch.Tensor:
        leaves.append(t)
        return t

    map_tensors(obj, collect)
    return leaves


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor leaf of a nested structure, or ``None`` when it holds no tensor."""
    leaves = tensor_leaves(obj)
    return leaves[0] if leaves else None
