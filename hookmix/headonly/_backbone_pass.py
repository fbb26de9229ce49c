"""One pass of a frozen backbone over row ranges of a dataset, each output's rows handed to its own sink.

The pass behind :meth:`hookmix.FeatureCache.extract` and :meth:`~hookmix.FeatureCache.extract_many`: the
backbone maps a batch ``(B, C, H, W)`` to one tensor ``(B, *F)``, or to a mapping of named tensors
``{name: (B, *F_name)}`` (several layers' features from one forward); the rows of each range, all views
together, go to the sink of each name as features ``(V, n, *F_name)`` and labels ``(n, ...)``. :class:`Regroup`
lets a sink whose shard boundaries differ from the pass's ranges (a cache resumed from another row than its
neighbours) receive exactly its own shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hookmix.core.checks import modes_restored
from hookmix.core.devices import autocast_dtype
from hookmix.core.errors import UsageError
from hookmix.headonly._cache_format import Sink
from hookmix.headonly.view_seeds import SeededViews

__all__ = ["Regroup", "pass_ranges", "run_backbone"]


def pass_ranges(outputs: list[tuple[int, int]], stop: int) -> list[tuple[int, int]]:
    """The row ranges one pass runs for outputs given as ``(start, shard_size)``, each stored as shards
    ``[start, start + shard_size), ...`` up to ``stop``: the pass starts at the lowest ``start`` and cuts at
    every output's shard boundaries, so that each shard is a union of whole ranges (the ranges are the shards
    themselves when the outputs start at the same row with the same size, the usual case)."""
    edges = sorted({stop} | {b for start, size in outputs for b in range(start, stop, size)})
    return list(zip(edges[:-1], edges[1:]))


class Regroup:
    """A sink that drops the rows before ``start`` and hands ``sink`` one call per shard
    ``[start + k * shard_size, ...)`` (up to ``stop``), joining the pass's ranges that make it up."""

    def __init__(self, sink: Sink, start: int, stop: int, shard_size: int) -> None:
        self.sink, self.start, self.stop, self.shard_size = sink, start, stop, shard_size
        self.pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, start: int, stop: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        if stop <= self.start:
            return
        self.pending.append((start, stop, features, labels))
        if stop != self.stop and (stop - self.start) % self.shard_size:
            return
        first, parts = self.pending[0][0], self.pending
        self.pending = []
        if len(parts) == 1:
            self.sink(first, stop, features, labels)
            return
        joined = torch.cat([p[2] for p in parts], dim=1), torch.cat([p[3] for p in parts])
        self.sink(first, stop, *joined)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise TypeError(f"dataset must yield (x, y) pairs; a collated batch was {type(batch).__name__}.")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"dataset must yield (x, y) with tensor-like x and y; got a batch of x: {type(x).__name__}, "
            f"y: {type(y).__name__} (ints and floats are fine, strings are not)."
        )
    return x, y


def _named(out: Any, names: list[str]) -> dict[str, Any]:
    """The backbone's output as ``{name: output}``: a mapping is read by name, anything else is the one output
    of a single-output pass (checked by :func:`_store`)."""
    if not isinstance(out, Mapping):
        if len(names) == 1:
            return {names[0]: out}
        raise TypeError(f"backbone must return a mapping of the outputs {names}, got {type(out).__name__}.")
    missing = [name for name in names if name not in out]
    if missing:
        raise UsageError(f"backbone returned the outputs {sorted(out)} but not {missing}.")
    return {name: out[name] for name in names}


def _store(out: Any, rows: int, dtype: torch.dtype, first_index: int) -> torch.Tensor:
    """The backbone's output ``(B, *F)`` as a CPU tensor of ``dtype``, checked for shape and range."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"backbone must return one tensor (B, *F), got {type(out).__name__}; wrap it in a module "
            "that returns the feature tensor you want cached."
        )
    if out.ndim < 1 or out.shape[0] != rows:
        raise UsageError(f"backbone returned shape {tuple(out.shape)} for a batch of {rows} examples.")
    stored = out.detach().to(dtype=dtype).cpu()
    if not torch.isfinite(stored).all() and torch.isfinite(out).all():
        raise UsageError(
            f"features of examples {first_index}..{first_index + rows - 1} exceed the range of {dtype} "
            f"(max |x| = {out.abs().max().item():.4g}); pass dtype=torch.float32 or torch.bfloat16."
        )
    return stored


def _stack_views(features: list[list[torch.Tensor]], start: int) -> torch.Tensor:
    """Per-view batch lists -> features ``(V, n, *F)``."""
    try:
        return torch.stack([torch.cat(view) for view in features]).contiguous()
    except RuntimeError as exc:
        raise UsageError(
            f"backbone feature shapes differ between batches near example {start} ({exc}); "
            "every row must have one fixed feature shape."
        ) from exc


def _view_labels(labels: list[list[torch.Tensor]], start: int) -> torch.Tensor:
    """Per-view label lists -> labels ``(n, ...)``; the views must agree on them."""
    view_labels = [torch.cat(view) for view in labels]
    for view, other in enumerate(view_labels[1:], start=1):
        if not torch.equal(other, view_labels[0]):
            raise UsageError(
                f"view {view} of examples from {start} got different labels than view 0; views are "
                "passes over the same examples and may differ only in their (augmented) inputs."
            )
    return view_labels[0].contiguous()


class _Rows:
    """The stored outputs and labels of the current range, per name and view, until the range is complete."""

    def __init__(self, names: list[str], views: int) -> None:
        self.features = {name: [[] for _ in range(views)] for name in names}
        self.labels: list[list[torch.Tensor]] = [[] for _ in range(views)]

    def add(self, view: int, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        for name, stored in outputs.items():
            self.features[name][view].append(stored)
        self.labels[view].append(labels)

    def hand_over(self, start: int, stop: int, sinks: Mapping[str, Sink]) -> None:
        stacked = {name: _stack_views(views, start) for name, views in self.features.items()}
        labels = _view_labels(self.labels, start)
        for name, sink in sinks.items():
            sink(start, stop, stacked[name], labels)


def run_backbone(
    backbone: nn.Module,
    dataset: Dataset,
    ranges: list[tuple[int, int]],
    sinks: Mapping[str, Sink],
    *,
    views: int,
    dtype: torch.dtype,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    desc: str = "extracting features",
) -> int:
    """Run ``backbone`` over ``views`` passes of each row range in turn, hand each range's rows of each output
    to that output's sink (in the order of ``sinks``). Returns the number of batches the backbone ran.

    Batches never straddle two ranges, so one DataLoader (its workers started once) serves every range. View
    ``v`` of row ``i`` is read under its own seed (:class:`~hookmix.headonly.view_seeds.SeededViews`), so the
    inputs are the same whatever the ranges, batch size and workers, and the global generators are left as they
    were. The backbone runs in eval mode under ``torch.no_grad()`` (and autocast on a GPU unless ``dtype`` is
    float32); each submodule's training flag is restored afterwards.
    """
    plan = [
        (range_index, view, list(range(b, min(b + batch_size, stop))))
        for range_index, (start, stop) in enumerate(ranges)
        for view in range(views)
        for b in range(start, stop, batch_size)
    ]
    loader = DataLoader(
        SeededViews(dataset, len(dataset)),  # type: ignore[arg-type]
        batch_sampler=[[(row, view) for row in indices] for _, view, indices in plan],
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # the workers' seeds, not drawn from the global generator
    )
    names, total = list(sinks), views * sum(stop - start for start, stop in ranges)
    half = autocast_dtype(device) if dtype != torch.float32 else None
    rows = _Rows(names, views)
    with (
        modes_restored(backbone, False),
        torch.no_grad(),
        torch.autocast(device.type, dtype=half, enabled=half is not None),
        tqdm(total=total, desc=desc, unit="ex", disable=not progress) as bar,
    ):
        for (range_index, view, indices), batch in zip(plan, loader):
            x, y = _split_batch(batch)
            out = _named(backbone(x.to(device, non_blocking=True)), names)
            rows.add(view, {n: _store(o, len(indices), dtype, indices[0]) for n, o in out.items()}, y)
            bar.update(len(indices))
            start, stop = ranges[range_index]
            if view == views - 1 and indices[-1] == stop - 1:
                rows.hand_over(start, stop, sinks)
                rows = _Rows(names, views)
    return len(plan)
