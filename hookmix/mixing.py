"""Pure tensor functions that apply a plan's λ and partners to activations.

These run inside the forward hook on every training step, so each is a couple of tensor ops: no Python
loop over the batch, no host synchronisation, and one new tensor (the mixed output) per mixed leaf.
"""

from __future__ import annotations

from typing import Any

import torch

from hookmix._tree import map_tensors
from hookmix.plan import MixPlan


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


def _box_keep(x: torch.Tensor, lam: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-mask (B, 1, H, W) of the cutmix boxes on ``x`` (B, C, H, W) and the kept fraction (B,).

    Each row's box has side ``floor(side * sqrt(1 - lam))`` around its centre and is clipped at the
    borders; the kept fraction is 1 - the clipped box area / (H * W).
    """
    height, width = x.shape[-2:]
    ratio = (1.0 - lam.to(device=x.device, dtype=torch.float32)).clamp(min=0).sqrt()
    centers = centers.to(x.device)
    bounds = []
    for size, center in ((height, centers[:, 0]), (width, centers[:, 1])):
        cut = torch.floor(size * ratio)
        low = torch.floor(center * size) - torch.div(cut, 2, rounding_mode="floor")
        bounds.append((low.clamp(0, size), (low + cut).clamp(0, size)))
    (y1, y2), (x1, x2) = bounds
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_y = (rows >= y1[:, None]) & (rows < y2[:, None])
    in_x = (cols >= x1[:, None]) & (cols < x2[:, None])
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    kept = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return keep[:, None], kept


def _token_keep(
    x: torch.Tensor, lam: torch.Tensor, scores: torch.Tensor, prefix: int, batch_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-mask (B, N) for token cutmix on ``x`` (B, N, D) or (N, B, D) and the kept fraction (B,).

    The first ``prefix`` tokens (class / register tokens) are always kept; of the other F tokens each
    row swaps the ``round((1 - lam) * F)`` with the lowest scores.
    """
    tokens = x.shape[1 - batch_dim]
    free = tokens - prefix
    slots = scores.shape[1]
    if free < 1 or free > slots:
        raise ValueError(
            f"token cutmix needs 1..{slots} tokens after the {prefix} prefix token(s), got {free} "
            f"(activation shape {tuple(x.shape)}); set prefix_tokens= to the model's class/register tokens."
        )
    slot = torch.div(torch.arange(free, device=x.device) * slots, free, rounding_mode="floor")
    ranks = scores.to(x.device)[:, slot].argsort(dim=1).argsort(dim=1)
    swapped = torch.round((1.0 - lam.to(device=x.device, dtype=torch.float32)) * free)
    keep = ranks >= swapped[:, None]
    keep = torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)
    return keep, 1.0 - swapped / free


def cutmix_tensor(
    x: torch.Tensor,
    lam: torch.Tensor,
    perm: torch.Tensor,
    centers: torch.Tensor,
    token_scores: torch.Tensor,
    batch_dim: int = 0,
    prefix_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CutMix on an activation: paste the partner's box (B, C, H, W) or tokens (B, N, D).

    Returns the mixed tensor and the fraction of ``x`` each row kept (B,) — the λ its targets must use.
    Tensors of other ranks are interpolated with ``lam`` like mixup (kept fraction ``None``). As in
    :func:`mix_tensor` the partner rows are gathered and then moved towards ``x`` in place, with a 0/1
    weight, so kept positions are bitwise ``x`` and pasted ones bitwise the partner's.
    """
    if x.dim() == 4 and batch_dim == 0:
        keep, kept = _box_keep(x, lam, centers)
    elif x.dim() == 3 and batch_dim in (0, 1):
        keep, kept = _token_keep(x, lam, token_scores, prefix_tokens, batch_dim)
        keep = keep[:, :, None] if batch_dim == 0 else keep.t()[:, :, None]
    else:
        return mix_tensor(x, lam, perm, batch_dim), None
    partner = x[(slice(None),) * batch_dim + (perm.to(x.device),)]
    return partner.lerp_(x, keep.to(x.dtype)), kept


def mixable(x: Any, batch_size: int, batch_dim: int) -> bool:
    """Whether ``x`` is a floating tensor whose ``batch_dim`` has ``batch_size`` rows."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() > batch_dim
        and x.shape[batch_dim] == batch_size
    )


def mix_structure(
    output: Any, plan: MixPlan, batch_dim: int = 0, prefix_tokens: int = 0
) -> tuple[Any, int, torch.Tensor | None]:
    """Mix every floating tensor leaf of ``output`` that has the plan's batch size on ``batch_dim``.

    ``output`` is a tensor or a tuple / list / dict / dataclass of them. Returns the rebuilt output,
    how many leaves were mixed, and for cutmix the kept fraction (B,) of the first leaf cut by a box or
    token subset (``None`` otherwise). Leaves without the batch dimension (masks, integer indices)
    pass through untouched.
    """
    count = 0
    kept: list[torch.Tensor] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if not mixable(t, plan.batch_size, batch_dim):
            return t
        count += 1
        if plan.method == "mixup":
            return mix_tensor(t, plan.lam, plan.perm, batch_dim)
        mixed, fraction = cutmix_tensor(
            t, plan.lam, plan.perm, plan.centers, plan.token_scores, batch_dim, prefix_tokens
        )
        if fraction is not None:
            kept.append(fraction)
        return mixed

    return map_tensors(output, fn), count, kept[0] if kept else None
