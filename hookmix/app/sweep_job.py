"""The ``hookmix sweep`` job: per layer, one feature cache and a grid of heads (α × cutmix α × lr × seed) trained
together.

It reuses the ``finetune`` job's phases — preparing the model and data, cutting and assembling the head,
the cache keys and cache directories (so the caches in ``--cache`` are shared with ``finetune``) — extracts every
layer's cache in one backbone pass per part (:meth:`~hookmix.FeatureCache.extract_many` with hooks on all the
layers), and trains each layer's cells with :func:`hookmix.sweep`, on multi-class (class folders, digits) or
multi-label (``--labels``) data. The data are prepared once, with seed 0 (the split of a folder without
``--val``, the digits task, a random-init backbone); ``--seeds K`` varies each head's seed (its init, data order,
mix plans, dropout). So a cell of seed s is exactly ``finetune --seed s --data-seed 0`` with its α, lr, layer and head.

Writes ``sweep.json`` (settings, one record per cell, the paired differences against no mixing, the verdicts and
warnings), ``sweep.csv`` (the records), ``sweep.png`` (each metric against α per layer, mean ± 95% CI over
seeds) and the best cell on validation NLL as a normal run directory ``best/`` (``predict`` and ``export``
read it).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hookmix.app.finetune_job import (
    JobSpec,
    _assemble,
    _cache_key,
    _cache_path,
    _CachePoint,
    _check_budget,
    _identity,
    _prepare,
    _Prepared,
    _report,
    _say_stored,
    _Trained,
)
from hookmix.core.devices import resolve_device
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.evaluation.metrics import mean_ci
from hookmix.graph.cutpoints import stage_names
from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.sweep import HIGHER_IS_BETTER, cell_alpha, cell_cutmix_alpha, grid_configs, sweep
from hookmix.headonly.taps import LayerTaps
from hookmix.headonly.training import FitConfig

__all__ = ["SweepSpec", "format_table", "run_sweep"]

DATA_SEED = 0
"""The seed the sweep's data are prepared with (a folder's split, the digits task, a random-init backbone)."""


@dataclass(frozen=True)
class SweepSpec:
    """What ``hookmix sweep`` was asked to do: the finetune inputs (``job``; its ``layer`` is unused), the
    layers (``None``: the model's last two stages), the α, cutmix α and lr lists, the number of seeds and the base
    training settings (epochs, batch size) every cell shares."""

    job: JobSpec
    layers: tuple[str, ...] | None
    alphas: tuple[float, ...]
    lrs: tuple[float, ...]
    seeds: int
    base: FitConfig
    overwrite: bool = False
    cutmix_alphas: tuple[float, ...] = (0.0,)


def _layers(spec: SweepSpec, prepared: _Prepared) -> tuple[str, ...]:
    """The requested layers, or the last two stages of the model (the digits CNN's last two)."""
    if spec.layers:
        return tuple(dict.fromkeys(spec.layers))
    try:
        return tuple(stage_names(prepared.model)[-2:])
    except UsageError as err:
        raise UsageError(f"the model has no stages to sweep by default ({err}); give --layers L1 [L2 ...].") from None


@dataclass
class _Layer:
    """One layer's cut and what its best cell needs to be written as a run: the job prepared at the layer, the
    cached point (and the fixed ops that take the layer's map to it, ``None``: the map is cached), its cache keys,
    each seed's fresh head; its caches once extracted, its cells once trained."""

    prepared: _Prepared
    point: _CachePoint
    fixed_ops: torch.nn.Module | None
    keys: tuple[CacheKey, CacheKey]
    heads: dict[int, torch.nn.Module]
    caches: tuple[Any, Any] = ()
    facts: dict[str, Any] = field(default_factory=dict)
    trained: list[tuple[FitConfig, torch.nn.Module, Any]] = field(default_factory=list)


def _configs(spec: SweepSpec) -> list[FitConfig]:
    return grid_configs(spec.base, spec.alphas, spec.lrs, range(spec.seeds), spec.cutmix_alphas)


def _prepare_layer(spec: SweepSpec, prepared: _Prepared, layer: str) -> _Layer:
    """Cut the model at ``layer`` as ``finetune --layer`` would — caching the maps when a cell cuts (CutMix
    pastes boxes of the map) — with each seed's fresh head."""
    prepared = replace(prepared, layer=layer, layer_is_default=False)
    configs = _configs(spec)
    widest = next((c for c in configs if c.mix and c.mixing.uses_cutmix), configs[0])  # decides what is cached
    by_seed = {c.seed: _assemble(prepared, spec.job, replace(widest, seed=c.seed)) for c in configs}
    backbone, _, point = by_seed[0]
    keys = (_cache_key(prepared, "train", point.key_layer), _cache_key(prepared, "val", point.key_layer))
    heads = {seed: head for seed, (_, head, _) in by_seed.items()}
    return _Layer(prepared, point, backbone[1] if point.fixed_ops else None, keys, heads)


def _extract_layers(
    spec: SweepSpec, layers: Sequence[_Layer], device: torch.device, say: Callable[[str], None]
) -> None:
    """All layers' caches from ONE backbone pass over the training data and one over the validation data:
    hooks on every layer (:class:`~hookmix.headonly.taps.LayerTaps`), the forward stopped after the deepest.
    Each cache is the one ``finetune --layer`` makes (same point, key, ``--cache`` directory and bytes), so
    either reuses the other's; layers already cached are loaded, and when all are no backbone runs."""
    job, first = spec.job, layers[0].prepared
    budget = max(_check_budget(job, layer.prepared, layer.point) for layer in layers)
    taps = {layer.point.key_layer: (layer.point.layer, layer.fixed_ops) for layer in layers}

    def backbone_for(names: tuple[str, ...]) -> LayerTaps:
        return LayerTaps(first.model, {name: taps[name] for name in names})

    start, parts = time.perf_counter(), []
    for index, part in enumerate(("train", "val")):
        targets = {
            layer.point.key_layer: (layer.keys[index], _cache_path(job, layer.keys[index], layer.prepared.layer))
            for layer in layers
        }
        parts.append(
            FeatureCache.extract_many(
                backbone_for,
                first.dataset(part),
                targets,
                dtype=job.dtype,
                batch_size=job.extract_batch_size,
                views=job.views if index == 0 else 1,
                num_workers=job.workers,
                device=device,
                progress=job.progress,
                mmap=None if index == 0 and job.cache_dir is not None else False,
                memory_budget=budget if index == 0 else None,
                desc=f"extracting {part} features",
            )
        )
    facts = {"device": str(device), "memory_budget": budget, "extract_seconds": round(time.perf_counter() - start, 3)}
    for layer in layers:
        name = layer.prepared.layer
        layer.caches, layer.facts = (parts[0][layer.point.key_layer], parts[1][layer.point.key_layer]), dict(facts)
        _say_stored(job, layer.caches, budget, lambda line, name=name: say(f"{name}: {line}"))


def _grid_text(spec: SweepSpec) -> str:
    alphas = " ".join(f"{a:g}" for a in sorted({0.0, *spec.alphas}))
    cutmix = " ".join(f"{a:g}" for a in sorted({0.0, *spec.cutmix_alphas}))
    cutmix = f" × cutmix α {cutmix}" if cutmix != "0" else ""
    return f"α {alphas}{cutmix} × lr {' '.join(f'{v:g}' for v in spec.lrs)} × {spec.seeds} seeds"


def _write_best(spec: SweepSpec, layers: Sequence[_Layer]) -> dict[str, Any]:
    """Write the cell of the lowest validation NLL as a normal run directory ``--out/best``; its record."""
    done, (config, head, result) = min(
        ((layer, cell) for layer in layers for cell in layer.trained), key=lambda found: found[1][2].final["val_nll"]
    )
    job = replace(spec.job, out_dir=spec.job.out_dir / "best", layer=done.prepared.layer)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "head.safetensors"):  # a best run of an earlier sweep, replaced with --overwrite
        (job.out_dir / name).unlink(missing_ok=True)
    identity = _identity(job, done.prepared, done.point, config, [key.fingerprint() for key in done.keys])
    train, val = done.caches
    _report(job, config, done.prepared, done.point, _Trained(train, val, head, result, done.facts, identity))
    return {
        "layer": done.prepared.layer,
        "alpha": cell_alpha(config),
        "cutmix_alpha": cell_cutmix_alpha(config),
        "lr": config.lr,
        "seed": config.seed,
    }


def _check_out(spec: SweepSpec) -> None:
    out = spec.job.out_dir
    if (out / "sweep.json").exists() and not spec.overwrite:
        raise UsageError(f"--out {out} holds a finished sweep (sweep.json); give another --out, or --overwrite.")


def run_sweep(spec: SweepSpec, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep (:func:`hookmix.sweep` on each layer's caches) and write its report; returns the
    ``sweep.json`` payload."""
    _check_out(spec)
    device = resolve_device(spec.job.device)
    prepared = _prepare(spec.job, DATA_SEED)
    layers = _layers(spec, prepared)
    say(f"{prepared.source.id} @ {', '.join(layers)} on {device}: {_grid_text(spec)}")
    done = {layer: _prepare_layer(spec, prepared, layer) for layer in layers}
    _extract_layers(spec, list(done.values()), device, say)
    train, val = next(iter(done.values())).caches  # the labels: one set of images for every layer
    result = sweep(
        {layer: d.caches[0].features for layer, d in done.items()},
        train.labels,
        {layer: d.caches[1].features[0] for layer, d in done.items()},
        val.labels,
        num_classes=len(prepared.classes),
        head=lambda layer, seed: copy.deepcopy(done[layer].heads[seed]),
        head_name=spec.job.head,
        alphas=spec.alphas,
        cutmix_alphas=spec.cutmix_alphas,
        lrs=spec.lrs,
        seeds=spec.seeds,
        base=spec.base,
        device=device,
        progress=spec.job.progress,
        say=say,
    )
    for layer, cells in result.cells.items():
        done[layer].trained = cells
    payload = {
        "model": prepared.source.id,
        "head": spec.job.head,
        "task": prepared.task.name,
        "layers": list(layers),
        "data_seed": DATA_SEED,
        "settings": {"epochs": spec.base.epochs, "batch_size": spec.base.batch_size, "seeds": spec.seeds},
        "records": result.records,
        **result.summary,
        "best": _write_best(spec, list(done.values())),
    }
    out = spec.job.out_dir
    atomic_write(out / "sweep.json", json.dumps(payload, indent=1).encode())
    atomic_write(out / "sweep.csv", _csv(result.records))
    plot_sweep(result.records, out / "sweep.png")
    return payload


def _csv(records: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue().encode()


def _arms(records: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The records by (layer, head, lr, cutmix α, α), in the order they come."""
    arms: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        arms.setdefault((r["layer"], r["head"], r["lr"], r["cutmix_alpha"], r["alpha"]), []).append(r)
    return arms


def _metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in HIGHER_IS_BETTER if m in records[0]]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """One line per layer, head, lr, cutmix α and α: each metric's mean ± 95% CI half-width over seeds."""
    metrics = _metrics(records)
    columns = f"{'layer':<12} {'head':<7} {'lr':>8} {'cutmix':>6} {'alpha':>6} {'seeds':>5} "
    lines = [columns + " ".join(f"{m:>19}" for m in metrics)]
    for (layer, head, lr, cutmix, alpha), members in _arms(records).items():
        cells = []
        for metric in metrics:
            mean, half = mean_ci([m[metric] for m in members])
            cells.append(f"{mean:>10.4f} ± {half:<6.4f}" if not math.isnan(half) else f"{mean:>10.4f}         ")
        lines.append(f"{layer:<12} {head:<7} {lr:>8g} {cutmix:>6g} {alpha:>6g} {len(members):>5} " + " ".join(cells))
    return "\n".join(lines)


def plot_sweep(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Each metric against α, one line per layer (and lr, cutmix α), mean ± 95% CI over seeds; a PNG at ``path``."""
    from hookmix.evaluation.plots import new_figure, save_figure

    metrics = _metrics(records)
    figure = new_figure(4.0 * len(metrics), 3.2)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    lines: dict[tuple[Any, ...], dict[float, list[dict[str, Any]]]] = {}
    for (layer, head, lr, cutmix, alpha), members in _arms(records).items():
        lines.setdefault((layer, head, lr, cutmix), {})[alpha] = members
    for ax, metric in zip(axes, metrics):
        for (layer, head, lr, cutmix), by_alpha in lines.items():
            alphas = sorted(by_alpha)
            stats = [mean_ci([m[metric] for m in by_alpha[a]]) for a in alphas]
            errors = [0.0 if math.isnan(half) else half for _, half in stats]
            label = f"{layer} ({head}, lr {lr:g}{f', cutmix α {cutmix:g}' if cutmix else ''})"
            ax.errorbar(alphas, [mean for mean, _ in stats], yerr=errors, marker="o", capsize=3, label=label)
        ax.set_xlabel("α (0: no mixup)")
        ax.set_title(f"validation {metric.removeprefix('val_')}")
    axes[0].legend(fontsize=7)
    return save_figure(figure, path)
