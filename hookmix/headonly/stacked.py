"""G heads of one structure trained together, each exactly as :func:`hookmix.fit` trains it alone.

The heads' parameters and buffers are stacked (:func:`stack_state`, (G, ...) each) and run in
``vmap`` forwards over a batched gather ``(G, B, ...)`` of each head's own batch; one AdamW steps them all —
AdamW is elementwise, so with one parameter group per (lr, weight decay) it is per-head exact.

* BatchNorm: the running statistics are stacked buffers passed to ``functional_call`` under ``vmap`` (batched
  on dim 0), which updates each head's row in place — the statistics ``fit`` keeps, to the bit.
* Dropout (``nn.Dropout`` at the top level of an ``nn.Sequential`` head, as :func:`hookmix.build_head`'s MLP
  has): the head runs as segments between its dropouts, and each dropout multiplies by the mask its cell's
  ``fit`` would draw (:class:`~hookmix.headonly.grid_draws.DropoutStreams`).
* Mixing: each head mixes its own batch with its own plan, mixup as :func:`hookmix.mixing.blend.mix_tensor`
  and CutMix boxes / token subsets with :func:`hookmix.mixing.blend.cutmix_tensor` on the (G·B, ...) rows,
  the targets following the area each box really keeps (as ``fit``'s mixer does).
* One ``nn.Linear`` on (B, D) features skips the per-head gather: mixing commutes with an affine map
  (``W(λa + (1−λ)b) + c = λ(Wa + c) + (1−λ)(Wb + c)``), so each seed's batch goes unmixed through its heads —
  one batched GEMM per parameter group, each seed's heads on its batch — and each head mixes its own logits with
  its own λ and partners.
* Targets: class indices (the mixed cross-entropy) or multi-hot rows (``BCEWithLogits`` on mixed targets).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from hookmix.core.checks import modes_restored
from hookmix.core.devices import module_device, resolve_device
from hookmix.graph.layouts import LayerLayouts
from hookmix.headonly.grid_draws import DropoutStreams, GridDraws, StepPlans
from hookmix.headonly.tasks import MULTICLASS, Task
from hookmix.headonly.training import FitConfig, FitResult, _check_data, _freeze_mode
from hookmix.mixing.blend import cutmix_tensor

__all__ = ["StackedGrid", "dropout_segments", "linear_names"]

Segment = nn.Module | float
"""A run of a head's modules (names as in the head), or the p of a dropout between runs."""
Masks = Callable[[torch.Size, float], torch.Tensor]
"""Gives the (G, *shape) dropout masks of an input of per-head ``shape`` and dropout ``p``."""


def dropout_segments(head: nn.Module) -> list[Segment] | None:
    """``head`` as runs of modules between its ``nn.Dropout`` s (their p); ``None`` when a dropout is not an
    ``nn.Dropout`` at the top level of an ``nn.Sequential`` (its masks could not be drawn as ``fit`` does)."""
    random = [m for m in head.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not random:
        return [head]
    if not isinstance(head, nn.Sequential) or any(type(m) is not nn.Dropout for m in random):
        return None
    if sum(type(m) is nn.Dropout for m in head.children()) != len(random):
        return None
    segments: list[Segment] = []
    run: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in head.named_children():
        if type(module) is nn.Dropout:
            segments += [nn.Sequential(run), module.p] if run else [module.p]
            run = OrderedDict()
        else:
            run[name] = module
    return segments + ([nn.Sequential(run)] if run else [])


def linear_names(head: nn.Module) -> tuple[str, str | None] | None:
    """The names of the weight and bias of ``head`` when it is exactly one ``nn.Linear`` on (B, D) features
    (no other parameter, buffer or op: checked on a probe, bit for bit); ``None`` otherwise."""
    linears = [(name, m) for name, m in head.named_modules() if type(m) is nn.Linear]
    if len(linears) != 1 or next(head.buffers(), None) is not None:
        return None
    name, linear = linears[0]
    prefix = f"{name}." if name else ""
    if {n for n, _ in head.named_parameters()} != {prefix + n for n, _ in linear.named_parameters()}:
        return None
    probe = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight)
    with torch.no_grad():
        try:
            same = torch.equal(head(probe), F.linear(probe, linear.weight, linear.bias))
        except (RuntimeError, TypeError, ValueError):  # e.g. a head that reshapes a map
            return None
    return (prefix + "weight", None if linear.bias is None else prefix + "bias") if same else None


def stack_state(modules: Sequence[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each parameter and buffer of ``modules`` stacked along a new dim 0, ``(G, ...)``, detached: what
    ``torch.func.stack_module_state`` gives, for modules of one structure whose classes may differ (every copy
    of a torch.fx GraphModule — the heads :func:`hookmix.split` cuts — has a class of its own)."""
    named = [(dict(m.named_parameters()), dict(m.named_buffers())) for m in modules]
    params = {n: torch.stack([p[n].detach() for p, _ in named]) for n in named[0][0]}
    buffers = {n: torch.stack([b[n].detach() for _, b in named]) for n in named[0][1]}
    return params, buffers


class StackedGrid:
    """G heads of one structure as stacked parameters, one parameter group per (lr, weight decay), and their
    stacked buffers; rows ordered by group and by seed within a group (:attr:`order`)."""

    def __init__(self, heads: Sequence[nn.Module], configs: Sequence[FitConfig], num_classes: int, device: Any) -> None:
        self.configs, self.heads, self.num_classes = list(configs), list(heads), num_classes
        self.device = resolve_device(device) if device is not None else module_device(heads[0])
        keys = [(c.lr, c.weight_decay) for c in configs]
        groups = list(dict.fromkeys(keys))
        self.order = sorted(range(len(configs)), key=lambda i: (groups.index(keys[i]), configs[i].seed))
        self.base = copy.deepcopy(heads[0]).to(self.device)  # its modules run every head, functionally
        self.segments = dropout_segments(self.base) or [self.base]
        self.trainable = [n for n, p in heads[0].named_parameters() if p.requires_grad]
        ordered = [heads[i] for i in self.order]
        params, buffers = stack_state(ordered)
        self.frozen = {n: p.detach().to(self.device) for n, p in params.items() if n not in self.trainable}
        self.buffers = {n: b.to(self.device) for n, b in buffers.items()}
        self.groups: list[dict[str, torch.Tensor]] = []
        for group in groups:
            members = [h for h, i in zip(ordered, self.order) if keys[i] == group]
            stacked, _ = stack_state(members)
            self.groups.append({n: stacked[n].detach().to(self.device).requires_grad_(True) for n in self.trainable})
        self.optimizer = torch.optim.AdamW(
            [{"params": list(g.values()), "lr": lr, "weight_decay": wd} for g, (lr, wd) in zip(self.groups, groups)]
        )
        self.linear = linear_names(heads[0])
        self.layout: str | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """The stacked parameters and buffers of every head, (G, ...) each, rows in :attr:`order`."""
        trained = {n: torch.cat([g[n] for g in self.groups]) for n in self.trainable}
        return {**trained, **self.frozen, **self.buffers}

    def forward(
        self,
        x: torch.Tensor,
        shared_input: bool = False,
        masks: Callable[[torch.Size, float], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (G, B, C) of each head on its own batch x (G, B, ...), or on one batch (B, ...) for all;
        ``masks(shape, p)`` gives the (G, *shape) dropout masks in training (``None``: eval, no dropout)."""
        state = self.params()
        for segment in self.segments:
            if not isinstance(segment, nn.Module):
                x = x * masks(x.shape[1:], segment) if masks is not None and segment > 0 else x
                continue
            names = {n for n, _ in itertools.chain(segment.named_parameters(), segment.named_buffers())}

            def one(own: dict[str, torch.Tensor], inputs: torch.Tensor, module: nn.Module = segment) -> torch.Tensor:
                return functional_call(module, own, (inputs,))

            own = {n: t for n, t in state.items() if n in names}
            x = torch.vmap(one, in_dims=(0, None if shared_input else 0))(own, x)
            shared_input = False
        return x

    def train(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        val_inputs: torch.Tensor,
        val_labels: torch.Tensor,
        progress: bool,
    ) -> list[FitResult]:
        """Train every head; its :class:`FitResult` per cell (in the order of the configs)."""
        views, task = _check_data(inputs, labels, "train", self.num_classes)
        _check_data(val_inputs, val_labels, "val", self.num_classes)
        config = self.configs[0]
        views, labels = views.to(self.device), labels.to(self.device)
        ordered = [self.configs[i] for i in self.order]
        self.layout = self._layout(views)
        features = views.flatten(0, 1)  # (V·N, ...)
        run = GridDraws(ordered, labels.shape[0], views.shape[0], tokens=self.layout == "NLC")
        steps = config.epochs * len(run.starts)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        results = [FitResult(history=[]) for _ in self.order]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the dropout streams set the global RNG, as fit seeds it
            dropout = DropoutStreams(run.seeds, self.device)
            for epoch in tqdm(range(config.epochs), desc="epochs", disable=not progress, leave=False):
                losses = _GridEpoch(self, run, dropout, task).run(epoch, features, labels, scheduler, results)
                logits = self._validate(val_inputs, config.eval_batch_size)
                lrs = [group["lr"] for group in self.optimizer.param_groups for _ in range(len(group["params"][0]))]
                for r, result in enumerate(results):
                    row = {"epoch": epoch + 1, "train_loss": losses[r], **task.metrics(logits[r], val_labels.cpu())}
                    result.history.append({**row, "lr": lrs[r]})
                    result.val_logits = logits[r]
        self._write_back()
        by_cell = [FitResult(history=[])] * len(self.order)
        for r, i in enumerate(self.order):
            by_cell[i] = results[r]
        return by_cell

    def _layout(self, views: torch.Tensor) -> str | None:
        """The CutMix layout of the head's input, as ``fit``'s mixer reads it (``None``: no cell cuts, or
        the features have no positions and a CutMix plan interpolates with its λ)."""
        if not any(c.mix and c.mixing.cutmix_alpha > 0 for c in self.configs):
            return None
        return LayerLayouts(self.base, ("input",), None, cutmix=True, batch_dim=0).of("input", views[0, :2].float())

    @torch.no_grad()
    def _validate(self, val_inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Logits (G, M, C) on the CPU of every head on the validation features, batch by batch, in eval."""
        with modes_restored(self.base, False):
            parts = [
                self.forward(val_inputs[i : i + batch_size].to(self.device).float(), shared_input=True).cpu()
                for i in range(0, len(val_inputs), batch_size)
            ]
        return torch.cat(parts, 1)

    def _write_back(self) -> None:
        """Each head gets its trained parameters and buffers (its row of the stacked ones)."""
        stacked = self.params()
        for r, i in enumerate(self.order):
            head = self.heads[i]
            with torch.no_grad():
                for name, tensor in itertools.chain(head.named_parameters(), head.named_buffers()):
                    tensor.copy_(stacked[name][r].to(tensor.device))


class _GridEpoch:
    """One epoch of every head of a :class:`StackedGrid`: each head's batch, plan, forward, loss and step."""

    def __init__(self, grid: StackedGrid, run: GridDraws, dropout: DropoutStreams, task: Task) -> None:
        self.grid, self.draws, self.dropout, self.task = grid, run, dropout, task
        self.blocks = _seed_blocks(run.seed_of.tolist(), [len(next(iter(g.values()))) for g in grid.groups])

    def _masks(self, shape: torch.Size, p: float) -> torch.Tensor:
        """(G, *shape) dropout masks: each seed's, for each of its cells."""
        return self.dropout.masks(shape, p)[self.draws.seed_of]

    def run(
        self, epoch: int, features: torch.Tensor, labels: torch.Tensor, scheduler: Any, results: list[FitResult]
    ) -> list[float]:
        """One epoch on the cached views flattened to ``features`` (V·N, ...); the mean training loss of each
        head (rows in the grid's order)."""
        grid, run = self.grid, self.draws
        _freeze_mode(grid.base)
        order, view = run.epoch(epoch, labels.device)
        rows = view.gather(1, order) * labels.shape[0] + order  # (S, N): views[view[i], i] is features[view[i]·N + i]
        total = torch.zeros(len(grid.order), device=labels.device)
        lams: list[torch.Tensor] = []
        batch = grid.configs[0].batch_size
        for start in run.starts:
            idx = order[:, start : start + batch]  # (S, B): each seed's own rows
            plans = run.plans(idx.shape[1], labels.device)
            if grid.linear is not None:  # each seed's batch (S, B, D), its heads' logits mixed
                logits, lam = self._mixed_linear(_gather(features, rows[:, start : start + batch]), plans), plans.lam
            else:  # each head's batch (G, B, ...), mixed
                mixed, lam = mix_heads(_gather(features, rows[run.seed_of, start : start + batch]), plans, grid.layout)
                logits = grid.forward(mixed, masks=self._masks)
            loss = self._step(logits, labels[idx[run.seed_of]], lam, plans.perm, scheduler)
            total += loss.detach() * idx.shape[1]
            lams.append(torch.where(plans.mixed, lam[:, 0], torch.nan))
        if lams:
            drawn = torch.stack(lams, 1).cpu()
            for r, result in enumerate(results):
                result.lams.extend(v for v in drawn[r].tolist() if not math.isnan(v))
        return (total / min(labels.shape[0], run.starts[-1] + batch)).tolist()

    def _mixed_linear(self, xs: torch.Tensor, plans: StepPlans) -> torch.Tensor:
        """Logits (G, B, C) of linear heads on their mixed batches, from each seed's batch xs (S, B, D): one
        batched GEMM per group for all its heads (each seed's on its batch), then each head mixes its own logits
        (mixing commutes with W·x + c)."""
        weight_name, bias_name = self.grid.linear  # type: ignore[misc]
        blocks = []
        for group, parts in zip(self.grid.groups, self.blocks):
            weight = group[weight_name]  # (G_g, C, D)
            sizes = [(seeds.stop - seeds.start) * count for seeds, count in parts]
            # split, not slices: the backward of a split is one cat, that of a slice a zero-filled (G_g, C, D)
            for (seeds, count), heads in zip(parts, weight.split(sizes) if len(sizes) > 1 else (weight,)):
                blocks.append(_seed_logits(heads, xs[seeds], count))
        z = torch.cat(blocks)
        g = torch.arange(z.shape[0], device=z.device)[:, None]
        mixed = z[g, plans.perm].lerp(z, plans.lam.to(z.dtype)[..., None])
        if bias_name is None:
            return mixed
        return mixed + torch.cat([group[bias_name] for group in self.grid.groups])[:, None, :]

    def _step(
        self, logits: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, scheduler: Any
    ) -> torch.Tensor:
        """One AdamW step of every head from its logits (G, B, C) on its mixed batch; the per-head losses (G,)."""
        g = torch.arange(logits.shape[0], device=logits.device)[:, None]
        if self.task is MULTICLASS:
            flat = logits.flatten(0, 1)
            own = F.cross_entropy(flat, y.flatten(), reduction="none").view(y.shape)
            partner = F.cross_entropy(flat, y[g, perm].flatten(), reduction="none").view(y.shape)
            loss = torch.lerp(partner, own, lam).mean(1)
        else:  # multi-hot rows: BCE on the mixed targets, as fit's mixer mixes them
            targets = y[g, perm].lerp(y, lam.to(y.dtype)[..., None])
            loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((1, 2))
        optimizer = self.grid.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # the heads are independent: each gets the gradient of its own loss
        optimizer.step()
        scheduler.step()
        return loss


def _gather(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The ``rows`` (..., B) of ``features`` (V·N, ...) as float (..., B, ...): one ``index_select`` (a copy of
    the same values as ``fit``'s ``views[view[idx], idx]``, about twice as fast as that two-index gather)."""
    return features.index_select(0, rows.flatten()).view(*rows.shape, *features.shape[1:]).float()


def _seed_blocks(seed_of: Sequence[int], group_sizes: Sequence[int]) -> list[list[tuple[slice, int]]]:
    """Per parameter group (``group_sizes`` rows each, in order), its blocks of rows: (a slice of the seeds'
    indices, how many rows each of those seeds has). The grid orders its rows by group, then seed: a group with
    every seed in order, each as often (a full grid's), is one block; otherwise each seed's run is one."""
    blocks, row = [], 0
    for size in group_sizes:
        runs = [(seed, len(list(rows))) for seed, rows in itertools.groupby(seed_of[row : row + size])]
        counts = {count for _, count in runs}
        if [seed for seed, _ in runs] == list(range(max(seed_of) + 1)) and len(counts) == 1:
            blocks.append([(slice(0, len(runs)), counts.pop())])
        else:
            blocks.append([(slice(seed, seed + 1), count) for seed, count in runs])
        row += size
    return blocks


def _seed_logits(heads: torch.Tensor, xs: torch.Tensor, count: int) -> torch.Tensor:
    """Logits (S·count, B, C) of ``count`` heads per seed, ``heads`` (S·count, C, D) in seed order, each on its
    seed's batch of xs (S, B, D): one batched GEMM W·xᵀ (S, count·C, B), whose weight gradient g·x comes out in
    the weights' own layout (x·Wᵀ's would be transposed, and copied in the backward)."""
    out = torch.bmm(heads.view(len(xs), -1, xs.shape[2]), xs.transpose(1, 2))  # (S, count·C, B)
    return out.view(len(xs), count, -1, xs.shape[1]).transpose(2, 3).flatten(0, 1)


def mix_heads(x: torch.Tensor, plans: StepPlans, layout: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's batch x (G, B, ...) mixed with its own plan, and the λ (G, B) its targets use.

    Mixup as :func:`~hookmix.mixing.blend.mix_tensor` (the partner rows gathered, then moved towards x in place);
    the CutMix cells' rows, when the features have positions (``layout``), pasted by
    :func:`~hookmix.mixing.blend.cutmix_tensor` on their (G_c·B, ...) rows, their λ the area each row keeps."""
    g = torch.arange(x.shape[0], device=x.device)[:, None]
    weight = plans.lam.to(x.dtype).view(*plans.lam.shape, *[1] * (x.dim() - 2))
    mixed = x[g, plans.perm].lerp_(x, weight)
    cells = [i for i, cut in enumerate(plans.cutmix) if cut]
    if not cells or layout is None:
        return mixed, plans.lam
    rows = torch.tensor(cells, device=x.device)
    b = x.shape[1]
    perm = (plans.perm[rows] + torch.arange(len(cells), device=x.device)[:, None] * b).flatten()
    scores = plans.token_scores
    pasted, cut = cutmix_tensor(
        x[rows].flatten(0, 1),
        plans.lam[rows].flatten(),
        perm,
        plans.centers[rows].flatten(0, 1),  # type: ignore[index]
        None if scores is None else scores[rows].flatten(0, 1),
        layout=layout,
    )
    lam = plans.lam.index_copy(0, rows, cut.kept.view(len(cells), b).to(plans.lam.dtype))
    return mixed.index_copy(0, rows, pasted.view(len(cells), b, *x.shape[2:])), lam
