"""hookmix under torch.distributed: two gloo processes on the CPU (torch.multiprocessing and torchrun).

Among the bugs caught here: a failure on one rank not shared where the ranks meet (the other rank then waits in,
or dies inside, the next collective), the wrong rank named, a bug reported as a user's mistake, or the ranks out
of step after a failure -> ``test_a_step_that_fails_on_one_rank_raises_its_error_there_and_rank_failed_elsewhere``.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset

from hookmix import CacheKey, FeatureCache, HookMixer
from hookmix.core.errors import UsageError
from hookmix.headonly.distributed import extract_sharded, gather_or_fail, rank_seed, unwrap
from hookmix.headonly.training import FitConfig, FitResult, fit
from hookmix.mixing.settings import MixSettings
from tests.conftest import expected_mix, recover_mix

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
C = 3
STEPS = 2
KEY = CacheKey(model="test:conv", layer="2", input_size=(3, 6, 6), transform="none", dataset="synthetic")


def mlp() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, C))


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(5, 6, generator=g), torch.randint(0, C, (5,), generator=g)


def backbone() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))


def images() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(13, 3, 6, 6, generator=g), torch.arange(13) % C)


def run_ranks(worker: Callable[[int, str], None], tmp_path: Path) -> None:
    """Run ``worker(rank, tmp)`` in WORLD processes joined in one gloo group.

    Forked, not spawned: a spawned child re-imports torch, timm and hookmix (~10 s on 2 busy cores); the
    children set one intra-op thread before any torch op, which keeps fork safe.
    """
    mp.start_processes(_join_group, args=(worker, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")


def _join_group(rank: int, worker: Callable[[int, str], None], tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        worker(rank, tmp)
    finally:
        dist.destroy_process_group()


def _ddp_train(rank: int, tmp: str) -> None:
    model = mlp()
    seen: dict[str, torch.Tensor] = {}
    model[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    model[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
    ddp = DistributedDataParallel(model)
    mixer = HookMixer(ddp, "1", alpha=0.4, seed=rank_seed(0))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    steps = []
    for index in range(STEPS):
        x, y = rank_batch(rank, index)
        step = mixer.plan(y)
        loss = step.loss(nn.CrossEntropyLoss(), ddp(x))
        optimizer.zero_grad()
        loss.backward()
        steps.append(
            {
                "lam": step.lam,
                "raw": seen["raw"],
                "mixed": seen["mixed"],
                "grads": [p.grad.clone() for p in model.parameters()],
            }
        )
        optimizer.step()
    torch.save({"steps": steps, "params": [p.detach() for p in model.parameters()]}, f"{tmp}/rank{rank}.pt")


class CrashAt(Dataset):
    """``images()`` that raises at index ``at``: a rank that dies in the middle of its rows. It leaves the file
    ``marker`` first, since which rank's error spawn reports is a race (the other rank's barrier fails too)."""

    def __init__(self, at: int, marker: str) -> None:
        self.base, self.at, self.marker = images(), at, marker

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.at:
            Path(self.marker).write_text(f"simulated crash at example {index}")
            raise RuntimeError(f"simulated crash at example {index}")
        return self.base[index]


def _extract(rank: int, tmp: str, cache_dir: str | None = None, dataset: Dataset | None = None) -> None:
    cache = extract_sharded(
        backbone(),
        images() if dataset is None else dataset,
        KEY,
        path=cache_dir or f"{tmp}/cache",
        dtype=torch.float32,
        batch_size=2,
        shard_size=3,
        progress=False,
    )
    torch.save({"features": cache.features, "labels": cache.labels}, f"{tmp}/extract{rank}.pt")


def _extract_rank1_crashes(rank: int, tmp: str) -> None:
    _extract(rank, tmp, dataset=CrashAt(10, f"{tmp}/crashed") if rank == 1 else None)  # rank 1: shards 1 and 3


def _extract_again(rank: int, tmp: str) -> None:
    _extract(rank, tmp, cache_dir=f"{Path(tmp).parent}/cache")


def _fail_on_rank_1(rank: int, tmp: str) -> None:
    """``gather_or_fail`` three times: every rank succeeds, then rank 1's step raises a user's mistake, then a bug."""
    outcomes: dict[str, Any] = {"ok": gather_or_fail(lambda: rank * 10)}
    for name, error in (("usage", UsageError("give --x 1.")), ("bug", RuntimeError("a bug"))):

        def step(error: Exception = error) -> None:
            if rank == 1:
                raise error

        try:
            gather_or_fail(step)
        except Exception as exc:
            outcomes[name] = [type(exc).__name__, str(exc), getattr(exc, "usage", None)]
    Path(f"{tmp}/outcome{rank}.json").write_text(json.dumps(outcomes))


def test_a_step_that_fails_on_one_rank_raises_its_error_there_and_rank_failed_elsewhere(tmp_path: Path) -> None:
    run_ranks(_fail_on_rank_1, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"outcome{rank}.json").read_text()) for rank in range(WORLD))
    assert rank0["ok"] == rank1["ok"] == [0, 10]  # every rank's result, by rank
    stopped = "rank 1 of 2 stopped with {} (its message is above), so rank 0 stopped too."
    assert rank0["usage"] == ["RankFailed", stopped.format("a usage error"), True]
    assert rank0["bug"] == ["RankFailed", stopped.format("an error"), False]  # the ranks still meet after a failure
    assert rank1["usage"] == ["UsageError", "give --x 1.", None] and rank1["bug"] == ["RuntimeError", "a bug", None]


def test_ddp_ranks_mix_their_own_plans_and_average_the_mixed_gradients(tmp_path: Path) -> None:
    run_ranks(_ddp_train, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # the same training in one process, from the formula: each rank's λ and partners recovered from its
    # activations, its mixed loss written out, the ranks' gradients averaged by hand
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for index in range(STEPS):
        per_rank = []
        for rank in range(WORLD):
            x, y = rank_batch(rank, index)
            recorded = ranks[rank]["steps"][index]
            lam, partner, residual = recover_mix(recorded["raw"], recorded["mixed"])
            assert residual.max() < 1e-5 and (lam < 1).all()
            torch.testing.assert_close(lam, recorded["lam"], rtol=1e-4, atol=1e-5)
            model.zero_grad()
            out = model[2](expected_mix(model[:2](x), lam, partner))
            (lam[0] * F.cross_entropy(out, y) + (1 - lam[0]) * F.cross_entropy(out, y[partner])).backward()
            per_rank.append([p.grad.clone() for p in model.parameters()])
        mean_grads = [torch.stack(grads).mean(0) for grads in zip(*per_rank)]
        for rank in range(WORLD):  # DDP averaged the ranks' mixed gradients
            for got, expected in zip(ranks[rank]["steps"][index]["grads"], mean_grads):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        for param, grad in zip(model.parameters(), mean_grads):
            param.grad = grad
        optimizer.step()
    assert not torch.equal(ranks[0]["steps"][0]["lam"], ranks[1]["steps"][0]["lam"])
    for rank in range(WORLD):
        for got, expected in zip(ranks[rank]["params"], model.parameters()):
            torch.testing.assert_close(got, expected.detach())


def shard_list(directory: Path) -> list[dict]:
    return json.loads((directory / "manifest.json").read_text())["shards"]


def test_sharded_extraction_equals_one_process_and_is_one_standard_cache(tmp_path: Path) -> None:
    run_ranks(_extract, tmp_path)
    single = FeatureCache.extract(
        backbone(), images(), KEY, path=tmp_path / "single", dtype=torch.float32, batch_size=2, shard_size=3
    )
    stored = FeatureCache.load(tmp_path / "cache", KEY)
    for rank in range(WORLD):  # every rank returns the whole merged cache, the one stored on disk
        result = torch.load(tmp_path / f"extract{rank}.pt")
        assert torch.equal(result["features"], stored.features) and torch.equal(result["labels"], stored.labels)
    assert torch.equal(stored.features, single.features) and torch.equal(stored.labels, single.labels)
    # the shards one process writes (rows 0-2, 3-5, ..., 12: rank 0 wrote shards 0, 2, 4, rank 1 shards 1, 3),
    # byte for byte; no entry files remain
    assert shard_list(tmp_path / "cache") == shard_list(tmp_path / "single")
    assert [(s["start"], s["stop"]) for s in shard_list(tmp_path / "cache")] == [
        (0, 3), (3, 6), (6, 9), (9, 12), (12, 13)
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")) == [".writer.lock"]
    again = extract_sharded(backbone(), images(), KEY, path=tmp_path / "cache", dtype=torch.float32, progress=False)
    assert again.batches_run == 0 and torch.equal(again.features, stored.features)


def test_a_rank_writes_its_shards_itself_and_a_crashed_extraction_resumes(tmp_path: Path) -> None:
    with pytest.raises(mp.ProcessRaisedException):  # rank 1's crash, or rank 0's barrier failing after it
        run_ranks(_extract_rank1_crashes, tmp_path)
    assert (tmp_path / "crashed").read_text() == "simulated crash at example 10"
    cache = tmp_path / "cache"
    # rank 1's shard 1 (rows 3-5) is on disk under its final name with its entry although rank 1 never reached a
    # barrier (no rank but rank 1 held those rows); shard 3 (rows 9-11, where it died) is not; no manifest
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [
        ".shard-00000.json",
        ".shard-00001.json",
        ".shard-00002.json",
        ".shard-00004.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
        "shard-00004.safetensors",
    ]
    with pytest.raises(ValueError, match="manifest.json is missing"):
        FeatureCache.load(cache, KEY)  # never a cache that looks complete
    shard2 = cache / "shard-00002.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:-8])  # damaged since: its sha256 no longer matches, so it is redone
    FeatureCache.extract(
        backbone(), images(), KEY, path=tmp_path / "single", dtype=torch.float32, batch_size=2, shard_size=3
    )
    kept = (cache / "shard-00001.safetensors").stat().st_mtime_ns
    (tmp_path / "again").mkdir()  # a fresh rendezvous file: the killed group left its own behind
    run_ranks(_extract_again, tmp_path / "again")
    assert shard_list(cache) == shard_list(tmp_path / "single")
    assert (cache / "shard-00001.safetensors").stat().st_mtime_ns == kept  # verified and kept, not redone
    assert not list(cache.glob(".shard-*"))


def _extract_into(url: str, crash: bool, rank: int, tmp: str) -> None:
    """``_extract`` into ``url``; with ``crash`` rank 1 dies at example 10 (after its shard 1, in shard 3)."""
    _extract(rank, tmp, cache_dir=url, dataset=CrashAt(10, f"{tmp}/crashed") if crash and rank == 1 else None)


def test_two_ranks_extract_into_s3_the_bytes_one_process_writes_and_redo_only_missing_or_damaged_shards(
    tmp_path: Path, s3_bucket: str
) -> None:
    from hookmix.headonly.store import RemoteStore, open_store

    url = f"s3://{s3_bucket}/ranks"
    store = open_store(url)
    assert isinstance(store, RemoteStore)

    def objects(prefix: str) -> dict[str, bytes]:
        return {p.rsplit("/", 1)[-1]: store.fs.cat_file(p) for p in store.fs.find(f"{s3_bucket}/{prefix}")}

    with pytest.raises(mp.ProcessRaisedException):  # rank 1's crash, or rank 0's barrier failing after it
        run_ranks(functools.partial(_extract_into, url, True), tmp_path)
    # each rank PUT its own shards and entries (rank 1's shard 1 although it never reached a barrier); no manifest
    assert sorted(objects("ranks")) == [
        *(f".shard-0000{i}.json.partial" for i in (0, 1, 2, 4)),
        *(f"shard-0000{i}.safetensors" for i in (0, 1, 2, 4)),
    ]
    with pytest.raises(ValueError, match="manifest.json is missing"):
        FeatureCache.load(url, KEY)  # never a cache that looks complete
    for index in (0, 1, 4):  # marked in the store: a shard put again loses its user metadata
        store.fs.setxattr(f"{store._root}/shard-0000{index}.safetensors", kept="yes")
    shard2 = f"{store._root}/shard-00002.safetensors"
    store.fs.pipe_file(shard2, store.fs.cat_file(shard2)[:-8])  # truncated since: redone, not refused
    (tmp_path / "again").mkdir()  # a fresh rendezvous file: the crashed group left its own behind
    run_ranks(functools.partial(_extract_into, url, False), tmp_path / "again")

    options = dict(dtype=torch.float32, batch_size=2, shard_size=3, progress=False)
    FeatureCache.extract(backbone(), images(), KEY, path=f"s3://{s3_bucket}/one", **options)
    FeatureCache.extract(backbone(), images(), KEY, path=tmp_path / "local", **options)
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir() if not p.name.startswith(".")}
    caches = [objects("ranks"), objects("one"), local]  # no entry, progress record or temp file left in any
    manifests = [{**json.loads(files.pop("manifest.json")), "created": None} for files in caches]
    assert caches[0] == caches[1] == caches[2] and manifests[0] == manifests[1] == manifests[2]  # byte for byte
    kept = [i for i in range(5) if store.fs.metadata(f"{store._root}/shard-0000{i}.safetensors").get("kept")]
    assert kept == [0, 1, 4]  # verified and kept; 2 (truncated) and 3 (never written) were extracted again


FEATURES, CLASSES = 6, 3


def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g), torch.arange(n) % CLASSES


def head() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def _fit(model: nn.Module, ddp: bool, mix: bool, **options: Any) -> FitResult:
    """45 training rows in global batches of 8 (the last one 5 rows: split 2 + 3 under DDP), 2 epochs."""
    config = FitConfig(epochs=2, batch_size=8, lr=0.05, mix=mix, mixing=MixSettings(alpha=0.4))
    return fit(
        model,
        "input",
        *features(45, 0),
        *features(9, 1),
        config,
        num_classes=CLASSES,
        ddp=ddp,
        progress=False,
        **options,
    )


def _ddp_fit(rank: int, tmp: str, mix: bool = False, checkpoint: bool = False) -> None:
    model = head()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    raw: list[torch.Tensor] = []
    recording = lambda: model.training and torch.is_grad_enabled()  # noqa: E731 - training steps only
    model.register_forward_pre_hook(lambda m, a: raw.append(a[0].detach().clone()) if recording() else None)
    model[0].register_forward_pre_hook(
        lambda m, a: seen.append((raw[-1], a[0].detach().clone())) if recording() else None
    )  # registered before fit's mixer: the first hook sees the rows, the second the mixed rows
    result = _fit(model, True, mix, checkpoint_dir=f"{tmp}/run" if checkpoint else None)
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "seen": seen, "history": result.history},
        f"{tmp}/fit{rank}.pt",
    )


def _ddp_fit_mixed(rank: int, tmp: str) -> None:
    _ddp_fit(rank, tmp, mix=True, checkpoint=True)


def test_ddp_fit_without_mixing_equals_one_process_of_the_global_batch(tmp_path: Path) -> None:
    run_ranks(_ddp_fit, tmp_path)
    reference = head()
    expected = _fit(reference, False, False)
    ranks = [torch.load(tmp_path / f"fit{rank}.pt") for rank in range(WORLD)]
    for rank in ranks:  # both ranks hold the head of one process trained on batches of 8 (max diff seen: 3e-8)
        for got, want in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        assert [r["epoch"] for r in rank["history"]] == [1, 2]  # rank 0's validation, sent to rank 1
        for got, want in zip(rank["history"], expected.history):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # each rank trained on 4 rows of the full batches and 2 / 3 of the last one: 6 steps per epoch
    assert [len(x) for x, _ in ranks[0]["seen"][:6]] == [4, 4, 4, 4, 4, 2]
    assert [len(x) for x, _ in ranks[1]["seen"][:6]] == [4, 4, 4, 4, 4, 3]


def test_each_ddp_rank_mixes_the_plans_of_its_rank_seed(tmp_path: Path) -> None:
    run_ranks(_ddp_fit_mixed, tmp_path)
    for rank in range(WORLD):
        # the plans of a HookMixer seeded seed + rank, drawn for this rank's batches ...
        reference = head()
        mixer = HookMixer(
            reference, "input", settings=MixSettings(alpha=0.4), num_classes=CLASSES, seed=rank_seed(0, rank=rank)
        )
        seen = torch.load(tmp_path / f"fit{rank}.pt")["seen"]
        assert len(seen) == 12
        for x, mixed in seen:
            plan = mixer.plan(torch.zeros(len(x), dtype=torch.int64))
            reference(x)  # a forward uses the plan up
            lam, partner, residual = recover_mix(x, mixed)  # ... recovered from the rows the head saw
            assert residual.max() < 1e-4
            torch.testing.assert_close(lam.float(), plan.lam, rtol=1e-4, atol=1e-5)
            assert torch.equal(partner, plan.perm)
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert state["world"] == WORLD and state["epoch"] == 2


def test_save_writes_a_loadable_cache_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cache = FeatureCache.extract(backbone(), images(), KEY, dtype=torch.float32, batch_size=4, progress=False)
    saved = cache.save(tmp_path / "c", shard_size=6)
    loaded = FeatureCache.load(tmp_path / "c", KEY)
    assert saved.path == tmp_path / "c" and torch.equal(loaded.features, cache.features)
    assert torch.equal(loaded.labels, cache.labels)
    with pytest.raises(ValueError, match="already holds a feature cache"):
        cache.save(tmp_path / "c")
    with pytest.raises(ValueError, match="cannot be stored"):
        FeatureCache(cache.features.double(), cache.labels, KEY).save(tmp_path / "d")


def test_rank_seed() -> None:
    assert [rank_seed(7, rank=r) for r in range(3)] == [7, 8, 9]
    assert [rank_seed(7, rank=r, shared=True) for r in range(3)] == [7, 7, 7]
    assert rank_seed(7) == 7  # no process group: rank 0
    with pytest.raises(ValueError, match="rank=-1"):
        rank_seed(7, rank=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        rank_seed(1.5)


def test_unwrap_looks_through_data_parallel_and_compile() -> None:
    model = mlp()
    assert unwrap(nn.DataParallel(torch.compile(model))) is model
    assert unwrap(model) is model


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    script = ROOT / "examples" / "ddp_torchrun.py"
    assert (
        "--layer"
        in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        script,
        "--epochs",
        "1",
        "--samples",
        "64",
        "--cache",
        tmp_path / "cache",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert "val accuracy" in result.stdout
    assert "cached features (1, 64, 64, 2, 2)" in result.stdout and (tmp_path / "cache" / "manifest.json").exists()
