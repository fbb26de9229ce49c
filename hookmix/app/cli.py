"""The ``hookmix`` command.

Heavy imports (torch, timm, torchvision) happen inside the commands, after the arguments and paths are
checked, so ``--help``, a bad value, a missing input and an unwritable output answer at once.

Usage errors (bad arguments, unknown model or layer names, unusable or unwritable files:
:class:`~hookmix.UsageError` and missing files) exit with code 2 and one line, ``hookmix: error: ...``,
that names the flag (``--alpha``, also where the library's message names its Python argument ``alpha=``);
an argparse error adds where to read more (``see hookmix finetune --help``) instead of the usage block.
Ctrl-C exits with code 130 and one line saying what was kept and how to continue. Under ``torchrun`` a rank
whose job stopped because another rank failed prints one line naming that rank (whose own message is above),
with code 2 when that rank's error was a user's mistake, else 1. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from hookmix.core.errors import RankFailed, UsageError

__all__ = ["build_parser", "main"]

if TYPE_CHECKING:
    from hookmix.headonly.training import FitConfig


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _number_in(
    low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite float between ``low`` and ``high`` (``math.inf``: no upper bound), each end included
    unless ``low_open`` / ``high_open``: checked as the flag is parsed, so no model is loaded first."""
    if high == math.inf:
        bound = f"{'>' if low_open else '>='} {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; give one {bound}")
        below = value <= low if low_open else value < low
        if below or (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    parse.__name__ = "number"
    return parse


def _size(text: str) -> int:
    """Bytes from ``"8G"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes (units are powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number[: len(number) - len(unit)])
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give e.g. 8G, 512M or a number of bytes")
    return int(value * units[unit])


def _device(text: str) -> str:
    """A device name of :data:`hookmix.core.devices.DEVICES`. Importing it imports torch, and argparse converts a
    string default with this function on every command line: so the ``--device`` flags default to ``None``
    (meaning ``"auto"``), and torch is loaded at parse time only when a device is named."""
    from hookmix.core.devices import DEVICES

    head, _, index = text.partition(":")
    if head not in DEVICES or (index and (head != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return text


def _cmd_layers(args: argparse.Namespace) -> None:
    import torch

    from hookmix.graph.cutpoints import UntraceableError, cut_points
    from hookmix.graph.layers import format_layers, list_layers
    from hookmix.graph.models import create_model, default_input_size

    model = create_model(args.model)
    size = tuple(args.input_size) if args.input_size else default_input_size(model)
    if len(size) != 3:
        raise UsageError(f"--input-size takes C H W (3 numbers), got {len(size)}: {' '.join(map(str, size))}.")
    try:
        cut_points(model)
        note = (
            "cut: yes = every path from the input to the output passes through it (sound to mix or split at)\n"
            "mixup here: ≡ X = only linear ops follow, so mixup here is exactly mixup at X (a cheaper point to "
            "cache; CutMix differs)"
        )
    except UntraceableError as err:
        if args.mixable:
            raise UsageError(f"--mixable needs the cut-point analysis, which is not possible: {err}") from None
        note = f"cut: ? = not analysed: {err}"
    try:
        rows = list_layers(model, torch.zeros(1, *size))
    except UsageError as err:  # the model's forward refused the input (the library's error names example_input)
        given = f"--input-size {' '.join(map(str, size))}" if args.input_size else f"the default input size {size}"
        raise UsageError(
            f"{given}: {args.model} refused a 1x{'x'.join(map(str, size))} input ({err.__cause__ or err!r}); "
            "give the size it was built for with --input-size C H W."
        ) from None
    print(f"{args.model}: input 1x{'x'.join(map(str, size))}, {rows[0].params:,} parameters")
    print(format_layers([r for r in rows if r.cut_point or not args.mixable], max_depth=args.depth))
    print(note)


# The head's default optimisation: the small digits CNN's head (100 examples) wants the demo's larger steps.
_IMAGE_FIT = {"lr": 3e-3, "batch_size": 32}
_DIGITS_FIT = {"lr": 3e-2, "batch_size": 16}


def _fit_config(args: argparse.Namespace) -> "FitConfig":
    from hookmix.headonly.training import FitConfig
    from hookmix.mixing.settings import MixSettings

    excluded = tuple(args.exclude_classes) if args.exclude_classes else None
    mixing = MixSettings(
        alpha=args.alpha,
        cutmix_alpha=args.cutmix_alpha,
        switch_prob=args.switch_prob,
        lam_mode=args.lam_mode,
        dominant=args.dominant,
        label_smoothing=args.label_smoothing,
        stop_epoch=args.stop_epoch,
        exclude_classes=excluded,
    )
    defaults = _DIGITS_FIT if args.data == "digits" else _IMAGE_FIT
    return FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size if args.batch_size is not None else defaults["batch_size"],
        lr=args.lr if args.lr is not None else defaults["lr"],
        mixing=mixing,
        mix=not args.no_mix,
        seed=args.seed,
    )


_DIGITS = "digits"  # hookmix.app.finetune_job.DIGITS, named here without importing torch


def _check_finetune_paths(args: argparse.Namespace) -> str | Path | None:
    """The inputs ``finetune`` reads exist, ``--out`` and ``--cache`` can be written, and an image folder
    comes with ``--model``: checked before torch is imported or a model built, so such a mistake answers
    at once (and leaves nothing behind). Returns the ``--cache`` location (a directory or a URL)."""
    from hookmix.app.paths import cache_location, existing_dir, existing_file, writable_dir

    if args.data != _DIGITS:
        root = "the folder the CSV's paths are relative to" if args.labels else "a folder with one sub-folder per class"
        existing_dir("--data", Path(args.data), f"give {root}, or 'digits'")
    if args.val:
        existing_dir("--val", Path(args.val), "give a folder with the same class sub-folders as --data")
    for flag, given in (("--labels", args.labels), ("--val-labels", args.val_labels)):
        if given:
            existing_file(flag, Path(given), "give a CSV file with the columns path,labels")
    if args.weights:
        existing_file("--weights", Path(args.weights), "give a .safetensors file or a torch state dict")
    writable_dir("--out", Path(args.out))
    cache = cache_location("--cache", args.cache)
    if args.data != _DIGITS and args.model is None:
        raise UsageError("--model is required with an image folder, e.g. --model resnet50.")
    return cache


def _cmd_finetune(args: argparse.Namespace) -> None:
    cache = _check_finetune_paths(args)
    config = _fit_config(args)  # every setting checked before the model is built
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from hookmix.app.finetune_job import JobSpec, run_finetune

    spec = JobSpec(
        data=args.data,
        layer=args.layer,
        out_dir=Path(args.out),
        model=args.model,
        pretrained=args.pretrained,
        weights=Path(args.weights) if args.weights else None,
        cache_dir=cache,
        input_size=tuple(args.input_size) if args.input_size else None,
        fp32=args.fp32,
        shots=args.shots,
        data_seed=args.data_seed,
        val_dir=Path(args.val) if args.val else None,
        labels=Path(args.labels) if args.labels else None,
        val_labels=Path(args.val_labels) if args.val_labels else None,
        views=args.views,
        workers=args.workers,
        device=args.device or "auto",
        extract_batch_size=args.extract_batch_size,
        head=args.head,
        keep_maps=args.keep_maps,
        calibrate=args.calibrate,
        memory_budget=args.memory_budget,
        progress=not args.quiet,
        ddp=args.ddp,
    )
    payload = run_finetune(spec, config, resume=args.resume, overwrite=args.overwrite, say=print)
    if payload is not None:  # None: a torchrun rank other than 0, which prints nothing
        _print_finetune_report(payload, config, spec.out_dir)


def _print_finetune_report(payload: dict[str, Any], config: "FitConfig", out: Path) -> None:
    """The closing lines of ``finetune``: the data, the final epoch's metrics (the run's task says which lead),
    calibration, files written."""
    from hookmix.headonly.tasks import task_named

    final, task = payload["final"], task_named(payload["task"])
    print(
        f"{payload['train_examples']} train / {payload['val_examples']} val, "
        f"features {'x'.join(map(str, payload['feature_shape']))} ({payload['cache_bytes_per_example']:,} B/example)"
    )
    settings = config.mixing
    methods = [f"{name} alpha={a}" for name, a in (("mixup", settings.alpha), ("cutmix", settings.cutmix_alpha)) if a]
    mixing = " + ".join(methods) if config.mix else "no mixup"
    print(
        f"epoch {final['epoch']}: train loss {final['train_loss']:.4f}, {task.describe(final)}, "
        f"NLL {final['val_nll']:.4f}, ECE {final['val_ece']:.4f} ({mixing})"
    )
    if payload["final_tuned"] is not None:
        print(f"per-label thresholds tuned on validation: F1 {payload['final_tuned']['val_f1']:.4f} (in-sample)")
    calibration = payload["calibration"]
    if calibration is not None:
        print(
            f"temperature T = {calibration['temperature']:.4f} (fitted on validation): NLL "
            f"{calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f}, ECE "
            f"{calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}"
        )
    plots = "curves.png, reliability.png" + (", lambda_hist.png" if config.mix else "")
    print(f"wrote {out}/metrics.json, {plots}")


def _finetune_interrupted(args: argparse.Namespace) -> str:
    """What an interrupted ``finetune`` leaves and how to go on: the next run reuses the features cached in
    ``--cache``, and ``--resume`` continues from the checkpoint of the last finished epoch in ``--out``."""
    out = Path(args.out)
    finetune = sys.modules.get("hookmix.headonly.training")  # imported before any epoch starts: absent, none finished
    kept = [f"the features cached in --cache {args.cache} (the next run reuses them)"] if args.cache else []
    if finetune is not None and (out / finetune.CHECKPOINT_WEIGHTS).exists():
        kept.append(f"the checkpoint of the last finished epoch in --out {out}")
    if not kept:
        return "no epoch had finished and no --cache was given, so nothing is kept; run the same command again"
    return f"kept {' and '.join(kept)}; continue with the same command and --resume"


def _cmd_sweep(args: argparse.Namespace) -> None:
    """``hookmix sweep``: checked like ``finetune`` before torch is imported, then :func:`run_sweep`."""
    from hookmix.app.paths import cache_location, existing_dir, existing_file, writable_dir

    if args.data != _DIGITS:
        root = "the folder the CSV's paths are relative to" if args.labels else "a folder with one sub-folder per class"
        existing_dir("--data", Path(args.data), f"give {root}, or 'digits'")
        if args.model is None:
            raise UsageError("--model is required with an image folder, e.g. --model resnet50.")
    if args.val:
        existing_dir("--val", Path(args.val), "give a folder with the same class sub-folders as --data")
    for flag, given in (("--labels", args.labels), ("--val-labels", args.val_labels)):
        if given:
            existing_file(flag, Path(given), "give a CSV file with the columns path,labels")
    writable_dir("--out", Path(args.out))
    cache = cache_location("--cache", args.cache)
    from hookmix.headonly.training import FitConfig

    defaults = _DIGITS_FIT if args.data == _DIGITS else _IMAGE_FIT
    base = FitConfig(epochs=args.epochs, batch_size=args.batch_size or defaults["batch_size"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from hookmix.app.finetune_job import JobSpec
    from hookmix.app.sweep_job import SweepSpec, format_table, run_sweep

    job = JobSpec(
        data=args.data,
        layer=None,
        out_dir=Path(args.out),
        model=args.model,
        pretrained=args.pretrained,
        cache_dir=cache,
        input_size=tuple(args.input_size) if args.input_size else None,
        shots=args.shots,
        val_dir=Path(args.val) if args.val else None,
        labels=Path(args.labels) if args.labels else None,
        val_labels=Path(args.val_labels) if args.val_labels else None,
        device=args.device or "auto",
        extract_batch_size=args.extract_batch_size,
        head=args.head,
        progress=not args.quiet,
    )
    lrs = tuple(args.lr) if args.lr else (defaults["lr"],)
    layers = tuple(args.layers or ()) or None
    alphas, cutmix = tuple(args.alpha), tuple(args.cutmix_alpha)
    spec = SweepSpec(job, layers, alphas, lrs, args.seeds, base, args.overwrite, cutmix)
    payload = run_sweep(spec, say=print)
    print(format_table(payload["records"]))
    for line in payload["verdicts"] + payload["warnings"]:
        print(line)
    best = payload["best"]
    cutmix = f" cutmix α={best['cutmix_alpha']:g}" if best["cutmix_alpha"] else ""
    print(f"best on validation NLL: {best['layer']} α={best['alpha']:g}{cutmix} lr {best['lr']:g} seed {best['seed']}")
    print(f"wrote {args.out}/sweep.json, sweep.csv, sweep.png and the best cell's run in {args.out}/best")


def _cmd_demo(args: argparse.Namespace) -> None:
    from hookmix.app.demo import run_demo

    run_demo(args.out, seeds=args.seeds, alpha=args.alpha, progress=not args.quiet)


def _cmd_predict(args: argparse.Namespace) -> None:
    from hookmix.app.predict import run_predict

    out = Path(args.out) if args.out else None
    rows = run_predict(
        args.run,
        args.inputs,
        out,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device or "auto",
        progress=not args.quiet,
    )
    if out is not None:
        print(f"wrote {rows} predictions to {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from hookmix.app.export import run_export

    for path in run_export(args.run, Path(args.out), onnx=args.onnx):
        print(f"wrote {path}")


def _predict_interrupted(args: argparse.Namespace) -> str:
    written = f"nothing was written to --out {args.out}" if args.out else "nothing was printed"
    return f"{written} (the CSV is written whole, after the last image); run the same command again"


def _export_interrupted(args: argparse.Namespace) -> str:
    return (
        f"no file of --out {args.out} is half-written (each is written whole, after the model is traced); "
        "run the same command again"
    )


def _interrupted(args: argparse.Namespace) -> str:
    return "run the same command again"


def _run_command(sub: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A sub-command that reads a finished run directory (``--run DIR``)."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.add_argument("--run", required=True, metavar="DIR", help="the --out directory of hookmix finetune")
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose error is one line and where to read more (``see hookmix finetune --help``),
    not the usage block above it (15 lines for ``finetune``); its sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hookmix: error: {message} (see {self.prog} --help)\n")


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{Python argument: flag}`` of ``parser``'s options, e.g. ``{"cutmix_alpha": "--cutmix-alpha"}``."""
    return {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}


def _with_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each ``name=value`` of a Python argument that a flag sets written as that flag,
    ``alpha=-1.0`` -> ``--alpha -1.0``, ``device='cuda'`` -> ``--device cuda``: the library's messages name
    its arguments, the user typed flags."""
    if not flags:
        return message
    names = "|".join(map(re.escape, sorted(flags, key=len, reverse=True)))
    pattern = rf"(?<![\w.-])({names})=(?:'([^']*)')?"
    return re.sub(pattern, lambda found: f"{flags[found[1]]} {found[2] or ''}", message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hookmix", description="Feature-level mixup through forward hooks.")
    parser.set_defaults(interrupted=_interrupted, flags={})
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_layers, _add_finetune, _add_predict, _add_export, _add_demo, _add_sweep):
        add(sub)
    for command in sub.choices.values():
        command.set_defaults(flags=_flag_names(command))
    return parser


def _add_layers(sub: Any) -> None:
    layers = sub.add_parser(
        "layers",
        help="print every layer of a torchvision/timm model with its output shape",
        description="Print each module's name, type, output shape, parameter count and whether it is a cut "
        "point (random init, no download): the names you can pass as layers=.",
    )
    layers.add_argument("model", help="model name, e.g. resnet50, timm:vit_small_patch16_224")
    layers.add_argument(
        "--input-size",
        type=_positive_int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="input size (default: the model's own, else 3 224 224)",
    )
    layers.add_argument(
        "--depth", type=_positive_int, default=None, help="show names up to this many dotted parts (>= 1)"
    )
    layers.add_argument(
        "--mixable",
        action="store_true",
        help="only cut points: layers every path to the output passes through (sound to mix at)",
    )
    layers.set_defaults(handler=_cmd_layers)


# The flags finetune and sweep share, one definition each, in the groups --help shows them in: what the
# job reads (data, model), how it extracts the features, and how long and in what batches the head trains.


def _data_flags(parser: argparse.ArgumentParser) -> Any:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="an image folder (one sub-folder per class) or 'digits'")
    group.add_argument("--val", metavar="DIR", help="a validation folder with the same classes (default: split --data)")
    group.add_argument("--shots", type=_positive_int, default=20, help="labels per class for --data digits")
    group.add_argument(
        "--labels",
        metavar="CSV",
        help="multi-label: a CSV with columns path,labels (labels ';'-separated, may be empty; paths under "
        "--data); trains with BCEWithLogitsLoss on mixed label targets",
    )
    group.add_argument("--val-labels", metavar="CSV", help="the validation CSV of --labels (default: split --labels)")
    return group


def _model_flags(parser: argparse.ArgumentParser, *, weights: bool) -> Any:
    """``--model``, ``--pretrained`` (or, with ``weights``, ``--weights`` instead) and ``--input-size``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="torchvision/timm model name, e.g. resnet50 (not with --data digits)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--pretrained", action="store_true", help="load the library's default weights (download)")
    if weights:
        source.add_argument("--weights", metavar="PATH", help="weights file (.safetensors or torch state dict)")
    group.add_argument(
        "--input-size",
        type=_positive_int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="the image size the backbone sees (default: the model's own)",
    )
    return group


def _extraction_flags(parser: argparse.ArgumentParser) -> Any:
    group = parser.add_argument_group("feature extraction")
    group.add_argument(
        "--extract-batch-size",
        type=_positive_int,
        default=64,
        metavar="N",
        help="images per backbone forward while extracting (default 64); memory and speed only: the cache "
        "serves runs of any extraction batch size",
    )
    group.add_argument(
        "--cache",
        metavar="DIR|URL",
        help="keep features here (reused when they match, by finetune and sweep): a directory, or object storage "
        "such as s3://bucket/prefix",
    )
    group.add_argument(
        "--device", type=_device, default=None, help="auto (cuda, then mps, then cpu; the default), cpu, cuda, mps"
    )
    return group


def _training_flags(parser: argparse.ArgumentParser) -> Any:
    group = parser.add_argument_group("head training")
    group.add_argument("--epochs", type=_positive_int, default=20, help="head training epochs (default 20)")
    group.add_argument(
        "--batch-size", type=_positive_int, default=None, help="head training batch (default 32; digits: 16)"
    )
    return group


def _add_finetune(sub: Any) -> None:
    ft = sub.add_parser(
        "finetune",
        help="train a model's head on cached, mixed features of a named layer",
        description="Split the model at --layer, run the frozen backbone once over the data (cached), then "
        "train the head on mixed cached features; writes metrics.json and PNG plots to --out.",
    )
    _finetune_data(_data_flags(ft))
    _finetune_model(_model_flags(ft, weights=True))
    _finetune_extraction(_extraction_flags(ft))
    _mixing_flags(ft.add_argument_group("mixing"))
    _finetune_training(_training_flags(ft))
    run = ft.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="DIR", help="where metrics.json, plots and checkpoints go")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    again.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(handler=_cmd_finetune, interrupted=_finetune_interrupted)


def _finetune_data(group: Any) -> None:
    group.add_argument(
        "--data-seed",
        type=_non_negative_int,
        default=None,
        help="seed of the data's preparation: the split of --data, the digits task's sample, a random-init "
        "backbone (default: --seed; a sweep's cells use 0)",
    )


def _finetune_model(group: Any) -> None:
    group.add_argument(
        "--layer",
        help="where to cut and mix, e.g. layer4 (default: the last stage before the pooling and head: layer4 of "
        "a ResNet, the last block of a ViT, the last stage of a ConvNeXt; stage2 for digits)",
    )
    group.add_argument(
        "--head",
        choices=("model", "linear", "mlp"),
        default="model",
        help="the head to train: the model's own after the layer (default), a fresh pooled linear one, or "
        "fastai's create_head MLP (concat pool, BatchNorm, dropout, 512, ReLU, ...)",
    )
    group.add_argument(
        "--keep-maps",
        action="store_true",
        help="cache the layer's maps even when only fixed linear ops (average pool, flatten) follow it; by "
        "default the pooled features are cached then (the same training, often 49x smaller)",
    )


def _finetune_extraction(group: Any) -> None:
    group.add_argument(
        "--views",
        type=_positive_int,
        default=1,
        help="augmented views per training image, with the model's training transform (default 1)",
    )
    group.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader worker processes (default 0)")
    group.add_argument("--fp32", action="store_true", help="cache features in float32 (default float16)")
    group.add_argument(
        "--memory-budget",
        type=_size,
        default=None,
        metavar="SIZE",
        help="training features larger than this (e.g. 8G) are memory-mapped from --cache and streamed in "
        "shuffled blocks with bounded memory (default: half the available RAM)",
    )


def _mixing_flags(group: Any) -> None:
    """The library's :class:`~hookmix.MixSettings`, one flag each, and ``--no-mix`` for the baseline."""
    group.add_argument(
        "--alpha", type=_number_in(0), default=0.4, help="mixup lambda ~ Beta(alpha, alpha); 0: off (default 0.4)"
    )
    group.add_argument(
        "--cutmix-alpha",
        type=_number_in(0),
        default=0.0,
        help="cutmix at the layer, lambda ~ Beta(a, a); 0: off (default)",
    )
    group.add_argument(
        "--switch-prob",
        type=_number_in(0, 1),
        default=0.5,
        help="with both alphas > 0, the probability a step uses cutmix (default 0.5)",
    )
    group.add_argument(
        "--lam-mode", choices=("batch", "sample"), default="batch", help="one lambda per batch (default) or per example"
    )
    group.add_argument("--dominant", action="store_true", help="use max(lambda, 1 - lambda): each example dominates")
    group.add_argument(
        "--label-smoothing",
        type=_number_in(0, 1, high_open=True),
        default=0.0,
        help="smooth the class targets before mixing, in [0, 1)",
    )
    group.add_argument(
        "--stop-epoch", type=_non_negative_int, default=None, help="train without mixing from this epoch on (0-based)"
    )
    group.add_argument("--exclude-classes", type=int, nargs="+", metavar="C", help="class indices never mixed")
    group.add_argument("--no-mix", action="store_true", help="train the baseline head without mixup")


def _finetune_training(group: Any) -> None:
    group.add_argument(
        "--lr", type=_number_in(0, low_open=True), default=None, help="AdamW learning rate (default 3e-3; digits: 3e-2)"
    )
    group.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the head's init, data order and mix plans (default 0)",
    )
    group.add_argument(
        "--calibrate",
        action="store_true",
        help="after training, fit a temperature T on the validation split (L-BFGS on the NLL); metrics.json "
        "records T and the NLL / ECE before and after, reliability.png draws both",
    )
    group.add_argument(
        "--ddp",
        choices=("auto", "on", "off"),
        default="auto",
        help="under torchrun: train the head with DDP on every rank (on), on rank 0 alone (off), or as measured "
        "best (auto: rank 0 on CPUs; DDP on GPUs from 1024 rows per GPU and step); --batch-size is the global batch",
    )


def _add_predict(sub: Any) -> None:
    pr = _run_command(
        sub,
        "predict",
        "classify images with a fine-tuned run; one CSV row per image",
        "Rebuild the run's model (its weights, layer, head, preprocessing and temperature) and write, per image, "
        "the top-k classes and probabilities (and the predicted set of a multi-label run). Unreadable images "
        "are reported on stderr and skipped.",
    )
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    pr.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: standard output)")
    pr.add_argument("--top-k", type=_positive_int, default=5, help="classes per row (default 5)")
    pr.add_argument("--batch-size", type=_positive_int, default=64)
    pr.add_argument("--device", type=_device, default=None, help="auto (the default), cpu, cuda, mps")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(handler=_cmd_predict, interrupted=_predict_interrupted)


def _add_export(sub: Any) -> None:
    ex = _run_command(
        sub,
        "export",
        "write a fine-tuned run as one safetensors file (+ JSON config), optionally ONNX",
        "Write the backbone and the trained head as one safetensors state dict with the run's configuration "
        "(model, weights reference, layer, head, classes, preprocessing, temperature, thresholds) in its "
        "metadata and in FILE.json; hookmix.load_finetuned(FILE) rebuilds it.",
    )
    ex.add_argument("--out", required=True, metavar="FILE", help="e.g. model.safetensors")
    ex.add_argument("--onnx", action="store_true", help="also write FILE.onnx (needs pip install 'hookmix[onnx]')")
    ex.set_defaults(handler=_cmd_export, interrupted=_export_interrupted)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="the digits-transfer experiment: head-only fine-tuning with and without feature mixup",
        description="Frozen CNN pretrained on digits 0-4, head trained on few labels of digits 5-9 with and "
        "without feature mixup at stage2, over seeds; prints mean ± 95% CI and writes plots.",
    )
    demo.add_argument("--out", default="demo_out", metavar="DIR")
    demo.add_argument(
        "--seeds", type=_int_at_least(2), default=5, help="at least 2: a 95%% CI needs a spread over seeds"
    )
    demo.add_argument("--alpha", type=float, default=0.4)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)


def _add_sweep(sub: Any) -> None:
    """The ``sweep`` sub-command: finetune's inputs, with lists where a grid makes sense."""
    sw = sub.add_parser(
        "sweep",
        help="train a grid of heads (layer x alpha x cutmix alpha x lr x seed) on cached features; paired CIs "
        "against no mixing",
        description="Per layer, cache the features once and train every cell (alpha x cutmix alpha x lr x seed) "
        "together; report each mixing against none (alpha=0, cutmix alpha=0) on the same seeds with 95% CIs, and "
        "write the best cell on validation NLL as a run directory --out/best.",
    )
    _data_flags(sw)
    _model_flags(sw, weights=False)
    sw.add_argument("--layers", nargs="+", metavar="L", help="layers to cut at (default: the last two stages)")
    sw.add_argument("--head", choices=("model", "linear", "mlp"), default="model", help="as finetune --head")
    sw.add_argument("--alpha", type=_number_in(0), nargs="+", default=[0.0, 0.2, 0.4, 1.0], help="0 is always in")
    sw.add_argument(
        "--cutmix-alpha",
        type=_number_in(0),
        nargs="+",
        default=[0.0],
        help="CutMix alphas (caches the maps); crossed with --alpha, 0 always in (default: 0, no CutMix)",
    )
    sw.add_argument("--lr", type=_number_in(0, low_open=True), nargs="+", help="AdamW lrs (default as finetune)")
    sw.add_argument("--seeds", type=_int_at_least(2), default=5, help="seeds 0..K-1 per cell (>= 2, default 5)")
    _extraction_flags(sw)
    _training_flags(sw)
    sw.add_argument("--out", required=True, metavar="DIR", help="sweep.json, sweep.csv, sweep.png, best/")
    sw.add_argument("--overwrite", action="store_true", help="replace a finished sweep in --out")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(handler=_cmd_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except (UsageError, FileNotFoundError) as exc:  # a user's mistake: one line; anything else keeps its traceback
        parser.exit(2, f"hookmix: error: {_with_flags(str(exc), args.flags)}\n")
    except RankFailed as exc:  # another torchrun rank failed and printed why: one line here, its exit code's kind
        parser.exit(2 if exc.usage else 1, f"hookmix: error: {exc}\n")
    except KeyboardInterrupt:  # Ctrl-C: what is kept and how to go on, not the traceback of where it landed
        parser.exit(130, f"hookmix: interrupted; {args.interrupted(args)}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
