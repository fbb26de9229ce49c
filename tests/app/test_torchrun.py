"""``torchrun -m hookmix finetune``: two gloo ranks on the CPU, launched from the test as a user would.

Each launch costs several seconds (two interpreters import torch and hookmix), so four tests hold five launches;
the references run in this process (no torchrun). A rank is killed from the outside: the test finds it among
torchrun's children by its ``RANK`` and a marker in its environment (psutil), no hook in the library.

Bugs a maintainer could plausibly make here, and the test that catches each:
- DDP ranks training the same rows, or the global batch not split (``--batch-size`` per rank), or gradients
  not averaged: ``test_ddp_without_mixing_equals_one_process_and_resumes_after_a_rank_dies`` (the head differs
  from the one-process head of the same global batch);
- a resumed DDP run restarting its data order or a rank's plans, or a checkpoint written by every rank:
  the same test (killed after epoch 1, resumed: the uninterrupted head);
- the job training on every rank without DDP, a rank other than 0 writing or printing the report, or the
  auto rule choosing DDP on gloo: ``test_rank_0_trains_alone_on_cpus_and_a_rank_killed_mid_extraction_resumes``;
- a rank's death leaving a cache that looks complete (manifest written early), or the resumed extraction
  losing shards or keeping a damaged one (its entry trusted without hashing the shard): the same test (a shard
  with its entry is cut short before the resume; the cache and head equal the one-process run's);
- ranks that cannot write a cache in object storage (shards written through local paths, an interrupted run's
  object refused instead of replaced), or a rank that trains no head loading (downloading) the whole cache anyway:
  ``test_ranks_extract_into_s3_and_replace_what_an_interrupted_run_left`` (each shard GET once, in moto's log);
- a rank raising a user's mistake before the ranks meet again (its error not gathered), leaving the others to die
  in the collective with a "Connection closed by peer" traceback, or them printing its message again:
  ``test_a_usage_error_on_one_rank_is_one_line_on_each_rank`` (each rank's own stderr, via torchrun's --log-dir).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load, load_file

from hookmix.app.cli import main
from hookmix.headonly.store import RemoteStore, join, open_store
from tests.headonly.conftest import s3_bucket, s3_env, s3_server  # noqa: F401 - moto's S3 server, as fixtures

pytestmark = pytest.mark.slow

DIGITS = ["finetune", "--data", "digits", "--epochs", "3", "--batch-size", "16", "--quiet"]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "0"]
# fp16 features of shards of 2 rows against one batch of 16: the backbone's sums may round differently
# (a unit in the last place of a few features); heads trained on them stay within (measured max diff 1e-5)
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def launch(tmp_path: Path, *flags: str, cache: str | None = None, logs: Path | None = None) -> subprocess.Popen:
    """torchrun of ``hookmix finetune`` on the digits; with ``logs`` each rank's stdout and stderr go to its own
    files there (torchrun's ``--log-dir``, ``--redirects 3``: LOGS/*/attempt_0/RANK/stderr.log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOOKMIX_TEST_MARKER": str(tmp_path)}
    cache = cache or str(tmp_path / "cache")
    separate = ["--log-dir", str(logs), "--redirects", "3"] if logs is not None else []
    command = [*LAUNCH, *separate, "-m", "hookmix", *DIGITS, "--cache", cache, "--out", str(tmp_path / "out")]
    return subprocess.Popen([*command, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    return out


def rank_process(torchrun: subprocess.Popen, rank: int, marker: Path) -> psutil.Process:
    """The worker of ``rank`` among torchrun's children, waited for."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and torchrun.poll() is None:
        for child in psutil.Process(torchrun.pid).children(recursive=True):
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if env.get("RANK") == str(rank) and env.get("HOOKMIX_TEST_MARKER") == str(marker):
                return child
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started: {torchrun.communicate()[1][-2000:]}")


def kill_when(torchrun: subprocess.Popen, victim: psutil.Process, ready: "callable") -> None:
    """SIGKILL ``victim`` as soon as ``ready()``; torchrun then stops the other rank and fails."""
    deadline = time.monotonic() + 120
    while not ready():
        assert time.monotonic() < deadline and torchrun.poll() is None, torchrun.communicate()[1][-2000:]
        time.sleep(0.005)
    victim.kill()
    torchrun.communicate(timeout=120)
    assert torchrun.returncode != 0


def head(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "head.safetensors")


def assert_same_head(got: Path, want: Path) -> None:
    expected = head(want)
    for name, value in head(got).items():
        torch.testing.assert_close(value, expected[name], **TOLERANCE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, no torchrun: the run the ranks must reproduce (mixing off: DDP equals it exactly)."""
    where = tmp_path_factory.mktemp("one_process")
    assert main([*DIGITS, "--no-mix", "--cache", str(where / "cache"), "--out", str(where / "out")]) == 0
    return where


def test_ddp_without_mixing_equals_one_process_and_resumes_after_a_rank_dies(tmp_path: Path, reference: Path) -> None:
    torchrun = launch(tmp_path, "--no-mix", "--ddp", "on")
    checkpoint = tmp_path / "out" / "checkpoint.json"

    def after_epoch_1() -> bool:
        try:
            return json.loads(checkpoint.read_text())["epoch"] >= 1
        except (OSError, ValueError):
            return False

    victim = rank_process(torchrun, 1, tmp_path)
    os.kill(victim.pid, signal.SIGSTOP)  # rank 0 then waits at its next all-reduce: the run cannot finish first
    os.kill(victim.pid, signal.SIGCONT)
    kill_when(torchrun, victim, after_epoch_1)
    assert not (tmp_path / "out" / "run.json").exists()
    assert json.loads(checkpoint.read_text())["epoch"] < 3
    out = finish(launch(tmp_path, "--no-mix", "--ddp", "on", "--resume"))
    lines = out.splitlines()
    assert lines[0] == "rank 0 of 2 (gloo); the other ranks print only errors"
    assert "resuming at epoch" in out and "head training: DDP on all ranks (--ddp on: 8 rows per rank" in out
    assert out.count("val accuracy") == 1  # rank 1 printed nothing
    assert_same_head(tmp_path / "out", reference / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["distributed"] == {
        "world": 2,
        "backend": "gloo",
        "head_training": "ddp",
        "reason": "--ddp on: 8 rows per rank and step",
    }
    wanted = json.loads((reference / "out" / "metrics.json").read_text())
    assert metrics["final"]["val_accuracy"] == pytest.approx(wanted["final"]["val_accuracy"], abs=2e-3)


def test_rank_0_trains_alone_on_cpus_and_a_rank_killed_mid_extraction_resumes(tmp_path: Path, reference: Path) -> None:
    torchrun = launch(tmp_path, "--no-mix")
    victim = rank_process(torchrun, 1, tmp_path)
    kill_when(torchrun, victim, lambda: any((tmp_path / "cache").glob("*/.shard-*.json")))
    caches = sorted((tmp_path / "cache").iterdir())
    assert any(not (cache / "manifest.json").exists() for cache in caches)  # it died mid-extraction
    entry = sorted((tmp_path / "cache").glob("*/.shard-*.json"))[0]  # a shard written, with its entry ...
    shard = entry.parent / f"shard-{entry.name.split('-')[1].split('.')[0]}.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # ... cut short since (a disk fault, a copy): the resume redoes it
    out = finish(launch(tmp_path, "--no-mix", "--resume"))
    assert "head training: on rank 0 alone (--ddp auto: gloo ranks on CPUs; measured" in out
    assert out.count("val accuracy") == 1
    for part in ("train", "val"):  # the resumed cache holds the one-process features (within fp16 rounding)
        (got,) = (tmp_path / "cache").glob(f"{part}.*")
        (want,) = (reference / "cache").glob(f"{part}.*")
        assert not list(got.glob(".shard-*.json"))  # a killed write may leave a .tmp file: documented, harmless
        features = [torch.cat([load_file(s)["features"] for s in sorted(d.glob("shard-*"))], 1) for d in (got, want)]
        torch.testing.assert_close(features[0].float(), features[1].float(), rtol=1e-3, atol=1e-3)
    assert_same_head(tmp_path / "out", reference / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["distributed"]["head_training"] == "rank 0"


def features_of(root: Path | str, part: str) -> torch.Tensor:
    """The features ``(V, N, *F)`` of the ``part`` cache under a local or s3:// ``--cache``, read shard by shard
    from its manifest, after checking that no rank's entry is left beside them."""
    (directory,) = [name for name in open_store(root).names() if name.startswith(f"{part}.")]
    cache = open_store(join(root, directory))
    assert {name for name in cache.names() if not name.startswith("shard-")} <= {"manifest.json", ".writer.lock"}
    manifest = json.loads(cache.read("manifest.json"))
    return torch.cat([load(cache.read(shard["file"]))["features"] for shard in manifest["shards"]], 1)


def test_ranks_extract_into_s3_and_replace_what_an_interrupted_run_left(
    tmp_path: Path, reference: Path, request: pytest.FixtureRequest
) -> None:
    bucket = request.getfixturevalue("s3_bucket")  # the fixture imported from tests/headonly/conftest.py
    url = f"s3://{bucket}/cache"
    store = open_store(url)
    assert isinstance(store, RemoteStore)
    (train,) = [p.name for p in (reference / "cache").iterdir() if p.name.startswith("train.")]  # the same key
    store.fs.pipe_file(f"{store._root}/{train}/shard-00001.safetensors", b"left by an interrupted run")
    out = finish(launch(tmp_path, "--no-mix", cache=url))
    assert out.splitlines()[0] == "rank 0 of 2 (gloo); the other ranks print only errors"
    assert "head training: on rank 0 alone" in out and out.count("val accuracy") == 1
    # rank 1 trains nothing, so it downloads no shard: each shard was fetched once, by rank 0 (the server's log)
    fetched = Counter(request.getfixturevalue("s3_server").gets(f"/{bucket}/cache/"))
    listed = {f"/{path}" for path in store.fs.find(store._root) if "/shard-" in path}
    assert {path for path in fetched if "/shard-" in path} == listed and {fetched[path] for path in listed} == {1}
    for part in ("train", "val"):  # the one-process features (within fp16 rounding: other batches)
        got, want = features_of(url, part), features_of(reference / "cache", part)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-3)
    assert_same_head(tmp_path / "out", reference / "out")


def test_a_usage_error_on_one_rank_is_one_line_on_each_rank(tmp_path: Path, reference: Path) -> None:
    (train,) = [p for p in (reference / "cache").iterdir() if p.name.startswith("train.")]  # the same key
    entry = json.loads((train / "manifest.json").read_text())
    entry["key"]["transform"] += "-other"  # shard 0's entry left by a cache of another key: only rank 0 checks it
    entry["shards"][0]["stop"] = 2  # the ranks' layout: 100 rows in shards of 2
    (tmp_path / "cache" / train.name).mkdir(parents=True)
    (tmp_path / "cache" / train.name / ".shard-00000.json").write_text(json.dumps(entry))
    torchrun = launch(tmp_path, "--no-mix", logs=tmp_path / "logs")
    _, err = torchrun.communicate(timeout=240)
    assert torchrun.returncode != 0
    stderr = [(next((tmp_path / "logs").glob(f"*/attempt_0/{rank}/stderr.log"))).read_text() for rank in (0, 1)]
    assert (
        stderr[0].startswith("hookmix: error: the feature cache in ")
        and "transform='digits:k20:seed0-other'" in stderr[0]
    )
    want = "hookmix: error: rank 0 of 2 stopped with a usage error (its message is above), so rank 1 stopped too.\n"
    assert stderr[1] == want  # one line, no traceback of a collective whose peer left
    assert [text.count("\n") for text in stderr] == [1, 1] and "Traceback" not in "".join(stderr)
    codes = dict(re.findall(r"rank +: (\d) \(local_rank: \d\)\s+exitcode +: (-?\d+)", err))
    # torchrun stops the other workers (SIGTERM) once one has exited: whichever rank exits second may be stopped
    # after its line (seen both ways: rank 1, and in a CI run rank 0)
    assert set(codes) == {"0", "1"} and "2" in codes.values(), err[-2000:]
    assert set(codes.values()) <= {"2", str(-signal.SIGTERM)}, err[-2000:]
