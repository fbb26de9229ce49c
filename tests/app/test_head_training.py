"""``--ddp``'s rule (:func:`hookmix.app.head_training.head_training`), decided from the ranks alone, so every
branch is checked here without launching ranks — the NCCL ones included, which no CPU machine can launch.

Plausible maintainer bugs and the test that catches each:
- ``auto`` taking DDP on gloo (CPU) ranks, where it was measured slower:
  ``test_auto_trains_on_rank_0_on_cpu_ranks_whatever_the_batch``.
- the GPU threshold compared with the global batch instead of the rows per rank, or ``>`` for ``>=``:
  ``test_auto_takes_ddp_on_gpus_from_the_threshold_rows_per_rank``.
- ``on`` accepting a global batch the ranks cannot split evenly (DDP would then average unequal slices), or one
  row per rank: ``test_on_refuses_a_batch_the_ranks_cannot_split_naming_a_batch_that_works``.
- one process (no torchrun) reported as DDP or as "rank 0" of a job: ``test_one_process_never_uses_ddp``.
- a mode outside ``auto|on|off`` silently read as ``auto``: ``test_an_unknown_mode_is_refused_naming_the_choices``.
"""

import pytest

from hookmix.app.head_training import MIN_ROWS_PER_GPU, head_training
from hookmix.core.errors import UsageError
from hookmix.headonly.distributed import Ranks

GLOO = Ranks(rank=0, world=2, backend="gloo")
NCCL = Ranks(rank=0, world=8, backend="nccl")


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_one_process_never_uses_ddp(mode: str) -> None:
    plan = head_training(Ranks(), mode, 64)
    assert not plan.ddp
    assert plan.record(Ranks())["head_training"] == "one process"


@pytest.mark.parametrize("batch", [64, 4096, 65536])
def test_auto_trains_on_rank_0_on_cpu_ranks_whatever_the_batch(batch: int) -> None:
    plan = head_training(GLOO, "auto", batch)
    assert not plan.ddp
    assert plan.record(GLOO) == {"world": 2, "backend": "gloo", "head_training": "rank 0", "reason": plan.reason}
    assert "gloo ranks on CPUs" in plan.reason


def test_auto_takes_ddp_on_gpus_from_the_threshold_rows_per_rank() -> None:
    at = head_training(NCCL, "auto", 8 * MIN_ROWS_PER_GPU)
    below = head_training(NCCL, "auto", 8 * MIN_ROWS_PER_GPU - 8)
    global_batch_above = head_training(NCCL, "auto", 2 * MIN_ROWS_PER_GPU)  # above the threshold, not per rank
    assert at.ddp and at.record(NCCL)["head_training"] == "ddp"
    assert at.reason == f"--ddp auto: {MIN_ROWS_PER_GPU} rows per GPU >= {MIN_ROWS_PER_GPU}"
    assert not below.ddp and f"{MIN_ROWS_PER_GPU - 1:g} rows per GPU < {MIN_ROWS_PER_GPU}" in below.reason
    assert not global_batch_above.ddp


def test_auto_on_gpus_keeps_rank_0_when_the_batch_does_not_split_evenly() -> None:
    assert not head_training(NCCL, "auto", 8 * MIN_ROWS_PER_GPU + 4).ddp


def test_on_and_off_are_obeyed() -> None:
    assert head_training(GLOO, "on", 64).ddp
    assert head_training(GLOO, "on", 64).reason == "--ddp on: 32 rows per rank and step"
    assert not head_training(NCCL, "off", 8 * MIN_ROWS_PER_GPU).ddp


@pytest.mark.parametrize(("batch", "fix"), [(63, "--batch-size 62"), (8, "--batch-size 16")])
def test_on_refuses_a_batch_the_ranks_cannot_split_naming_a_batch_that_works(batch: int, fix: str) -> None:
    ranks = Ranks(rank=0, world=8 if batch == 8 else 2, backend="gloo")
    with pytest.raises(UsageError) as error:
        head_training(ranks, "on", batch)
    assert f"--batch-size {batch} (the global batch)" in str(error.value)
    assert str(error.value).endswith(f"give e.g. {fix}.")


def test_an_unknown_mode_is_refused_naming_the_choices() -> None:
    with pytest.raises(UsageError, match=r"--ddp 'maybe' is not one of auto, on, off\."):
        head_training(GLOO, "maybe", 64)
