"""From a fine-tuned run to a model in use: ``hookmix predict``, ``hookmix export``, ``load_finetuned`` and
ONNX, checked against a model rebuilt by hand from the run's files."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hookmix import load_finetuned
from hookmix.app.cli import main
from hookmix.app.digits import digits_transfer, pretrain_source
from hookmix.app.run import load_run
from tests.conftest import write_folder


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["finetune", "--data", "digits", "--epochs", "4", "--calibrate", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Validation digits (never trained on) as 8x8 greyscale PNGs, plus one file that is not an image."""
    folder = tmp_path_factory.mktemp("digits")
    task = digits_transfer(20, 0)
    for i in range(12):
        pixels = (task.val_x[i, 0] * 255).round().byte().numpy()
        Image.fromarray(pixels, "L").save(folder / f"{i:02d}.png")
    (folder / "zz-broken.png").write_text("not an image")
    return folder


def by_hand(run: Path, images: list[Path]) -> torch.Tensor:
    """Logits of the run's model built by hand: the pretrained digits CNN with the trained classifier
    (head.2 of run/head.safetensors) put back, on the PNGs read as pixel / 255."""
    model = pretrain_source(seed=0).eval()
    head = load_file(run / "head.safetensors")
    model.head[2].load_state_dict({"weight": head["head.2.weight"], "bias": head["head.2.bias"]})
    x = torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.float32) / 255)[None] for p in images])
    with torch.no_grad():
        return model(x)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_predict_writes_the_run_s_calibrated_probabilities(digits_run: Path, digit_images: Path, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(digits_run), str(digit_images), "--out", str(out), "--top-k", "3"]) == 0
    assert "skipped" in capsys.readouterr().err and "zz-broken.png" not in out.read_text()
    rows = read_csv(out)
    images = sorted(digit_images.glob("[0-9]*.png"))
    assert [Path(r["path"]) for r in rows] == images
    temperature = json.loads((digits_run / "run.json").read_text())["finetuned"]["temperature"]
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert temperature == metrics["calibration"]["temperature"] != 1.0
    probabilities = torch.softmax(by_hand(digits_run, images) / temperature, dim=1)
    classes = metrics["classes"]
    for row, expected in zip(rows, probabilities):
        values, indices = expected.topk(3)
        assert [row[f"class_{i}"] for i in (1, 2, 3)] == [classes[j] for j in indices]
        assert [float(row[f"prob_{i}"]) for i in (1, 2, 3)] == pytest.approx(values.tolist(), abs=2e-6)


def test_export_reloads_and_onnx_matches(digits_run: Path, digit_images: Path, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    target = tmp_path / "model.safetensors"
    assert main(["export", "--run", str(digits_run), "--out", str(target), "--onnx"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_finetuned(target)
    config = json.loads(target.with_name("model.safetensors.json").read_text())
    assert config["layer"] == "stage2" and config["pooled"] and config["temperature"] == model.config.temperature
    images = sorted(digit_images.glob("[0-9]*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.float32) / 255)[None] for p in images])
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, by_hand(digits_run, images), rtol=1e-5, atol=1e-5)
    session = onnxruntime.InferenceSession(str(target.with_suffix(".onnx")))
    (from_onnx,) = session.run(None, {"images": x.numpy()})
    assert np.abs(from_onnx - logits.numpy()).max() <= 1e-4


def test_an_image_folder_run_predicts_with_its_own_preprocessing(tmp_path: Path, capsys) -> None:
    """resnet18 on RGB images: predict (the run rebuilt from its seed) equals the exported model applied
    with the run's recorded transform."""
    data = write_folder(tmp_path / "imgs", per_class=3, size=40)
    run = tmp_path / "run"
    common = ["--model", "resnet18", "--input-size", "3", "32", "32", "--epochs", "1", "--quiet"]
    assert main(["finetune", "--data", str(data), *common, "--head", "linear", "--out", str(run)]) == 0
    assert main(["predict", "--run", str(run), str(data), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 9
    model = load_finetuned(tmp_path / "m.safetensors")
    transform = load_run(run).transform
    image = Image.open(rows[0]["path"]).convert("RGB")
    expected = model.probabilities(transform(image)[None])[0]
    assert float(rows[0]["prob_1"]) == pytest.approx(expected.max().item(), abs=2e-6)


@pytest.mark.parametrize("case", ["missing", "unfinished", "other-version", "no-images", "no-input", "onnx-extra"])
def test_bad_runs_and_inputs_are_one_line_errors(case: str, digits_run: Path, tmp_path: Path, capsys, monkeypatch):
    run, inputs = digits_run, [str(tmp_path)]
    (tmp_path / "a.png").write_bytes(b"")  # unreadable: skipped, leaving nothing
    if case == "missing":
        run = tmp_path / "nowhere"
    elif case == "unfinished":
        run = tmp_path / "copy"
        shutil.copytree(digits_run, run)
        (run / "head.safetensors").unlink()
    elif case == "other-version":
        run = tmp_path / "copy"
        shutil.copytree(digits_run, run)
        data = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps(data | {"run_version": 99}))
    elif case == "no-images":
        (tmp_path / "empty").mkdir()
        inputs = [str(tmp_path / "empty")]
    elif case == "no-input":
        inputs = [str(tmp_path / "missing.png")]
    if case == "onnx-extra":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
        args = ["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors"), "--onnx"]
    else:
        args = ["predict", "--run", str(run), *inputs, "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("hookmix: error: ")
    expected = {
        "missing": "is not a directory",
        "unfinished": "has no head.safetensors",
        "other-version": "run format 99",
        "no-images": "holds no images",
        "no-input": "does not exist",
        "onnx-extra": "pip install 'hookmix[onnx]'",
    }[case]
    assert expected in err[-1]


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hookmix.app.mosaics import digits_mosaics, write_mosaics

    root = tmp_path_factory.mktemp("mosaics")
    write_mosaics(root, digits_mosaics(120, 60, 0))
    return root


def test_multilabel_runs_end_to_end_with_thresholds(mosaics: Path, tmp_path: Path, capsys) -> None:
    """--labels CSV on digit mosaics: BCE training, calibrated, thresholds tuned and saved; predict's set is
    each label whose calibrated probability reaches its saved threshold; the export reloads to the same
    probabilities."""
    run = tmp_path / "run"
    common = ["--data", str(mosaics), "--model", "digits-cnn", "--input-size", "1", "16", "16", "--quiet"]
    labels = ["--labels", str(mosaics / "train.csv"), "--val-labels", str(mosaics / "val.csv")]
    assert main(["finetune", *labels, *common, "--epochs", "5", "--calibrate", "--out", str(run)]) == 0
    assert "val mAP" in capsys.readouterr().out
    report = json.loads((run / "metrics.json").read_text())
    assert report["task"] == "multilabel" and set(report["thresholds"]) == set(report["classes"])
    assert {"val_map", "val_f1"} <= set(report["final"]) and report["final_tuned"]["val_f1"] >= report["final"][
        "val_f1"
    ]
    assert main(["predict", "--run", str(run), str(mosaics / "val"), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    model = load_finetuned(tmp_path / "m.safetensors")
    assert model.config.thresholds == tuple(report["thresholds"][c] for c in report["classes"])
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 60
    x = torch.stack([torch.from_numpy(np.array(Image.open(r["path"]), dtype=np.float32) / 255)[None] for r in rows])
    with torch.no_grad():
        probabilities = torch.sigmoid(model(x) / report["calibration"]["temperature"])
    thresholds = torch.tensor(model.config.thresholds)
    for row, p in zip(rows, probabilities):
        expected = [c for c, q, t in zip(report["classes"], p, thresholds) if q >= t]
        assert (row["predicted"].split(";") if row["predicted"] else []) == expected
        assert float(row["prob_1"]) == pytest.approx(p.max().item(), abs=2e-6)


def test_a_cache_over_the_memory_budget_is_streamed_or_needs_a_cache_dir(mosaics: Path, tmp_path: Path, capsys):
    common = ["--data", str(mosaics), "--model", "digits-cnn", "--input-size", "1", "16", "16", "--quiet"]
    labels = ["--labels", str(mosaics / "train.csv"), "--epochs", "2", "--memory-budget", "4K"]
    out = ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        main(["finetune", *labels, *common, *out])
    assert "over the memory budget of 4.0 KiB; give --cache DIR" in capsys.readouterr().err
    assert main(["finetune", *labels, *common, *out, "--cache", str(tmp_path / "cache")]) == 0
    assert "memory-mapped, streamed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["streamed"] is True
