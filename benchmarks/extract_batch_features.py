"""Do features depend on the extraction batch size? (Why ``--extract-batch-size`` is not in the cache key.)

Runs a backbone over the same images in batches of each ``--batch-sizes`` and compares the features with
those of batches of 64 (the default): whether they are bitwise equal in float32, the largest absolute
difference, and the share of values that differ once stored in float16 (the default cache dtype). The
backbones: the embedded digits CNN (pretrained on digits 0-4) at stage2 on the digits task's 796 validation
images, and a random-init torchvision ResNet-18 up to layer4 on 96 random 3x32x32 images. BatchNorm in eval
mode does not look at the batch; what can differ is the float rounding of the kernels a backend picks for a
batch shape.

    python benchmarks/extract_batch_features.py [--batch-sizes 1 7 16 32 128] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn

from hookmix.app.digits import digits_transfer, pretrain_source


def features(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model`` over ``x`` (N, C, H, W) in batches of ``batch_size``, in eval mode without grad; float32 on the CPU."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])


def backbones(device: torch.device) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    digits = pretrain_source(seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18().eval()
    return {
        "digits-cnn@stage2": (
            nn.Sequential(digits.stem, digits.stage1, digits.stage2).to(device),
            digits_transfer(20, 0).val_x.to(device),
        ),
        "resnet18@layer4": (
            nn.Sequential(*list(resnet.children())[:-2]).to(device),
            torch.randn(96, 3, 32, 32, generator=generator).to(device),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 7, 16, 32, 128])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; reference: batches of 64")
    for name, (model, x) in backbones(torch.device(args.device)).items():
        reference = features(model, x, 64)
        for batch_size in args.batch_sizes:
            found = features(model, x, batch_size)
            diff = (found - reference).abs().max().item()
            fp16 = (found.half() != reference.half()).float().mean().item()
            print(
                f"{name:<18} batch {batch_size:>4}: float32 bitwise {str(torch.equal(found, reference)):<5} "
                f"max |diff| {diff:.2e}, float16 values differing {fp16:.2%}"
            )


if __name__ == "__main__":
    main()
