"""The `hookmix` command end to end: layers, finetune on a generated image folder and on digits, demo,
and usage errors (exit code 2, one line, no traceback)."""

import json
import os
import subprocess
import sys

import pytest

from hookmix.app.cli import main
from tests.conftest import write_folder


def run_cli(*args):
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "hookmix.app.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_layers_table(capsys):
    assert main(["layers", "resnet18", "--input-size", "3", "64", "64", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "1x512x2x2" in out and "11,689,512" in out and "layer4.0" not in out


def test_layers_timm_vit_tokens(capsys):
    main(["layers", "timm:vit_tiny_patch16_224", "--depth", "2"])
    out = capsys.readouterr().out
    assert "blocks.11" in out and "1x197x192" in out


def test_layers_marks_cut_points_and_mixable_lists_only_them(capsys):
    assert main(["layers", "resnet18", "--input-size", "3", "32", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(maxsplit=5) for line in lines[3:-2]}
    assert rows["layer4.0"][4] == "yes" and rows["layer4.0.conv2"][4] == "no" and rows["output"][4] == "yes"
    assert rows["layer4"][5] == "≡ fc input, ≡ output" and len(rows["layer3"]) == 5
    assert main(["layers", "resnet18", "--input-size", "3", "32", "32", "--mixable"]) == 0
    out = capsys.readouterr().out
    mixable = {line.split()[0]: line.split() for line in out.splitlines()[3:-2]}
    assert {name for name, row in rows.items() if row[4] == "yes"} == set(mixable) and "layer4.0.conv2" not in mixable
    assert mixable["layer4"][2] == "1x512x1x1" and out.splitlines()[-2].startswith("cut: yes = every path")
    assert out.splitlines()[-1].startswith("mixup here: ≡ X = only linear ops follow")


@pytest.mark.parametrize(
    "args, message",
    [
        (["layers", "resnet5"], "closest names: resnet50"),
        (["layers", "resnet18", "--input-size", "3", "0", "64"], "must be >= 1"),
        (["finetune", "--data", "digits", "--out", "x", "--epochs", "0"], "must be >= 1"),
        (["finetune", "--out", "x"], "required: --data"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    code, out, err = run_cli(*args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_finetune_on_image_folder_writes_report_and_reuses_cache(tmp_path, capsys):
    data = write_folder(tmp_path / "imgs")
    args = [
        "finetune",
        "--data",
        str(data),
        "--model",
        "resnet18",
        "--layer",
        "layer4",
        "--input-size",
        "3",
        "32",
        "32",
        "--epochs",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["classes"] == ["cat", "dog", "eel"] and report["train_examples"] == 9
    assert report["val_examples"] == 3 and report["feature_shape"] == [512]  # pooled: layer4 ≡ fc input
    assert report["cache_bytes_per_example"] == 512 * 2  # float16
    assert len(report["history"]) == 2
    for name in ("curves.png", "reliability.png", "lambda_hist.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "checkpoint.safetensors").stat().st_size > 0
    (manifest,) = (tmp_path / "cache").glob("train.avgpool+flatten-*/manifest.json")  # one directory per cache key
    stamp = manifest.stat().st_mtime_ns
    assert main([*args[:-3], "--out", str(tmp_path / "out2"), "--no-mix", "--quiet"]) == 0
    assert manifest.stat().st_mtime_ns == stamp  # the second run read the cache, it did not extract again
    assert not (tmp_path / "out2" / "lambda_hist.png").exists()
    assert "no mixup" in capsys.readouterr().out


def test_finetune_digits(tmp_path, capsys):
    args = ["finetune", "--data", "digits", "--shots", "5", "--epochs", "3", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["layer"] == "stage2" and report["train_examples"] == 25 and report["feature_shape"] == [64]
    assert "val accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["empty", "single", "unreadable", "missing"])
def test_bad_image_folders(tmp_path, case):
    root = tmp_path / "imgs"
    if case == "empty":
        root.mkdir()
        message = "holds no images"
    elif case == "single":
        write_folder(root, classes=("only",))
        message = "single class"
    elif case == "unreadable":
        write_folder(root)
        (root / "dog" / "9.png").write_bytes(b"not a png")
        message = "unreadable image"
    else:
        message = "is not a directory"
    code, _, err = run_cli(
        "finetune",
        "--data",
        str(root),
        "--model",
        "resnet18",
        "--layer",
        "layer4",
        "--input-size",
        "3",
        "32",
        "32",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    )
    assert code == 2 and message in err and "Traceback" not in err, err


def check_rows_summarise_runs(rows, runs, settings, n_val):
    """Each row is the mean ± 95% CI of its two seeds' runs, and each run a real validation of ``n_val`` images."""
    for row in rows:
        mine = [r for r in runs if all(r[key] == row[key] for key in settings)]
        assert row["seeds"] == 2 and sorted(r["seed"] for r in mine) == [0, 1]
        for r in mine:  # an accuracy is a count of validation images, and better than chance (1 in 5)
            assert r["val_accuracy"] * n_val[r["seed"]] == pytest.approx(round(r["val_accuracy"] * n_val[r["seed"]]))
            assert r["val_accuracy"] > 0.2 and r["val_nll"] > 0
        for metric in ("val_accuracy", "val_nll", "val_ece"):  # the table is these runs' mean ± CI
            a, b = (r[metric] for r in mine)
            assert row[metric] == pytest.approx((a + b) / 2)
            assert row[f"{metric}_ci95"] == pytest.approx(12.7062047 * abs(a - b) / 2, rel=1e-6)
            assert 0 < row[f"{metric}_ci95"] < float("inf")


def test_demo_small(tmp_path, capsys):
    import torch

    from hookmix import FitConfig, MixSettings, build_head, fit, split
    from hookmix.app.demo import run_demo
    from hookmix.app.digits import digits_transfer, pretrain_source, single_thread

    rows = run_demo(tmp_path, seeds=2, ks=(5,), epochs=(5,), progress=False)
    main, heads = [r for r in rows if r.get("head") == "model"], [r for r in rows if r.get("head") == "mlp"]
    assert (
        len(rows) == 9
        and len(main) == 4
        and {(r["mix"], r["calibrated"]) for r in main}
        == {
            (True, False),
            (False, False),
            (True, True),
            (False, True),
        }
    )
    payload = strict_json((tmp_path / "metrics.json").read_text())
    n_val = {seed: len(digits_transfer(5, seed).val_y) for seed in (0, 1)}
    check_rows_summarise_runs(main, payload["runs"], ("mix", "calibrated"), n_val)
    runs = payload["runs"]
    assert {r["val_nll"] for r in runs if r["mix"]} != {r["val_nll"] for r in runs if not r["mix"]}
    for plain in (r for r in runs if not r["calibrated"]):  # "+ T": the same head, its logits scaled
        scaled = next(r for r in runs if r["calibrated"] and (r["seed"], r["mix"]) == (plain["seed"], plain["mix"]))
        assert scaled["val_accuracy"] == plain["val_accuracy"] and scaled["val_nll"] != plain["val_nll"]
    # the multi-label table: mixup and none on digit mosaics, mean ± CI of two seeds each
    multilabel = payload["multilabel"]
    assert [r["mix"] for r in multilabel["summary"]] == [False, True] and multilabel["summary"] == rows[-2:]
    for row in multilabel["summary"]:
        mine = [r for r in multilabel["runs"] if r["mix"] == row["mix"]]
        assert row["val_map"] == pytest.approx(sum(r["val_map"] for r in mine) / 2) and 0 < row["val_map"] <= 1
    # the MLP-head table: no mixup, mixup of the stage2 map, mixup of the logits; the largest k, longest schedule
    assert payload["heads"]["summary"] == heads
    assert [(r["mix"], r["mixed_at"], r["k"], r["epochs"]) for r in heads] == [
        (False, "input", 5, 5),
        (True, "input", 5, 5),
        (True, "output", 5, 5),
    ]
    head_runs = payload["heads"]["runs"]
    check_rows_summarise_runs(heads, head_runs, ("mix", "mixed_at"), n_val)
    for seed in (0, 1):  # three different trainings: no arm copies another
        assert len({r["val_nll"] for r in head_runs if r["seed"] == seed}) == 3
    # one arm again from the outside: seed 1, mixup of the logits of a fresh MLP head on the stage2 features
    data = digits_transfer(5, 1)
    backbone = split(pretrain_source(seed=0), "stage2")[0].eval()
    with torch.no_grad():  # the cache stores float16
        train, val = backbone(data.train_x).half(), backbone(data.val_x).half()
    with torch.random.fork_rng(devices=[]), single_thread():  # as the demo runs it
        torch.manual_seed(1)
        again = fit(
            build_head("mlp", feature_shape=(64, 2, 2), num_classes=5, seed=1),
            "output",
            train,
            data.train_y,
            val,
            data.val_y,
            FitConfig(epochs=5, batch_size=16, lr=3e-2, mixing=MixSettings(alpha=0.4), seed=1),
            num_classes=5,
            progress=False,
        )
    (stored,) = [r for r in head_runs if r["seed"] == 1 and r["mixed_at"] == "output"]
    assert stored["val_nll"] == pytest.approx(again.final["val_nll"], rel=1e-5)
    out = capsys.readouterr().out
    assert "| 5 | 5 | yes |" in out and "±" in out
    for arm in ("none", "map", "logits"):
        assert f"| mlp | 5 | 5 | {arm} | " in out
    for name in ("metrics.json", "curves_k5.png", "reliability_k5.png", "lambda_hist.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("args", [["--help"], ["finetune", "--epochs", "0"]], ids=["help", "argument_error"])
def test_help_and_argument_errors_answer_at_once_without_torch(args):
    code = (
        "import json, sys, time\n"
        "start = time.perf_counter()\n"
        "from hookmix.app.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as exit:\n    status = exit.code\n"
        "loaded = [m for m in ('torch', 'torchvision', 'timm') if m in sys.modules]\n"
        "print(json.dumps([status, loaded, time.perf_counter() - start]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status, loaded, seconds = json.loads(result.stdout.splitlines()[-1])
    assert status == (0 if args == ["--help"] else 2) and loaded == [] and seconds < 0.5, result.stdout


def test_a_library_bug_keeps_its_traceback_and_a_usage_error_is_one_line(monkeypatch, capsys):
    import hookmix.app.cli as cli
    from hookmix import UsageError

    def bug(args):
        raise ValueError("not the user's fault")

    monkeypatch.setattr(cli, "_cmd_demo", bug)
    with pytest.raises(ValueError, match="not the user's fault"):
        cli.main(["demo"])

    def mistake(args):
        raise UsageError("--data x is not a directory")

    monkeypatch.setattr(cli, "_cmd_demo", mistake)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "hookmix: error: --data x is not a directory\n"


# Small defects of `layers` and `demo` (issue 20, item 12): each a one-line usage error, exit 2, no traceback.


def usage_error(capsys, args):
    """``main(args)`` exits 2 with one line on stderr: that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_layers_names_the_input_size_a_model_refuses(capsys):
    # a timm ViT is built for 224x224: its patch embedding refuses 64x64 with an AssertionError
    line = usage_error(capsys, ["layers", "vit_tiny_patch16_224", "--input-size", "3", "64", "64"])
    assert line.startswith("hookmix: error: --input-size 3 64 64: vit_tiny_patch16_224 refused a 1x3x64x64 input")
    assert "Input height (64) doesn't match model (224)" in line and line.endswith("--input-size C H W.")
    # one channel where three are expected: a RuntimeError from the first conv, the same one line
    line = usage_error(capsys, ["layers", "resnet18", "--input-size", "1", "32", "32"])
    assert line.startswith("hookmix: error: --input-size 1 32 32: resnet18 refused a 1x1x32x32 input")


@pytest.mark.parametrize("depth", ["-1", "0"])
def test_layers_refuses_a_depth_that_shows_no_layer(capsys, depth):
    line = usage_error(capsys, ["layers", "resnet18", "--input-size", "3", "32", "32", "--depth", depth])
    assert "--depth" in line and "must be >= 1" in line


def test_demo_help_prints_a_percent_sign_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "95% CI" in out and "%%" not in out


def test_demo_refuses_one_seed_before_any_work(capsys, monkeypatch):
    import hookmix.app.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: pytest.fail("the demo ran with --seeds 1"))
    line = usage_error(capsys, ["demo", "--seeds", "1"])
    assert "--seeds" in line and "must be >= 2" in line


def test_run_demo_refuses_one_seed(tmp_path):
    from hookmix import UsageError
    from hookmix.app.demo import run_demo

    with pytest.raises(UsageError, match=r"seeds=1 must be an int >= 2: the tables give mean ± 95% CI"):
        run_demo(tmp_path, seeds=1, ks=(5,), epochs=(1,), progress=False)
    assert not (tmp_path / "metrics.json").exists()


def strict_json(text):
    """``text`` parsed as JSON proper: NaN and Infinity, which Python's json module writes by default, are refused."""

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)
