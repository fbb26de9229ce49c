"""The ``hookmix finetune`` job: model -> split at a layer -> feature cache -> head training -> report.

The backbone runs once over the data (train and validation features are cached, on disk with
``cache_dir``, and reused by later runs with the same model, layer, input size and transform); the head
then trains for many epochs on the cached features with mixup (or without, ``mix=False``). The report
is ``metrics.json`` (settings, history, final metrics, cache facts) and PNG plots in ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, TensorDataset

from hookmix._checks import modes_restored
from hookmix._errors import UsageError
from hookmix._io import atomic_write
from hookmix.app.digits import digits_transfer, pretrain_source
from hookmix.app.imagefolder import load_image_folder
from hookmix.app.models import create_model, resolve_model, set_num_classes
from hookmix.app.preprocessing import model_preprocessing
from hookmix.cache import CacheKey, FeatureCache
from hookmix.cutpoints import stage_names
from hookmix.devices import resolve_device
from hookmix.finetune import FitConfig, fit
from hookmix.metrics import reliability
from hookmix.splitting import split
from hookmix.targets import check_classes

__all__ = ["DIGITS", "DIGITS_MODEL", "JobSpec", "default_layer", "run_finetune"]

DIGITS = "digits"
DIGITS_MODEL = "digits-cnn"


@dataclass(frozen=True)
class JobSpec:
    """What ``hookmix finetune`` was asked to do (validated CLI arguments)."""

    data: str
    layer: str | None
    out_dir: Path
    model: str | None = None
    pretrained: bool = False
    weights: Path | None = None
    cache_dir: Path | None = None
    input_size: tuple[int, int, int] | None = None
    fp32: bool = False
    shots: int = 20
    val: Path | None = None
    val_fraction: float = 0.2
    views: int = 1
    workers: int = 0
    device: str = "auto"
    batch_size: int = 64
    progress: bool = True


@dataclass(frozen=True)
class _Prepared:
    """The model, data and cache-key parts one fine-tuning job works on."""

    model: torch.nn.Module
    model_id: str
    layer: str
    layer_is_default: bool
    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    input_size: tuple[int, ...]
    train_transform: str
    val_transform: str
    preprocessing: dict[str, Any] | None


def _weights_id(path: Path) -> str:
    return "weights-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _check_input_size(model: torch.nn.Module, input_size: tuple[int, int, int], name: str) -> None:
    """Run ``model`` (in eval mode, no grad) on one zero image (1, C, H, W), so that an input size the model
    cannot take fails here with a message instead of as a torch error in the middle of the extraction."""
    try:
        with modes_restored(model, False), torch.no_grad():
            model(torch.zeros(1, *input_size))
    except (RuntimeError, AssertionError) as exc:  # torch shape errors; timm asserts the image size
        raise UsageError(
            f"--input-size {' '.join(map(str, input_size))} does not fit --model {name} "
            f"({str(exc).splitlines()[0]}); give the C H W it expects (`hookmix layers {name}` uses its default)."
        ) from None


def default_layer(model: torch.nn.Module, name: str) -> str:
    """The last stage before the model's pooling and head: ``layer4`` of a ResNet, the last block of a ViT,
    the last stage of a ConvNeXt (the last of :func:`~hookmix.stage_names`)."""
    try:
        return stage_names(model)[-1]
    except UsageError as err:
        raise UsageError(f"--model {name} has no stage to cut at by default ({err}); give --layer.") from None


def _digits(spec: JobSpec, seed: int) -> _Prepared:
    if spec.model not in (None, DIGITS_MODEL):
        raise UsageError(f"--data digits uses the embedded {DIGITS_MODEL!r}; drop --model {spec.model}.")
    for flag, given in (("--views", spec.views > 1), ("--val", spec.val is not None)):
        if given:
            raise UsageError(f"{flag} needs an image folder: the digits task has fixed tensors; drop {flag}.")
    task = digits_transfer(spec.shots, seed)
    transform = f"digits:k{spec.shots}:seed{seed}"
    return _Prepared(
        model=pretrain_source(seed=0),
        model_id="hookmix:digits-cnn(seed0)",
        layer=spec.layer or "stage2",
        layer_is_default=spec.layer is None,
        train=TensorDataset(task.train_x, task.train_y),
        val=TensorDataset(task.val_x, task.val_y),
        classes=task.class_names,
        input_size=tuple(task.train_x.shape[1:]),
        train_transform=transform,
        val_transform=transform,
        preprocessing=None,
    )


def _prepare(spec: JobSpec, seed: int) -> _Prepared:
    if spec.data == DIGITS:
        return _digits(spec, seed)
    if spec.model is None:
        raise UsageError("--model is required with an image folder, e.g. --model resnet50.")
    model_spec = resolve_model(spec.model)
    model = create_model(spec.model, pretrained=spec.pretrained, weights=spec.weights, seed=seed)
    layer = spec.layer or default_layer(model, spec.model)
    preprocessing = model_preprocessing(model, model_spec, spec.input_size)
    input_size = preprocessing.input_size
    _check_input_size(model, input_size, spec.model)
    folder = load_image_folder(
        spec.data,
        input_size,
        preprocessing=preprocessing,
        val_root=spec.val,
        augment=spec.views > 1,
        val_fraction=spec.val_fraction,
        seed=seed,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        set_num_classes(model, len(folder.classes))
    if spec.pretrained:
        model_id = f"{model_spec.id}:pretrained"
    elif spec.weights is not None:
        model_id = f"{model_spec.id}:{_weights_id(spec.weights)}"
    else:
        model_id = f"{model_spec.id}:random-init-seed{seed}"
    return _Prepared(
        model=model,
        model_id=model_id,
        layer=layer,
        layer_is_default=spec.layer is None,
        train=folder.train,
        val=folder.val,
        classes=folder.classes,
        input_size=input_size,
        train_transform=preprocessing.fingerprint(training=folder.augmented),
        val_transform=preprocessing.fingerprint(),
        preprocessing=preprocessing.record(),
    )


def _extract(
    prepared: _Prepared, backbone: torch.nn.Module, spec: JobSpec, device: torch.device, part: str
) -> FeatureCache:
    train = part == "train"
    transform = prepared.train_transform if train else prepared.val_transform
    source = spec.val if not train and spec.val is not None else spec.data
    key = CacheKey(prepared.model_id, prepared.layer, prepared.input_size, transform, f"{source}:{part}")
    return FeatureCache.extract(
        backbone,
        prepared.train if train else prepared.val,
        key,
        path=spec.cache_dir / part if spec.cache_dir is not None else None,
        dtype=torch.float32 if spec.fp32 else torch.float16,
        batch_size=spec.batch_size,
        views=spec.views if train else 1,
        num_workers=spec.workers,
        device=device,
        progress=spec.progress,
    )


def run_finetune(
    spec: JobSpec, config: FitConfig, resume: bool = False, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the job and write its report; returns the ``metrics.json`` payload. ``say`` gets the first line
    (model, layer, device) before the long work starts."""
    from hookmix.plots import plot_history, plot_lambda_hist, plot_reliability

    device = resolve_device(spec.device)
    prepared = _prepare(spec, config.seed)
    check_classes(config.mixing.exclude_classes, len(prepared.classes))  # before the extraction
    chosen = " (default: the last stage before the pooling and head)" if prepared.layer_is_default else ""
    picked = " (auto)" if spec.device == "auto" else ""
    say(f"{prepared.model_id} @ {prepared.layer}{chosen} on {device}{picked}")
    backbone, head = split(prepared.model, prepared.layer)
    head.requires_grad_(True)
    start = time.perf_counter()
    train = _extract(prepared, backbone, spec, device, "train")
    val = _extract(prepared, backbone, spec, device, "val")
    extract_s = time.perf_counter() - start
    result = fit(
        head,
        "input",
        train.features,
        train.labels,
        val.features[0],
        val.labels,
        config,
        num_classes=len(prepared.classes),
        checkpoint_dir=spec.out_dir,
        resume=resume,
        device=device,
        progress=spec.progress,
    )
    out = spec.out_dir
    label = "mixup" if config.mix else "no mixup"
    plot_history({label: result.history}, out / "curves.png")
    plot_reliability({label: reliability(result.val_logits, val.labels)}, out / "reliability.png")
    if result.lams:
        plot_lambda_hist(torch.tensor(result.lams), out / "lambda_hist.png", alpha=config.mixing.alpha)
    payload = {
        "model": prepared.model_id,
        "layer": prepared.layer,
        "layer_is_default": prepared.layer_is_default,
        "device": str(device),
        "device_requested": spec.device,
        "preprocessing": prepared.preprocessing,
        "views": spec.views,
        "workers": spec.workers,
        "validation": str(spec.val) if spec.val is not None else f"split {spec.val_fraction} of --data",
        "classes": list(prepared.classes),
        "train_examples": len(train),
        "val_examples": len(val),
        "feature_shape": list(train.feature_shape),
        "cache_bytes_per_example": train.bytes_per_example,
        "extract_seconds": round(extract_s, 3),
        "config": asdict(config),
        "final": result.final,
        "history": result.history,
    }
    atomic_write(out / "metrics.json", json.dumps(payload, indent=1).encode())
    return payload
