"""``--ddp``: whether a torchrun job trains the head with DDP on every rank or on rank 0 alone, decided before
training, with the reason the job prints and records in ``metrics.json``.

The rule is the command's policy, not the library's: :func:`hookmix.fit` trains with DDP whenever it is asked
(``ddp=True``); this module decides when the job asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hookmix.core.errors import UsageError
from hookmix.headonly.distributed import Ranks

__all__ = ["DDP_MODES", "MIN_ROWS_PER_GPU", "HeadTraining", "head_training"]

DDP_MODES = ("auto", "on", "off")

MIN_ROWS_PER_GPU = 1024
"""``--ddp auto`` trains the head with DDP on GPUs only from this many rows per rank and step: below it a head
step is launch-bound (about 0.1-0.2 ms whatever the rows), so splitting the batch saves nothing while the
gradient all-reduce adds 0.1 ms (NVLink) to 0.75 ms (PCIe) per step for a 2048 x 1000 head (on paper: the
README's "Past one machine")."""


@dataclass(frozen=True)
class HeadTraining:
    """How the head trains in a job of several ranks: with DDP on every rank, or on rank 0 alone; and why."""

    ddp: bool
    reason: str

    def record(self, ranks: Ranks) -> dict[str, Any]:
        """The ``distributed`` entry of ``metrics.json``."""
        how = "ddp" if self.ddp else ("rank 0" if ranks.world > 1 else "one process")
        return {"world": ranks.world, "backend": ranks.backend, "head_training": how, "reason": self.reason}


def head_training(ranks: Ranks, mode: str, batch_size: int) -> HeadTraining:
    """Decide, before training, whether the head trains with DDP (``mode="on"``), on rank 0 alone (``"off"``)
    or by the rule (``"auto"``): never on gloo (CPU) ranks — measured, DDP of a head on 2 gloo ranks is at best
    as fast as one process and up to 4x slower per step (``benchmarks/ddp_head.py``) — and on GPUs only with at
    least :data:`MIN_ROWS_PER_GPU` rows per rank (on paper: README, "Past one machine").

    Args:
        ranks: the job's ranks (:func:`process_group`).
        mode: ``"auto"``, ``"on"`` or ``"off"`` (``hookmix finetune --ddp``).
        batch_size: the global batch; under DDP each rank trains ``batch_size / world`` rows of every step.
    """
    if mode not in DDP_MODES:
        raise UsageError(f"--ddp {mode!r} is not one of {', '.join(DDP_MODES)}.")
    if ranks.world == 1:
        return HeadTraining(False, "one process (not launched by torchrun with more than one process)")
    per_rank, rest = divmod(batch_size, ranks.world)
    if mode == "on":
        if rest or per_rank < 2:
            raise UsageError(
                f"--ddp on: --batch-size {batch_size} (the global batch) must be a multiple of the {ranks.world} "
                f"ranks with at least 2 rows per rank; give e.g. --batch-size {ranks.world * max(2, per_rank)}."
            )
        return HeadTraining(True, f"--ddp on: {per_rank} rows per rank and step")
    if mode == "off":
        return HeadTraining(False, "--ddp off")
    if ranks.backend != "nccl":
        return HeadTraining(
            False,
            f"--ddp auto: {ranks.backend} ranks on CPUs; measured, DDP of a head on 2 gloo ranks is at best as fast "
            "as one process and up to 4x slower per step (benchmarks/ddp_head.py)",
        )
    if rest or per_rank < MIN_ROWS_PER_GPU:
        return HeadTraining(
            False,
            f"--ddp auto: {batch_size / ranks.world:g} rows per GPU < {MIN_ROWS_PER_GPU}: such a head step is "
            "launch-bound, so DDP would add the gradient all-reduce and save nothing (on paper; --ddp on overrides)",
        )
    return HeadTraining(True, f"--ddp auto: {per_rank} rows per GPU >= {MIN_ROWS_PER_GPU}")
