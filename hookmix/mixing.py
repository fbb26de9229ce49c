"""Pure tensor functions that apply a plan's λ and partners to activations.

These run inside the forward hook on every training step, so each is a couple of tensor ops: no Python
loop over the batch, no host synchronisation, and one new tensor (the mixed output) per mixed leaf.
"""

from __future__ import annotations

from typing import Any

import torch

from hookmix._tree import map_tensors


def mix_tensor(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` along ``batch_dim``.

    Args:
        x: activation with the batch on ``batch_dim``, e.g. (B, C, H, W), (B, N, D) or (N, B, D).
        lam: (B,) weight of each row's own sample (moved to ``x``'s device and dtype; a no-op when
            the plan already lives there).
        perm: (B,) partner index of each row.

    The partner rows are gathered into a new tensor that is then interpolated in place towards ``x``:
    the gather is the only allocation. ``torch.lerp`` returns ``end`` exactly where the weight is 1, so
    unmixed rows are bitwise unchanged. The result keeps ``x``'s dtype (autocast included); λ is cast
    to it.
    """
    shape = [1] * x.dim()
    shape[batch_dim] = -1
    weight = lam.to(device=x.device, dtype=x.dtype).view(shape)
    partner = x[(slice(None),) * batch_dim + (perm.to(x.device),)]  # advanced indexing keeps channels_last
    return partner.lerp_(x, weight)


def mixable(x: Any, batch_size: int, batch_dim: int) -> bool:
    """Whether ``x`` is a floating tensor whose ``batch_dim`` has ``batch_size`` rows."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() > batch_dim
        and x.shape[batch_dim] == batch_size
    )


def mix_structure(output: Any, lam: torch.Tensor, perm: torch.Tensor, batch_dim: int = 0) -> tuple[Any, int]:
    """Mix every floating tensor leaf of ``output`` that has the batch on ``batch_dim``.

    ``output`` is a tensor or a tuple / list / dict / dataclass of them. Returns the rebuilt output and
    how many leaves were mixed; leaves without the batch dimension (masks, integer indices, shapes)
    pass through untouched.
    """
    batch_size = lam.shape[0]
    count = 0

    def fn(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if not mixable(t, batch_size, batch_dim):
            return t
        count += 1
        return mix_tensor(t, lam, perm, batch_dim)

    return map_tensors(output, fn), count
