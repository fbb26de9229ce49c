"""The command line answers a user's mistake at once, in one line that names the flag, and Ctrl-C in one line
that says what was kept and how to go on (issue 20, items 8 and 13).

The maintainer bugs these tests guard against, and the test that catches each:

- a path or value check moved after ``import torch`` or after the model is built (the answer takes seconds
  again; a string ``--device`` default, which argparse converts through a torch import, does that too), or a
  failed check that leaves an empty ``--out`` behind: ``test_a_mistake_answers_before_torch_or_the_job``;
- argparse's 15-line usage block back above the error line, or no ``--help`` hint in it:
  ``test_an_argument_error_is_one_line_with_a_help_hint``;
- ``--alpha`` / ``--lr`` / ``--seed`` parsed as plain numbers again (checked only after loading), or a
  non-finite value let through: ``test_an_argument_error_is_one_line_with_a_help_hint``;
- the library's Python argument names (``alpha=``, ``layer=``) shown to a command-line user:
  ``test_a_library_message_names_the_flag`` and ``test_a_mistake_answers_before_torch_or_the_job``;
- an unwritable ``--out`` / ``--cache`` / ``predict --out`` / ``export --out`` found only when writing, a
  traceback after the work: ``test_an_unwritable_output_is_one_line_before_the_work`` (a path under a regular
  file, which fails as root too) and ``test_a_read_only_out_directory_is_one_line`` (permission bits; skipped
  as root, who ignores them);
- Ctrl-C printing a traceback, exiting with another code, or ``--resume`` not continuing from the checkpoint
  it left (or the cache extracted again): ``test_ctrl_c_in_finetune_keeps_the_cache_and_checkpoint_and_resume_goes_on``
  (a real ``SIGINT`` to a real process);
- ``export`` writing its safetensors file before the long ONNX trace (an interrupted export leaves a partial
  export), or ``predict`` writing before the last image: ``test_ctrl_c_in_predict_and_export_writes_nothing``;
- ``--overwrite`` not reaching ``run_finetune``: ``test_overwrite_replaces_a_finished_run``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from hookmix.app.cli import main
from hookmix.app.digits import digits_transfer

HEAVY = ("torch", "torchvision", "timm", "hookmix.app.finetune_job")


def answer_in_a_fresh_process(args: list[str]) -> tuple[int, list[str], list[str]]:
    """Run ``hookmix ARGS`` in a fresh interpreter: its exit code, its stderr lines, and which of
    :data:`HEAVY` it had imported by then."""
    code = (
        "import contextlib, io, json, sys\n"
        "from hookmix.app.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    try:\n        status = main({args!r})\n    except SystemExit as exit:\n        status = exit.code\n"
        f"print(json.dumps([status, err.getvalue().splitlines(), [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status, lines, loaded = json.loads(result.stdout.splitlines()[-1])
    return status, lines, loaded


def one_error_line(args: list[str], capsys: pytest.CaptureFixture[str], code: int = 2) -> str:
    """Run ``hookmix ARGS`` in this process; it must exit with ``code`` and print exactly one line."""
    try:
        status = main(args)
    except SystemExit as exit:
        status = exit.code
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("Ctrl-C escaped main: the user sees a traceback")
    err = capsys.readouterr().err
    assert status == code and len(err.splitlines()) == 1 and err.endswith("\n"), (status, err)
    return err.rstrip("\n")


def test_a_mistake_answers_before_torch_or_the_job(tmp_path: Path) -> None:
    """A missing input, an unwritable output, a bad value and a missing --model are found before torch is
    imported; settings that only conflict together before the job (and its model) is loaded; and a refused
    command leaves no --out behind."""
    out, missing, file = tmp_path / "out", tmp_path / "missing_dir", tmp_path / "file"
    file.write_text("a file, not a directory")
    no_torch = {
        "missing data": (["--data", str(missing)], f"--data {missing} is not a directory (it does not exist)"),
        "bad alpha": (["--data", "digits", "--alpha", "-1"], "argument --alpha: -1 must be >= 0 (see hookmix"),
        "no model": (["--data", str(tmp_path)], "--model is required with an image folder"),
        "missing labels": (["--data", "digits", "--labels", str(file) + "x"], f"--labels {file}x is not a file"),
        "missing weights": (["--data", str(tmp_path), "--weights", str(tmp_path)], "(it is a directory)"),
        "out under a file": (["--data", "digits", "--out", str(file / "run")], f"({file} is a file, not a directory)"),
        "cache under a file": (["--data", "digits", "--cache", str(file / "c")], f"--cache {file / 'c'} cannot be"),
    }
    for name, (flags, says) in no_torch.items():
        status, lines, loaded = answer_in_a_fresh_process(["finetune", "--out", str(out), *flags])  # a later --out wins
        assert status == 2 and len(lines) == 1 and says in lines[0] and loaded == [], (name, lines, loaded)
    status, lines, loaded = answer_in_a_fresh_process(
        ["finetune", "--data", "digits", "--out", str(out), "--alpha", "0"]
    )
    assert status == 2 and lines == [
        "hookmix: error: --alpha 0 and --cutmix-alpha 0 turn both methods off; give --alpha 0.4 (mixup) or "
        "--cutmix-alpha 1.0 (cutmix), or both."
    ]
    assert "hookmix.app.finetune_job" not in loaded and not out.exists()


@pytest.mark.parametrize(
    "args, line",
    [
        (["finetune", "--out", "x"], "the following arguments are required: --data (see hookmix finetune --help)"),
        (["predict", "--run", "r"], "the following arguments are required: INPUT (see hookmix predict --help)"),
        (["finetune", "--data", "digits", "--out", "x", "--lr", "0"], "argument --lr: 0 must be > 0 (see hookmix"),
        (["finetune", "--data", "digits", "--out", "x", "--alpha", "inf"], "argument --alpha: inf is not a finite"),
        (["finetune", "--data", "digits", "--out", "x", "--alpha", "nan"], "argument --alpha: nan is not a finite"),
        (["finetune", "--data", "digits", "--out", "x", "--seed", "-1"], "argument --seed: -1 must be >= 0 (see"),
        (["finetune", "--data", "digits", "--out", "x", "--cutmix-alpha", "inf"], "--cutmix-alpha: inf is not a"),
        (["finetune", "--data", "digits", "--out", "x", "--resume", "--overwrite"], "--overwrite: not allowed with"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_an_argument_error_is_one_line_with_a_help_hint(args: list[str], line: str, capsys) -> None:
    said = one_error_line(args, capsys)
    assert said.startswith("hookmix: error: ") and line in said and said.endswith(" --help)"), said


def test_a_library_message_names_the_flag(tmp_path: Path, capsys) -> None:
    """The library names its Python arguments (``layer='stage9'``); the command line shows the flag."""
    said = one_error_line(["finetune", "--data", "digits", "--layer", "stage9", "--out", str(tmp_path)], capsys)
    assert said.startswith("hookmix: error: --layer stage9 is not a layer") and "layer=" not in said, said


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run of the digits task, and the command line that made it (for --overwrite)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["finetune", "--data", "digits", "--shots", "5", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    pixels = digits_transfer(5, 0).val_x[:3, 0]
    for i, image in enumerate(pixels):
        Image.fromarray((image * 255).round().byte().numpy(), "L").save(folder / f"{i}.png")
    return folder


def output_commands(run: Path, pngs: Path, blocked: Path, free: Path) -> dict[str, list[str]]:
    """One command per output flag, each told to write under ``blocked`` (and anything else into ``free``)."""
    return {
        "finetune --out": ["finetune", "--data", "digits", "--out", str(blocked / "run")],
        "finetune --cache": ["finetune", "--data", "digits", "--out", str(free), "--cache", str(blocked)],
        "predict --out": ["predict", "--run", str(run), str(pngs), "--out", str(blocked / "p.csv"), "--quiet"],
        "export --out": ["export", "--run", str(run), "--out", str(blocked / "m.safetensors")],
    }


@pytest.mark.parametrize("command", ["finetune --out", "finetune --cache", "predict --out", "export --out"])
def test_an_unwritable_output_is_one_line_before_the_work(
    command: str, digits_run: Path, digit_pngs: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A path under a regular file cannot be created, even by root: one line naming the flag and the path,
    and neither a model is loaded nor an image predicted first."""
    import hookmix.app.export
    import hookmix.app.predict

    def too_early(*args, **kwargs):
        raise AssertionError("the work started before --out was checked")

    for module in (hookmix.app.export, hookmix.app.predict):
        monkeypatch.setattr(module, "load_run", too_early)
    file = tmp_path / "file"
    file.write_text("a regular file")
    args = output_commands(digits_run, digit_pngs, file / "sub", tmp_path / "out")[command]
    flag = command.split()[1]
    said = one_error_line(args, capsys)
    assert said.startswith(f"hookmix: error: {flag} {file / 'sub'}") and f"({file} is a file, not a directory)" in said


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_directory_is_one_line(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        said = one_error_line(["finetune", "--data", "digits", "--out", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o700)
    assert said.startswith(f"hookmix: error: --out {locked / 'run'} cannot be written (Permission denied)"), said


def stamps(cache: Path) -> dict[str, int]:
    """The modification times of the cache's shards and manifests (not its lock files, which a reader opens)."""
    return {str(p): p.stat().st_mtime_ns for p in cache.rglob("*") if p.suffix in (".safetensors", ".json")}


def test_ctrl_c_in_finetune_keeps_the_cache_and_checkpoint_and_resume_goes_on(tmp_path: Path) -> None:
    """SIGINT to a real ``hookmix finetune`` once its first epoch is checkpointed: exit code 130 and one line
    naming what was kept and ``--resume``; the resumed run reuses the cache, keeps the epochs already trained
    and trains the rest."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    epochs = 30  # of 25 steps each (--batch-size 4): time to interrupt after the first, little to resume
    args = ["finetune", "--data", "digits", "--epochs", str(epochs), "--batch-size", "4", "--quiet"]
    args += ["--out", str(out), "--cache", str(cache)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hookmix.app.cli", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.splitlines() == [
        f"hookmix: interrupted; kept the features cached in --cache {cache} (the next run reuses them) and the "
        f"checkpoint of the last finished epoch in --out {out}; continue with the same command and --resume."
    ]
    trained = json.loads((out / "checkpoint.json").read_text())["history"]
    assert 1 <= len(trained) < epochs and not (out / "metrics.json").exists()
    extracted = stamps(cache)
    assert main([*args, "--resume"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == epochs and history[: len(trained)] == trained
    assert stamps(cache) == extracted  # reused, not extracted again


def test_ctrl_c_in_predict_and_export_writes_nothing(
    digits_run: Path, digit_pngs: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Ctrl-C during the long part (predicting; tracing the ONNX model) leaves no output file."""
    import hookmix.app.export
    import hookmix.app.predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hookmix.app.predict, "predict_images", interrupted)
    monkeypatch.setattr(hookmix.app.export, "export_onnx", interrupted)
    csv, model = tmp_path / "p.csv", tmp_path / "m.safetensors"
    said = one_error_line(["predict", "--run", str(digits_run), str(digit_pngs), "--out", str(csv)], capsys, 130)
    assert said == f"hookmix: interrupted; nothing was written to --out {csv} (the CSV is written whole, after the " + (
        "last image); run the same command again."
    )
    said = one_error_line(["export", "--run", str(digits_run), "--out", str(model), "--onnx"], capsys, 130)
    assert said.startswith(f"hookmix: interrupted; no file of --out {model} is half-written") and said.endswith(
        "again."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_replaces_a_finished_run(digits_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(digits_run, out)
    args = ["finetune", "--data", "digits", "--shots", "5", "--epochs", "2", "--out", str(out), "--quiet"]
    said = one_error_line(args, capsys)
    assert said.startswith(f"hookmix: error: --out {out} holds a finished run") and "--overwrite" in said, said
    assert main([*args, "--overwrite"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2
