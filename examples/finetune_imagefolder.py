"""Head-only fine-tuning of a timm model on your ImageFolder, mixup vs no mixup over several seeds.

The Python-API version of ``hookmix finetune``, comparing both arms on one feature cache:

1. ``timm.create_model(--model, pretrained=--pretrained)`` (random init unless asked: nothing downloads
   by default) and timm's own eval transform for it;
2. ``hookmix.graph.splitting`` at ``--layer`` (a cut point, e.g. ``layer4`` of a ResNet, ``stages.3`` of a ConvNeXt);
3. ``hookmix.FeatureCache.extract``: the frozen backbone runs once over the images (``--cache DIR`` keeps
   the features on disk and reuses them on the next run);
4. ``hookmix.fit`` trains a fresh copy of the head on the cached features, with feature mixup and without,
   for each seed (same init and data order per seed); the table gives mean ± 95% CI.

The folder holds one sub-folder per class (``DIR/<class>/<image>``); each class is split into training
and validation images (``--val-fraction``).

    python examples/finetune_imagefolder.py --data DIR --model resnet50 --pretrained --layer layer4 \\
        --epochs 30 --seeds 5 --cache cache/ --out run/
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import timm
import torch
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from hookmix import CacheKey, FeatureCache, FitConfig, MixSettings, fit, mean_ci, split
from hookmix.app.imagefolder import stratified_split
from hookmix.headonly.cache import transform_fingerprint

METRICS = ("val_accuracy", "val_nll", "val_ece")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder root: DIR/<class>/<image>")
    parser.add_argument("--model", default="resnet50", help="a timm model name (default resnet50)")
    parser.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    parser.add_argument("--layer", default="layer4", help="cut point to mix and cut at (`hookmix layers MODEL`)")
    parser.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--cache", type=Path, default=None, help="feature cache directory (reused when it matches)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds {args.seeds}: a confidence interval needs at least 2 seeds")

    data_config = {"input_size": (3, args.input_size, args.input_size)} if args.input_size else {}
    model = timm.create_model(args.model, pretrained=args.pretrained)
    data_config = timm.data.resolve_data_config(data_config, model=model)
    transform = timm.data.create_transform(**data_config)
    folder = ImageFolder(args.data, transform=transform)
    if len(folder.classes) < 2:
        parser.error(f"--data {args.data} has {len(folder.classes)} class folder; give two or more")
    try:
        train_rows, val_rows = stratified_split(folder, args.val_fraction, seed=0)
    except ValueError as exc:
        parser.error(str(exc))
    model.reset_classifier(len(folder.classes))
    backbone, head = split(model.eval(), args.layer)
    classifier = model.pretrained_cfg["classifier"]  # e.g. "fc", "head.fc": the layer trained from scratch

    weights = "pretrained" if args.pretrained else "random-init"
    caches = {}
    for part, rows in (("train", train_rows), ("val", val_rows)):
        key = CacheKey(
            f"timm:{args.model}:{weights}",
            args.layer,
            data_config["input_size"],
            transform_fingerprint(transform),
            f"{args.data.resolve()}:{part}",
        )
        path = args.cache / part if args.cache else None
        caches[part] = FeatureCache.extract(backbone, Subset(folder, rows), key, path=path)
    train, val = caches["train"], caches["val"]
    print(
        f"{len(folder.classes)} classes, {len(train)} training / {len(val)} validation images, "
        f"features {tuple(train.feature_shape)} at {args.layer}"
    )

    results: dict[str, list[dict[str, float]]] = {"no mixup": [], "mixup": []}
    for seed in range(args.seeds):
        for arm in results:
            config = FitConfig(
                epochs=args.epochs, lr=args.lr, mixing=MixSettings(alpha=args.alpha), mix=arm == "mixup", seed=seed
            )
            fresh = copy.deepcopy(head).requires_grad_(True)
            with torch.random.fork_rng():  # a new classifier per seed, the same for both arms
                torch.manual_seed(seed)
                fresh.get_submodule(classifier).reset_parameters()
            run = fit(
                fresh,
                "input",
                train.features,
                train.labels,
                val.features[0],
                val.labels,
                config,
                num_classes=len(folder.classes),
                progress=False,
            )
            results[arm].append(run.final)

    print(f"\n{args.model} @ {args.layer}, {args.epochs} epochs, alpha {args.alpha}, {args.seeds} seeds, mean ± 95% CI")
    print("| arm | accuracy | NLL | ECE |\n|---|---:|---:|---:|")
    for arm, runs in results.items():
        cells = ["%.3f ± %.3f" % mean_ci([run[metric] for run in runs]) for metric in METRICS]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, default=str, indent=1))
        print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
