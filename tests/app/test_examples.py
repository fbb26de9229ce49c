"""Every script in examples/ answers --help, and the ImageFolder fine-tuning example runs end to end.

The other examples' full runs live next to the code they show (test_integrations_*, test_distributed,
test_tabular_example)."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_folder

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run(script: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_there_is_an_example_for_each_loop_the_readme_names() -> None:
    assert {p.stem for p in EXAMPLES} >= {
        "finetune_imagefolder",
        "timm_train_loop",
        "lightning_train",
        "fastai_train",
        "tabular",
        "ddp_torchrun",
    }


def run_in_process(
    script: Path, *args: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run ``script`` as ``__main__`` in this process (torch is imported once, not per script)."""
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.syspath_prepend(str(script.parent))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_help(script: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_in_process(script, "--help", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.startswith("usage:") and "--" in out


@pytest.mark.slow
def test_finetune_imagefolder_compares_both_arms_on_one_cache(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "imgs", per_class=5, size=40)
    args = (
        "--data",
        str(data),
        "--model",
        "resnet18",
        "--layer",
        "layer4",
        "--input-size",
        "32",
        "--epochs",
        "3",
        "--seeds",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "run"),
    )
    result = run(ROOT / "examples" / "finetune_imagefolder.py", *args)
    assert result.returncode == 0, result.stderr
    assert "3 classes, 12 training / 3 validation images, features (512, 1, 1) at layer4" in result.stdout
    assert "| no mixup |" in result.stdout and "| mixup |" in result.stdout
    runs = json.loads((tmp_path / "run" / "results.json").read_text())["runs"]
    assert {arm: len(r) for arm, r in runs.items()} == {"no mixup": 2, "mixup": 2}
    for arm, arm_runs in runs.items():
        for r in arm_runs:  # 3 validation images: an accuracy is a count of them
            assert r["val_accuracy"] * 3 == pytest.approx(round(r["val_accuracy"] * 3))
            assert r["val_nll"] > 0 and r["epoch"] == 3 and r["lr"] == pytest.approx(0.0, abs=1e-12)
        mean = sum(r["val_nll"] for r in arm_runs) / 2
        half = 12.7062047 * abs(arm_runs[0]["val_nll"] - arm_runs[1]["val_nll"]) / 2  # t(0.975, 1) * s / sqrt(2)
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {arm} |"))
        assert row.split(" | ")[2] == f"{mean:.3f} ± {half:.3f}"  # the printed table is these runs' mean ± CI
    assert [r["val_nll"] for r in runs["mixup"]] != [r["val_nll"] for r in runs["no mixup"]]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train", "val"]


def test_finetune_imagefolder_refuses_one_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_in_process(
        ROOT / "examples" / "finetune_imagefolder.py",
        "--data",
        str(tmp_path),
        "--seeds",
        "1",
        capsys=capsys,
        monkeypatch=monkeypatch,
    )
    assert code == 2 and "needs at least 2 seeds" in err
