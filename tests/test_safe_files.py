"""Safe files: caches, checkpoints and weights load without unpickling code; a file smuggling pickled
code is refused and its code never runs; writes are atomic, so a process killed mid-write (SIGXFSZ from
the kernel, SIGKILL) or a failed write leaves the previous file intact, and a crash between the two
checkpoint files still resumes exactly.

An audit hook (``sys.addaudithook``; inert unless a test arms it) sees every ``pickle.find_class`` — the
step by which unpickling reaches code — and can fail an ``os.replace`` to simulate a crash at that point.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from hookmix import CacheKey, FeatureCache, FitConfig, fit
from hookmix.app.cli import main
from hookmix.core.files import atomic_write
from hookmix.graph.models import create_model
from hookmix.headonly.cache import MANIFEST_NAME
from hookmix.headonly.training import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS
from tests.conftest import write_folder

IO_MODULE = Path(__file__).resolve().parent.parent / "hookmix" / "core" / "files.py"
_AUDIT: list[Callable[[str, tuple], None]] = []


def _audit(event: str, args: tuple) -> None:
    for action in _AUDIT:
        action(event, args)


sys.addaudithook(_audit)  # permanent by design of sys.addaudithook; does nothing while _AUDIT is empty


@contextmanager
def auditing(action: Callable[[str, tuple], None]) -> Iterator[None]:
    _AUDIT.append(action)
    try:
        yield
    finally:
        _AUDIT.remove(action)


@contextmanager
def unpickled_globals() -> Iterator[list[str]]:
    """Collect the globals any unpickler looks up while the block runs."""
    found: list[str] = []

    def record(event: str, args: tuple) -> None:
        if event == "pickle.find_class":
            found.append(f"{args[0]}.{args[1]}")

    with auditing(record):
        yield found


class SimulatedCrash(RuntimeError):
    pass


@contextmanager
def crash_before_replacing(name: str, occurrence: int) -> Iterator[None]:
    """Fail the ``occurrence``-th ``os.replace`` onto a file called ``name``: the process 'dies' right there."""
    seen = []

    def fail(event: str, args: tuple) -> None:
        if event == "os.rename" and Path(os.fsdecode(args[1])).name == name:
            seen.append(1)
            if len(seen) == occurrence:
                raise SimulatedCrash(f"crash before replacing {name} ({occurrence})")

    with auditing(fail):
        yield


class Payload:
    """Unpickling this opens ``marker`` for writing: the file existing afterwards proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def smuggle(path: Path, style: str, marker: Path) -> bytes:
    """Write a pickle that runs code (``style``: a bare pickle, or torch.save's zip) to ``path``."""
    if style == "pickle":
        path.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    else:
        torch.save({"weight": Payload(marker)}, path)
    return path.read_bytes()


STYLES = ("pickle", "torch.save")
KEY = CacheKey(model="test:pool", layer="pool", input_size=(3, 4, 4), transform="none")


def make_cache(directory: Path) -> Path:
    data = TensorDataset(torch.randn(12, 3, 4, 4), torch.arange(12) % 3)
    FeatureCache.extract(nn.AdaptiveAvgPool2d(1), data, KEY, path=directory, shard_size=4, progress=False)
    return directory


CONFIG = FitConfig(epochs=3, batch_size=4, seed=2)


def run_fit(directory: Path | None, resume: bool = False) -> tuple[list, list, dict[str, torch.Tensor]]:
    """(history, λs, weights) of ``fit`` on 12 synthetic examples with a fresh, seeded head."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.arange(12) % 3
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    result = fit(
        head,
        "input",
        x,
        y,
        x[:6],
        y[:6],
        CONFIG,
        num_classes=3,
        checkpoint_dir=directory,
        resume=resume,
        progress=False,
    )
    return result.history, result.lams, {k: v.clone() for k, v in head.state_dict().items()}


def test_caches_checkpoints_and_weights_load_without_unpickling(tmp_path: Path) -> None:
    with unpickled_globals() as control:
        pickle.loads(pickle.dumps(Fraction(1, 3)))
    assert control == ["fractions.Fraction"]  # the spy sees unpickling when it happens
    cache_dir = make_cache(tmp_path / "cache")
    run_fit(tmp_path / "run")
    model = create_model("resnet18", seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    with unpickled_globals() as found:
        cache = FeatureCache.load(cache_dir, KEY)
        history = run_fit(tmp_path / "run", resume=True)[0]
        loaded = create_model("resnet18", weights=tmp_path / "w.safetensors")
    assert found == []
    assert len(cache) == 12 and len(history) == CONFIG.epochs
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


@pytest.mark.parametrize("style", STYLES)
def test_cache_shard_smuggling_code_is_refused_unexecuted(tmp_path: Path, style: str) -> None:
    cache_dir, marker = make_cache(tmp_path / "cache"), tmp_path / "executed"
    payload = smuggle(cache_dir / "shard-00001.safetensors", style, marker)
    manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
    manifest["shards"][1].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())  # a careful forger
    (cache_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-00001.safetensors is not a valid safetensors file"):
        FeatureCache.load(cache_dir, KEY)
    manifest["shards"] = manifest["shards"][:2]  # an interrupted extraction: resuming verifies the shards kept
    (cache_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        FeatureCache.extract(
            nn.AdaptiveAvgPool2d(1),
            TensorDataset(torch.randn(12, 3, 4, 4), torch.arange(12) % 3),
            KEY,
            path=cache_dir,
            shard_size=4,
            progress=False,
        )
    assert not marker.exists()


@pytest.mark.parametrize("style", STYLES)
def test_checkpoint_smuggling_code_is_refused_unexecuted(tmp_path: Path, style: str) -> None:
    run_fit(tmp_path)
    marker = tmp_path / "executed"
    smuggle(tmp_path / CHECKPOINT_STATE, style, marker)
    assert len(run_fit(tmp_path, resume=True)[0]) == CONFIG.epochs  # the readable copy is never read back
    smuggle(tmp_path / CHECKPOINT_WEIGHTS, style, marker)
    with pytest.raises(ValueError, match=f"cannot read the checkpoint in {tmp_path}.*resume=False"):
        run_fit(tmp_path, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_smuggling_code_is_refused_by_the_cli(
    tmp_path: Path, style: str, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, weights = tmp_path / "executed", tmp_path / f"evil{suffix}"
    smuggle(weights, style, marker)
    with pytest.raises(SystemExit) as info:
        main(
            [
                "finetune",
                "--data",
                str(write_folder(tmp_path / "imgs")),
                "--model",
                "resnet18",
                "--layer",
                "layer4",
                "--weights",
                str(weights),
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"hookmix: error: cannot load weights from {weights}") and "weights_only=False" not in err
    assert not marker.exists()


def test_a_crash_between_the_two_checkpoint_files_still_resumes_exactly(tmp_path: Path) -> None:
    full = run_fit(None)
    with crash_before_replacing(CHECKPOINT_STATE, occurrence=2), pytest.raises(SimulatedCrash):
        run_fit(tmp_path)  # epoch 2: its tensors were written, the crash hits before its state file
    assert json.loads((tmp_path / CHECKPOINT_STATE).read_text())["epoch"] == 1
    history, lams, weights = run_fit(tmp_path, resume=True)
    assert history == full[0] and lams == full[1]
    assert all(torch.equal(weights[k], full[2][k]) for k in weights)


def test_a_failed_replace_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    atomic_write(target, b"old")
    with crash_before_replacing(target.name, occurrence=1), pytest.raises(SimulatedCrash):
        atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


# A child interpreter that loads hookmix/core/files.py on its own (no torch import: it starts in milliseconds).
CHILD = """
import importlib.util, os, resource, signal, sys, threading
from pathlib import Path
spec = importlib.util.spec_from_file_location("hookmix_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
target, how = Path(sys.argv[2]), sys.argv[3]
size = 8 << 20
if how == "kernel":  # the kernel kills the process (SIGXFSZ) when the write crosses 1 MiB
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
elif how == "failure":  # Python ignores SIGXFSZ: the same write fails with OSError (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
else:  # SIGKILL from a watcher thread once the temp file holds 1 MiB of a 256 MiB write
    size = 256 << 20
    def watch():
        while True:
            for temp in target.parent.glob(f".{target.name}.*.tmp"):
                if temp.stat().st_size >= 1 << 20:
                    os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()
try:
    io.atomic_write(target, b"n" * size)
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


@pytest.mark.parametrize("how, returncode", [("kernel", -signal.SIGXFSZ), ("sigkill", -signal.SIGKILL), ("failure", 0)])
def test_a_write_killed_or_failing_midway_leaves_the_old_file_intact(tmp_path: Path, how: str, returncode: int) -> None:
    target = tmp_path / "checkpoint.safetensors"
    old = os.urandom(4096)
    atomic_write(target, old)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(IO_MODULE), str(target), how], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == returncode, proc.stderr
    assert target.read_bytes() == old
    temps = list(tmp_path.glob(".checkpoint.safetensors.*.tmp"))
    if how == "failure":
        assert proc.stdout.split() == ["OSError", "27"] and temps == []  # EFBIG; the temp file was removed
    else:  # killed: a torn temp file (safe to delete) proves the kill landed in the middle of the write
        assert len(temps) == 1 and (1 << 20) <= temps[0].stat().st_size < 256 << 20


def test_written_files_get_the_usual_permissions_not_the_temp_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
