"""Determinism: the same seed gives bitwise-identical plans, mixed activations and losses; a run saved
mid-way and continued in a NEW process is bitwise identical to the uninterrupted run — for a HookMixer
training loop (checkpoint through ``torch.save`` / ``torch.load(weights_only=True)``) and for
``hookmix.fit``'s own checkpoints, resumed after the first process was SIGKILLed in the middle of an epoch.

The three runs (uninterrupted, first part, continuation) each run in a fresh interpreter with one
intra-op thread, through :func:`run_worker`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hookmix import FitConfig, HookMixer, MixSettings, fit

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_AT = 12, 5
MIXED_LAYERS = ("bn", "block")
FIT_CONFIG = FitConfig(epochs=4, batch_size=8, lr=1e-2, seed=5, mixing=MixSettings(lam_mode="sample"))
FORWARDS_PER_EPOCH = 5 + 1  # 40 examples / 8 per batch, plus one validation forward


class Loop:
    """A HookMixer training loop (small CNN with BatchNorm, SGD with momentum) that records every step."""

    def __init__(self, seed: int = 123) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = nn.Sequential(
                OrderedDict(
                    stem=nn.Conv2d(3, 8, 3, padding=1),
                    bn=nn.BatchNorm2d(8),
                    act=nn.ReLU(),
                    block=nn.Conv2d(8, 8, 3, padding=1),
                    act2=nn.ReLU(),
                    pool=nn.AdaptiveAvgPool2d(1),
                    flat=nn.Flatten(),
                    fc=nn.Linear(8, 5),
                )
            )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.mixer = HookMixer(
            self.model, list(MIXED_LAYERS), lam_mode="sample", prob=0.8, exclude_classes=[4], num_classes=5, seed=seed
        )
        self.data = torch.Generator().manual_seed(7)
        self.seen: dict[str, torch.Tensor] = {}
        for name in MIXED_LAYERS:  # registered after the mixer's hooks, so they see the mixed outputs
            self.model.get_submodule(name).register_forward_hook(self._recorder(name))

    def _recorder(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.seen[name] = output.detach().clone()

        return hook

    def run(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Steps ``start..stop-1``; per step: λ, partners, drawn layer, both layers' outputs and the loss."""
        trace = {}
        for i in range(start, stop):
            x = torch.randn(6, 3, 8, 8, generator=self.data)
            y = torch.randint(0, 5, (6,), generator=self.data)
            step = self.mixer.plan(y)
            loss = step.loss(nn.CrossEntropyLoss(), self.model(x))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            layer = MIXED_LAYERS.index(step.layers[0]) if step.mixed else -1
            trace |= {
                f"{i}.lam": step.lam.clone(),
                f"{i}.perm": step.perm.clone(),
                f"{i}.layer": torch.tensor(layer),
                f"{i}.loss": loss.detach(),
            }
            trace |= {f"{i}.{name}": self.seen[name] for name in MIXED_LAYERS}
        return trace

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save(self, path: Path) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "mixer": self.mixer.state_dict(),
                "data": self.data.get_state(),
            },
            path,
        )

    def load(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)  # the mixer's state needs no unpickling of code
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.mixer.load_state_dict(state["mixer"])
        self.data.set_state(state["data"])


def fit_run(directory: Path | None, resume: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """``fit`` a small head on synthetic (8, 2, 2) features; returns its weights and {history, lams}."""
    g = torch.Generator().manual_seed(3)
    train_x, val_x = torch.randn(40, 8, 2, 2, generator=g), torch.randn(12, 8, 2, 2, generator=g)
    train_y, val_y = torch.arange(40) % 4, torch.arange(12) % 4
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    if directory is not None and not resume:
        calls = []

        def crash_in_epoch_3(module: nn.Module, args: tuple) -> None:
            calls.append(1)
            if len(calls) == 2 * FORWARDS_PER_EPOCH + 1:
                os.kill(os.getpid(), signal.SIGKILL)

        head.register_forward_pre_hook(crash_in_epoch_3)
    result = fit(
        head,
        "input",
        train_x,
        train_y,
        val_x,
        val_y,
        FIT_CONFIG,
        num_classes=4,
        checkpoint_dir=directory,
        resume=resume,
        progress=False,
    )
    return dict(head.state_dict()), {"history": result.history, "lams": result.lams}


def run_worker(mode: str, directory: str) -> None:
    """One process of the resume test: ``full`` (uninterrupted), ``first`` (save at SAVE_AT, then fit until
    SIGKILL in epoch 3) or ``resume`` (continue both from what ``first`` saved)."""
    torch.set_num_threads(1)
    out = Path(directory)
    rng = torch.get_rng_state()
    loop = Loop()
    if mode == "resume":
        loop.load(out / "loop.pt")
    start, stop = {"full": (0, STEPS), "first": (0, SAVE_AT), "resume": (SAVE_AT, STEPS)}[mode]
    trace = loop.run(start, stop)
    save_file({**trace, **{f"param.{k}": v for k, v in loop.params().items()}}, out / f"{mode}_loop.safetensors")
    (out / f"{mode}_rng_untouched").write_text(str(torch.equal(rng, torch.get_rng_state())))
    if mode == "first":
        loop.save(out / "loop.pt")
    weights, record = fit_run(None if mode == "full" else out / "fit", resume=mode == "resume")
    save_file(weights, out / f"{mode}_fit.safetensors")
    (out / f"{mode}_fit.json").write_text(json.dumps(record))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"not bitwise equal: {differ}"


def test_same_seed_gives_bitwise_identical_plans_activations_and_losses() -> None:
    rng = torch.get_rng_state()
    runs = [Loop(seed).run(0, STEPS) for seed in (123, 123, 124)]
    assert_bitwise_equal(runs[0], runs[1])
    assert any(runs[0][k].float().mean() != 1 for k in runs[0] if k.endswith(".lam"))  # steps really mixed
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0] if k.endswith((".lam", ".perm")))
    assert torch.equal(rng, torch.get_rng_state())  # the mixer never touched the global RNG


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run ``full`` and ``first`` in parallel fresh processes, then ``resume`` in a third."""
    directory = tmp_path_factory.mktemp("determinism")
    code = "import sys; from tests.test_determinism import run_worker; run_worker(sys.argv[1], sys.argv[2])"

    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", code, mode, str(directory)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )

    for batch in (("full", "first"), ("resume",)):
        procs = {mode: start(mode) for mode in batch}
        for mode, proc in procs.items():
            output = proc.communicate(timeout=300)[0]
            expected = -signal.SIGKILL if mode == "first" else 0
            assert proc.returncode == expected, f"{mode} exited {proc.returncode}:\n{output[-3000:]}"
        if batch[0] == "full":  # the killed process left the checkpoint of its last complete epoch
            assert json.loads((directory / "fit" / "checkpoint.json").read_text())["epoch"] == 2
    return directory


@pytest.mark.slow
def test_hookmixer_loop_saved_and_continued_in_a_new_process_is_bitwise_identical(processes: Path) -> None:
    full = load_file(processes / "full_loop.safetensors")
    first = load_file(processes / "first_loop.safetensors")
    resumed = load_file(processes / "resume_loop.safetensors")
    steps = {k for k in full if not k.startswith("param.")}
    early = {k for k in steps if int(k.split(".")[0]) < SAVE_AT}
    assert_bitwise_equal({k: full[k] for k in early}, {k: first[k] for k in early})  # two processes, same seed
    assert_bitwise_equal({k: full[k] for k in steps - early}, {k: v for k, v in resumed.items() if k in steps})
    assert_bitwise_equal(
        {k: v for k, v in full.items() if k.startswith("param.")},
        {k: v for k, v in resumed.items() if k.startswith("param.")},
    )
    assert {int(full[f"{i}.layer"]) for i in range(STEPS)} >= {0, 1}  # both layers were drawn
    for mode in ("full", "first", "resume"):
        assert (processes / f"{mode}_rng_untouched").read_text() == "True"


@pytest.mark.slow
def test_fit_resumed_after_sigkill_in_a_new_process_is_bitwise_identical(processes: Path) -> None:
    assert json.loads((processes / "fit" / "checkpoint.json").read_text())["epoch"] == FIT_CONFIG.epochs
    full = json.loads((processes / "full_fit.json").read_text())
    resumed = json.loads((processes / "resume_fit.json").read_text())
    assert not (processes / "first_fit.json").exists()  # the first process died in epoch 3
    assert len(full["history"]) == FIT_CONFIG.epochs and len(full["lams"]) == FIT_CONFIG.epochs * 5
    assert resumed == full  # every loss, metric, learning rate and λ
    assert_bitwise_equal(load_file(processes / "full_fit.safetensors"), load_file(processes / "resume_fit.safetensors"))
