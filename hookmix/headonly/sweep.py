"""A sweep: a grid of heads (α × lr × seed) trained together on one cache, and what it says about mixup.

Every cell is the run :func:`hookmix.fit` would make alone with its :class:`~hookmix.FitConfig`:
the data order and views from a ``torch.Generator`` seeded like fit's, the mix plans from a
:class:`hookmix.mixing.plan.PlanSampler` seeded like the :class:`~hookmix.HookMixer` fit builds (drawn in the same
order), the head's own init, AdamW with a per-step cosine schedule. What differs is the loop: the heads'
parameters are stacked (``torch.func.stack_module_state``) and run in one ``vmap`` forward over a batched
gather ``(G, B, ...)`` of each head's own batch, and one AdamW steps them all — AdamW is elementwise, so with
one parameter group per (lr, weight decay) it is per-head exact. A head that is one ``nn.Linear`` skips the
per-head gather: mixing commutes with an affine map (``W(λa + (1−λ)b) + c = λ(Wa + c) + (1−λ)(Wb + c)``), so
each seed's batch goes through one GEMM for all the heads of that seed and each head mixes its own logits
with its own λ and partners. The results equal ``fit``'s up to float rounding (``tests/headonly/test_sweep.py``
measures it).

Stacked: heads without buffers or dropout (a linear head; a ResNet's own ``fc`` on pooled features), a
multi-class task, mixup (not CutMix) without label smoothing or excluded classes, in-memory features. Any other
grid (an MLP head with BatchNorm and dropout, multi-label, CutMix, a streamed cache) is trained cell by cell
with ``fit`` itself: the same results, without the speed-up (:func:`stackable` says which and why).

:func:`paired_differences` turns the cells into the answer: per layer, head and lr, each α against α = 0 on
the same seed, with a 95% CI over seeds (:func:`hookmix.mean_ci`) and a one-line verdict per metric.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm

from hookmix.core.devices import module_device, resolve_device
from hookmix.core.errors import UsageError
from hookmix.evaluation.metrics import mean_ci
from hookmix.headonly.streaming import ShardedFeatures
from hookmix.headonly.tasks import MULTICLASS, task_of
from hookmix.headonly.training import FitConfig, FitResult, _batch_starts, _check_data, fit
from hookmix.mixing.plan import PlanSampler

__all__ = [
    "cell_record",
    "fit_grid",
    "grid_configs",
    "grid_unstacked",
    "paired_differences",
    "stackable",
    "summary",
    "verdicts",
    "warnings_of",
]

HIGHER_IS_BETTER = {"val_accuracy": True, "val_map": True, "val_f1": True, "val_nll": False, "val_ece": False}
"""The metrics a sweep compares, and which way is better."""

_SHARED = ("epochs", "batch_size", "eval_batch_size")


def grid_configs(
    base: FitConfig, alphas: Sequence[float], lrs: Sequence[float], seeds: Sequence[int]
) -> list[FitConfig]:
    """One :class:`FitConfig` per cell α × lr × seed of ``base``: α = 0 is the no-mixup baseline
    (``mix=False``, as ``finetune --no-mix``), always included and first; every other α mixes with
    ``base.mixing`` at that α."""
    if not alphas or not lrs or not seeds:
        raise UsageError(
            f"alphas={list(alphas)}, lrs={list(lrs)} and seeds={list(seeds)} must each list one value or more."
        )
    ordered = [0.0, *sorted({float(a) for a in alphas} - {0.0})]
    configs = []
    for alpha in ordered:
        for lr in dict.fromkeys(float(v) for v in lrs):
            for seed in dict.fromkeys(seeds):
                mixing = base.mixing if alpha == 0 else replace(base.mixing, alpha=alpha)
                configs.append(replace(base, mixing=mixing, mix=alpha > 0, lr=lr, seed=seed))
    return configs


def cell_alpha(config: FitConfig) -> float:
    """The α of a cell: 0 for the no-mixup baseline."""
    return config.mixing.alpha if config.mix else 0.0


def stackable(head: nn.Module, config: FitConfig, train_inputs: Any, train_labels: torch.Tensor) -> str:
    """Why the cells of ``head`` and ``config`` cannot be trained stacked (``""``: they can)."""
    if any(True for _ in head.buffers()):
        return "the head has buffers (BatchNorm running statistics)"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in head.modules()):
        return "the head has dropout"
    if isinstance(train_inputs, ShardedFeatures):
        return "the training features are streamed from disk"
    if task_of(train_labels, "train_labels") is not MULTICLASS:
        return "multi-label targets"
    mixing = config.mixing
    if config.mix and (mixing.uses_cutmix or mixing.label_smoothing or mixing.exclude_classes):
        return "CutMix, label smoothing or excluded classes"
    return ""


def grid_unstacked(
    heads: Sequence[nn.Module], configs: Sequence[FitConfig], train_inputs: Any, train_labels: torch.Tensor
) -> str:
    """Why :func:`fit_grid` trains these cells one by one with ``fit`` (``""``: they are stacked)."""
    if len({type(h) for h in heads}) > 1:
        return "the heads are of different types"
    reasons = sorted({stackable(h, c, train_inputs, train_labels) for h, c in zip(heads, configs)} - {""})
    return "; ".join(reasons)


def _check_grid(heads: Sequence[nn.Module], configs: Sequence[FitConfig]) -> None:
    if len(heads) != len(configs) or not configs:
        raise UsageError(f"give one head per config: {len(heads)} heads for {len(configs)} configs.")
    if len({id(h) for h in heads}) != len(heads):
        raise UsageError("heads holds the same module twice; give each cell its own head (copy.deepcopy).")
    for name in _SHARED:
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise UsageError(f"the cells of one grid share {name}, got {sorted(values)}; sweep them in separate grids.")


def fit_grid(
    heads: Sequence[nn.Module],
    configs: Sequence[FitConfig],
    train_inputs: torch.Tensor | ShardedFeatures,
    train_labels: torch.Tensor,
    val_inputs: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[FitResult]:
    """Train ``heads[i]`` with ``configs[i]`` on the cached features, all cells together when they stack.

    Each head ends trained in place, and ``FitResult`` i is what ``fit(heads[i], "input", ..., configs[i])``
    returns (history per epoch, λ of the mixed steps, the last validation logits). The configs share
    ``epochs``, ``batch_size`` and ``eval_batch_size``; lr, weight decay, seed and mixing vary per cell.
    """
    _check_grid(heads, configs)
    if grid_unstacked(heads, configs, train_inputs, train_labels):
        return [
            fit(
                h,
                "input",
                train_inputs,
                train_labels,
                val_inputs,
                val_labels,
                c,
                num_classes=num_classes,
                device=device,
                progress=False,
            )
            for h, c in tqdm(list(zip(heads, configs)), desc="cells", disable=not progress, leave=False)
        ]
    return _StackedGrid(heads, configs, num_classes, device).train(
        train_inputs, train_labels, val_inputs, val_labels, progress
    )


class _StackedGrid:
    """G heads of one structure as stacked parameters, one parameter group per (lr, weight decay)."""

    def __init__(self, heads: Sequence[nn.Module], configs: Sequence[FitConfig], num_classes: int, device: Any) -> None:
        self.configs, self.heads, self.num_classes = list(configs), list(heads), num_classes
        self.device = resolve_device(device) if device is not None else module_device(heads[0])
        keys = [(c.lr, c.weight_decay) for c in configs]
        groups = list(dict.fromkeys(keys))
        # row r holds cell order[r]: grouped by (lr, weight decay), and by seed within a group, so that a seed's
        # linear heads are one slice of their group's stacked weights
        self.order = sorted(range(len(configs)), key=lambda i: (groups.index(keys[i]), configs[i].seed))
        self.base = heads[0]
        self.names = [n for n, p in heads[0].named_parameters()]
        self.groups: list[dict[str, torch.Tensor]] = []
        for group in groups:
            members = [heads[i] for i in self.order if keys[i] == group]
            stacked, _ = stack_module_state(members)
            self.groups.append({n: stacked[n].detach().to(self.device).requires_grad_(True) for n in self.names})
        self.optimizer = torch.optim.AdamW(
            [{"params": list(g.values()), "lr": lr, "weight_decay": wd} for g, (lr, wd) in zip(self.groups, groups)]
        )
        self.linear = _linear_names(heads[0])

    def params(self) -> dict[str, torch.Tensor]:
        """The stacked parameters of every head, (G, ...) each, rows in :attr:`order`."""
        return {n: torch.cat([g[n] for g in self.groups]) for n in self.names}

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """Logits (G, B, C) of each head on its own batch x (G, B, ...), or on one batch (B, ...) for all."""

        def one(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, params, (inputs,))

        return torch.vmap(one, in_dims=(0, None if shared_input else 0))(self.params(), x)

    def train(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        val_inputs: torch.Tensor,
        val_labels: torch.Tensor,
        progress: bool,
    ) -> list[FitResult]:
        views, _ = _check_data(inputs, labels, "train", self.num_classes)
        _check_data(val_inputs, val_labels, "val", self.num_classes)
        config = self.configs[0]
        views, labels = views.to(self.device), labels.to(self.device)
        run = _Draws([self.configs[i] for i in self.order], labels.shape[0], views.shape[0])
        steps = config.epochs * len(run.starts)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        results = [FitResult(history=[]) for _ in self.order]
        for epoch in tqdm(range(config.epochs), desc="epochs", disable=not progress, leave=False):
            losses = self._epoch(run, epoch, views, labels, scheduler, results)
            logits = self._validate(val_inputs, config.eval_batch_size)
            lrs = [group["lr"] for group in self.optimizer.param_groups for _ in range(len(group["params"][0]))]
            for r, result in enumerate(results):
                row = {"epoch": epoch + 1, "train_loss": losses[r], **MULTICLASS.metrics(logits[r], val_labels.cpu())}
                result.history.append({**row, "lr": lrs[r]})
                result.val_logits = logits[r]
        self._write_back()
        by_cell = [FitResult(history=[])] * len(self.order)
        for r, i in enumerate(self.order):
            by_cell[i] = results[r]
        return by_cell

    def _epoch(
        self,
        run: "_Draws",
        epoch: int,
        views: torch.Tensor,
        labels: torch.Tensor,
        scheduler: Any,
        results: list[FitResult],
    ) -> list[float]:
        """One epoch of every head; the mean training loss of each (rows in :attr:`order`)."""
        order, view = run.epoch(epoch, labels.device)
        total = torch.zeros(len(self.order), device=labels.device)
        lams: list[torch.Tensor] = []
        batch = self.configs[0].batch_size
        for start in run.starts:
            idx = order[:, start : start + batch]  # (S, B): each seed's own rows
            lam, perm, mixed = run.plans(idx.shape[1], labels.device)
            rows = idx[run.seed_of]  # (G, B)
            if self.linear is not None:  # each seed's batch once (S, B, D), as fit's views[view[idx], idx]
                logits = self._mixed_linear(views[view.gather(1, idx), idx].float(), run.seed_of, lam, perm)
            else:  # each head's own batch (G, B, ...)
                logits = self._mixed_stacked(views[view[run.seed_of].gather(1, rows), rows].float(), lam, perm)
            loss = self._step(logits, labels[rows], lam, perm, scheduler)
            total += loss.detach() * idx.shape[1]
            lams.append(torch.where(mixed, lam[:, 0], torch.nan))
        n = labels.shape[0]
        if lams:
            drawn = torch.stack(lams, 1).cpu()
            for r, result in enumerate(results):
                result.lams.extend(v for v in drawn[r].tolist() if not math.isnan(v))
        return (total / min(n, run.starts[-1] + batch)).tolist()

    def _mixed_stacked(self, x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Logits (G, B, C) of each head on its own mixed batch x (G, B, ...)."""
        g = torch.arange(x.shape[0], device=x.device)[:, None]
        weight = lam.to(x.dtype).view(*lam.shape, *[1] * (x.dim() - 2))
        return self.forward(x[g, perm].lerp_(x, weight))  # as hookmix.mixing.blend.mix_tensor, per head

    def _mixed_linear(
        self, xs: torch.Tensor, seed_of: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor
    ) -> torch.Tensor:
        """Logits (G, B, C) of linear heads on their mixed batches, from each seed's batch xs (S, B, D): one
        GEMM per seed for all its heads, then each head mixes its own logits (mixing commutes with W·x + c)."""
        weight_name, bias_name = self.linear
        seeds, blocks, row = seed_of.tolist(), [], 0
        for group in self.groups:
            weight, start = group[weight_name], 0  # (G_g, C, D), a seed's heads consecutive
            for seed, members in itertools.groupby(seeds[row : row + len(weight)]):
                heads = weight[start : start + len(list(members))]  # a slice: its backward is a cheap copy
                out = xs[seed] @ heads.flatten(0, 1).T  # (B, G_s·C)
                blocks.append(out.view(xs.shape[1], len(heads), -1).transpose(0, 1))
                start += len(heads)
            row += len(weight)
        z = torch.cat(blocks)
        g = torch.arange(z.shape[0], device=z.device)[:, None]
        mixed = z[g, perm].lerp(z, lam.to(z.dtype)[..., None])
        if bias_name is None:
            return mixed
        return mixed + torch.cat([group[bias_name] for group in self.groups])[:, None, :]

    def _step(
        self, logits: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, scheduler: Any
    ) -> torch.Tensor:
        """One AdamW step of every head from its logits (G, B, C) on its mixed batch; the per-head losses (G,)."""
        g = torch.arange(logits.shape[0], device=logits.device)[:, None]
        flat = logits.flatten(0, 1)
        own = F.cross_entropy(flat, y.flatten(), reduction="none").view(y.shape)
        partner = F.cross_entropy(flat, y[g, perm].flatten(), reduction="none").view(y.shape)
        loss = torch.lerp(partner, own, lam).mean(1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # the heads are independent: each gets the gradient of its own loss
        self.optimizer.step()
        scheduler.step()
        return loss

    @torch.no_grad()
    def _validate(self, val_inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Logits (G, M, C) on the CPU of every head on the validation features, batch by batch."""
        parts = [
            self.forward(val_inputs[i : i + batch_size].to(self.device).float(), shared_input=True).cpu()
            for i in range(0, len(val_inputs), batch_size)
        ]
        return torch.cat(parts, 1)

    def _write_back(self) -> None:
        """Each head gets its trained parameters (its row of the stacked ones)."""
        stacked = self.params()
        for r, i in enumerate(self.order):
            head = self.heads[i]
            with torch.no_grad():
                for name, param in head.named_parameters():
                    param.copy_(stacked[name][r].to(param.device))


def _linear_names(head: nn.Module) -> tuple[str, str | None] | None:
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


@dataclass
class _Draws:
    """The random draws of G cells, as each cell's ``fit`` makes them: one data generator per distinct seed
    (cells of one seed share the order and views) and one plan sampler per cell that mixes."""

    configs: list[FitConfig]
    n: int
    views: int

    def __post_init__(self) -> None:
        seeds = list(dict.fromkeys(c.seed for c in self.configs))
        self.seed_of = torch.tensor([seeds.index(c.seed) for c in self.configs])
        self.data = [torch.Generator().manual_seed(s) for s in seeds]
        self.samplers = [
            PlanSampler(("input",), c.mixing, seed=c.seed) if c.mix else None for c in self.configs
        ]  # an unmixed fit's plans (prob 0) are all identity: nothing to draw
        self.starts = _batch_starts(self.n, self.configs[0].batch_size)

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

    def plans(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's λ (G, B), partners (G, B) and whether each cell mixed (G,)."""
        lam = torch.ones(len(self.configs), batch)
        perm = torch.arange(batch).repeat(len(self.configs), 1)
        mixed = torch.zeros(len(self.configs), dtype=torch.bool)
        for g, sampler in enumerate(self.samplers):
            if sampler is not None:
                plan = sampler.draw(batch)
                if plan.mixed:
                    lam[g], perm[g], mixed[g] = plan.lam, plan.perm, True
        return lam.to(device), perm.to(device), mixed.to(device)


def cell_record(layer: str, head: str, config: FitConfig, result: FitResult, labels: torch.Tensor) -> dict[str, Any]:
    """One row of a sweep: the cell (layer, head, α, cutmix α, lr, seed) and its final epoch — training loss,
    validation metrics, and the mean confidence (top probability) beside the accuracy, for the calibration
    gap. ``labels`` are the validation labels (multi-class: the confidence is computed; else ``None``)."""
    final = dict(result.final)
    confidence = None
    if result.val_logits is not None and labels.dim() == 1:
        confidence = float(torch.softmax(result.val_logits.double(), 1).max(1).values.mean())
    return {
        "layer": layer,
        "head": head,
        "alpha": cell_alpha(config),
        "cutmix_alpha": config.mixing.cutmix_alpha if config.mix else 0.0,
        "lr": config.lr,
        "seed": config.seed,
        "epochs": config.epochs,
        **{k: v for k, v in final.items() if k not in ("epoch", "lr")},
        "val_confidence": confidence,
    }


def _arm(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a cell is compared within: its layer, head, lr and cutmix α (α and the seed vary)."""
    return record["layer"], record["head"], record["lr"], record["cutmix_alpha"]


def _metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in HIGHER_IS_BETTER if records and m in records[0]]


def paired_differences(records: Sequence[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """Per layer, head, lr and α > 0: the mean over seeds of (metric at α − metric at α = 0, same seed) and
    its ``level`` CI (:func:`hookmix.mean_ci`; NaN half-width with one seed), for each metric."""
    baseline = {(*_arm(r), r["seed"]): r for r in records if r["alpha"] == 0}
    arms: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        if r["alpha"] != 0 and (*_arm(r), r["seed"]) in baseline:
            arms.setdefault((*_arm(r), r["alpha"]), []).append(r)
    rows = []
    for (layer, head, lr, cutmix, alpha), members in arms.items():
        for metric in _metrics(records):
            diffs = [m[metric] - baseline[(*_arm(m), m["seed"])][metric] for m in members]
            mean, half = mean_ci(diffs, level)
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "lr": lr,
                    "cutmix_alpha": cutmix,
                    "alpha": alpha,
                    "metric": metric,
                    "seeds": len(diffs),
                    "mean": mean,
                    "half_width": half,
                    "low": mean - half,
                    "high": mean + half,
                }
            )
    return rows


def _name(metric: str) -> str:
    return {"val_accuracy": "accuracy", "val_nll": "NLL", "val_ece": "ECE", "val_map": "mAP", "val_f1": "F1"}[metric]


def verdicts(differences: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row of :func:`paired_differences`, e.g. ``α=0.4 at layer4 (linear, lr 0.003): NLL
    −0.0500 [−0.0800, −0.0200] better than α=0`` or ``... accuracy +0.0100 [−0.0200, +0.0400] within noise``."""
    lines = []
    for row in differences:
        where = f"α={row['alpha']:g} at {row['layer']} ({row['head']}, lr {row['lr']:g})"
        shown = f"{_name(row['metric'])} {row['mean']:+.4f}"
        if math.isnan(row["half_width"]):
            lines.append(f"{where}: {shown} (one seed: no interval; give --seeds 3 or more)")
            continue
        interval = f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        if row["low"] <= 0 <= row["high"]:
            judged = "within noise"
        else:
            better = (row["low"] > 0) == HIGHER_IS_BETTER[row["metric"]]
            judged = "better than α=0" if better else "worse than α=0"
        lines.append(f"{where}: {shown} {interval} {judged}")
    return lines


def warnings_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """The warning signs of a sweep, per layer, head, lr and α (means over seeds): a mixed cell whose final
    training loss is above its validation loss (the mixed targets are harder than the data: lower α), and
    under-confidence (accuracy above the mean confidence: the calibration gap's sign; ``--calibrate``)."""
    arms: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        arms.setdefault((*_arm(r), r["alpha"]), []).append(r)
    lines = []
    for (layer, head, lr, _, alpha), members in arms.items():
        where = f"α={alpha:g} at {layer} ({head}, lr {lr:g})"
        train = math.fsum(m["train_loss"] for m in members) / len(members)
        val = math.fsum(m["val_nll"] for m in members) / len(members)
        if alpha > 0 and train > val:
            lines.append(
                f"{where}: training loss {train:.4f} above validation loss {val:.4f} at the end: the mixed targets "
                "are harder than the data; try a lower α"
            )
        gaps = [m["val_accuracy"] - m["val_confidence"] for m in members if m.get("val_confidence") is not None]
        if len(gaps) > 1 and (gap := mean_ci(gaps))[0] - gap[1] > 0:  # accuracy above confidence beyond noise
            lines.append(
                f"{where}: under-confident (accuracy {gap[0]:+.4f} ± {gap[1]:.4f} above the mean confidence): "
                "fit a temperature with finetune --calibrate"
            )
    return lines


def summary(records: Sequence[dict[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """The answer of a sweep: the paired differences against α = 0, their verdicts and the warnings."""
    differences = paired_differences(records, level)
    return {"differences": differences, "verdicts": verdicts(differences), "warnings": warnings_of(records)}
