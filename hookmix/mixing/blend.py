"""Blend activations with a plan: interpolate towards the partner (mixup) or paste its positions (cutmix).

These run inside the forward hook on every training step, so each is a couple of tensor ops: no Python
loop over the batch, no host synchronisation, and one new tensor (the mixed output) per mixed leaf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hookmix.core.errors import UsageError
from hookmix.core.tree import map_tensors
from hookmix.mixing.plan import MixPlan

__all__ = ["Cut", "cutmix_tensor", "mix_structure", "mix_tensor", "mixable"]


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


@dataclass(frozen=True)
class Cut:
    """The positions one cutmix forward takes from the partner, fixed at the first layer it cuts.

    Attributes:
        grid: the position grid it was cut on: (H, W) or (L,) for a box, (F,) free tokens for a subset.
        bounds: boxes only — per grid axis, the (low, high) pixel bounds (B,) of each row's box.
        swapped: token subsets only — (B, F) bool, the free tokens taken from the partner.
        kept: (B,) the fraction of positions each row keeps: the λ its targets use.

    Every later layer of the same forward (``mode="all"``) and every recomputation of a layer
    (gradient checkpointing) pastes this cut, scaled to its own grid, so they all keep exactly ``kept``.
    """

    grid: tuple[int, ...]
    bounds: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    swapped: torch.Tensor | None = None
    kept: torch.Tensor | None = None

    @property
    def is_box(self) -> bool:
        return self.swapped is None

    def describe(self) -> str:
        return f"a box on a {'x'.join(map(str, self.grid))} grid" if self.is_box else f"{self.grid[0]} tokens"


def _box(grid: tuple[int, ...], lam: torch.Tensor, centers: torch.Tensor) -> Cut:
    """One box per row on ``grid``: side ``floor(size * (1 - lam) ** (1 / len(grid)))`` on each axis around
    the row's centre, clipped at the borders (so the kept fraction can exceed ``lam``)."""
    ratio = (1.0 - lam.float()).clamp(min=0) ** (1.0 / len(grid))
    bounds = []
    for axis, size in enumerate(grid):
        cut = torch.floor(size * ratio)
        low = torch.floor(centers[:, axis] * size) - torch.div(cut, 2, rounding_mode="floor")
        bounds.append((low.clamp(0, size), (low + cut).clamp(0, size)))
    area = torch.stack([high - low for low, high in bounds]).prod(dim=0)
    return Cut(grid=grid, bounds=tuple(bounds), kept=1.0 - area / math.prod(grid))


def _token_subset(free: int, lam: torch.Tensor, scores: torch.Tensor) -> Cut:
    """Of ``free`` tokens each row swaps the ``round((1 - lam) * free)`` whose virtual slots score lowest."""
    slots = scores.shape[1]
    if free < 1 or free > slots:
        raise UsageError(
            f"token cutmix needs 1..{slots} tokens after the prefix token(s), got {free}; set prefix_tokens= "
            "to the model's class/register tokens."
        )
    slot = torch.div(torch.arange(free, device=scores.device) * slots, free, rounding_mode="floor")
    ranks = scores[:, slot].argsort(dim=1).argsort(dim=1)
    count = torch.round((1.0 - lam.float()) * free)
    return Cut(grid=(free,), swapped=ranks < count[:, None], kept=1.0 - count / free)


def _scaled(cut: Cut, grid: tuple[int, ...], is_box: bool) -> Cut:
    """``cut`` on another layer's ``grid``: the same box with its bounds multiplied by whole factors, or the
    same token subset; a ``ValueError`` when that cannot keep exactly the same fraction."""
    same_kind = cut.is_box == is_box and len(cut.grid) == len(grid)
    if same_kind and not is_box and grid == cut.grid:
        return cut
    if same_kind and is_box and all(new % old == 0 for new, old in zip(grid, cut.grid)):
        factors = [new // old for new, old in zip(grid, cut.grid)]
        bounds = tuple((low * k, high * k) for (low, high), k in zip(cut.bounds, factors))
        return Cut(grid=grid, bounds=bounds, kept=cut.kept)
    here = Cut(grid=grid, swapped=None if is_box else torch.empty(0))
    raise UsageError(
        f"cutmix pastes one cut per forward, first {cut.describe()}, which cannot be scaled exactly to "
        f"{here.describe()}: the layers would keep different areas than the targets use. With mode='all' "
        "list layers that share one grid (e.g. the blocks of one stage) or whose grids are whole multiples "
        "of the first layer's, or use mode='one'."
    )


def _positions(cut: Cut) -> torch.Tensor:
    """(B, *grid) bool: True where a row keeps its own value."""
    if not cut.is_box:
        return ~cut.swapped
    inside = None
    for (low, high), size in zip(cut.bounds, cut.grid):
        index = torch.arange(size, device=low.device)
        axis = (index >= low[:, None]) & (index < high[:, None])
        inside = axis if inside is None else inside[..., None] & axis[:, None, :]
    return ~inside


_POSITION_AXES = {"NCHW": (2, 3), "NHWC": (1, 2), "NCL": (2,), "NLC": (1,)}


def cutmix_tensor(
    x: torch.Tensor,
    lam: torch.Tensor,
    perm: torch.Tensor,
    centers: torch.Tensor,
    token_scores: torch.Tensor,
    *,
    layout: str,
    prefix_tokens: int = 0,
    cut: Cut | None = None,
) -> tuple[torch.Tensor, Cut]:
    """CutMix on an activation: paste the partner's positions, all channels at once.

    Args:
        x: the activation in ``layout``: ``"NCHW"`` / ``"NHWC"`` maps and ``"NCL"`` signals get a box
            (a segment for NCL), ``"NLC"`` tokens — or ``"LNC"``, sequence-first (N, B, D) — a random
            subset of the tokens after the first ``prefix_tokens``.
        lam: (B,) the λ as drawn; the box area / token count follows it.
        perm: (B,) partner of each row.
        centers / token_scores: the plan's box centres (B, 2) and token slot scores (B, R).
        cut: the cut an earlier layer of this forward made: it is scaled to this layer instead of a new one.

    Returns the mixed tensor and the :class:`Cut` (its ``kept`` (B,) is the λ the targets must use). As in
    :func:`mix_tensor` the partner rows are gathered and then moved towards ``x`` in place, with a 0/1
    weight, so kept positions are bitwise ``x`` and pasted ones bitwise the partner's.
    """
    device = x.device
    batch_dim = 1 if layout == "LNC" else 0
    tokens = layout in ("NLC", "LNC")
    axes = (1 - batch_dim,) if tokens else _POSITION_AXES[layout]
    grid = tuple(x.shape[axis] - (prefix_tokens if tokens else 0) for axis in axes)
    if cut is not None:
        cut = _scaled(cut, grid, is_box=not tokens)
    elif tokens:
        cut = _token_subset(grid[0], lam.to(device), token_scores.to(device))
    else:
        cut = _box(grid, lam.to(device), centers.to(device))
    keep = _positions(cut)
    if tokens:
        keep = torch.cat([keep.new_ones(keep.shape[0], prefix_tokens), keep], dim=1)
        keep = keep[:, :, None] if batch_dim == 0 else keep.t()[:, :, None]
    else:
        keep = keep.unsqueeze(1 if layout in ("NCHW", "NCL") else -1)
    partner = x[(slice(None),) * batch_dim + (perm.to(device),)]
    return partner.lerp_(x, keep.to(x.dtype)), cut


def mixable(x: Any, batch_size: int, batch_dim: int) -> bool:
    """Whether ``x`` is a floating tensor whose ``batch_dim`` has ``batch_size`` rows."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() > batch_dim
        and x.shape[batch_dim] == batch_size
    )


def mix_structure(
    output: Any,
    plan: MixPlan,
    *,
    batch_dim: int = 0,
    prefix_tokens: int = 0,
    layout: Callable[[torch.Tensor], str | None] = lambda t: None,
    cut: Cut | None = None,
) -> tuple[Any, int, Cut | None]:
    """Mix every floating tensor leaf of ``output`` that has the plan's batch size on ``batch_dim``.

    ``output`` is a tensor or a tuple / list / dict / dataclass of them. ``layout(leaf)`` names each
    leaf's layout (asked on every mixed step, so an unknown layout is refused at the first one); a
    cutmix plan cuts leaves that have one and interpolates the others (``None``: no positions, e.g.
    (B, D)) with the λ of the cut made so far;
    the first leaf cut fixes the :class:`Cut` that later leaves (and the ``cut`` given, from an earlier
    layer) share. Returns the rebuilt output, how many leaves were mixed, and the cut (``None`` when
    nothing was cut). Leaves without the batch dimension (masks, integer indices) pass through untouched.
    """
    count = 0

    def fn(t: torch.Tensor) -> torch.Tensor:
        nonlocal count, cut
        if not mixable(t, plan.batch_size, batch_dim):
            return t
        count += 1
        where = layout(t)
        if where is None or plan.method != "cutmix":
            return mix_tensor(t, plan.lam if cut is None else cut.kept, plan.perm, batch_dim)
        mixed, cut = cutmix_tensor(
            t,
            plan.drawn,
            plan.perm,
            plan.centers,
            plan.token_scores,
            layout=where,
            prefix_tokens=prefix_tokens,
            cut=cut,
        )
        return mixed

    mixed = map_tensors(output, fn)
    return mixed, count, cut
