"""Tests for hookmix.headonly.cache: exact round trips, resume after interruption, and refusal of bad caches.

Several caches from one pass (``FeatureCache.extract_many``), the bugs a maintainer could plausibly make and the
test that catches each:
- one output's features handed to another's sink, rows lost or reordered when the ranges are joined, another
  dtype or shard layout than ``extract`` writes: ``test_one_pass_caches_equal_single_extractions_bitwise``
  (features, labels and the shard files' bytes against single extractions, on disk and in memory);
- a second pass per output, or an output extracted again although its cache is stored, or a backbone run when
  every cache is stored: ``test_one_pass_caches_equal_single_extractions_bitwise`` (rows through the backbone)
  and ``test_stored_targets_are_loaded_and_no_backbone_runs_when_all_are``;
- a resumed cache rewritten from row 0 or from another target's row, shards cut at the pass's ranges instead of
  its own: ``test_each_target_resumes_from_its_own_row_and_shard_size``;
- two targets writing one directory, a backbone missing an output passing silently:
  ``test_bad_targets_refused``, ``test_a_backbone_without_an_output_it_was_asked_for_is_refused``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from hookmix.headonly.cache import MANIFEST_NAME, CacheKey, FeatureCache, keyed_directory, transform_fingerprint
from hookmix.headonly.store import LOCK_NAME, writer_lock
from hookmix.headonly.streaming import BlockLayout, ShardedFeatures
from hookmix.headonly.training import FitConfig, FitResult, fit

N = 50
SHARD = 16
BATCH = 8
KEY = CacheKey(model="test:tiny-conv", layer="pool", input_size=(3, 16, 16), transform="none")


def make_backbone() -> nn.Module:
    torch.manual_seed(0)  # deterministic weights for the test model only; hookmix itself never uses it
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    with torch.no_grad():  # non-trivial running stats, so eval mode differs from train mode
        backbone[1].running_mean.uniform_(-0.5, 0.5)
        backbone[1].running_var.uniform_(0.5, 2.0)
    return backbone


def make_dataset(n: int = N) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 5, (n,), generator=gen))


def reference(backbone: nn.Module, dataset: TensorDataset) -> torch.Tensor:
    """The backbone's eval-mode output, in the same batches as the extraction: (N, 8, 2, 2)."""
    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone(dataset.tensors[0][i : i + BATCH]) for i in range(0, len(dataset), BATCH)])


def extract(dataset: Dataset, path: Path | None = None, key: CacheKey = KEY, **kwargs) -> FeatureCache:
    """Extract with a fresh test backbone; float32, BATCH and SHARD unless overridden."""
    options = dict(batch_size=BATCH, shard_size=SHARD, dtype=torch.float32, progress=False) | kwargs
    return FeatureCache.extract(make_backbone(), dataset, key, path=path, **options)


def assert_safe_advice(message: str) -> None:
    """A refusal names no command-line flag (the app adds those) and never says to delete: the cache it refuses
    may be another run's valid work (removal is advised only for damaged files, once no process uses them)."""
    assert "delete" not in message and not re.search(r"--[a-z]", message), message


class FailOnce(Dataset):
    """Wraps a dataset; raises at index ``fail_at`` until ``armed`` is cleared (a simulated crash)."""

    def __init__(self, base: Dataset, fail_at: int) -> None:
        self.base, self.fail_at, self.armed = base, fail_at, True

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        if self.armed and index == self.fail_at:
            raise RuntimeError(f"simulated crash at example {index}")
        return self.base[index]


class Noisy(Dataset):
    """A random augmentation: Gaussian noise from the dataset's own seeded generator."""

    def __init__(self, base: TensorDataset, seed: int = 0) -> None:
        self.base, self.gen = base, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x + 0.5 * torch.randn(x.shape, generator=self.gen), y


def test_fp32_round_trip_is_bitwise_equal_to_eval_backbone(tmp_path: Path) -> None:
    dataset = make_dataset()
    cache = extract(dataset, tmp_path)
    assert cache.features.shape == (1, N, 8, 2, 2) and cache.dtype == torch.float32 and len(cache) == N
    assert torch.equal(cache.features[0], reference(make_backbone(), dataset))
    assert torch.equal(cache.labels, dataset.tensors[1]) and cache.labels.dtype == torch.int64
    assert cache.batches_run == 7  # ceil(16/8) * 3 full shards + 1 batch for the last 2 rows
    shards = [f"shard-0000{i}.safetensors" for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_NAME, MANIFEST_NAME, *shards])
    loaded = FeatureCache.load(tmp_path, KEY)
    assert torch.equal(loaded.features, cache.features) and torch.equal(loaded.labels, cache.labels)
    assert loaded.batches_run == 0 and loaded.key == KEY


def test_fp16_is_within_fp16_rounding_and_in_memory_matches_on_disk(tmp_path: Path) -> None:
    dataset = make_dataset()
    on_disk = extract(dataset, tmp_path, dtype=torch.float16)
    in_memory = extract(dataset, None, dtype=torch.float16)
    assert on_disk.dtype == torch.float16 and in_memory.path is None and on_disk.path == tmp_path
    assert torch.equal(on_disk.features, in_memory.features) and torch.equal(on_disk.labels, in_memory.labels)
    exact = reference(make_backbone(), dataset)
    torch.testing.assert_close(on_disk.features[0].float(), exact, rtol=1e-3, atol=1e-5)
    assert on_disk.bytes_per_example == 8 * 2 * 2 * 2  # prod(F) * 2 bytes
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["bytes_per_example"] == 64 and manifest["dtype"] == "float16" and manifest["count"] == N
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert manifest["key"]["input_size"] == [3, 16, 16] and manifest["fingerprint"] == KEY.fingerprint()


def test_extract_on_a_complete_cache_loads_it_without_running_the_backbone(tmp_path: Path) -> None:
    first = extract(make_dataset(), tmp_path)
    again = extract(make_dataset(), tmp_path)
    assert again.batches_run == 0 and torch.equal(again.features, first.features)
    assert again.reused and again.rows_reused == N  # what the job reports as "reusing the cache in DIR"
    assert not first.reused and first.rows_reused == 0 and not extract(make_dataset()).reused
    assert FeatureCache.load(tmp_path, KEY).reused


def test_keyed_directory_gives_each_key_dtype_and_views_its_own_directory(tmp_path: Path) -> None:
    base = keyed_directory(tmp_path, "train", KEY, dtype=torch.float16, views=1)
    assert base.parent == tmp_path and re.fullmatch(r"train-[0-9a-f]{12}", base.name)
    assert keyed_directory(str(tmp_path), "train", KEY, dtype=torch.float16, views=1) == base  # stable
    others = {
        keyed_directory(
            tmp_path, "train", dataclasses.replace(KEY, dataset="train:files:9:stat:0"), dtype=torch.float16, views=1
        ),
        keyed_directory(tmp_path, "train", KEY, dtype=torch.float32, views=1),
        keyed_directory(tmp_path, "train", KEY, dtype=torch.float16, views=2),
    }
    assert len(others) == 3 and base not in others


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "test:other"),
        ("layer", "conv"),
        ("input_size", (3, 32, 32)),
        ("transform", "Resize:abc"),
        ("dataset", "val"),
    ],
)
def test_a_cache_for_another_key_is_refused_naming_the_field(tmp_path: Path, field: str, value: object) -> None:
    extract(make_dataset(), tmp_path)
    other = dataclasses.replace(KEY, **{field: value})
    attempts = (lambda: FeatureCache.load(tmp_path, other), lambda: extract(make_dataset(), tmp_path, other))
    for attempt in attempts:
        with pytest.raises(ValueError) as info:
            attempt()
        message = str(info.value)
        assert f"{field}={getattr(KEY, field)!r}" in message  # the stored value
        assert f"{field}={getattr(other, field)!r}" in message  # the requested value
        assert "extract into another directory" in message
        assert_safe_advice(message)


@pytest.mark.parametrize(
    "request_kwargs, expected",
    [({"dtype": torch.float16}, "dtype='float32'"), ({"views": 2}, "views=1")],
)
def test_dtype_and_views_mismatch_refused(tmp_path: Path, request_kwargs: dict, expected: str) -> None:
    extract(make_dataset(), tmp_path)
    with pytest.raises(ValueError, match=expected):
        FeatureCache.load(tmp_path, KEY, **request_kwargs)
    with pytest.raises(ValueError, match=expected):
        extract(make_dataset(), tmp_path, **request_kwargs)


def test_extract_refuses_a_cache_for_a_dataset_of_another_length(tmp_path: Path) -> None:
    extract(make_dataset(), tmp_path)
    with pytest.raises(ValueError, match="count=50, but count=40"):
        extract(make_dataset(40), tmp_path)


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _damage_flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor payload: same size, different checksum
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, expected",
    [(_damage_truncate, "truncated"), (_damage_flip_byte, "checksum"), (Path.unlink, "missing")],
)
def test_damaged_shard_refused(tmp_path: Path, damage, expected: str) -> None:
    extract(make_dataset(), tmp_path)
    damage(tmp_path / "shard-00002.safetensors")
    with pytest.raises(ValueError, match=expected) as info:
        FeatureCache.load(tmp_path, KEY)
    assert "shard-00002" in str(info.value) and "once no process uses it" in str(info.value)
    assert_safe_advice(str(info.value))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"{not json", "not a valid feature cache manifest"),
        (b"[1, 2]", "expected a JSON object"),
        (json.dumps({"format": "hookmix-feature-cache", "format_version": 99}).encode(), "version 99"),
        (None, "missing field 'count'"),
        (b"", "not a valid feature cache manifest"),
    ],
)
def test_invalid_manifest_refused(tmp_path: Path, content: bytes | None, expected: str) -> None:
    extract(make_dataset(), tmp_path)
    manifest_path = tmp_path / MANIFEST_NAME
    if content is None:
        manifest = json.loads(manifest_path.read_text())
        del manifest["count"]
        content = json.dumps(manifest).encode()
    manifest_path.write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        FeatureCache.load(tmp_path, KEY)


def test_missing_manifest_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest.json is missing"):
        FeatureCache.load(tmp_path, KEY)


def test_shard_path_outside_the_cache_refused(tmp_path: Path) -> None:
    extract(make_dataset(), tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())
    manifest["shards"][0]["file"] = "../elsewhere.safetensors"
    (tmp_path / "cache" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="contiguous shard layout"):
        FeatureCache.load(tmp_path / "cache", KEY)


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("manifest_updated", [False, True])
def test_pickle_payload_as_shard_is_refused_unexecuted(tmp_path: Path, manifest_updated: bool) -> None:
    cache_dir, marker = tmp_path / "cache", tmp_path / "executed"
    extract(make_dataset(), cache_dir)
    payload = pickle.dumps(_Payload(marker))
    (cache_dir / "shard-00001.safetensors").write_bytes(payload)
    if manifest_updated:  # an attacker who also fixed size and checksum: the format check must still refuse
        manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
        manifest["shards"][1].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
        (cache_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    expected = "not a valid safetensors file" if manifest_updated else "bytes but manifest.json says"
    with pytest.raises(ValueError, match=expected):
        FeatureCache.load(cache_dir, KEY)
    assert not marker.exists()


def test_resume_recomputes_only_missing_shards_and_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted = extract(make_dataset(), tmp_path / "whole")
    dataset = FailOnce(make_dataset(), fail_at=40)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(dataset, tmp_path / "resumed")
    done = json.loads((tmp_path / "resumed" / MANIFEST_NAME).read_text())["shards"]
    assert [(s["start"], s["stop"]) for s in done] == [(0, 16), (16, 32)]
    with pytest.raises(ValueError, match="incomplete \\(32 of 50"):
        FeatureCache.load(tmp_path / "resumed", KEY)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("shard-*")}

    dataset.armed = False
    backbone, forwards = make_backbone(), []
    backbone.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    resumed = FeatureCache.extract(
        backbone,
        dataset,
        KEY,
        path=tmp_path / "resumed",
        batch_size=BATCH,
        shard_size=SHARD,
        dtype=torch.float32,
        progress=False,
    )
    assert resumed.batches_run == 3 and forwards == [8, 8, 2]  # rows 32..49 only
    assert resumed.rows_reused == 32 and not resumed.reused
    assert {p: (tmp_path / "resumed" / p).stat().st_mtime_ns for p in kept} == kept
    assert torch.equal(resumed.features, uninterrupted.features)
    assert torch.equal(resumed.labels, uninterrupted.labels)
    assert (tmp_path / "resumed" / "shard-00003.safetensors").read_bytes() == (
        tmp_path / "whole" / "shard-00003.safetensors"
    ).read_bytes()


def test_load_says_whether_an_incomplete_cache_is_being_written_or_was_interrupted(tmp_path: Path) -> None:
    """An incomplete cache is "interrupted" only when no writer holds the lock; while one does (a lock is per
    open file, so this process holding it counts as another writer), load says so and how to wait for it."""
    with pytest.raises(RuntimeError):
        extract(FailOnce(make_dataset(), fail_at=40), tmp_path)
    with pytest.raises(ValueError, match=r"incomplete \(32 of 50 examples; its extraction was interrupted"):
        FeatureCache.load(tmp_path, KEY)
    (tmp_path / "new").mkdir()
    for directory, done in ((tmp_path, "32 of 50 examples so far"), (tmp_path / "new", "no shard is complete yet")):
        with writer_lock(directory), pytest.raises(ValueError) as info:
            FeatureCache.load(directory, KEY)
        assert f"{directory} is being extracted by another process now ({done}); FeatureCache.extract" in str(
            info.value
        )


def test_a_cache_of_another_format_version_is_left_as_it_is(tmp_path: Path) -> None:
    extract(make_dataset(), tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest | {"format_version": 2, "hookmix_version": "0.9.0"}))
    with pytest.raises(ValueError, match="format version 2 \\(written by hookmix 0.9.0\\)") as info:
        FeatureCache.load(tmp_path, KEY)
    assert "extract into another directory" in str(info.value)
    assert_safe_advice(str(info.value))


def test_resume_refuses_a_damaged_complete_shard(tmp_path: Path) -> None:
    dataset = FailOnce(make_dataset(), fail_at=40)
    with pytest.raises(RuntimeError):
        extract(dataset, tmp_path)
    _damage_flip_byte(tmp_path / "shard-00000.safetensors")
    dataset.armed = False
    with pytest.raises(ValueError, match="shard-00000.*checksum"):
        extract(dataset, tmp_path)


@pytest.mark.parametrize("path_kind", ["memory", "disk"])
def test_views_hold_different_augmentations_of_the_same_examples(tmp_path: Path, path_kind: str) -> None:
    dataset = make_dataset()
    cache = extract(Noisy(dataset), tmp_path if path_kind == "disk" else None, views=2)
    assert cache.features.shape == (2, N, 8, 2, 2) and cache.views == 2
    assert cache.bytes_per_example == 2 * 32 * 4
    assert torch.equal(cache.labels, dataset.tensors[1])
    gap = (cache.features[0] - cache.features[1]).abs().mean().item()
    clean = reference(make_backbone(), dataset)
    assert gap > 1e-2  # noise of std 0.5 moves the pooled features visibly
    assert (cache.features[0] - clean).abs().mean().item() > 1e-2


def test_views_with_changing_labels_refused() -> None:
    class Relabel(Noisy):
        def __getitem__(self, index: int):
            x, _ = super().__getitem__(index)
            return x, torch.randint(0, 1000, (), generator=self.gen)

    with pytest.raises(ValueError, match="different labels"):
        extract(Relabel(make_dataset()), None, views=2)


def test_extraction_keeps_batchnorm_stats_and_restores_each_training_flag() -> None:
    backbone = make_backbone().train()
    backbone[1].eval()  # a frozen BatchNorm inside a training model: a mixed state that must survive
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    FeatureCache.extract(backbone, make_dataset(), KEY, batch_size=BATCH, progress=False)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats, num_batches_tracked
    assert [m.training for m in backbone] == [True, False, True, True] and backbone.training


def test_features_are_ordinary_tensors_usable_with_autograd() -> None:
    cache = extract(make_dataset(), None)
    weight = torch.ones(32, requires_grad=True)
    (cache.features[0].flatten(1) @ weight).sum().backward()
    assert torch.allclose(weight.grad, cache.features[0].flatten(1).sum(0))


def test_multilabel_float_targets_are_kept(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    targets = (torch.rand(N, 4, generator=gen) > 0.5).float()
    dataset = TensorDataset(make_dataset().tensors[0], targets)
    cache = extract(dataset, tmp_path)
    assert cache.labels.dtype == torch.float32 and cache.labels.shape == (N, 4)
    assert torch.equal(FeatureCache.load(tmp_path, KEY).labels, targets)


def test_fp16_overflow_refused_with_a_fix() -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with torch.no_grad():
        backbone[1].bias.fill_(1e5)
    with pytest.raises(ValueError, match="exceed the range of torch.float16.*dtype=torch.float32"):
        FeatureCache.extract(backbone, make_dataset(), KEY, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"shard_size": 0}, ValueError, "shard_size=0"),
        ({"views": 0}, ValueError, "views=0"),
        ({"batch_size": 2.5}, ValueError, "batch_size=2.5"),
        ({"num_workers": -1}, ValueError, "num_workers=-1"),
        ({"dtype": torch.int64}, ValueError, "dtype=torch.int64"),
        ({"key": "resnet50"}, TypeError, "key must be a CacheKey"),
    ],
)
def test_bad_arguments_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        extract(make_dataset(), None, **kwargs)


def test_backbone_returning_a_tuple_refused() -> None:
    class TwoOutputs(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(TypeError, match="must return one tensor"):
        FeatureCache.extract(TwoOutputs(), make_dataset(), KEY, progress=False)


def test_cache_key_validation_and_stable_fingerprint() -> None:
    assert CacheKey("m", "l", [3, 8, 8], "t").input_size == (3, 8, 8)
    base = CacheKey("m", "l", (3, 8, 8), "t")
    assert base.fingerprint() == CacheKey("m", "l", [3, 8, 8], "t").fingerprint()
    assert base.fingerprint() != CacheKey("m", "l", (3, 8, 9), "t").fingerprint()
    # sha256 of the canonical JSON: the same in every process and Python version
    assert (
        KEY.fingerprint()
        == hashlib.sha256(
            b'{"dataset":"","input_size":[3,16,16],"layer":"pool","model":"test:tiny-conv","transform":"none"}'
        ).hexdigest()[:16]
    )
    with pytest.raises(ValueError, match="input_size=\\(3, 0\\)"):
        CacheKey("m", "l", (3, 0), "t")
    with pytest.raises(ValueError, match="layer=''"):
        CacheKey("m", "", (3,), "t")
    with pytest.raises(TypeError, match="model must be a string"):
        CacheKey(None, "l", (3,), "t")  # type: ignore[arg-type]


def test_transform_fingerprint_tracks_parameters_not_addresses() -> None:
    class Scale:
        def __init__(self, factor: float) -> None:
            self.factor = factor

        def __repr__(self) -> str:
            return f"Scale(factor={self.factor})"

    assert transform_fingerprint(Scale(2.0)) == transform_fingerprint(Scale(2.0))
    assert transform_fingerprint(Scale(2.0)) != transform_fingerprint(Scale(3.0))
    assert transform_fingerprint(Scale(2.0)).startswith("Scale:")
    first, second = (lambda x: x), (lambda x: x)
    assert transform_fingerprint(first) == transform_fingerprint(second)  # addresses are stripped
    assert transform_fingerprint(None) == "none"


def _head() -> nn.Module:
    torch.manual_seed(0)  # the same initial head for every run compared
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 5))


def _fit(
    cache: FeatureCache, config: FitConfig, blocks: BlockLayout | None = None, head: nn.Module | None = None
) -> tuple[FitResult, nn.Module]:
    """Train a fresh (or the given) head on the cache with ``fit``, validating on 10 other examples."""
    head = head or _head()
    val = make_dataset(10)
    val_x = reference(make_backbone(), val)
    result = fit(
        head,
        "input",
        cache.features,
        cache.labels,
        val_x,
        val.tensors[1],
        config,
        num_classes=5,
        blocks=blocks,
        progress=False,
    )
    return result, head


def test_block_order_visits_shuffled_blocks_of_shards_with_rows_shuffled_inside() -> None:
    layout = BlockLayout((16, 32, 48, 50), shards_per_block=2)
    plan = layout.order(torch.Generator().manual_seed(3))
    assert sorted(plan.order.tolist()) == list(range(50))
    ranges = [range(0, 16), range(16, 32), range(32, 48), range(48, 50)]
    begin = 0
    for block in plan.blocks:  # each block's rows come together, and exactly those of its shards
        rows = sorted(r for shard in block for r in ranges[shard])
        assert sorted(plan.order[begin : begin + len(rows)].tolist()) == rows
        begin += len(rows)
    assert sorted(s for block in plan.blocks for s in block) == [0, 1, 2, 3] and len(plan.blocks) == 2
    assert plan.order[:16].tolist() != sorted(plan.order[:16].tolist())  # shuffled inside the block
    again = layout.order(torch.Generator().manual_seed(3))
    assert torch.equal(again.order, plan.order) and again.blocks == plan.blocks  # a pure function of the seed


def test_streamed_training_equals_in_memory_training_for_the_same_block_order(tmp_path: Path) -> None:
    extract(Noisy(make_dataset()), tmp_path, views=2, shard_size=7)  # 8 shards, 2 views
    in_memory = FeatureCache.load(tmp_path, KEY)
    streamed = FeatureCache.load(tmp_path, KEY, mmap=True)
    assert isinstance(streamed.features, ShardedFeatures) and streamed.features.shape == in_memory.features.shape
    assert torch.equal(streamed.labels, in_memory.labels) and len(streamed) == N and streamed.views == 2
    config = FitConfig(epochs=3, batch_size=6, seed=4)  # batches straddle blocks of 2 shards (14 rows)
    layout = streamed.features.layout(2)
    memory_run, memory_head = _fit(in_memory, config, blocks=layout)
    streamed_run, streamed_head = _fit(streamed, config, blocks=layout)
    for a, b in zip(memory_run.history, streamed_run.history, strict=True):
        for key in ("train_loss", "val_nll", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(streamed_head[1].weight, memory_head[1].weight)
    assert streamed_run.lams == pytest.approx(memory_run.lams)
    plain_run, _ = _fit(in_memory, config)  # no block layout: today's permutation of all rows, other steps
    assert plain_run.history[0]["train_loss"] != pytest.approx(memory_run.history[0]["train_loss"], rel=1e-6)


def test_a_corrupted_shard_is_refused_mid_epoch_before_its_rows_are_used(tmp_path: Path) -> None:
    extract(make_dataset(), tmp_path, shard_size=8)  # 7 shards
    good = FeatureCache.load(tmp_path, KEY)
    streamed = FeatureCache.load(tmp_path, KEY, mmap=True)
    config = FitConfig(epochs=1, batch_size=4, seed=5, mix=False)
    layout = streamed.features.layout(1)
    last = layout.order(torch.Generator().manual_seed(config.seed)).blocks[-1][0]  # fit's first draw
    path = tmp_path / f"shard-{last:05d}.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the features: same size, valid header, other checksum
    path.write_bytes(bytes(data))
    head, seen = _head(), []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with pytest.raises(ValueError, match=f"shard-{last:05d}.safetensors fails its checksum") as info:
        _fit(streamed, config, blocks=layout, head=head)
    assert "once no process uses it" in str(info.value)
    assert_safe_advice(str(info.value))
    used = torch.cat(seen)
    assert len(used) >= 40  # mid-epoch: the six other shards (42 or 48 rows) were trained on first
    start = 8 * last
    corrupted_rows = good.features[0, start : start + 8]
    assert not (used[:, None] == corrupted_rows[None]).flatten(2).all(2).any()  # none of its rows reached a step


@pytest.mark.parametrize("damage, expected", [(_damage_truncate, "truncated"), (Path.unlink, "missing")])
def test_memory_mapping_refuses_a_truncated_or_missing_shard_at_once(tmp_path: Path, damage, expected: str) -> None:
    extract(make_dataset(), tmp_path)
    damage(tmp_path / "shard-00001.safetensors")
    with pytest.raises(ValueError, match=f"shard-00001.*{expected}"):
        FeatureCache.load(tmp_path, KEY, mmap=True)


def test_mmap_none_streams_only_a_cache_above_the_memory_budget(tmp_path: Path) -> None:
    extract(make_dataset(), tmp_path)
    stored = sum(p.stat().st_size for p in tmp_path.glob("shard-*"))
    above = FeatureCache.load(tmp_path, KEY, mmap=None, memory_budget=stored - 1)
    within = FeatureCache.load(tmp_path, KEY, mmap=None, memory_budget=stored)
    assert isinstance(above.features, ShardedFeatures) and above.features.stored_bytes == stored
    assert isinstance(within.features, torch.Tensor)
    assert isinstance(extract(make_dataset(), tmp_path, mmap=True).features, ShardedFeatures)
    with pytest.raises(ValueError, match="mmap=True needs path"):
        extract(make_dataset(), None, mmap=True)
    with pytest.raises(ValueError, match="memory_budget=0"):
        FeatureCache.load(tmp_path, KEY, mmap=None, memory_budget=0)


# --- several caches from one pass (FeatureCache.extract_many) ---------------------------------------------------

MAP_KEY = dataclasses.replace(KEY, layer="relu")  # the (B, 8, 14, 14) map before the pooling


class TwoOutputs(nn.Module):
    """The test backbone's map after the ReLU and its pooled output from one forward: ``{"map", "pooled"}``."""

    def __init__(self, names: tuple[str, ...] = ("map", "pooled")) -> None:
        super().__init__()
        self.backbone, self.names = make_backbone(), names

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        relu = self.backbone[:3](x)
        outputs = {"map": relu, "pooled": self.backbone[3](relu)}
        return {name: outputs[name] for name in self.names}


class Builder:
    """``backbone_for`` of extract_many, recording the names it is asked for and the rows its module runs."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []
        self.rows = 0

    def __call__(self, names: tuple[str, ...]) -> nn.Module:
        self.asked.append(names)
        module = TwoOutputs(names)
        module.register_forward_pre_hook(lambda m, args: setattr(self, "rows", self.rows + args[0].shape[0]))
        return module


def extract_two(dataset: Dataset, root: Path | None, builder: Builder | None = None, **kwargs) -> dict:
    options = dict(batch_size=BATCH, shard_size=SHARD, progress=False) | kwargs
    targets = {
        "map": (MAP_KEY, None if root is None else root / "map"),
        "pooled": (KEY, None if root is None else root / "pooled"),
    }
    return FeatureCache.extract_many(builder or Builder(), dataset, targets, **options)


def single(dataset: Dataset, key: CacheKey, path: Path | None, **kwargs) -> FeatureCache:
    """The cache of one output alone, extracted by FeatureCache.extract (the map: the first three modules)."""
    backbone = make_backbone() if key == KEY else make_backbone()[:3]
    options = dict(batch_size=BATCH, shard_size=SHARD, progress=False) | kwargs
    return FeatureCache.extract(backbone, dataset, key, path=path, **options)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*"))}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_pass_caches_equal_single_extractions_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    dataset, builder = make_dataset(), Builder()
    both = extract_two(dataset, tmp_path / "both", builder, dtype=dtype)
    assert builder.asked == [("map", "pooled")] and builder.rows == N  # one pass: every row through once
    in_memory = extract_two(dataset, None, dtype=dtype)
    for name, key in (("map", MAP_KEY), ("pooled", KEY)):
        alone = single(dataset, key, tmp_path / "alone" / name, dtype=dtype)
        for cache in (both[name], in_memory[name]):
            assert cache.dtype == alone.dtype == dtype and cache.key == key
            assert torch.equal(cache.features, alone.features) and torch.equal(cache.labels, alone.labels)
        assert shard_bytes(tmp_path / "both" / name) == shard_bytes(tmp_path / "alone" / name)
        assert both[name].batches_run == 7 and both[name].rows_reused == 0
    assert both["map"].feature_shape == (8, 14, 14) and both["pooled"].feature_shape == (8, 2, 2)


def test_stored_targets_are_loaded_and_no_backbone_runs_when_all_are(tmp_path: Path) -> None:
    dataset = make_dataset()
    single(dataset, KEY, tmp_path / "pooled")
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pooled").iterdir()}
    builder = Builder()
    caches = extract_two(dataset, tmp_path, builder)
    assert builder.asked == [("map",)] and builder.rows == N  # the pooled cache is not extracted again
    assert caches["pooled"].reused and caches["pooled"].batches_run == 0 and caches["map"].batches_run == 7
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pooled").iterdir()} == kept
    again = Builder()
    loaded = extract_two(dataset, tmp_path, again)
    assert again.asked == [] and again.rows == 0 and all(cache.reused for cache in loaded.values())
    assert torch.equal(loaded["map"].features, caches["map"].features)


def test_each_target_resumes_from_its_own_row_and_shard_size(tmp_path: Path) -> None:
    """The pooled cache was interrupted at row 20 with shards of 10; the map cache is new. One pass computes
    every row once; the pooled cache gets shards 20..36, 36..50 (16 each, from where it stopped), the map
    cache 0..16, 16..32, ...; both equal uninterrupted extractions."""
    dataset = FailOnce(make_dataset(), fail_at=25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        single(dataset, KEY, tmp_path / "pooled", shard_size=10)
    dataset.armed = False
    builder = Builder()
    caches = extract_two(dataset, tmp_path, builder)
    assert builder.asked == [("map", "pooled")] and builder.rows == N
    ranges = {
        name: [(s["start"], s["stop"]) for s in json.loads((tmp_path / name / MANIFEST_NAME).read_text())["shards"]]
        for name in ("map", "pooled")
    }
    assert ranges == {
        "map": [(0, 16), (16, 32), (32, 48), (48, 50)],
        "pooled": [(0, 10), (10, 20), (20, 36), (36, 50)],
    }
    assert caches["pooled"].rows_reused == 20 and caches["map"].rows_reused == 0
    for name, key in (("map", MAP_KEY), ("pooled", KEY)):
        alone = single(make_dataset(), key, None)
        assert torch.equal(caches[name].features, alone.features) and torch.equal(caches[name].labels, alone.labels)


@pytest.mark.parametrize(
    "targets, match",
    [
        ({}, "non-empty mapping"),
        ({"a": (KEY, "same"), "b": (MAP_KEY, "same")}, "share a cache directory"),
        ({"a": ("resnet50", None)}, "key must be a CacheKey"),
        ({"a": KEY}, "name \\(str\\) to \\(CacheKey, path or None\\)"),
    ],
)
def test_bad_targets_refused(tmp_path: Path, targets: dict, match: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises((TypeError, ValueError), match=match):
        FeatureCache.extract_many(Builder(), make_dataset(), targets, progress=False)


def test_a_backbone_without_an_output_it_was_asked_for_is_refused() -> None:
    targets = {"map": (MAP_KEY, None), "pooled": (KEY, None)}
    with pytest.raises(ValueError, match=r"returned the outputs \['map'\] but not \['pooled'\]"):
        FeatureCache.extract_many(lambda names: TwoOutputs(("map",)), make_dataset(), targets, progress=False)
    with pytest.raises(TypeError, match="must return a mapping of the outputs"):
        FeatureCache.extract_many(lambda names: make_backbone(), make_dataset(), targets, progress=False)
