"""The ``hookmix`` command.

Heavy imports (torch, timm, torchvision) happen inside the commands, so ``--help`` and usage errors
answer at once.

Usage errors (bad arguments, unknown model or layer names, unusable files: :class:`~hookmix.UsageError`
and missing files) exit with code 2 and a one-line ``hookmix: error: ...`` message; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hookmix._errors import UsageError

__all__ = ["build_parser", "main"]

if TYPE_CHECKING:
    from hookmix.finetune import FitConfig


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


def _number_in(low: float, high: float, high_open: bool = False) -> Callable[[str], float]:
    """A float in [low, high] ([low, high) when ``high_open``; high = inf for no upper bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value >= high if high_open else value > high
        if not low <= value or above or value != value:
            bound = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high != float("inf") else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text} must be {'in ' if high != float('inf') else ''}{bound}")
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
    from hookmix.devices import DEVICES

    head, _, index = text.partition(":")
    if head not in DEVICES or (index and (head != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return text


def _cmd_layers(args: argparse.Namespace) -> None:
    import torch

    from hookmix.cutpoints import UntraceableError, cut_points
    from hookmix.layers import format_layers, list_layers
    from hookmix.models import create_model, default_input_size

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
    rows = list_layers(model, torch.zeros(1, *size))
    print(f"{args.model}: input 1x{'x'.join(map(str, size))}, {rows[0].params:,} parameters")
    print(format_layers([r for r in rows if r.cut_point or not args.mixable], max_depth=args.depth))
    print(note)


def _fit_config(args: argparse.Namespace) -> "FitConfig":
    from hookmix.finetune import FitConfig
    from hookmix.settings import MixSettings

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
    return FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mixing=mixing, mix=not args.no_mix, seed=args.seed
    )


def _cmd_finetune(args: argparse.Namespace) -> None:
    from hookmix.app.finetune_job import JobSpec, run_finetune

    spec = JobSpec(
        data=args.data,
        layer=args.layer,
        out_dir=Path(args.out),
        model=args.model,
        pretrained=args.pretrained,
        weights=Path(args.weights) if args.weights else None,
        cache_dir=Path(args.cache) if args.cache else None,
        input_size=tuple(args.input_size) if args.input_size else None,
        fp32=args.fp32,
        shots=args.shots,
        val=Path(args.val) if args.val else None,
        labels=Path(args.labels) if args.labels else None,
        val_labels=Path(args.val_labels) if args.val_labels else None,
        views=args.views,
        workers=args.workers,
        device=args.device,
        head=args.head,
        keep_maps=args.keep_maps,
        calibrate=args.calibrate,
        memory_budget=args.memory_budget,
        progress=not args.quiet,
    )
    config = _fit_config(args)
    for flag, path in (("--out", spec.out_dir), ("--cache", spec.cache_dir)):
        if path is not None and path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} is a file; give a directory (it is created when missing).")
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    payload = run_finetune(spec, config, resume=args.resume, say=print)
    final = payload["final"]
    print(
        f"{payload['train_examples']} train / {payload['val_examples']} val, "
        f"features {'x'.join(map(str, payload['feature_shape']))} ({payload['cache_bytes_per_example']:,} B/example)"
    )
    settings = config.mixing
    methods = [f"{name} alpha={a}" for name, a in (("mixup", settings.alpha), ("cutmix", settings.cutmix_alpha)) if a]
    mixing = " + ".join(methods) if config.mix else "no mixup"
    headline = (
        f"val mAP {final['val_map']:.4f}, F1@0.5 {final['val_f1']:.4f}"
        if payload["task"] == "multilabel"
        else f"val accuracy {final['val_accuracy']:.4f}"
    )
    print(
        f"epoch {final['epoch']}: train loss {final['train_loss']:.4f}, {headline}, "
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
    print(f"wrote {spec.out_dir}/metrics.json, {plots}")


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
        device=args.device,
        progress=not args.quiet,
    )
    if out is not None:
        print(f"wrote {rows} predictions to {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from hookmix.app.export import run_export

    for path in run_export(args.run, Path(args.out), onnx=args.onnx):
        print(f"wrote {path}")


def _run_command(sub: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A sub-command that reads a finished run directory (``--run DIR``)."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.add_argument("--run", required=True, metavar="DIR", help="the --out directory of hookmix finetune")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hookmix", description="Feature-level mixup through forward hooks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
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
    layers.add_argument("--depth", type=int, default=None, help="show names up to this many dotted parts")
    layers.add_argument(
        "--mixable",
        action="store_true",
        help="only cut points: layers every path to the output passes through (sound to mix at)",
    )
    layers.set_defaults(handler=_cmd_layers)

    ft = sub.add_parser(
        "finetune",
        help="train a model's head on cached, mixed features of a named layer",
        description="Split the model at --layer, run the frozen backbone once over the data (cached), then "
        "train the head on mixed cached features; writes metrics.json and PNG plots to --out.",
    )
    ft.add_argument("--data", required=True, help="an image folder (one sub-folder per class) or 'digits'")
    ft.add_argument("--model", help="torchvision/timm model name, e.g. resnet50 (not with --data digits)")
    source = ft.add_mutually_exclusive_group()
    source.add_argument("--pretrained", action="store_true", help="load the library's default weights (download)")
    source.add_argument("--weights", metavar="PATH", help="weights file (.safetensors or torch state dict)")
    ft.add_argument(
        "--layer",
        help="where to cut and mix, e.g. layer4 (default: the last stage before the pooling and head: layer4 of "
        "a ResNet, the last block of a ViT, the last stage of a ConvNeXt; stage2 for digits)",
    )
    ft.add_argument(
        "--head",
        choices=("model", "linear", "mlp"),
        default="model",
        help="the head to train: the model's own after the layer (default), a fresh pooled linear one, or "
        "fastai's create_head MLP (concat pool, BatchNorm, dropout, 512, ReLU, ...)",
    )
    ft.add_argument(
        "--keep-maps",
        action="store_true",
        help="cache the layer's maps even when only fixed linear ops (average pool, flatten) follow it; by "
        "default the pooled features are cached then (the same training, often 49x smaller)",
    )
    ft.add_argument(
        "--calibrate",
        action="store_true",
        help="after training, fit a temperature T on the validation split (L-BFGS on the NLL); metrics.json "
        "records T and the NLL / ECE before and after, reliability.png draws both",
    )
    ft.add_argument(
        "--memory-budget",
        type=_size,
        default=None,
        metavar="SIZE",
        help="training features larger than this (e.g. 8G) are memory-mapped from --cache and streamed in "
        "shuffled blocks with bounded memory (default: half the available RAM)",
    )
    ft.add_argument("--device", type=_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    ft.add_argument("--alpha", type=float, default=0.4, help="mixup lambda ~ Beta(alpha, alpha); 0: off (default 0.4)")
    ft.add_argument(
        "--cutmix-alpha",
        type=_number_in(0, float("inf")),
        default=0.0,
        help="cutmix at the layer, lambda ~ Beta(a, a); 0: off (default)",
    )
    ft.add_argument(
        "--switch-prob",
        type=_number_in(0, 1),
        default=0.5,
        help="with both alphas > 0, the probability a step uses cutmix (default 0.5)",
    )
    ft.add_argument(
        "--lam-mode", choices=("batch", "sample"), default="batch", help="one lambda per batch (default) or per example"
    )
    ft.add_argument("--dominant", action="store_true", help="use max(lambda, 1 - lambda): each example dominates")
    ft.add_argument(
        "--label-smoothing",
        type=_number_in(0, 1, high_open=True),
        default=0.0,
        help="smooth the class targets before mixing, in [0, 1)",
    )
    ft.add_argument(
        "--stop-epoch", type=_non_negative_int, default=None, help="train without mixing from this epoch on (0-based)"
    )
    ft.add_argument("--no-mix", action="store_true", help="train the baseline head without mixup")
    ft.add_argument("--epochs", type=_positive_int, default=20)
    ft.add_argument("--batch-size", type=_positive_int, default=32)
    ft.add_argument("--lr", type=float, default=3e-3)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--exclude-classes", type=int, nargs="+", metavar="C", help="class indices never mixed")
    ft.add_argument("--cache", metavar="DIR", help="keep features on disk here (reused when they match)")
    ft.add_argument("--fp32", action="store_true", help="cache features in float32 (default float16)")
    ft.add_argument("--input-size", type=_positive_int, nargs=3, metavar=("C", "H", "W"))
    ft.add_argument("--shots", type=_positive_int, default=20, help="labels per class for --data digits")
    ft.add_argument("--val", metavar="DIR", help="a validation folder with the same classes (default: split --data)")
    ft.add_argument(
        "--labels",
        metavar="CSV",
        help="multi-label: a CSV with columns path,labels (labels ';'-separated, may be empty; paths under "
        "--data); trains with BCEWithLogitsLoss on mixed label targets",
    )
    ft.add_argument("--val-labels", metavar="CSV", help="the validation CSV of --labels (default: split --labels)")
    ft.add_argument(
        "--views",
        type=_positive_int,
        default=1,
        help="augmented views per training image, with the model's training transform (default 1)",
    )
    ft.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader worker processes (default 0)")
    ft.add_argument("--out", required=True, metavar="DIR", help="where metrics.json, plots and checkpoints go")
    ft.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(handler=_cmd_finetune)

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
    pr.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, mps")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(handler=_cmd_predict)

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
    ex.set_defaults(handler=_cmd_export)

    demo = sub.add_parser(
        "demo",
        help="the digits-transfer experiment: head-only fine-tuning with and without feature mixup",
        description="Frozen CNN pretrained on digits 0-4, head trained on few labels of digits 5-9 with and "
        "without feature mixup at stage2, over seeds; prints mean ± 95%% CI and writes plots.",
    )
    demo.add_argument("--out", default="demo_out", metavar="DIR")
    demo.add_argument("--seeds", type=_positive_int, default=5)
    demo.add_argument("--alpha", type=float, default=0.4)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except (UsageError, FileNotFoundError) as exc:  # a user's mistake: one line; anything else keeps its traceback
        parser.exit(2, f"hookmix: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
