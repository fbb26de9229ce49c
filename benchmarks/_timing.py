"""Interleaved timing shared by the benchmarks: every variant runs once per round, so slow phases of a
noisy machine hit all of them alike, and the median over rounds is reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def train_step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> float:
    """Seconds for one zero_grad / forward+loss / backward / optimizer step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    optimizer.step()
    return time.perf_counter() - start


def interleaved_medians(
    variants: dict[str, Callable[[], float]], rounds: int, verbose: bool = True
) -> dict[str, float]:
    """Run each timed variant once (warm-up), then ``rounds`` interleaved rounds; median seconds each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            times[name].append(fn())
        if verbose:
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    return {name: statistics.median(t) for name, t in times.items()}
