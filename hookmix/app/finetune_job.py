"""The ``hookmix finetune`` job: model -> split at a layer -> feature cache -> head training -> report.

The backbone runs once over the data (train and validation features are cached, on disk with
``cache_dir``, and reused by later runs with the same model, layer, input size and transform); the head
then trains for many epochs on the cached features with mixup (or without, ``mix=False``). The report
is ``metrics.json`` (settings, history, final metrics, cache facts) and PNG plots in ``out_dir``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from hookmix.app.data_identity import data_identity
from hookmix.app.digits import digits_transfer
from hookmix.app.head_training import HeadTraining, head_training
from hookmix.app.imagefolder import load_image_folder
from hookmix.app.labels_csv import load_labels_csv
from hookmix.app.preprocessing import DIGITS_PREPROCESSING, model_preprocessing
from hookmix.core.checks import modes_restored
from hookmix.core.devices import resolve_device
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.evaluation.calibration import fit_temperature
from hookmix.graph.cutpoints import stage_names
from hookmix.graph.equivalence import mix_equivalence
from hookmix.graph.models import resolve_model
from hookmix.headonly.cache import CacheKey, FeatureCache, bytes_per_example, keyed_directory
from hookmix.headonly.distributed import (
    Ranks,
    extract_sharded,
    launched_world,
    leave_group,
    phase,
    process_group,
    rank_and_world,
)
from hookmix.headonly.run_directory import (
    DIGITS_NAME,
    HEAD_FILE,
    RUN_FILE,
    BackboneSource,
    finished_run,
    save_run,
    sha256_of,
)
from hookmix.headonly.streaming import ShardedFeatures, default_memory_budget
from hookmix.headonly.tasks import MULTICLASS, MULTILABEL, Task
from hookmix.headonly.trained_model import FinetunedConfig, assemble, example_shape
from hookmix.headonly.training import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, FitConfig, FitResult, fit
from hookmix.mixing.targets import check_classes

__all__ = ["DIGITS", "DIGITS_MODEL", "JobSpec", "default_layer", "run_finetune"]

DIGITS = "digits"
DIGITS_MODEL = "digits-cnn"


@dataclass(frozen=True)
class JobSpec:
    """What ``hookmix finetune`` was asked to do (validated CLI arguments): ``val_dir`` is ``--val`` (a folder
    of class sub-folders), ``extract_batch_size`` the images per backbone forward while extracting (the head's
    training batch is :attr:`FitConfig.batch_size`)."""

    data: str
    layer: str | None
    out_dir: Path
    model: str | None = None
    pretrained: bool = False
    weights: Path | None = None
    cache_dir: Path | str | None = None  # a directory, or a URL in object storage (s3://bucket/prefix)
    input_size: tuple[int, int, int] | None = None
    fp32: bool = False
    shots: int = 20
    data_seed: int | None = None
    val_dir: Path | None = None
    labels: Path | None = None
    val_labels: Path | None = None
    val_fraction: float = 0.2
    views: int = 1
    workers: int = 0
    device: str = "auto"
    extract_batch_size: int = 64
    head: str = "model"
    keep_maps: bool = False
    calibrate: bool = False
    memory_budget: int | None = None
    progress: bool = True
    ddp: str = "auto"

    @property
    def dtype(self) -> torch.dtype:
        """The feature cache's storage dtype (``--fp32``, else float16)."""
        return torch.float32 if self.fp32 else torch.float16


@dataclass(frozen=True)
class _Prepared:
    """The model, data and cache-key parts one fine-tuning job works on: ``train_set`` / ``val_set`` are the
    datasets the backbone runs over (images or tensors, not yet features)."""

    model: torch.nn.Module
    source: BackboneSource
    layer: str
    layer_is_default: bool
    train_set: Dataset
    val_set: Dataset
    classes: tuple[str, ...]
    input_size: tuple[int, ...]
    train_transform: str
    val_transform: str
    preprocessing: dict[str, Any] | None
    task: Task = MULTICLASS

    def dataset(self, part: str) -> Dataset:
        """The ``"train"`` or ``"val"`` dataset."""
        return self.train_set if part == "train" else self.val_set


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
    the last stage of a ConvNeXt (the last of :func:`~hookmix.graph.cutpoints.stage_names`)."""
    try:
        return stage_names(model)[-1]
    except UsageError as err:
        raise UsageError(f"--model {name} has no stage to cut at by default ({err}); give --layer.") from None


def _digits(spec: JobSpec, seed: int) -> _Prepared:
    if spec.model not in (None, DIGITS_MODEL):
        raise UsageError(f"--data digits uses the embedded {DIGITS_MODEL!r}; drop --model {spec.model}.")
    for flag, given in (("--views", spec.views > 1), ("--val", spec.val_dir is not None), ("--labels", spec.labels)):
        if given:
            raise UsageError(f"{flag} needs an image folder: the digits task has fixed tensors; drop {flag}.")
    task = digits_transfer(spec.shots, seed)
    transform = f"digits:k{spec.shots}:seed{seed}"
    source = BackboneSource(DIGITS_NAME, digits_seed=0)
    return _Prepared(
        model=source.build(),
        source=source,
        layer=spec.layer or "stage2",
        layer_is_default=spec.layer is None,
        train_set=TensorDataset(task.train_x, task.train_y),
        val_set=TensorDataset(task.val_x, task.val_y),
        classes=task.class_names,
        input_size=tuple(task.train_x.shape[1:]),
        train_transform=transform,
        val_transform=transform,
        preprocessing=DIGITS_PREPROCESSING.record(),
    )


def _prepare(spec: JobSpec, seed: int) -> _Prepared:
    if spec.data == DIGITS:
        return _digits(spec, seed)
    if spec.model is None:
        raise UsageError("--model is required with an image folder, e.g. --model resnet50.")
    if spec.val_labels is not None and spec.labels is None:
        raise UsageError("--val-labels needs --labels (the training CSV); add it or drop --val-labels.")
    if spec.labels is not None and spec.val_dir is not None:
        raise UsageError("--val is a folder of class sub-folders; with --labels give --val-labels CSV instead.")
    model_spec = resolve_model(spec.model)
    weights = None if spec.weights is None else str(spec.weights)
    digest = None if spec.weights is None else sha256_of(spec.weights)
    embedded = model_spec.source == "hookmix" and weights is None  # the digits CNN, pretrained on digits 0-4
    source = BackboneSource(model_spec.id, spec.pretrained, weights, digest, seed, 0 if embedded else None)
    model = source.build()
    layer = spec.layer or default_layer(model, spec.model)
    preprocessing = model_preprocessing(model, model_spec, spec.input_size)
    input_size = preprocessing.input_size
    _check_input_size(model, input_size, spec.model)
    folder = _load_data(spec, input_size, preprocessing, seed)
    source.resize(model, len(folder.classes))
    return _Prepared(
        model=model,
        source=source,
        layer=layer,
        layer_is_default=spec.layer is None,
        train_set=folder.train,
        val_set=folder.val,
        classes=folder.classes,
        input_size=input_size,
        train_transform=preprocessing.fingerprint(training=folder.augmented),
        val_transform=preprocessing.fingerprint(),
        preprocessing=preprocessing.record(),
        task=MULTICLASS if spec.labels is None else MULTILABEL,
    )


def _load_data(spec: JobSpec, input_size: tuple[int, int, int], preprocessing: Any, seed: int) -> Any:
    """The training and validation images: class sub-folders of ``--data``, or the rows of ``--labels``
    (multi-label) with paths under ``--data``; the validation part from ``--val`` / ``--val-labels`` or split."""
    common = dict(preprocessing=preprocessing, augment=spec.views > 1, val_fraction=spec.val_fraction, seed=seed)
    if spec.labels is None:
        return load_image_folder(spec.data, input_size, val_root=spec.val_dir, progress=spec.progress, **common)
    data = load_labels_csv(
        spec.labels, spec.data, input_size, val_labels=spec.val_labels, progress=spec.progress, **common
    )
    for note in data.skipped:
        print(f"hookmix: skipped unreadable image: {note}", file=sys.stderr)
    return data


@dataclass(frozen=True)
class _CachePoint:
    """What the job caches: ``layer``'s map, or the output of the fixed linear ops after it (``fixed_ops``);
    ``reason`` says why (``""``: no fixed op follows the layer, so its map is the only choice)."""

    layer: str
    fixed_ops: tuple[str, ...]
    map_shape: tuple[int, ...]
    shape: tuple[int, ...]
    reason: str

    @property
    def key_layer(self) -> str:
        """The :attr:`CacheKey.layer` of this point: a pooled cache never serves a map request."""
        return f"{self.layer}+{'+'.join(self.fixed_ops)}" if self.fixed_ops else self.layer

    def sizes(self, views: int, dtype: torch.dtype) -> tuple[int, int]:
        """Bytes per example of what is cached and of the layer's map."""
        return bytes_per_example(views, self.shape, dtype), bytes_per_example(views, self.map_shape, dtype)

    def record(self, views: int, dtype: torch.dtype) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "pooled": bool(self.fixed_ops),
            "fixed_ops": list(self.fixed_ops),
            "map_shape": list(self.map_shape),
            "bytes_per_example_map": self.sizes(views, dtype)[1],
            "reason": self.reason,
        }


def _op_name(module: nn.Module, name: str) -> str:
    """An op of :func:`hookmix.mix_equivalence` for people: its module's type when the name is
    a bare ``Sequential`` index (``head.0`` -> ``AdaptiveAvgPool2d``), else the name (``avgpool``)."""
    last = name.rpartition(".")[2]
    submodules = dict(module.named_modules())
    return type(submodules[name]).__name__ if last.isdigit() and name in submodules else name


def _assemble(prepared: _Prepared, spec: JobSpec, config: FitConfig) -> tuple[nn.Module, nn.Module, _CachePoint]:
    """The backbone to cache with, the head to train and what is cached: the pooled features when only fixed
    linear ops (average pool, flatten) start the head — mixup commutes with them (:mod:`hookmix.graph.equivalence`),
    so that trains the same head — unless ``--keep-maps`` or CutMix, which pastes boxes of the map."""
    keep = "--keep-maps" if spec.keep_maps else ""
    keep = keep or ("CutMix pastes boxes of the map" if config.mix and config.mixing.uses_cutmix else "")
    backbone, head, fixed = assemble(
        prepared.model,
        prepared.layer,
        spec.head,
        input_size=prepared.input_size,
        num_classes=len(prepared.classes),
        seed=config.seed,
        pool=not keep,
    )
    map_shape = example_shape(backbone[0] if fixed else backbone, prepared.input_size)
    if fixed:
        ops = ", ".join(_op_name(backbone[1], name) for name in fixed)
        reason = f"mixing {prepared.layer} ≡ mixing after {ops} (only fixed linear ops between)"
        return (
            backbone,
            head,
            _CachePoint(prepared.layer, fixed, map_shape, example_shape(backbone, prepared.input_size), reason),
        )
    reason = keep if keep and mix_equivalence(head, "input").fixed_ops else ""
    return backbone, head, _CachePoint(prepared.layer, (), map_shape, map_shape, reason)


def _cache_name(part: str, key_layer: str, layer: str) -> str:
    """The sub-directory of ``--cache`` for one part: ``train`` / ``val`` for the layer's maps, and
    ``train.<ops>`` / ``val.<ops>`` (e.g. ``train.avgpool+flatten``) for features taken after the fixed ops,
    so that every cache of one layer lives side by side (``--head mlp`` needs the maps, ``--head model`` the
    pooled features)."""
    suffix = key_layer.removeprefix(layer).lstrip("+")
    return f"{part}.{re.sub(r'[^A-Za-z0-9+_.-]', '_', suffix)}" if suffix else part


def _cache_key(prepared: _Prepared, part: str, layer: str) -> CacheKey:
    """The key of one part's features: the weights, the cached point, the preprocessing and the data's
    identity (each row's file — name, size, mtime — and label, or the tensors' bytes); not how they are
    computed (device, ``--extract-batch-size``, ``--workers``), which changes them by float rounding at most."""
    transform = prepared.train_transform if part == "train" else prepared.val_transform
    identity = data_identity(prepared.dataset(part))
    return CacheKey(prepared.source.id, layer, prepared.input_size, transform, f"{part}:{identity}")


def _cache_path(spec: JobSpec, key: CacheKey, layer: str) -> Path | None:
    """The ``--cache`` directory of the cache of ``key`` (one part's features at ``layer``), ``None`` without
    ``--cache``: one directory per key, so other data or settings never meet this cache."""
    if spec.cache_dir is None:
        return None
    part = key.dataset.partition(":")[0]
    views = spec.views if part == "train" else 1
    return keyed_directory(spec.cache_dir, _cache_name(part, key.layer, layer), key, dtype=spec.dtype, views=views)


def _extract(
    prepared: _Prepared,
    backbone: torch.nn.Module,
    spec: JobSpec,
    device: torch.device,
    key: CacheKey,
    budget: int | None,
    load: bool = True,
) -> FeatureCache | None:
    """Extract (or load) one part's features; with a ``budget`` and a cache directory, a cache larger than
    the budget comes back memory-mapped (streamed by :func:`hookmix.fit`). ``load=False``: a rank of a torchrun
    job that trains no head takes part in the extraction and returns ``None``."""
    part = key.dataset.partition(":")[0]
    views = spec.views if part == "train" else 1
    path = _cache_path(spec, key, prepared.layer)
    dataset = prepared.dataset(part)
    options = dict(
        dtype=spec.dtype,
        batch_size=spec.extract_batch_size,
        views=views,
        num_workers=spec.workers,
        device=device,
        progress=spec.progress,
        mmap=None if budget is not None and spec.cache_dir is not None else False,
        memory_budget=budget,
    )
    world = rank_and_world()[1]
    if world == 1:
        return FeatureCache.extract(backbone, dataset, key, path=path, **options)
    assert path is not None  # run_finetune refuses torchrun without --cache
    return extract_sharded(
        backbone, dataset, key, path=path, shard_size=_shard_size(len(dataset)), load=load, **options
    )


def _shard_size(count: int) -> int:
    """Rows per shard of an extraction shared by the ranks: at least 64 shards (so up to 64 ranks share the
    work, and a rank that dies loses at most 1/64 of it), at most 1024 rows; the same for any number of ranks,
    so a resumed extraction may run on another number. One process keeps ``FeatureCache.extract``'s 1024: a
    shard is also a backbone batch's limit (batches never straddle shards), so a small data set keeps
    ``--extract-batch-size``."""
    return min(1024, max(1, -(-count // 64)))


@dataclass
class _Evaluation:
    """What the run's validation logits say after training: the temperature, the multi-label thresholds,
    and the reliability curves to draw."""

    calibration: dict[str, float] | None
    thresholds: tuple[float, ...] | None
    curves: dict[str, Any]

    @property
    def temperature(self) -> float:
        """The fitted T, 1 without ``--calibrate``."""
        return self.calibration["temperature"] if self.calibration else 1.0


def _evaluate(task: Task, logits: torch.Tensor, labels: torch.Tensor, calibrate: bool, label: str) -> _Evaluation:
    """Fit a temperature when asked (validation NLL / ECE before and after; in-sample: T is fitted on these
    examples), tune the task's thresholds (per label, multi-label only) on the calibrated probabilities, and
    the task's reliability curves."""
    curves = {label: task.reliability(logits, labels)}
    calibration = None
    temperature = 1.0
    if calibrate:
        temperature = fit_temperature(logits, labels)
        before, after = task.evaluate(logits, labels), task.evaluate(logits / temperature, labels)
        calibration = {"temperature": temperature, "fitted_on": "validation"}
        for name in ("nll", "ece"):
            calibration |= {f"val_{name}_before": before[name], f"val_{name}_after": after[name]}
        curves[f"{label} + T={temperature:.3g}"] = task.reliability(logits / temperature, labels)
    return _Evaluation(calibration, task.thresholds(logits / temperature, labels), curves)


def _say_cache(say: Callable[[str], None], point: _CachePoint, views: int, dtype: torch.dtype) -> None:
    cached, maps = point.sizes(views, dtype)
    if point.fixed_ops:
        smaller = f"instead of {maps:,} ({maps / cached:.0f}x smaller)" if maps > cached else "(as many as the maps)"
        say(f"{point.reason}: caching {cached:,} B/image {smaller}")
    elif point.reason:
        say(f"caching the {point.layer} maps ({maps:,} B/image): {point.reason}")


def _human(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"


def _check_budget(spec: JobSpec, prepared: _Prepared, point: _CachePoint) -> int:
    """The memory budget for the training features: over it they are memory-mapped and streamed from the
    ``--cache`` directory in blocks, which must then be given."""
    budget = spec.memory_budget if spec.memory_budget is not None else default_memory_budget()
    need = len(prepared.train_set) * point.sizes(spec.views, spec.dtype)[0]  # type: ignore[arg-type]
    if need > budget and spec.cache_dir is None:
        raise UsageError(
            f"the training features need {_human(need)}, over the memory budget of {_human(budget)}; "
            "give --cache DIR (or an s3:// URL) so they can be streamed from it (or raise --memory-budget)."
        )
    return budget


JOB_FILE = "job.json"
RUN_FILES = (
    RUN_FILE,
    HEAD_FILE,
    JOB_FILE,
    "metrics.json",
    CHECKPOINT_WEIGHTS,
    CHECKPOINT_STATE,
    "curves.png",
    "reliability.png",
    "lambda_hist.png",
)


def _checkpoint_epoch(out: Path) -> int | None:
    """The epochs the checkpoint in ``out`` has trained, ``None`` without one (``-1``: unreadable)."""
    if not (out / CHECKPOINT_WEIGHTS).exists():
        return None
    try:
        return int(json.loads((out / CHECKPOINT_STATE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over a run in ``--out`` unless asked: a finished run (``run.json``) or an unfinished
    one (a checkpoint) needs ``--resume`` to continue it or ``--overwrite`` to replace it."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them.")
    if resume or overwrite:
        return
    finished = finished_run(out)
    if finished is not None:
        done = finished.get("finetuned", {}) if isinstance(finished.get("finetuned"), dict) else {}
        what = f"{done.get('weights', '?')} @ {done.get('layer', '?')}"
        raise UsageError(
            f"--out {out} holds a finished run ({what}); give another --out, --resume (with more --epochs) to "
            "train it further, or --overwrite to replace it."
        )
    epoch = _checkpoint_epoch(out)
    if epoch is not None:
        where = f"a checkpoint after epoch {epoch}" if epoch >= 0 else "a checkpoint whose state cannot be read"
        raise UsageError(
            f"--out {out} holds an unfinished run ({where}); continue it with --resume, or give --overwrite to "
            "start over (or another --out)."
        )


def _identity(spec: JobSpec, prepared: _Prepared, point: _CachePoint, config: FitConfig, data: list[str]) -> dict:
    """What a run is trained on, checked by ``--resume``: the weights, the cut, the head, the classes, the
    preprocessing, the data (the train and validation cache keys, which cover the files and their labels)
    and the settings; ``epochs`` is left to :func:`fit`, which lets a finished run be trained further, and
    ``--calibrate`` to the report, so a finished run can be resumed to calibrate it."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("epochs", "mixing")} | asdict(config.mixing)
    return json.loads(
        json.dumps(
            {
                "model": prepared.source.id,
                "layer": prepared.layer,
                "head": spec.head,
                "cached": point.key_layer,
                "task": prepared.task.name,
                "classes": list(prepared.classes),
                "preprocessing": prepared.preprocessing,
                "views": spec.views,
                "cache_dtype": str(spec.dtype),
                "train_data": data[0],
                "val_data": data[1],
                "settings": settings,
            }
        )
    )


def _check_resume(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to continue a run in ``out`` that was trained on other data, weights, cut or settings."""
    try:
        stored = json.loads((out / JOB_FILE).read_text())
    except (OSError, ValueError):
        raise UsageError(
            f"--resume: {out / JOB_FILE} is missing or unreadable, so what the checkpoint in --out {out} was "
            "trained on cannot be checked; give --overwrite to start over, or another --out."
        ) from None
    then = {**stored, **(stored.get("settings") or {})}
    now = {**identity, **identity["settings"]}
    changed = [name for name in now if name != "settings" and then.get(name) != now[name]]
    if changed:
        data = [n for n in changed if n.endswith("_data")]
        detail = "; ".join(
            [f"{n}: the files, their labels or contents differ" for n in data]
            + [f"{n}: {then.get(n)!r} then, {now[n]!r} now" for n in changed if n not in data][:4]
        )
        raise UsageError(
            f"--resume: the run in --out {out} was trained on something else ({detail}); resume with what it "
            "was trained on, or give another --out (or --overwrite to replace it)."
        )


def _say_resume(say: Callable[[str], None], out: Path, config: FitConfig) -> None:
    epoch = _checkpoint_epoch(out)
    if epoch is None:
        say(f"--resume: no checkpoint in {out}; training from epoch 1")
    elif epoch < config.epochs and finished_run(out) is not None:
        say(
            f"training the finished {epoch}-epoch run further to {config.epochs} epochs: its cosine schedule "
            f"ended at lr 0, so epochs {epoch + 1}-{config.epochs} run a new cosine cycle from lr {config.lr:g}"
        )
    elif epoch < config.epochs:
        say(f"resuming at epoch {epoch + 1} of {config.epochs} from the checkpoint in {out}")
    else:
        say(f"the run in {out} has trained its {epoch} epochs: nothing to train, the report is written again")


def _say_caches(say: Callable[[str], None], caches: tuple[FeatureCache, FeatureCache]) -> None:
    for part, cache in zip(("train", "val"), caches):
        if cache.path is not None and cache.reused:
            say(f"reusing the {part} cache in {cache.path} (same model, layer, preprocessing and data)")


def _extract_all(
    spec: JobSpec,
    job: _Planned,
    device: torch.device,
    load: bool,
) -> tuple[FeatureCache | None, FeatureCache | None, int, float]:
    """The train and validation features (extracted, or reused from ``--cache``; ``None`` without ``load``:
    a rank that trains no head), the memory budget and the extraction time."""
    budget = _check_budget(spec, job.prepared, job.point)
    start = time.perf_counter()
    train = _extract(job.prepared, job.backbone, spec, device, job.keys[0], budget, load)
    val = _extract(job.prepared, job.backbone, spec, device, job.keys[1], None, load)
    return train, val, budget, time.perf_counter() - start


def _say_stored(spec: JobSpec, caches: tuple[FeatureCache, FeatureCache], budget: int, say: Callable) -> None:
    """Say which caches were reused, and whether the training features are streamed or kept in memory."""
    _say_caches(say, caches)
    train, limit = caches[0], _human(budget)
    if isinstance(train.features, ShardedFeatures):
        size = _human(train.features.stored_bytes)
        say(f"training features {size} > memory budget {limit}: memory-mapped, streamed from {train.path} in blocks")
    elif spec.cache_dir is not None or spec.memory_budget is not None:
        size = _human(len(train) * train.bytes_per_example)
        say(f"training features {size} <= memory budget {limit}: kept in memory")


def _start_training(spec: JobSpec, config: FitConfig, identity: dict, resume: bool, say: Callable) -> None:
    """Say where a resumed run continues, or clear ``--out`` of an overwritten run (only now, after every
    check and the extraction passed); then record the run's identity (``job.json``) before its first
    checkpoint."""
    out = spec.out_dir
    if resume:
        _say_resume(say, out, config)
    else:
        replaced = [name for name in RUN_FILES if (out / name).exists()]
        if replaced:
            say(f"--overwrite: replacing the run in {out}")
        for name in replaced:
            (out / name).unlink()
    atomic_write(out / JOB_FILE, json.dumps(identity, indent=1).encode())


def run_finetune(
    spec: JobSpec,
    config: FitConfig,
    resume: bool = False,
    say: Callable[[str], None] = print,
    *,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Run the job and write its report; returns the ``metrics.json`` payload. ``say`` gets the first lines
    (model, layer, device; what is cached, reused, resumed) before the long work starts. A run already in
    ``spec.out_dir`` is continued with ``resume`` (checked against this job's data, model, cut and settings),
    replaced with ``overwrite``, and otherwise refused.

    Under ``torchrun`` (more than one process) every rank runs this: the ranks share the extraction into
    ``--cache`` (:func:`~hookmix.headonly.distributed.extract_sharded`), then the head trains with DDP or on rank
    0 alone (:func:`~hookmix.app.head_training.head_training`). Rank 0 says what happens, writes the run and
    returns the payload; the other ranks print only errors and return ``None``."""
    _check_out(spec.out_dir, resume, overwrite)
    _check_shared_cache(spec.cache_dir, launched_world())
    with process_group(resolve_device(spec.device)) as (ranks, device):
        if not ranks.leader:
            say, spec = _quiet, replace(spec, progress=False)
        if ranks.world > 1:
            say(f"rank {ranks.rank} of {ranks.world} ({ranks.backend}); the other ranks print only errors")
        return _run(spec, config, resume, say, ranks, device)


def _check_shared_cache(cache_dir: str | Path | None, world: int) -> None:
    """Under torchrun (``world`` > 1) the ranks share the extraction through ``--cache``: refused before the
    process group is joined when it is missing (:func:`~hookmix.headonly.distributed.extract_sharded`)."""
    if world > 1 and cache_dir is None:
        raise UsageError(
            f"torchrun with {world} processes needs --cache (no --cache given): a directory on a shared file system "
            "every rank reaches, or object storage (s3://bucket/prefix), where the ranks write their shards."
        )


def _quiet(line: str) -> None:
    """The ``say`` of a rank other than 0."""


@dataclass(frozen=True)
class _Planned:
    """What the job decided before the extraction: the prepared model and data, the backbone and head it
    assembled, what is cached under which keys, the run's identity and how the head trains."""

    prepared: _Prepared
    backbone: nn.Module
    head: nn.Module
    point: _CachePoint
    keys: tuple[CacheKey, CacheKey]
    identity: dict[str, Any]
    plan: HeadTraining


def _plan(
    spec: JobSpec, config: FitConfig, resume: bool, say: Callable[[str], None], ranks: Ranks, device: torch.device
) -> _Planned:
    """Prepare, check and decide everything before the extraction (it may be long): the model, data and cut,
    a resumed run's identity, and the head's training (:func:`head_training` may refuse)."""
    prepared = _prepare(spec, config.seed if spec.data_seed is None else spec.data_seed)
    check_classes(config.mixing.exclude_classes, len(prepared.classes))
    chosen = " (default: the last stage before the pooling and head)" if prepared.layer_is_default else ""
    picked = " (auto)" if spec.device == "auto" else ""
    say(f"{prepared.source.id} @ {prepared.layer}{chosen} on {device}{picked}")
    backbone, head, point = _assemble(prepared, spec, config)
    _say_cache(say, point, spec.views, spec.dtype)
    keys = (_cache_key(prepared, "train", point.key_layer), _cache_key(prepared, "val", point.key_layer))
    identity = _identity(spec, prepared, point, config, [key.fingerprint() for key in keys])
    if resume and _checkpoint_epoch(spec.out_dir) is not None:
        _check_resume(spec.out_dir, identity)
    plan = head_training(ranks, spec.ddp, config.batch_size)
    return _Planned(prepared, backbone, head, point, keys, identity, plan)


def _run(
    spec: JobSpec, config: FitConfig, resume: bool, say: Callable[[str], None], ranks: Ranks, device: torch.device
) -> dict[str, Any] | None:
    """The phases of :func:`run_finetune` on one rank: plan, extract (shared by the ranks), train, report.
    Under torchrun the ranks meet after each phase (:func:`~hookmix.headonly.distributed.phase`): an error on one
    rank is its own one line, and the others stop with one line naming it (``RankFailed``), not in a collective.
    A rank that trains no head (``--ddp off``, or auto choosing rank 0 alone) loads no features."""
    job = phase(lambda: _plan(spec, config, resume, say, ranks, device))
    plan, trains = job.plan, job.plan.ddp or ranks.leader
    train, val, budget, extract_s = _extract_all(spec, job, device, load=trains)
    if ranks.world > 1:
        say(f"head training: {'DDP on all ranks' if plan.ddp else 'on rank 0 alone'} ({plan.reason})")
    if not plan.ddp:  # every rank has finished the extraction (extract_sharded's last meeting)
        leave_group()
    if train is None or val is None:
        return None
    _say_stored(spec, (train, val), budget, say)
    # job.json written, an overwritten run cleared, before any DDP step (alone: the group is left, no meeting)
    phase(lambda: _start_training(spec, config, job.identity, resume, say) if ranks.leader else None)
    result = fit(
        job.head,
        "input",
        train.features,
        train.labels,
        val.features[0],
        val.labels,
        config,
        num_classes=len(job.prepared.classes),
        checkpoint_dir=spec.out_dir,
        resume=resume,
        device=device,
        progress=spec.progress,
        ddp=plan.ddp,
    )
    if not ranks.leader:
        return None
    facts = {"device": str(device), "memory_budget": budget, "extract_seconds": round(extract_s, 3)}
    facts["distributed"] = plan.record(ranks)
    trained = _Trained(train, val, job.head, result, facts, job.identity)
    return _report(spec, config, job.prepared, job.point, trained)


@dataclass(frozen=True)
class _Trained:
    """What the training phase leaves for the report: the feature caches, the trained head and its fit, the
    job's facts (device, memory budget, extraction time) and the run's identity."""

    train_cache: FeatureCache
    val_cache: FeatureCache
    head: nn.Module
    result: FitResult
    facts: dict[str, Any]
    identity: dict[str, Any]


def _report(spec: JobSpec, config: FitConfig, prepared: _Prepared, point: _CachePoint, done: _Trained) -> dict:
    """Calibrate and tune thresholds on the validation logits, draw the plots, and write ``metrics.json``,
    then the run files (``head.safetensors``, ``run.json`` last: the run is finished once it is there)."""
    out, result = spec.out_dir, done.result
    label = "mixup" if config.mix else "no mixup"
    evaluation = _evaluate(prepared.task, result.val_logits, done.val_cache.labels, spec.calibrate, label)
    _draw(out, config, result, evaluation, label)
    payload = _payload(spec, config, prepared, point, done, evaluation)
    atomic_write(out / "metrics.json", json.dumps(payload, indent=1, allow_nan=False).encode())
    thresholds, temperature = evaluation.thresholds, evaluation.temperature
    finetuned = FinetunedConfig(
        model=prepared.source.model,
        weights=prepared.source.id,
        layer=prepared.layer,
        head=spec.head,
        pooled=bool(point.fixed_ops),
        classes=prepared.classes,
        task=prepared.task.name,
        input_size=prepared.input_size,
        preprocessing=prepared.preprocessing,
        temperature=temperature,
        thresholds=thresholds,
        seed=config.seed,
    )
    save_run(out, finetuned, prepared.source, done.head, done.identity)
    return payload


def _draw(out: Path, config: FitConfig, result: FitResult, evaluation: _Evaluation, label: str) -> None:
    """``curves.png`` (the history), ``reliability.png`` (before and after T) and, when steps mixed,
    ``lambda_hist.png`` (the λ the run drew)."""
    from hookmix.evaluation.plots import lambda_density_alpha, plot_history, plot_lambda_hist, plot_reliability

    plot_history({label: result.history}, out / "curves.png")
    plot_reliability(evaluation.curves, out / "reliability.png")
    if result.lams:
        plot_lambda_hist(torch.tensor(result.lams), out / "lambda_hist.png", alpha=lambda_density_alpha(config.mixing))


def _payload(
    spec: JobSpec, config: FitConfig, prepared: _Prepared, point: _CachePoint, done: _Trained, evaluation: _Evaluation
) -> dict[str, Any]:
    """The ``metrics.json`` payload: what ran (model, cut, data, settings, device) and what it measured."""
    train, val, result = done.train_cache, done.val_cache, done.result
    thresholds = evaluation.thresholds
    tuned_logits = result.val_logits / evaluation.temperature
    return {
        "model": prepared.source.id,
        "layer": prepared.layer,
        "layer_is_default": prepared.layer_is_default,
        "task": prepared.task.name,
        "device": done.facts["device"],
        "device_requested": spec.device,
        "preprocessing": prepared.preprocessing,
        "views": spec.views,
        "workers": spec.workers,
        "extract_batch_size": spec.extract_batch_size,
        "validation": _validation(spec, len(train), len(val)),
        "classes": list(prepared.classes),
        "train_examples": len(train),
        "val_examples": len(val),
        "head": spec.head,
        "cached_point": point.record(spec.views, spec.dtype),
        "feature_shape": list(train.feature_shape),
        "cache_bytes_per_example": train.bytes_per_example,
        "memory_budget": done.facts["memory_budget"],
        "streamed": isinstance(train.features, ShardedFeatures),
        "extract_seconds": done.facts["extract_seconds"],
        "distributed": done.facts.get("distributed"),  # None: written by hookmix sweep, not run by finetune
        "cache_reused": {"train": train.batches_run == 0, "val": val.batches_run == 0},
        "config": asdict(config),
        "schedule_restarts": result.restarts,
        "final": result.final,
        "calibration": evaluation.calibration,
        "thresholds": None if thresholds is None else dict(zip(prepared.classes, thresholds)),
        # in-sample: the thresholds were tuned on these examples
        "final_tuned": None if thresholds is None else prepared.task.metrics(tuned_logits, val.labels, thresholds),
        "history": result.history,
    }


def _validation(spec: JobSpec, n_train: int, n_val: int) -> str:
    if spec.data == DIGITS:
        return f"the digits task's own split ({n_train} train / {n_val} val)"
    given = spec.val_labels if spec.labels is not None else spec.val_dir
    source = "--labels" if spec.labels is not None else "--data"
    return str(given) if given is not None else f"split {spec.val_fraction} of {source}"
