"""From a fine-tuned run to a model in use: ``hookmix predict``, ``hookmix export``, ``load_finetuned(...).predict``
and ONNX, checked against a model rebuilt by hand from the run's files (the backbone from its seed or the
embedded digits CNN, head.safetensors put into a freshly built classifier) and inputs prepared by hand or
by the model library's own preset: never against the code under test.

Bugs a maintainer could plausibly make here, and the test that catches each:
- predict or export forgets the temperature, or applies it twice: ``test_predict_writes_the_run_s_calibrated_
  probabilities``, ``test_an_image_folder_run_predicts_with_its_own_preprocessing``,
  ``test_a_timm_run_predicts_and_runs_in_onnxruntime_as_hookmix_predict``;
- the run records or rebuilds another transform than the model's (mean/std, resize, crop, interpolation), or
  reads images in another order: ``test_an_image_folder_run_predicts_with_its_own_preprocessing`` (torchvision),
  ``test_a_timm_run_predicts_and_runs_in_onnxruntime_as_hookmix_predict`` (timm);
- ``FinetunedModel.predict`` and ``hookmix predict`` drifting apart (another reader, batch, T or decision):
  ``same_as_cli`` in the torchvision, timm and multi-label tests (every row and class, the label sets);
- the recorded NLL / ECE "after" are computed without T, or T is not the NLL's minimum:
  ``test_the_recorded_calibration_is_that_of_the_run_s_logits``;
- multi-label thresholds tuned on uncalibrated logits, the wrong argmax (largest threshold among ties,
  ``>`` for ``>=``), predict applying other thresholds than the F1-best ones, or the ONNX metadata listing them
  in another class order: ``test_multilabel_runs_end_to_end_with_thresholds``;
- export / ONNX differ from the run: ``test_export_reloads_and_onnx_matches``;
- the ONNX file written with torch's default ``.onnx.data`` sidecar (a second, unmentioned file), or the sidecar
  of a model over 2 GB left unnamed: ``test_export_reloads_and_onnx_matches``,
  ``test_an_onnx_model_over_the_one_file_limit_names_its_weights_file``;
- ONNX metadata without T, with another run's values (a config cached across exports), or preprocessing that
  does not reproduce the model library's tensors (mean/std order, resize vs crop):
  ``test_export_reloads_and_onnx_matches`` (digits) then ``test_a_timm_run_predicts_and_runs_in_onnxruntime_as_
  hookmix_predict`` in the same process.
"""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from hookmix import load_finetuned
from hookmix.app.cli import main
from hookmix.app.digits import digits_transfer, pretrain_source
from hookmix.headonly.trained_model import Predictions

ONNX_TOLERANCE = 1e-5  # onnxruntime and torch on CPU: probabilities agree to 2.0e-6 (measured, timm resnet18)


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


def onnx_metadata(path: Path) -> dict[str, object]:
    """The ``hookmix.*`` entries of an ONNX file's metadata_props, JSON-decoded, read with onnx itself."""
    import onnx

    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props if p.key.startswith("hookmix.")}


def test_export_reloads_and_onnx_matches(digits_run: Path, digit_images: Path, tmp_path, capsys):
    """The export holds the run's model (logits by hand), writes exactly three files (no .onnx.data sidecar),
    and the ONNX metadata is this run's configuration: classes, T, no thresholds, the grey 8x8 steps."""
    onnxruntime = pytest.importorskip("onnxruntime")
    target = tmp_path / "model.safetensors"
    assert main(["export", "--run", str(digits_run), "--out", str(target), "--onnx"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.safetensors", "model.safetensors.json"]
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
    metrics = json.loads((digits_run / "metrics.json").read_text())
    meta = onnx_metadata(target.with_suffix(".onnx"))
    assert meta["hookmix.classes"] == metrics["classes"] and meta["hookmix.task"] == "multiclass"
    assert meta["hookmix.temperature"] == metrics["calibration"]["temperature"] and meta["hookmix.thresholds"] is None
    assert meta["hookmix.preprocessing"] == {
        **{"channels": 1, "resize": 8, "resize_mode": "shorter", "interpolation": "bilinear", "crop": [8, 8]},
        **{"mean": [0.0], "std": [1.0]},
    }
    assert meta["hookmix.config"] == config


def test_an_onnx_model_over_the_one_file_limit_names_its_weights_file(
    digits_run: Path, digit_images: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Over protobuf's 2 GB (here: a limit of 1 kB) the weights go to FILE.onnx.data, named by the command;
    onnxruntime runs the pair."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import hookmix.app.export

    monkeypatch.setattr(hookmix.app.export, "ONE_FILE_LIMIT", 1000)
    target = tmp_path / "m.safetensors"
    assert main(["export", "--run", str(digits_run), "--out", str(target), "--onnx"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {tmp_path / 'm.onnx'}\n" in said and f"wrote {tmp_path / 'm.onnx.data'}\n" in said
    written = ["m.onnx", "m.onnx.data", "m.safetensors", "m.safetensors.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    (from_onnx,) = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert np.abs(from_onnx - load_finetuned(target)(x).numpy()).max() <= 1e-4


def colour_folder(root: Path) -> Path:
    """Three classes of smooth RGB PNGs (a 3x3 grid of random colours, tinted by class, resized bilinearly) in
    four sizes and aspect ratios: smooth, so that the pooled features of a random-init network differ between
    images (noise averages out), and of other shapes, so that the short-side resize and the crop both matter."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(("cat", "dog", "eel")):
        (root / c).mkdir(parents=True)
        for i, (h, w) in enumerate(((40, 56), (64, 40), (48, 48), (56, 48))):
            cells = rng.random((3, 3, 3)) * 0.6
            cells[..., k] += 0.4
            grid = Image.fromarray((cells * 255).astype("uint8"))
            grid.resize((w, h), Image.BILINEAR).save(root / c / f"{i}.png")
    return root


def test_an_image_folder_run_predicts_with_its_own_preprocessing(tmp_path: Path) -> None:
    """resnet18 (random init from the run's seed 0) on RGB images, calibrated (T ≠ 1): every row's classes and
    probabilities are softmax(logits / T) of torchvision's resnet18 built by hand with the trained fc put back,
    on the images transformed by torchvision's own ResNet18 preset (short side to 256, centre crop 224,
    bilinear, ImageNet mean/std); the export gives the same probabilities."""
    data = colour_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    assert (
        main(
            ["finetune", "--data", str(data), "--model", "resnet18", "--epochs", "2", "--calibrate"]
            + ["--out", str(run), "--quiet"]
        )
        == 0
    )
    assert main(["predict", "--run", str(run), str(data), "--out", str(tmp_path / "p.csv"), "--top-k", "3"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    rows = read_csv(tmp_path / "p.csv")
    images = sorted(data.rglob("*.png"))
    assert [Path(r["path"]) for r in rows] == images
    temperature = json.loads((run / "metrics.json").read_text())["calibration"]["temperature"]
    assert abs(temperature - 1) > 0.05
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
    head = load_file(run / "head.safetensors")
    model.fc = torch.nn.Linear(512, 3)
    model.fc.load_state_dict({"weight": head["fc.weight"], "bias": head["fc.bias"]})
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    x = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x) / temperature, dim=1)
    for row, p in zip(rows, expected, strict=True):
        got = {row[f"class_{k}"]: float(row[f"prob_{k}"]) for k in (1, 2, 3)}
        assert got == pytest.approx(dict(zip(("cat", "dog", "eel"), p.tolist())), abs=1e-5)
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == [("cat", "dog", "eel")[j] for j in p.argsort(descending=True)]
    exported = load_finetuned(tmp_path / "m.safetensors")
    torch.testing.assert_close(exported.probabilities(x), expected, rtol=0, atol=1e-5)
    same_as_cli(load_finetuned(run).predict(images), rows)


def same_as_cli(found: Predictions, rows: list[dict[str, str]]) -> None:
    """``FinetunedModel.predict``'s probabilities are the CSV's (every class of every row, to its 6 decimals)
    and its decisions the CSV's top class, or its ``predicted`` label set for a multi-label run."""
    assert len(rows) == len(found.probabilities) == len(found.predicted)
    for row, probabilities, predicted in zip(rows, found.probabilities, found.predicted):
        k = sum(1 for key in row if key.startswith("class_"))
        by_class = dict(zip(found.classes, probabilities.tolist()))
        written = {row[f"class_{i}"]: float(row[f"prob_{i}"]) for i in range(1, k + 1)}
        assert written == pytest.approx({c: by_class[c] for c in written}, abs=5e-7 + 1e-7)
        if "predicted" in row:
            assert ";".join(predicted) == row["predicted"]
        else:
            assert predicted == (row["class_1"],)


def test_a_timm_run_predicts_and_runs_in_onnxruntime_as_hookmix_predict(tmp_path: Path, capsys) -> None:
    """timm's resnet18 (random init, seed 0) at 64x64, calibrated (T ≠ 1): ``hookmix predict``, ``.predict``
    and softmax(logits / T) of the model built by hand on timm's own transform (``resolve_model_data_config`` +
    ``create_transform``: shorter side 67 bicubic, crop 64, ImageNet mean/std) agree for every row and class.
    The ONNX file's metadata is this run's (classes, T) and its preprocessing, applied with torchvision alone,
    gives timm's tensors exactly; onnxruntime's logits over the metadata's T give ``.predict``'s probabilities."""
    onnxruntime = pytest.importorskip("onnxruntime")
    data, run, export = colour_folder(tmp_path / "imgs"), tmp_path / "run", tmp_path / "export"
    args = ["--data", str(data), "--model", "timm:resnet18", "--input-size", "3", "64", "64", "--epochs", "2"]
    assert main(["finetune", *args, "--calibrate", "--out", str(run), "--quiet"]) == 0
    assert main(["predict", "--run", str(run), str(data), "--out", str(tmp_path / "p.csv"), "--top-k", "3"]) == 0
    assert main(["export", "--run", str(run), "--out", str(export / "m.safetensors"), "--onnx"]) == 0
    rows, images = read_csv(tmp_path / "p.csv"), sorted(data.rglob("*.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    temperature, classes = metrics["calibration"]["temperature"], metrics["classes"]
    assert abs(temperature - 1) > 0.05
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("resnet18")
    timm_config = timm.data.resolve_model_data_config(model) | {"input_size": (3, 64, 64)}
    head = load_file(run / "head.safetensors")
    model.fc = torch.nn.Linear(512, 3)
    model.fc.load_state_dict({"weight": head["fc.weight"], "bias": head["fc.bias"]})
    x = torch.stack([timm.data.create_transform(**timm_config)(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x) / temperature, dim=1)
    found = load_finetuned(run).predict(images)
    torch.testing.assert_close(found.probabilities, expected, rtol=0, atol=1e-5)
    same_as_cli(found, rows)
    assert sorted(p.name for p in export.iterdir()) == ["m.onnx", "m.safetensors", "m.safetensors.json"]
    meta = onnx_metadata(export / "m.onnx")
    assert meta["hookmix.classes"] == classes and meta["hookmix.temperature"] == temperature
    steps = meta["hookmix.preprocessing"]
    assert (steps["resize"], steps["interpolation"]) == (math.floor(64 / timm_config["crop_pct"]), "bicubic")
    from_metadata = transforms.Compose(
        [
            transforms.Resize(steps["resize"], interpolation=InterpolationMode(steps["interpolation"])),
            transforms.CenterCrop(steps["crop"]),
            transforms.ToTensor(),
            transforms.Normalize(steps["mean"], steps["std"]),
        ]
    )
    x_meta = torch.stack([from_metadata(Image.open(p).convert("RGB")) for p in images])
    assert torch.equal(x_meta, x)
    (logits,) = onnxruntime.InferenceSession(str(export / "m.onnx")).run(None, {"images": x_meta.numpy()})
    from_onnx = torch.softmax(torch.from_numpy(logits) / meta["hookmix.temperature"], dim=1)
    torch.testing.assert_close(from_onnx, found.probabilities, rtol=0, atol=ONNX_TOLERANCE)


def digits_val_logits(run: Path) -> torch.Tensor:
    """The run's validation logits computed by hand (the digits task of the fixture: 20 shots, seed 0), float64."""
    task = digits_transfer(20, 0)
    model = pretrain_source(seed=0).eval()
    head = load_file(run / "head.safetensors")
    model.head[2].load_state_dict({"weight": head["head.2.weight"], "bias": head["head.2.bias"]})
    with torch.no_grad():
        return model(task.val_x).double()


def top1_ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error by hand: top-1 softmax confidence in equal-width bins (closed on the right),
    the count-weighted mean of |accuracy − confidence|."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            hits = (predicted[members] == labels[members]).double()
            total += members.sum().item() * abs(hits.mean().item() - confidence[members].mean().item())
    return total / len(labels)


def test_the_recorded_calibration_is_that_of_the_run_s_logits(digits_run: Path) -> None:
    """metrics.json's NLL and ECE before and after calibration are those of the validation logits computed by
    hand, divided by the recorded T for "after"; and T is the NLL's minimum (1.05 T or T / 1.05 do worse)."""
    calibration = json.loads((digits_run / "metrics.json").read_text())["calibration"]
    temperature = calibration["temperature"]
    logits, labels = digits_val_logits(digits_run), digits_transfer(20, 0).val_y

    def nll(t: float) -> float:
        return F.cross_entropy(logits / t, labels).item()

    tolerance = 1e-4  # features cached in float16: 1e-5 measured between the cached and the by-hand logits
    assert calibration["val_nll_before"] == pytest.approx(nll(1.0), abs=tolerance)
    assert calibration["val_nll_after"] == pytest.approx(nll(temperature), abs=tolerance)
    assert calibration["val_ece_before"] == pytest.approx(top1_ece(logits, labels), abs=tolerance)
    assert calibration["val_ece_after"] == pytest.approx(top1_ece(logits / temperature, labels), abs=tolerance)
    assert nll(1.0) - nll(temperature) > 10 * tolerance
    assert nll(temperature) < min(nll(temperature * 1.05), nll(temperature / 1.05))


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
        "missing": "nowhere does not exist",
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


def best_f1_thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label, by brute force: the threshold t (one of the observed probabilities, predicting ``p >= t``)
    with the highest F1, the smallest among ties; 0.5 and NaN for a label without positives. Returns the
    thresholds and the F1 each reaches."""
    thresholds = torch.full((probabilities.shape[1],), 0.5, dtype=torch.float64)
    scores = torch.full((probabilities.shape[1],), float("nan"), dtype=torch.float64)
    for j in range(probabilities.shape[1]):
        p, truth = probabilities[:, j], targets[:, j].bool()
        if not truth.any():
            continue
        for t in sorted(set(p.tolist())):
            predicted = p >= t
            hits = (predicted & truth).sum().item()
            f1 = 2 * hits / (predicted.sum().item() + truth.sum().item())
            if not f1 <= scores[j]:  # strictly better (or the first): the smallest t among ties stays
                thresholds[j], scores[j] = t, f1
    return thresholds, scores


def test_multilabel_runs_end_to_end_with_thresholds(mosaics: Path, tmp_path: Path, capsys) -> None:
    """--labels CSV on digit mosaics, calibrated: the saved thresholds are the F1-best ones recomputed by brute
    force on the validation logits computed by hand (the digits CNN with the trained classifier on the PNGs
    read as pixel / 255) divided by T (T ≠ 1); the tuned F1, the NLL after T and predict's label sets follow
    from them; the export carries them."""
    run = tmp_path / "run"
    common = ["--data", str(mosaics), "--model", "digits-cnn", "--input-size", "1", "16", "16", "--quiet", "--fp32"]
    labels = ["--labels", str(mosaics / "train.csv"), "--val-labels", str(mosaics / "val.csv")]
    assert main(["finetune", *labels, *common, "--epochs", "5", "--calibrate", "--out", str(run)]) == 0
    assert "val mAP" in capsys.readouterr().out
    report = json.loads((run / "metrics.json").read_text())
    classes, temperature = report["classes"], report["calibration"]["temperature"]
    assert report["task"] == "multilabel" and abs(temperature - 1) > 0.02
    val = read_csv(mosaics / "val.csv")
    x = torch.stack(
        [torch.from_numpy(np.array(Image.open(mosaics / r["path"]), dtype=np.float32) / 255)[None] for r in val]
    )
    targets = torch.tensor([[float(c in r["labels"].split(";")) for c in classes] for r in val])
    model = pretrain_source(seed=0).eval()
    head = load_file(run / "head.safetensors")
    model.head[2] = torch.nn.Linear(64, len(classes))
    model.head[2].load_state_dict({"weight": head["head.2.weight"], "bias": head["head.2.bias"]})
    with torch.no_grad():
        logits = model(x).double()
    probabilities = torch.sigmoid(logits / temperature)
    thresholds, f1 = best_f1_thresholds(probabilities, targets)
    tolerance = 1e-5  # float32 features: the cached and the by-hand logits agree to 1e-6
    assert [report["thresholds"][c] for c in classes] == pytest.approx(thresholds.tolist(), abs=tolerance)
    assert report["final_tuned"]["val_f1"] == pytest.approx(f1.nanmean().item(), abs=tolerance)
    nll_after = F.binary_cross_entropy_with_logits(logits / temperature, targets.double()).item()
    assert report["calibration"]["val_nll_after"] == pytest.approx(nll_after, abs=tolerance)
    assert main(["predict", "--run", str(run), str(mosaics / "val"), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "p.csv")}
    assert len(rows) == len(val) == 60
    borderline = 0
    for r, p in zip(val, probabilities):
        predicted = rows[Path(r["path"]).name]["predicted"]
        clear = (p - thresholds).abs() > tolerance  # the example that sets a threshold sits on it
        borderline += int((~clear).sum())
        expected = {c for c, q, t, ok in zip(classes, p, thresholds, clear) if ok and q >= t}
        assert {c for c, ok in zip(classes, clear) if ok} & set(predicted.split(";") if predicted else []) == expected
    assert borderline <= len(classes)
    ordered = read_csv(tmp_path / "p.csv")
    same_as_cli(load_finetuned(run).predict([Path(r["path"]) for r in ordered]), ordered)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors"), "--onnx"]) == 0
    exported = load_finetuned(tmp_path / "m.safetensors").config.thresholds
    assert exported == pytest.approx(thresholds.tolist(), abs=tolerance)
    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["hookmix.task"] == "multilabel" and meta["hookmix.classes"] == classes
    assert meta["hookmix.thresholds"] == [report["thresholds"][c] for c in classes]
    assert meta["hookmix.temperature"] == temperature


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
