"""``hookmix finetune`` as practitioners run it: the model's own preprocessing, a default layer, the device,
and every documented flag checked end to end through the CLI by its effect on what the run leaves behind
(cache manifests and bytes, the λ the run recorded, the training loss, the head's weights), not by its
echo in metrics.json. ``FLAG_EFFECTS`` names, for every flag of ``hookmix finetune --help``, the test that
checks it; a new flag without one fails ``test_every_finetune_flag_has_a_test_of_its_effect``.

Bugs a maintainer could plausibly make here, and the test that catches each:
- a CutMix-only run (``--alpha 0``) crashes after training (the λ histogram asks for Beta(0, 0)), leaving no
  run.json or head: ``test_a_cutmix_only_run_finishes_with_its_head_and_predicts``;
- the histogram draws a Beta curve where λ follow none (CutMix, ``--dominant``): ``test_lambda_density_alpha``;
- ``--alpha`` / ``--cutmix-alpha`` / ``--switch-prob`` not passed on (or swapped):
  ``test_alpha_cutmix_and_switch_prob_shape_the_recorded_lambdas``;
- ``--dominant`` ignored, or folding a new draw instead of the same one: ``test_dominant_folds_the_same_draws``;
- ``--lam-mode`` not passed on: ``test_lam_mode_sample_changes_the_draws``;
- ``--stop-epoch`` off by one or ignored, ``--batch-size`` / ``--epochs`` not used:
  ``test_stop_epoch_batch_size_and_epochs_set_which_steps_mix``;
- ``--label-smoothing`` not reaching the targets, ``--no-mix`` still mixing, ``--exclude-classes`` ignored,
  ``--seed`` / ``--shots`` not choosing the task, ``--lr`` not reaching the optimiser:
  ``test_the_training_loss_is_the_criterion_of_the_initial_head``;
- ``--views`` caching one view, or the same view twice, or other views on a rerun (views drawn from the global
  generators): ``test_views_cache_that_many_augmented_views``;
- ``--fp32`` / ``--cache`` / ``--layer`` not reaching the cache: ``test_layer_fp32_and_cache_set_what_is_stored``;
- ``--workers`` changing the features: ``test_workers_extract_the_same_features``;
- ``--extract-batch-size`` ignored (extraction fixed at 64), or put in the cache key (a run with another
  extraction batch size extracts again), or not reaching ``sweep``:
  ``test_extract_batch_size_sets_the_backbone_batches_not_the_cache``,
  ``test_sweep_extracts_in_batches_of_extract_batch_size``; left unvalidated (the library's message then
  names ``--batch-size``): ``test_a_bad_flag_is_one_line_with_exit_code_2``;
- ``--pretrained`` / ``--weights`` not loading the weights: ``test_pretrained_and_weights_set_the_backbone``;
- ``--quiet`` not silencing the bars: ``test_quiet_silences_the_progress_bars``.
"""

import csv
import importlib
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from hookmix.app.cli import main
from hookmix.app.digits import digits_transfer, pretrain_source
from hookmix.app.finetune_job import default_layer
from hookmix.app.preprocessing import IMAGENET_MEAN, IMAGENET_STD, model_preprocessing
from hookmix.app.run import load_run
from hookmix.evaluation.plots import lambda_density_alpha
from hookmix.graph.models import resolve_model
from hookmix.mixing.settings import MixSettings
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
    "device absent": (["--device", "cuda"], "--device cuda but this machine has no CUDA device"),
    "cutmix alpha": (["--cutmix-alpha", "-1"], "argument --cutmix-alpha: -1 must be >= 0"),
    "switch prob": (["--switch-prob", "1.5"], "argument --switch-prob: 1.5 must be in [0, 1]"),
    "lam mode": (["--lam-mode", "row"], "argument --lam-mode: invalid choice: 'row'"),
    "label smoothing": (["--label-smoothing", "1"], "argument --label-smoothing: 1 must be in [0, 1)"),
    "stop epoch": (["--stop-epoch", "-1"], "argument --stop-epoch: -1 must be >= 0"),
    "views": (["--views", "0"], "argument --views: 0 must be >= 1"),
    "workers": (["--workers", "-2"], "argument --workers: -2 must be >= 0"),
    "extract batch size": (["--extract-batch-size", "0"], "argument --extract-batch-size: 0 must be >= 1"),
    "extract batch size text": (["--extract-batch-size", "many"], "argument --extract-batch-size: 'many' is not an"),
    "val missing": (["--val", "nowhere"], "--val nowhere is not a directory"),
    "both methods off": (["--alpha", "0"], "--alpha 0 and --cutmix-alpha 0 turn both methods off"),
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
    stored = cached(tmp_path / "cache")[0]  # the only training cache: the pooled one
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
    from hookmix.headonly.heads import HEAD_KINDS

    cache = ("--input-size", "3", "64", "64", "--cache", str(tmp_path / "cache"))  # one directory for both caches
    mlp = finetune(tmp_path / "mlp", images, "--head", "mlp", *cache)
    linear = finetune(tmp_path / "linear", images, "--head", "linear", *cache)
    assert mlp["head"] == "mlp" and mlp["feature_shape"] == [512, 2, 2] and not mlp["cached_point"]["pooled"]
    assert linear["head"] == "linear" and linear["feature_shape"] == [512] and linear["cached_point"]["pooled"]
    names = {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir()}  # "train-<key hash>"
    assert names == {"train", "val", "train.0+1", "val.0+1"}
    finetune_parser = build_parser()._subparsers._group_actions[0].choices["finetune"]
    head = next(a for a in finetune_parser._actions if a.dest == "head")
    assert tuple(head.choices) == HEAD_KINDS


# --- every flag by its effect --------------------------------------------------------------------------------

DIGITS_FIT = ("--batch-size", "16", "--lr", "3e-2")  # explicit, so that a change of the defaults moves no count


def digits_run(out: Path, *flags: str) -> dict:
    """``hookmix finetune --data digits`` (100 training images, 796 validation) into ``out``; its metrics.json."""
    args = ["finetune", "--data", "digits", "--epochs", "2", *DIGITS_FIT, "--out", str(out), "--quiet", *flags]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def recorded_lams(run: Path) -> torch.Tensor:
    """The λ of every mixed step (its first row's) in training order, as the run recorded them for its λ
    histogram: ``result.lams`` of the run's checkpoint."""
    return load_file(run / "checkpoint.safetensors")["result.lams"]


def quarters(lams: torch.Tensor) -> torch.Tensor:
    """Which λ are a multiple of 1/4: a CutMix box on the digits CNN's 2x2 stage2 map keeps 0-4 of 4 cells."""
    return ((lams * 4) - (lams * 4).round()).abs() < 1e-6


def digits_logits(x: torch.Tensor, head: Path | None = None) -> torch.Tensor:
    """Logits of the embedded digits CNN (pretrained on digits 0-4, seed 0), with the classifier of ``head``
    (a run's head.safetensors) when given, in float64."""
    model = pretrain_source(seed=0).eval()
    if head is not None:
        state = load_file(head)
        model.head[2] = nn.Linear(64, state["head.2.weight"].shape[0])
        model.head[2].load_state_dict({"weight": state["head.2.weight"], "bias": state["head.2.bias"]})
    with torch.no_grad():
        return model(x).double()


def test_a_cutmix_only_run_finishes_with_its_head_and_predicts(tmp_path: Path) -> None:
    """``--alpha 0 --cutmix-alpha 1`` ("cutmix only") leaves a finished run: run.json, the head, the λ
    histogram (λ = the kept share of the 2x2 map: multiples of 1/4), and predict works on its map-level head;
    ``--resume`` of the finished run answers instead of failing in the histogram again."""
    run = tmp_path / "run"
    report = digits_run(run, "--alpha", "0", "--cutmix-alpha", "1")
    assert report["feature_shape"] == [64, 2, 2] and not report["cached_point"]["pooled"]
    assert (run / "run.json").is_file() and (run / "head.safetensors").is_file()
    assert (run / "lambda_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lams = recorded_lams(run)
    assert len(lams) == 2 * 7 and quarters(lams).all() and (lams < 1).any()
    task = digits_transfer(20, 0)
    for i in range(3):
        Image.fromarray((task.val_x[i, 0] * 255).round().byte().numpy(), "L").save(tmp_path / f"{i}.png")
    out = tmp_path / "p.csv"
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    assert main(["predict", "--run", str(run), *images, "--out", str(out), "--top-k", "5", "--quiet"]) == 0
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.float32) / 255)[None] for p in images])
    expected = digits_logits(pixels, run / "head.safetensors").softmax(dim=1)
    rows = list(csv.DictReader(out.open()))
    for row, p in zip(rows, expected, strict=True):
        got = {row[f"class_{k}"]: float(row[f"prob_{k}"]) for k in range(1, 6)}
        assert got == pytest.approx(dict(zip(report["classes"], p.tolist())), abs=2e-5)
    args = ["finetune", "--data", "digits", "--epochs", "2", *DIGITS_FIT, "--out", str(run), "--quiet"]
    assert main([*args, "--alpha", "0", "--cutmix-alpha", "1", "--resume"]) == 0


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (MixSettings(alpha=0.4), 0.4),
        (MixSettings(alpha=0.4, cutmix_alpha=1.0, switch_prob=0.0), 0.4),  # CutMix never drawn
        (MixSettings(alpha=0.0, cutmix_alpha=1.0), None),
        (MixSettings(alpha=0.4, cutmix_alpha=1.0), None),
        (MixSettings(alpha=0.4, dominant=True), None),
    ],
    ids=["mixup", "cutmix-never-drawn", "cutmix-only", "both", "dominant"],
)
def test_lambda_density_alpha(settings: MixSettings, expected: float | None) -> None:
    """The λ histogram overlays Beta(α, α) only where the recorded λ follow it: never Beta(0, 0)."""
    assert lambda_density_alpha(settings) == expected


def test_alpha_cutmix_and_switch_prob_shape_the_recorded_lambdas(tmp_path: Path) -> None:
    """``--alpha 50`` keeps λ near 1/2, ``--alpha 0.05`` near 0 or 1; ``--switch-prob 1`` makes every step
    CutMix (λ in quarters of the 2x2 map, maps cached) and ``--switch-prob 0`` none (pooled features cached)."""
    epochs = ("--epochs", "4")
    digits_run(tmp_path / "a50", *epochs, "--alpha", "50")
    digits_run(tmp_path / "a005", *epochs, "--alpha", "0.05")
    narrow, wide = recorded_lams(tmp_path / "a50"), recorded_lams(tmp_path / "a005")
    assert len(narrow) == len(wide) == 4 * 7
    assert ((narrow - 0.5).abs() < 0.25).all()
    assert ((wide - 0.5).abs() > 0.45).float().mean() >= 0.7
    both = ("--alpha", "0.4", "--cutmix-alpha", "1")
    always = digits_run(tmp_path / "p1", *epochs, *both, "--switch-prob", "1")
    never = digits_run(tmp_path / "p0", *epochs, *both, "--switch-prob", "0")
    assert not always["cached_point"]["pooled"] and never["cached_point"]["pooled"]
    assert quarters(recorded_lams(tmp_path / "p1")).all() and (recorded_lams(tmp_path / "p1") < 1).any()
    assert quarters(recorded_lams(tmp_path / "p0")).float().mean() < 0.2


def test_dominant_folds_the_same_draws(tmp_path: Path) -> None:
    """``--dominant`` records max(λ, 1 − λ) of the very draws the same seed makes without it: all ≥ 0.5."""
    digits_run(tmp_path / "plain")
    digits_run(tmp_path / "dominant", "--dominant")
    plain, dominant = recorded_lams(tmp_path / "plain"), recorded_lams(tmp_path / "dominant")
    assert (plain < 0.5).any() and (dominant >= 0.5).all()
    assert torch.equal(dominant, torch.maximum(plain, 1 - plain))


def test_stop_epoch_batch_size_and_epochs_set_which_steps_mix(tmp_path: Path) -> None:
    """100 images in batches of 40 are 3 steps an epoch; 3 epochs mix 9 steps, ``--stop-epoch 1`` only the
    3 of epoch 0 (the same λ: a schedule never shifts the draws) and ``--stop-epoch 0`` none (no histogram)."""
    flags = ("--epochs", "3", "--batch-size", "40")
    full = digits_run(tmp_path / "full", *flags)
    digits_run(tmp_path / "stop1", *flags, "--stop-epoch", "1")
    digits_run(tmp_path / "stop0", *flags, "--stop-epoch", "0")
    assert len(full["history"]) == 3
    lams = recorded_lams(tmp_path / "full")
    assert len(lams) == 9 and torch.equal(recorded_lams(tmp_path / "stop1"), lams[:3])
    assert len(recorded_lams(tmp_path / "stop0")) == 0 and not (tmp_path / "stop0" / "lambda_hist.png").exists()


LOSS_CASES = {
    # name: (flags, label smoothing, task seed, shots)
    "no-mix": (("--no-mix",), 0.0, 0, 20),
    "label-smoothing": (("--no-mix", "--label-smoothing", "0.3"), 0.3, 0, 20),
    "seed-and-shots": (("--no-mix", "--seed", "1", "--shots", "10"), 0.0, 1, 10),
    "every-class-excluded": (("--exclude-classes", "0", "1", "2", "3", "4"), 0.0, 0, 20),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_the_training_loss_is_the_criterion_of_the_initial_head(name: str, tmp_path: Path) -> None:
    """With ``--lr 1e-12`` the head stays the pretrained one (its weights unchanged), so epoch 1's training
    loss is computable by hand: the cross-entropy of that head on the task ``--seed`` and ``--shots`` draw,
    against targets smoothed as ``--label-smoothing`` says, ``(1 − s)·onehot + s/5``, unmixed for ``--no-mix``
    and for ``--exclude-classes`` of every class. Mixing (the control) gives another loss."""
    flags, smoothing, seed, shots = LOSS_CASES[name]
    frozen = ("--epochs", "1", "--lr", "1e-12")
    report = digits_run(tmp_path / "run", *flags, *frozen)
    task = digits_transfer(shots, seed)
    targets = F.one_hot(task.train_y, 5).double() * (1 - smoothing) + smoothing / 5
    expected = -(targets * digits_logits(task.train_x).log_softmax(dim=1)).sum(dim=1).mean().item()
    assert report["train_examples"] == 5 * shots
    assert report["history"][0]["train_loss"] == pytest.approx(expected, abs=1e-4)  # fp16 cache: 1e-5 measured
    head, pretrained = load_file(tmp_path / "run" / "head.safetensors"), pretrain_source(seed=0).head[2]
    torch.testing.assert_close(head["head.2.weight"], pretrained.weight.detach(), rtol=0, atol=1e-8)
    if name == "every-class-excluded":
        mixed = digits_run(tmp_path / "mixed", *frozen)
        assert abs(mixed["history"][0]["train_loss"] - expected) > 1e-2


def cached(cache: Path, part: str = "train") -> tuple[dict, torch.Tensor]:
    """The manifest and the stored features (V, N, ...) of one part of a ``--cache`` directory."""
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and re.match(rf"{part}($|[.-])", p.name)]
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [load_file(folder / shard["file"])["features"] for shard in manifest["shards"]]
    return manifest, torch.cat(shards, dim=1)


def test_views_cache_that_many_augmented_views(tmp_path: Path, images: Path) -> None:
    """``--views 2`` stores two views of every training image (twice the bytes, views that differ: the
    training transform's random crops), validation one, and the same bytes on a rerun with workers; ``--views 1``
    one view, the deterministic one."""
    finetune(tmp_path / "one", images, "--cache", str(tmp_path / "c1"), "--epochs", "1")
    finetune(tmp_path / "two", images, "--views", "2", "--cache", str(tmp_path / "c2"), "--epochs", "1")
    one, features_one = cached(tmp_path / "c1")
    two, features_two = cached(tmp_path / "c2")
    assert (one["views"], two["views"]) == (1, 2) and two["count"] == one["count"] == features_one.shape[1]
    assert features_one.shape[0] == 1 and features_two.shape == (2, *features_one.shape[1:])
    assert two["bytes_per_example"] == 2 * one["bytes_per_example"]
    assert sum(s["bytes"] for s in two["shards"]) > 1.9 * sum(s["bytes"] for s in one["shards"])
    assert ((features_two[0] - features_two[1]).flatten(1).abs().amax(dim=1) > 0).all()
    assert cached(tmp_path / "c2", "val")[0]["views"] == 1
    # each (image, view) is drawn under its own seed: a rerun, here with DataLoader workers, caches the same views
    finetune(tmp_path / "again", images, "--views", "2", "--workers", "2", "--cache", str(tmp_path / "c3"))
    again, features_again = cached(tmp_path / "c3")
    assert torch.equal(features_again, features_two)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in two["shards"]]


def test_lam_mode_sample_changes_the_draws(tmp_path: Path) -> None:
    """``--lam-mode sample`` draws a λ per row, so the generator moves on by a batch of draws per step and
    the λ recorded (each step's first row) part from those of ``--lam-mode batch`` with the same seed after
    the first step. (Which λ the other rows got is not recorded: test_plan checks the per-row draws.)"""
    digits_run(tmp_path / "batch", "--lam-mode", "batch")
    digits_run(tmp_path / "sample", "--lam-mode", "sample")
    batch, sample = recorded_lams(tmp_path / "batch"), recorded_lams(tmp_path / "sample")
    assert len(batch) == len(sample) == 2 * 7 and ((sample > 0) & (sample < 1)).all()
    assert (batch[1:] - sample[1:]).abs().min() > 1e-4


def test_layer_fp32_and_cache_set_what_is_stored(tmp_path: Path) -> None:
    """``--layer stage1 --fp32 --cache DIR`` stores the stage1 maps (32x4x4, nothing pooled: a conv follows) in
    float32, equal to the pretrained CNN's stage1 computed by hand, and the head trains stage2 with it;
    the default caches stage2's pooled 64 features in float16 (4x fewer bytes per value pair)."""
    report = digits_run(tmp_path / "run", "--layer", "stage1", "--fp32", "--cache", str(tmp_path / "cache"))
    manifest, features = cached(tmp_path / "cache")
    assert report["feature_shape"] == manifest["feature_shape"] == [32, 4, 4] and manifest["dtype"] == "float32"
    assert manifest["bytes_per_example"] == report["cache_bytes_per_example"] == 32 * 4 * 4 * 4
    model = pretrain_source(seed=0).eval()
    with torch.no_grad():
        expected = model.stage1(model.stem(digits_transfer(20, 0).train_x))
    torch.testing.assert_close(features[0], expected, rtol=1e-5, atol=1e-5)
    assert any(name.startswith("stage2.") for name in load_file(tmp_path / "run" / "head.safetensors"))
    default = digits_run(tmp_path / "default")
    assert default["feature_shape"] == [64] and default["cache_bytes_per_example"] == 64 * 2


def backbone_batches(run: Callable[[], object]) -> list[int]:
    """The batch size of every forward of the digits CNN's first conv (the only module that takes the
    one-channel digit images) while ``run`` runs, seen by a global forward pre-hook of this test's own;
    forwards of one image (the job's shape probes) are left out."""
    pretrain_source(seed=0)  # pretrained (and cached) before the hook: its training batches are not the job's
    seen: list[int] = []

    def record(module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.Conv2d) and module.in_channels == 1 and args[0].shape[0] > 1:
            seen.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_extract_batch_size_sets_the_backbone_batches_not_the_cache(tmp_path: Path) -> None:
    """The digits task's 100 training and 796 validation images go through the backbone in batches of
    ``--extract-batch-size`` (40: 40, 40, 20 then 19 x 40 and 36; the default 64: 64, 36 then 12 x 64 and
    28), whatever the head's ``--batch-size``. The cache key leaves it out: a run with another extraction
    batch size reuses the cache (no backbone forward), and the features of both batch sizes agree to float
    rounding (bitwise on the x86 CPU this was written on; 1e-5 is the margin for other kernels)."""
    one = ("--fp32", "--epochs", "1", "--cache")
    by40 = backbone_batches(
        lambda: digits_run(tmp_path / "b40", *one, str(tmp_path / "c40"), "--extract-batch-size", "40")
    )
    assert by40 == [40, 40, 20] + [40] * 19 + [36]
    again = backbone_batches(lambda: digits_run(tmp_path / "again", *one, str(tmp_path / "c40")))
    assert again == []
    by64 = backbone_batches(lambda: digits_run(tmp_path / "b64", *one, str(tmp_path / "c64")))
    assert by64 == [64, 36] + [64] * 12 + [28]
    for part in ("train", "val"):
        torch.testing.assert_close(
            cached(tmp_path / "c40", part)[1], cached(tmp_path / "c64", part)[1], rtol=0, atol=1e-5
        )


def test_sweep_extracts_in_batches_of_extract_batch_size(tmp_path: Path) -> None:
    """``hookmix sweep --extract-batch-size 40`` runs the backbone over one layer's train and validation
    images in batches of 40, as ``finetune`` does."""
    args = ["sweep", "--data", "digits", "--layers", "stage2", "--alpha", "0", "--seeds", "2", "--epochs", "1"]
    run = [*args, "--extract-batch-size", "40", "--out", str(tmp_path / "sweep"), "--quiet"]
    assert backbone_batches(lambda: main(run)) == [40, 40, 20] + [40] * 19 + [36]


def test_workers_extract_the_same_features(tmp_path: Path, images: Path) -> None:
    """``--workers 2`` loads the images in two processes: the cached features are those of ``--workers 0``."""
    finetune(tmp_path / "w0", images, "--cache", str(tmp_path / "c0"), "--epochs", "1", "--workers", "0")
    finetune(tmp_path / "w2", images, "--cache", str(tmp_path / "c2"), "--epochs", "1", "--workers", "2")
    assert torch.equal(cached(tmp_path / "c0")[1], cached(tmp_path / "c2")[1])


@pytest.mark.parametrize("source", ["--pretrained", "--weights"])
def test_pretrained_and_weights_set_the_backbone(source: str, tmp_path: Path, images: Path, monkeypatch) -> None:
    """The run's model is the given weights with the trained classifier: ``--weights`` a safetensors file,
    ``--pretrained`` torchvision's default weights, served offline from a hub cache (TORCH_HOME) that holds
    other weights under the expected file name (so no download, and no chance of matching a random init)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        weights = torchvision.models.resnet18().state_dict()
    if source == "--pretrained":
        url = torchvision.models.ResNet18_Weights.DEFAULT.url
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(weights, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        flags = ["--pretrained"]
    else:
        save_file(weights, tmp_path / "w.safetensors")
        flags = ["--weights", str(tmp_path / "w.safetensors")]
    finetune(tmp_path, images, *flags, "--epochs", "1")
    model = torchvision.models.resnet18()
    model.load_state_dict(weights)
    head = load_file(tmp_path / "out" / "head.safetensors")
    model.fc = nn.Linear(512, 3)
    model.fc.load_state_dict({"weight": head["fc.weight"], "bias": head["fc.bias"]})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)
        got = load_run(tmp_path / "out").model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_quiet_silences_the_progress_bars(tmp_path: Path, capsys) -> None:
    """Without ``--quiet`` the extraction and training draw tqdm bars on stderr; with it, stderr stays empty."""
    assert main(["finetune", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "loud")]) == 0
    assert "it/s]" in capsys.readouterr().err
    digits_run(tmp_path / "quiet", "--epochs", "1")
    assert capsys.readouterr().err == ""


FLAG_EFFECTS = {
    # every flag of `hookmix finetune --help`: the test that checks what it does ("file::name"; this file if bare)
    "--data": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--model": "test_pretrained_and_weights_set_the_backbone",
    "--pretrained": "test_pretrained_and_weights_set_the_backbone",
    "--weights": "test_pretrained_and_weights_set_the_backbone",
    "--layer": "test_layer_fp32_and_cache_set_what_is_stored",
    "--head": "test_head_kinds_reach_the_run_and_the_cli_lists_them_all",
    "--keep-maps": "test_pooled_features_train_the_head_the_maps_would",
    "--calibrate": "test_predict_export.py::test_the_recorded_calibration_is_that_of_the_run_s_logits",
    "--memory-budget": "test_predict_export.py::test_a_cache_over_the_memory_budget_is_streamed_or_needs_a_cache_dir",
    "--device": "test_flags_reach_the_run_and_metrics_json",
    "--alpha": "test_alpha_cutmix_and_switch_prob_shape_the_recorded_lambdas",
    "--cutmix-alpha": "test_a_cutmix_only_run_finishes_with_its_head_and_predicts",
    "--switch-prob": "test_alpha_cutmix_and_switch_prob_shape_the_recorded_lambdas",
    "--lam-mode": "test_lam_mode_sample_changes_the_draws",
    "--dominant": "test_dominant_folds_the_same_draws",
    "--label-smoothing": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--stop-epoch": "test_stop_epoch_batch_size_and_epochs_set_which_steps_mix",
    "--no-mix": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--epochs": "test_stop_epoch_batch_size_and_epochs_set_which_steps_mix",
    "--batch-size": "test_stop_epoch_batch_size_and_epochs_set_which_steps_mix",
    "--lr": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--seed": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--data-seed": "test_sweep.py::test_the_sweep_cli_cells_equal_finetune_runs",
    "--exclude-classes": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--cache": "test_layer_fp32_and_cache_set_what_is_stored",
    "--fp32": "test_layer_fp32_and_cache_set_what_is_stored",
    "--input-size": "test_cutmix_keeps_the_maps_and_says_why",
    "--shots": "test_the_training_loss_is_the_criterion_of_the_initial_head",
    "--val": "test_flags_reach_the_run_and_metrics_json",
    "--labels": "test_predict_export.py::test_multilabel_runs_end_to_end_with_thresholds",
    "--val-labels": "test_predict_export.py::test_multilabel_runs_end_to_end_with_thresholds",
    "--views": "test_views_cache_that_many_augmented_views",
    "--workers": "test_workers_extract_the_same_features",
    "--extract-batch-size": "test_extract_batch_size_sets_the_backbone_batches_not_the_cache",
    "--out": "test_a_cutmix_only_run_finishes_with_its_head_and_predicts",
    "--resume": "test_a_cutmix_only_run_finishes_with_its_head_and_predicts",
    "--quiet": "test_quiet_silences_the_progress_bars",
    "--overwrite": "test_run_trust.py::test_a_finished_run_is_refused_unless_overwrite_is_given",
    "--ddp": "test_torchrun.py::test_ddp_without_mixing_equals_one_process_and_resumes_after_a_rank_dies",
}


def dotted_test_module(file_name: str) -> str:
    """The dotted name of the test file ``file_name`` wherever it lives under tests/."""
    tests = Path(__file__).resolve().parents[1]
    (path,) = tests.rglob(file_name)
    return ".".join(path.relative_to(tests.parent).with_suffix("").parts)


def test_every_finetune_flag_has_a_test_of_its_effect() -> None:
    """The flags of ``hookmix finetune --help`` are exactly FLAG_EFFECTS' keys, and each named test exists:
    a new flag fails here until a test of what it does is named."""
    from hookmix.app.cli import build_parser

    finetune_parser = build_parser()._subparsers._group_actions[0].choices["finetune"]
    flags = {option for action in finetune_parser._actions for option in action.option_strings}
    assert flags - {"-h", "--help"} == set(FLAG_EFFECTS)
    for where in FLAG_EFFECTS.values():
        module, _, name = where.rpartition("::")
        namespace = vars(importlib.import_module(dotted_test_module(module))) if module else globals()
        assert callable(namespace.get(name)), where
