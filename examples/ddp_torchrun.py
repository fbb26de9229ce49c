"""Feature mixup under DistributedDataParallel, and head-only feature extraction shared by the ranks.

Run it with torchrun (gloo on the CPU, NCCL when CUDA is available)::

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --epochs 3 --cache cache/

Each rank trains a random-init :class:`hookmix.app.digits.DigitsCNN` on its share of scikit-learn's bundled
digits 0-4 (offline), with its own :class:`hookmix.HookMixer` hooked on the module inside DDP and seeded
``seed + rank`` (``--shared-seed``: one λ for the whole global batch). With ``--cache DIR`` the trained
model is then cut at ``--cut`` and :func:`hookmix.headonly.distributed.extract_sharded` runs its backbone over the
training images, each rank on its own block of rows, into one feature cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hookmix import CacheKey, HookMixer, split
from hookmix.app.digits import DigitsCNN, source_split
from hookmix.headonly.distributed import extract_sharded, rank_seed, unwrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="stage1", help="DigitsCNN layer to mix: stem, stage1 or stage2")
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--shared-seed", action="store_true", help="every rank draws the same plans")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--samples", type=int, default=0, help="use only this many training images (0: all)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="extract features of the trained model here")
    parser.add_argument("--cut", default="stage2", help="layer whose output --cache stores")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    try:
        data = source_split()
        train_x, train_y = data.train_x, data.train_y
        if args.samples:
            train_x, train_y = train_x[: args.samples], train_y[: args.samples]
        train = TensorDataset(train_x, train_y)
        sampler = DistributedSampler(train, shuffle=True, seed=args.seed)
        loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)

        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = DistributedDataParallel(DigitsCNN(num_classes=data.num_classes).to(device))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        seed = rank_seed(args.seed, shared=args.shared_seed)
        with HookMixer(model, args.layer, alpha=args.alpha, seed=seed) as mixer:
            for epoch in range(args.epochs):
                sampler.set_epoch(epoch)
                model.train()
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    loss = mixer.plan(y).loss(F.cross_entropy, model(x))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                model.eval()
                with torch.no_grad():
                    correct = (model(data.val_x.to(device)).argmax(1) == data.val_y.to(device)).float().mean()
                if rank == 0:
                    print(f"epoch {epoch}: last loss {loss.item():.4f}, val accuracy {correct.item():.3f}")

        if args.cache is not None:
            backbone, _ = split(unwrap(model).eval(), args.cut)
            rows = f"[:{args.samples}]" if args.samples else ""
            key = CacheKey(
                model=f"ddp_torchrun:seed={args.seed},epochs={args.epochs}",
                layer=args.cut,
                input_size=tuple(train_x.shape[1:]),
                transform="none",
                dataset=f"digits0-4:train{rows}",
            )
            cache = extract_sharded(backbone, train, key, path=args.cache, batch_size=64)
            if rank == 0:
                print(f"cached features {tuple(cache.features.shape)} in {args.cache}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
