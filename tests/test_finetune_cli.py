"""``hookmix finetune`` as practitioners run it: the model's own preprocessing, a default layer, the device,
and every mixing option of the library as a flag (recorded in metrics.json, one-line errors for bad values)."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image

from hookmix.app.cli import main
from hookmix.app.finetune_job import default_layer
from hookmix.app.preprocessing import IMAGENET_MEAN, IMAGENET_STD, model_preprocessing
from hookmix.models import resolve_model
from tests.conftest import write_folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imgs") / "imgs", per_class=4, size=40)


def finetune_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    """``hookmix finetune`` on ``data`` with a small resnet18 run, plus ``extra`` flags."""
    small = ["--model", "resnet18", "--input-size", "3", "32", "32", "--epochs", "2", "--quiet"]
    return ["finetune", "--data", str(data), *small, "--out", str(tmp_path / "out"), *extra]


def finetune(tmp_path: Path, data: Path, *extra: str) -> dict:
    assert main(finetune_args(tmp_path, data, *extra)) == 0
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_the_transform_follows_the_model() -> None:
    """A timm ViT normalises with mean/std 0.5 and bicubic resizing; a ResNet with the ImageNet values; each
    transform is the library's own (timm's create_transform, torchvision's weights.transforms())."""
    image = Image.fromarray((torch.rand(50, 60, 3) * 255).byte().numpy())
    vit = timm.create_model("vit_tiny_patch16_224")
    found = model_preprocessing(vit, resolve_model("timm:vit_tiny_patch16_224"))
    assert found.mean == found.std == (0.5, 0.5, 0.5) and found.interpolation == "bicubic"
    expected = timm.data.create_transform(**timm.data.resolve_model_data_config(vit))
    assert torch.equal(found.eval_transform()(image), expected(image))
    resnet = torchvision.models.resnet50()
    found = model_preprocessing(resnet, resolve_model("resnet50"))
    assert (found.mean, found.std) == (IMAGENET_MEAN, IMAGENET_STD) and found.input_size == (3, 224, 224)
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    assert found.source == f"torchvision:{weights}" and found.resize == 232  # IMAGENET1K_V2 resizes to 232
    assert torch.equal(found.eval_transform()(image), weights.transforms()(image))
    smaller = model_preprocessing(resnet, resolve_model("resnet50"), (3, 112, 112))
    assert smaller.eval_transform()(image).shape == (3, 112, 112) and smaller.fingerprint() != found.fingerprint()


@pytest.mark.parametrize(
    "factory, expected",
    [
        (lambda: torchvision.models.resnet50(), "layer4"),
        (lambda: timm.create_model("resnet18"), "layer4"),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), "blocks.11"),
        (lambda: timm.create_model("convnext_atto"), "stages.3"),
        (lambda: torchvision.models.convnext_tiny(), "features.7"),
    ],
    ids=["tv_resnet50", "timm_resnet18", "timm_vit", "timm_convnext", "tv_convnext"],
)
def test_the_default_layer_is_the_last_stage_before_the_head(factory, expected: str) -> None:
    assert default_layer(factory(), "m") == expected


def test_flags_reach_the_run_and_metrics_json(tmp_path: Path, images: Path, capsys) -> None:
    val = write_folder(tmp_path / "val", per_class=2, size=40)
    report = finetune(
        tmp_path,
        images,
        "--val",
        str(val),
        "--cutmix-alpha",
        "1.0",
        "--switch-prob",
        "0.3",
        "--lam-mode",
        "sample",
        "--dominant",
        "--label-smoothing",
        "0.1",
        "--stop-epoch",
        "1",
        "--views",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert (
        first == "torchvision:resnet18:random-init-seed0 @ layer4 (default: the last stage before the pooling "
        "and head) on cpu"
    )
    mixing = report["config"]["mixing"]
    assert (mixing["cutmix_alpha"], mixing["switch_prob"], mixing["lam_mode"]) == (1.0, 0.3, "sample")
    assert (mixing["dominant"], mixing["label_smoothing"], mixing["stop_epoch"]) == (True, 0.1, 1)
    assert report["views"] == 2 and report["workers"] == 0 and report["device"] == "cpu"
    assert report["validation"] == str(val) and report["val_examples"] == 6 and report["train_examples"] == 12
    assert report["layer"] == "layer4" and report["layer_is_default"] is True
    assert report["preprocessing"]["mean"] == list(IMAGENET_MEAN) and report["preprocessing"]["input_size"] == [
        3,
        32,
        32,
    ]


def test_views_are_augmented_with_the_training_transform(tmp_path: Path, images: Path) -> None:
    """Two views of a training image differ (random crops and flips); validation images are deterministic."""
    from hookmix.app.imagefolder import load_image_folder
    from hookmix.app.preprocessing import default_preprocessing

    split = load_image_folder(images, (3, 32, 32), preprocessing=default_preprocessing(), augment=True)
    torch.manual_seed(0)
    assert not torch.equal(split.train[0][0], split.train[0][0])
    assert torch.equal(split.val[0][0], split.val[0][0])


@pytest.mark.slow
def test_a_vit_runs_with_its_own_preprocessing_the_default_layer_and_auto_device(
    tmp_path: Path, images: Path, capsys
) -> None:
    args = [
        "finetune",
        "--model",
        "vit_tiny_patch16_224",
        "--data",
        str(images),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--quiet",
    ]
    assert main(args) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[0]
        .endswith("@ blocks.11 (default: the last stage before the pooling and head) on cpu (auto)")
    )
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and report["preprocessing"]["input_size"] == [3, 224, 224]
    assert report["feature_shape"] == [197, 192] and report["device"] == "cpu"


BAD_FLAGS = {
    "device name": (["--device", "gpu"], "argument --device: 'gpu' is not one of auto, cpu, cuda, mps"),
    "device absent": (["--device", "cuda"], "device='cuda' but this machine has no CUDA device"),
    "cutmix alpha": (["--cutmix-alpha", "-1"], "argument --cutmix-alpha: -1 must be >= 0"),
    "switch prob": (["--switch-prob", "1.5"], "argument --switch-prob: 1.5 must be in [0, 1]"),
    "lam mode": (["--lam-mode", "row"], "argument --lam-mode: invalid choice: 'row'"),
    "label smoothing": (["--label-smoothing", "1"], "argument --label-smoothing: 1 must be in [0, 1)"),
    "stop epoch": (["--stop-epoch", "-1"], "argument --stop-epoch: -1 must be >= 0"),
    "views": (["--views", "0"], "argument --views: 0 must be >= 1"),
    "workers": (["--workers", "-2"], "argument --workers: -2 must be >= 0"),
    "val missing": (["--val", "nowhere"], "--val nowhere is not a directory"),
    "both methods off": (["--alpha", "0"], "alpha=0 and cutmix_alpha=0 turn both methods off"),
}


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_a_bad_flag_is_one_line_with_exit_code_2(name: str, tmp_path: Path, images: Path, capsys, monkeypatch) -> None:
    flags, message = BAD_FLAGS[name]
    monkeypatch.chdir(tmp_path)
    args = finetune_args(tmp_path, images, *flags)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("hookmix")]) == 1


def test_val_folder_with_other_classes_and_views_on_digits_are_refused(tmp_path: Path, images: Path, capsys) -> None:
    other = write_folder(tmp_path / "other", classes=("cat", "dog"), per_class=2)
    for args, message in (
        (["--data", str(images), "--model", "resnet18", "--val", str(other)], "give both folders the same class"),
        (["--data", "digits", "--views", "2"], "--views needs an image folder"),
    ):
        with pytest.raises(SystemExit):
            main(["finetune", *args, "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"])
        assert message in capsys.readouterr().err


def test_pooled_features_train_the_head_the_maps_would(tmp_path: Path, images: Path, capsys) -> None:
    """resnet18 at layer4 caches the pooled (512,) features, 4x smaller than its 2x2 maps at 64x64 (49x at
    224): its first lines say so, and the run equals the map-cache run (--keep-maps) of the same seed."""
    size = ("--input-size", "3", "64", "64", "--fp32")
    pooled = finetune(tmp_path / "pooled", images, *size, "--cache", str(tmp_path / "cache"))
    said = capsys.readouterr().out.splitlines()
    maps = finetune(tmp_path / "maps", images, *size, "--keep-maps")
    assert said[1] == (
        "mixing layer4 ≡ mixing after avgpool, flatten (only fixed linear ops between): caching 2,048 B/image "
        "instead of 8,192 (4x smaller)"
    )
    assert pooled["feature_shape"] == [512] and maps["feature_shape"] == [512, 2, 2]
    assert pooled["cached_point"]["pooled"] and not maps["cached_point"]["pooled"]
    for a, b in zip(pooled["history"], maps["history"], strict=True):
        for name in ("train_loss", "val_nll", "val_accuracy", "val_ece"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
    stored = json.loads((tmp_path / "cache" / "train.avgpool+flatten" / "manifest.json").read_text())
    assert stored["key"]["layer"] == "layer4+avgpool+flatten" and stored["feature_shape"] == [512]


def test_cutmix_keeps_the_maps_and_says_why(tmp_path: Path, images: Path, capsys) -> None:
    report = finetune(tmp_path, images, "--cutmix-alpha", "1.0", "--input-size", "3", "64", "64")
    assert capsys.readouterr().out.splitlines()[1] == (
        "caching the layer4 maps (4,096 B/image): CutMix pastes boxes of the map"
    )
    assert (
        report["feature_shape"] == [512, 2, 2] and report["cached_point"]["reason"] == "CutMix pastes boxes of the map"
    )


def test_head_kinds_reach_the_run_and_the_cli_lists_them_all(tmp_path: Path, images: Path) -> None:
    """--head mlp (fastai's create_head: concat pool, so the maps are cached) and linear (pooled) both train,
    from one --cache directory holding both caches; the CLI's literal choices (kept literal so --help loads
    no torch) are the library's HEAD_KINDS."""
    from hookmix.app.cli import build_parser
    from hookmix.heads import HEAD_KINDS

    cache = ("--input-size", "3", "64", "64", "--cache", str(tmp_path / "cache"))  # one directory for both caches
    mlp = finetune(tmp_path / "mlp", images, "--head", "mlp", *cache)
    linear = finetune(tmp_path / "linear", images, "--head", "linear", *cache)
    assert mlp["head"] == "mlp" and mlp["feature_shape"] == [512, 2, 2] and not mlp["cached_point"]["pooled"]
    assert linear["head"] == "linear" and linear["feature_shape"] == [512] and linear["cached_point"]["pooled"]
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {"train", "val", "train.0+1", "val.0+1"}
    finetune_parser = build_parser()._subparsers._group_actions[0].choices["finetune"]
    head = next(a for a in finetune_parser._actions if a.dest == "head")
    assert tuple(head.choices) == HEAD_KINDS
