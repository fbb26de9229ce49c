"""Augmented views are reproducible: view v of row i is drawn under its own seed (hookmix.headonly.view_seeds).

The dataset is generated images through a real torchvision augmentation that draws from all three global
generators: ``RandomResizedCrop`` and ``RandomHorizontalFlip`` (torch), ``RandomChoice`` (Python's ``random``) and
a brightness jitter from numpy (as timm's ``RandAugment`` draws). The backbone is random-init but batch-invariant by
construction (per-channel affine, average pooling, flatten), so its features are the augmented pixels, averaged:
equal features mean equal augmented inputs, whatever the batch size (a convolution's kernel choice may differ by
batch size, e.g. 7e-8 at batch 1 here, which these tests must not confuse with the views' randomness).

The bugs a maintainer could plausibly make and the test that catches each:
- the per-item seeding dropped (views drawn from the global generators as they stand, the state they were left in):
  every test below but ``test_view_seeds_are_distinct_and_not_the_common_seeds``;
- one of the three generators not seeded (torch's, Python's or numpy's):
  ``test_two_extractions_give_the_same_bytes_and_the_views_differ`` (each transform step draws from one of them);
- a seed that depends on the position in the pass (batch, shard, worker, rank) instead of ``(row, view)``:
  ``test_batch_and_shard_size_do_not_change_the_views``, ``test_worker_count_does_not_change_the_views``,
  ``test_a_resumed_extraction_equals_an_uninterrupted_one``, ``test_two_ranks_extract_the_views_of_one_process``;
- two views of a row under one seed (e.g. the view left out of the seed): the views-differ check of
  ``test_two_extractions_give_the_same_bytes_and_the_views_differ``;
- the caller's generators not restored, or the DataLoader's worker seed drawn from the global generator:
  ``test_the_callers_random_state_is_left_untouched``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms

from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.distributed import extract_sharded
from hookmix.headonly.view_seeds import view_seed
from tests.headonly.test_distributed import run_ranks

N, CLASSES = 20, 3
KEY = CacheKey(model="test:affine-pool", layer="pool", input_size=(3, 12, 12), transform="random-crop-flip")


class Negate:
    """``-x``: one branch of the ``RandomChoice`` (a class, not a lambda, so that worker processes can pickle it)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -x


class Keep:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NumpyBrightness:
    """``x`` times a factor drawn from numpy's global generator."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(np.random.uniform(0.5, 1.5))


class AugmentedImages(Dataset):
    """N generated 20x20 RGB images with labels, each read through a random torchvision augmentation to 12x12."""

    def __init__(self, fail_at: int | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images, self.labels = torch.rand(N, 3, 20, 20, generator=gen), torch.arange(N) % CLASSES
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(12, scale=(0.25, 1.0), antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.RandomChoice([Keep(), Negate()]),
                NumpyBrightness(),
            ]
        )
        self.fail_at = fail_at

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.fail_at:
            raise RuntimeError(f"simulated crash at example {index}")
        return self.transform(self.images[index]), self.labels[index]


class Affine(nn.Module):
    """``x * weight + bias`` per channel, random-init from a seeded generator."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(1, 3, 1, 1, generator=gen))
        self.bias = nn.Parameter(torch.randn(1, 3, 1, 1, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def backbone() -> nn.Module:
    """Random-init per-channel affine, 2x2 average pooling, flatten: ``(B, 3, 12, 12)`` -> ``(B, 108)``, each row
    computed alone (no op mixes rows or depends on the batch size)."""
    return nn.Sequential(Affine(), nn.AvgPool2d(2), nn.Flatten())


def extract(path: Path | None = None, dataset: Dataset | None = None, **options) -> FeatureCache:
    """Two views, float32 (the bytes the backbone gave), batch 4 and shard 6 unless overridden."""
    run = dict(views=2, dtype=torch.float32, batch_size=4, shard_size=6, progress=False) | options
    return FeatureCache.extract(backbone(), dataset or AugmentedImages(), KEY, path=path, **run)


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.safetensors"))}


def test_view_seeds_are_distinct_and_not_the_common_seeds() -> None:
    rows, views = 5000, 4
    seeds = {view_seed(row, view, rows) for row in range(rows) for view in range(views)}
    assert len(seeds) == rows * views
    assert seeds.isdisjoint(range(1000))  # never the stream of a user's torch.manual_seed(0), (1), ...


def test_two_extractions_give_the_same_bytes_and_the_views_differ(tmp_path: Path) -> None:
    first = extract(tmp_path / "first")
    torch.rand(3), random.random(), np.random.rand()  # the global generators moved on in between
    second = extract(tmp_path / "second")
    assert shard_files(tmp_path / "first") == shard_files(tmp_path / "second")
    assert torch.equal(first.features, second.features)
    # every row's two views differ (a crop, flip, sign and brightness of their own), and so do the rows' draws
    assert ((first.features[0] - first.features[1]).abs().amax(dim=1) > 1e-3).all()
    # view v of a row is the same in a cache of any number of views: a one-view cache is view 0
    one = extract(views=1)
    assert torch.equal(one.features[0], first.features[0])


def test_batch_and_shard_size_do_not_change_the_views(tmp_path: Path) -> None:
    small = extract(tmp_path / "small", batch_size=4, shard_size=6)
    large = extract(tmp_path / "large", batch_size=16, shard_size=8)
    in_memory = extract(None, batch_size=7)
    assert torch.equal(small.features, large.features) and torch.equal(small.features, in_memory.features)


def test_worker_count_does_not_change_the_views() -> None:
    assert torch.equal(extract(num_workers=0).features, extract(num_workers=2).features)


def test_a_resumed_extraction_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash at example 14"):
        extract(tmp_path / "resumed", AugmentedImages(fail_at=14))  # shards 0 and 1 (rows 0-11) written
    assert sorted(shard_files(tmp_path / "resumed")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    resumed = extract(tmp_path / "resumed")
    assert resumed.batches_run == 2 * (2 + 1)  # shards 2 (rows 12-17: batches of 4 and 2) and 3 (18-19), per view
    whole = extract(tmp_path / "whole")
    assert shard_files(tmp_path / "resumed") == shard_files(tmp_path / "whole")
    assert torch.equal(resumed.features, whole.features)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_callers_random_state_is_left_untouched(num_workers: int) -> None:
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    extract(num_workers=num_workers)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    after = np.random.get_state()
    assert np.array_equal(after[1], before[2][1]) and after[2:] == before[2][2:]


def _extract_on_rank(rank: int, tmp: str) -> None:
    extract_sharded(
        backbone(), AugmentedImages(), KEY, path=f"{tmp}/cache", views=2, dtype=torch.float32, batch_size=2,
        shard_size=3, progress=False,
    )  # fmt: skip


def test_two_ranks_extract_the_views_of_one_process(tmp_path: Path) -> None:
    run_ranks(_extract_on_rank, tmp_path)  # rank 0 extracts shards 0, 2, 4, 6; rank 1 shards 1, 3, 5
    single = extract(tmp_path / "single", batch_size=5, shard_size=3)
    assert shard_files(tmp_path / "cache") == shard_files(tmp_path / "single")
    assert torch.equal(FeatureCache.load(tmp_path / "cache", KEY).features, single.features)
