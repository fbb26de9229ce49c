"""The random draws of a grid of cells, each made as the cell's own :func:`hookmix.fit` makes it.

A cell's ``fit`` draws from three streams, all seeded by its ``FitConfig.seed``: the data order and views
(a ``torch.Generator``), the mix plans (the mixer's :class:`hookmix.PlanSampler`), and the head's dropout
masks (the global RNG of the training device, seeded with ``torch.manual_seed`` for the fit). Cells of one
seed draw the same data order, views and dropout masks (the masks depend only on the RNG state and the
shapes, which are equal), so those are drawn once per seed; plans are drawn per cell (α differs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from hookmix.headonly.training import FitConfig, _batch_starts
from hookmix.mixing.plan import PlanSampler

__all__ = ["DropoutStreams", "GridDraws", "StepPlans"]


@dataclass(frozen=True)
class StepPlans:
    """One step's plans of G cells on a batch of B rows.

    Attributes:
        lam: (G, B) the λ as drawn (1 for a cell that does not mix this step).
        perm: (G, B) each row's partner (its own index for a cell that does not mix).
        mixed: (G,) bool, whether each cell mixes this step.
        cutmix: G bools (on the host): whether each cell's plan is a CutMix plan.
        centers / token_scores: (G, B, 2) and (G, B, R) the CutMix plans' box centres and token scores
            (zeros for the other cells); ``None`` when no cell cuts this step (token scores also when the
            features have no tokens).
    """

    lam: torch.Tensor
    perm: torch.Tensor
    mixed: torch.Tensor
    cutmix: tuple[bool, ...]
    centers: torch.Tensor | None
    token_scores: torch.Tensor | None


class GridDraws:
    """The data order, views and plans of G cells (``configs``) on N rows with V cached views."""

    def __init__(self, configs: Sequence[FitConfig], n: int, views: int, tokens: bool) -> None:
        self.configs, self.n, self.views, self.tokens = list(configs), n, views, tokens
        seeds = list(dict.fromkeys(c.seed for c in configs))
        self.seeds = seeds
        self.seed_of = torch.tensor([seeds.index(c.seed) for c in configs])
        self.data = [torch.Generator().manual_seed(s) for s in seeds]
        self.samplers = [
            PlanSampler(("input",), c.mixing, seed=c.seed) if c.mix else None for c in configs
        ]  # an unmixed fit's plans (prob 0) are all identity: nothing to draw
        self.starts = _batch_starts(n, configs[0].batch_size)

    def epoch(self, epoch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each seed's order and views (S, N) of this epoch, drawn as ``fit``'s ``_train_epoch`` draws them."""
        for sampler in self.samplers:
            if sampler is not None:
                sampler.set_epoch(epoch)
        orders, views = [], []
        for gen in self.data:
            orders.append(torch.randperm(self.n, generator=gen))
            views.append(torch.randint(self.views, (self.n,), generator=gen))
        self.seed_of = self.seed_of.to(device)
        return torch.stack(orders).to(device), torch.stack(views).to(device)

    def plans(self, batch: int, device: torch.device) -> StepPlans:
        """This step's plans of every cell, each from the cell's own sampler."""
        g = len(self.configs)
        drawn = [None if s is None else s.draw(batch) for s in self.samplers]
        used = [plan if plan is not None and plan.mixed else None for plan in drawn]  # None: this step is plain
        ones, identity = torch.ones(batch), torch.arange(batch)
        lam = torch.stack([ones if plan is None else plan.lam for plan in used])
        perm = torch.stack([identity if plan is None else plan.perm for plan in used])
        mixed = torch.tensor([plan is not None for plan in used])
        cut = [i for i, plan in enumerate(used) if plan is not None and plan.method == "cutmix"]
        cutmix = tuple(i in cut for i in range(g))
        centers = torch.zeros(g, batch, 2) if cut else None
        scores = torch.zeros(g, batch, used[cut[0]].token_scores.shape[1]) if cut and self.tokens else None
        for i in cut:
            centers[i] = used[i].centers  # type: ignore[index, union-attr]
            if scores is not None:
                scores[i] = used[i].token_scores  # type: ignore[union-attr]
        moved = [None if t is None else t.to(device) for t in (centers, scores)]
        return StepPlans(lam.to(device), perm.to(device), mixed.to(device), cutmix, *moved)


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class DropoutStreams:
    """Each seed's dropout masks, drawn as its ``fit`` draws them: by ``F.dropout`` itself, from the device's
    global RNG set to the seed's own state (``fit`` seeds that RNG with ``torch.manual_seed(seed)``).

    ``F.dropout(ones)`` is the mask scaled by 1 / (1 − p), which ``fit``'s dropout multiplies its input
    with: ``x * mask`` here equals ``F.dropout(x)`` bit for bit. Use inside ``torch.random.fork_rng`` (the
    global state is left at the last seed's).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.device = device
        self.states = []
        for seed in seeds:
            torch.manual_seed(seed)
            self.states.append(_rng_state(device))

    def masks(self, shape: torch.Size, p: float) -> torch.Tensor:
        """(S, *shape): each seed's next dropout mask (scaled) for an input of ``shape``."""
        ones = torch.ones(shape, device=self.device)
        masks = []
        for s, state in enumerate(self.states):
            _set_rng_state(state, self.device)
            masks.append(F.dropout(ones, p, training=True))
            self.states[s] = _rng_state(self.device)
        return torch.stack(masks)
