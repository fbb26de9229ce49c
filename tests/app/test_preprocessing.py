"""The recorded preprocessing is the transform that runs: read back from what timm / torchvision build, written
into the run and the export, and rebuilt from that record alone — checked on real photos against the
transforms the libraries build themselves (``resolve_model_data_config`` + ``create_transform``,
``weights.transforms()``), never against hookmix's own code.

Plausible maintainer bugs, and the test that catches each:

* computing the resize from ``crop_pct`` again (``round(224 / 0.9)`` = 249 where timm floors to 248), in the
  record or in the rebuild -> ``test_the_record_is_what_the_library_builds`` (ViT, Swin, ConvNeXt at 60),
  ``test_crop_pct_decides_the_recorded_resize``, ``test_export_rebuild_equals_predict``;
* dropping timm's ``crop_mode`` (a squash model centre-cropped) or recording a non-square input's resize as
  the shorter side -> ``test_squash_and_non_square_crops_are_recorded_and_rebuilt``;
* recording ``Normalize``'s float32 read-back as the mean (0.48500001430511475), or truncating it wrongly
  -> ``test_the_record_is_what_the_library_builds`` (exact mean/std and exact tensors);
* rebuilding in predict from the configuration instead of the record, or from a record that lost a field
  -> ``test_export_rebuild_equals_predict`` (predict == a transform written by hand from the export's record);
* a transform step the record cannot express written down anyway (a record that rebuilds into another
  transform), or a malformed record taken silently -> ``test_what_cannot_be_recorded_is_refused_in_one_line``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data.transforms import ResizeKeepRatio
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from hookmix import UsageError, load_finetuned
from hookmix.app.cli import main
from hookmix.app.preprocessing import Preprocessing, model_preprocessing
from hookmix.graph.models import resolve_model
from hookmix.headonly.preprocessing import EvalTransform, read_eval_transform


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos shipped with scikit-learn (427x640, no download): both whole, a portrait crop and a small
    crop that the resize enlarges."""
    china, flower = (Image.fromarray(pixels) for pixels in load_sample_images().images)
    return [china, flower, china.crop((100, 20, 300, 320)), flower.crop((300, 200, 390, 330))]


def by_hand(record: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The transform a user writes from a record's ``eval`` entry with torchvision alone."""
    assert record["resize_mode"] == "shorter" and record["channels"] == 3
    mode = InterpolationMode(record["interpolation"])
    return transforms.Compose(
        [
            transforms.Resize(record["resize"], interpolation=mode),
            transforms.CenterCrop(record["crop"]),
            transforms.ToTensor(),
            transforms.Normalize(record["mean"], record["std"]),
        ]
    )


def library_transform(name: str, model: nn.Module, input_size: tuple[int, int, int] | None) -> Callable:
    """The evaluation transform as the model's library builds it (timm at ``input_size`` when given)."""
    library, _, arch = name.partition(":")
    if library == "torchvision":
        return torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    config = timm.data.resolve_model_data_config(model)
    if input_size is not None:
        config["input_size"] = input_size
    return timm.data.create_transform(**config)


def build(name: str, **kwargs: Any) -> nn.Module:
    library, _, arch = name.partition(":")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if library == "timm":
            return timm.create_model(arch, **kwargs)
        return torchvision.models.get_model(arch)


def json_record(preprocessing: Preprocessing) -> dict[str, Any]:
    """The record as a run or an export file holds it: through JSON."""
    return json.loads(json.dumps(preprocessing.record()))


def assert_same_on(photos: list[Image.Image], got: Callable, expected: Callable) -> None:
    for photo in photos:
        assert torch.equal(got(photo), expected(photo))


HALF = [0.5, 0.5, 0.5]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# name, --input-size, the resize the library applies (timm: floor(H / crop_pct); torchvision: the preset's),
# the interpolation, the mean and std
CASES = [
    ("timm:vit_tiny_patch16_224", None, 248, "bicubic", (HALF, HALF)),  # crop_pct 0.9: 248.9, floored
    ("timm:swin_tiny_patch4_window7_224", None, 248, "bicubic", IMAGENET),  # crop_pct 0.9
    ("timm:convnext_atto", (3, 60, 60), 68, "bicubic", IMAGENET),  # crop_pct 0.875: 68.57, floored
    ("torchvision:resnet18", None, 256, "bilinear", IMAGENET),  # ResNet18_Weights.IMAGENET1K_V1
    ("torchvision:efficientnet_b0", None, 256, "bicubic", IMAGENET),
]


@pytest.mark.parametrize("name, input_size, resize, interpolation, normalise", CASES, ids=[c[0] for c in CASES])
def test_the_record_is_what_the_library_builds(
    name: str, input_size: tuple[int, int, int] | None, resize: int, interpolation: str, normalise, photos
) -> None:
    model = build(name)
    preprocessing = model_preprocessing(model, resolve_model(name), input_size)
    record = json_record(preprocessing)["eval"]
    crop = list((input_size or (3, 224, 224))[1:])
    assert record == {
        "channels": 3,
        "resize": resize,
        "resize_mode": "shorter",
        "interpolation": interpolation,
        "crop": crop,
        "mean": normalise[0],
        "std": normalise[1],
    }
    expected = library_transform(name, model, input_size)
    assert_same_on(photos, by_hand(record), expected)
    assert_same_on(photos, EvalTransform.from_record(record, "run.json").build(), expected)
    assert_same_on(photos, preprocessing.eval_transform(), expected)


@pytest.mark.parametrize("crop_pct, resize", [(0.875, 256), (0.9, 248), (0.95, 235), (0.96, 233), (1.0, 224)])
def test_crop_pct_decides_the_recorded_resize(crop_pct: float, resize: int, photos) -> None:
    """timm floors 224 / crop_pct (0.95: 235.8 -> 235; 0.96: 233.3 -> 233); the record says what timm's own
    transform object holds, and the rebuilt transform equals timm's."""
    config = Preprocessing("timm:any", (3, 224, 224), (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), "bilinear", crop_pct)
    built = timm.data.create_transform(
        input_size=(3, 224, 224), crop_pct=crop_pct, interpolation="bilinear", mean=config.mean, std=config.std
    )
    assert built.transforms[0].size == resize == math.floor(224 / crop_pct)
    record = json_record(config)
    assert record["crop_pct"] == crop_pct and record["eval"]["resize"] == resize
    assert_same_on(photos[2:], by_hand(record["eval"]), built)


def test_squash_and_non_square_crops_are_recorded_and_rebuilt(photos) -> None:
    """A model whose timm configuration squashes (``crop_mode="squash"``, e.g. dm_nfnet_f0) and a non-square
    --input-size (timm keeps the aspect ratio, covering the crop) are recorded as such and rebuilt exactly."""
    squash_model = build("timm:convnext_atto", pretrained_cfg_overlay={"crop_mode": "squash"})
    square = build("timm:convnext_atto")
    for model, size, resize, mode in (
        (squash_model, (3, 60, 60), [68, 68], "squash"),
        (square, (3, 60, 90), [68, 102], "cover"),
    ):
        preprocessing = model_preprocessing(model, resolve_model("timm:convnext_atto"), size)
        record = json_record(preprocessing)["eval"]
        assert (record["resize"], record["resize_mode"], record["crop"]) == (resize, mode, list(size[1:]))
        expected = library_transform("timm:convnext_atto", model, size)
        assert_same_on(photos, EvalTransform.from_record(record, "run.json").build(), expected)
    assert json_record(model_preprocessing(squash_model, resolve_model("timm:convnext_atto")))["crop_mode"] == "squash"


def test_what_cannot_be_recorded_is_refused_in_one_line() -> None:
    """timm's ``crop_mode="border"`` pads; the record cannot say so, so it is refused rather than written as a
    centre crop. A record without its steps, or with a resize that does not fit its mode, names the file."""
    border = Preprocessing("timm:x", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", 0.9, "border")
    with pytest.raises(
        UsageError, match=r"the evaluation transform of timm:x has a step hookmix cannot record \("
    ) as info:
        border.record()
    assert "\n" not in str(info.value)
    fit = ResizeKeepRatio((36, 36), longest=1.0)  # fits the image inside (36, 36): not "cover"
    steps = transforms.Compose(
        [fit, transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(HALF, HALF)]
    )
    with pytest.raises(UsageError, match=r"of timm:y has a step hookmix cannot record \(.*ResizeKeepRatio"):
        read_eval_transform(steps, "timm:y")
    with pytest.raises(UsageError, match="run.json records no usable evaluation transform"):
        EvalTransform.from_record(None, "run.json")
    record = json_record(Preprocessing("timm:x", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", 0.9))["eval"]
    del record["crop"]
    with pytest.raises(UsageError, match=r"m\.json records no usable evaluation transform \(KeyError: 'crop'\)"):
        EvalTransform.from_record(record, "m.json")
    with pytest.raises(UsageError, match=r"m\.json records the resize \(36, 36\) in mode 'shorter'"):
        EvalTransform.from_record(record | {"crop": [32, 32], "resize": [36, 36]}, "m.json")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Image.Image]) -> Path:
    """Two classes of two photo crops each (JPEG, landscape and portrait)."""
    root = tmp_path_factory.mktemp("photos")
    boxes = [(0, 0, 320, 240), (200, 100, 440, 420)]
    for label, photo in zip(("china", "flower"), photos[:2]):
        (root / label).mkdir()
        for i, box in enumerate(boxes):
            photo.crop(box).save(root / label / f"{i}.jpg", quality=90)
    return root


E2E = [
    pytest.param("timm:vit_tiny_patch16_224", None, marks=pytest.mark.slow),
    pytest.param("timm:swin_tiny_patch4_window7_224", None, marks=pytest.mark.slow),
    pytest.param("timm:convnext_atto", (3, 60, 60)),
    pytest.param("torchvision:resnet18", None),
]


@pytest.mark.parametrize("name, input_size", E2E)
def test_export_rebuild_equals_predict(name: str, input_size, photo_folder: Path, tmp_path: Path, capsys) -> None:
    """finetune -> predict, and finetune -> export -> load_finetuned + the transform written by hand from the
    export's record: the same probabilities for every image and class (that the record is the library's
    transform is ``test_the_record_is_what_the_library_builds``)."""
    size = ["--input-size", *map(str, input_size)] if input_size else []
    run, exported = tmp_path / "run", tmp_path / "m.safetensors"
    common = ["--model", name, *size, "--epochs", "1", "--quiet"]
    assert main(["finetune", "--data", str(photo_folder), *common, "--out", str(run)]) == 0
    assert (
        main(["predict", "--run", str(run), str(photo_folder), "--out", str(tmp_path / "p.csv"), "--top-k", "2"]) == 0
    )
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    config = json.loads(exported.with_name("m.safetensors.json").read_text())
    transform = by_hand(config["preprocessing"]["eval"])
    model = load_finetuned(exported)
    with (tmp_path / "p.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4
    images = [Image.open(row["path"]).convert("RGB") for row in rows]
    with torch.no_grad():
        logits = model(torch.stack([transform(image) for image in images]))
    probabilities = torch.softmax(logits.double() / config["temperature"], dim=1)
    for row, p in zip(rows, probabilities):
        assert [row["class_1"], row["class_2"]] == [config["classes"][i] for i in p.argsort(descending=True)]
        assert [float(row["prob_1"]), float(row["prob_2"])] == pytest.approx(sorted(p.tolist())[::-1], abs=2e-6)
