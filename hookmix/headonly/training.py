"""Train the trainable part of a model on mixed activations: the head on cached features, or a model
whose frozen backbone runs every step (the slow reference the cache path must match).

One loop serves both, because with a frozen backbone they are the same computation:

* cache path — ``fit(head, "input", features, ...)``: the head's input (a cached layer-L feature batch)
  is mixed;
* hooked path — ``fit(model, "L", images, ...)`` with the backbone's parameters frozen: layer L's output
  is mixed inside the full forward.

Both draw the data order and the view of each example from one generator and the mix plans from the
mixer's own generator, both seeded by ``FitConfig.seed``, so equal seeds give equal steps. Modules whose
parameters are all frozen run in eval mode (BatchNorm uses its running statistics, as the cache's
extraction did) while the rest — any module with a trainable parameter below it — trains.
``mix=False`` is the baseline: the same draws, nothing mixed.

Checkpoints are ``checkpoint.safetensors`` — weights, optimizer tensors, generator states, and in its
metadata the JSON state (epoch, history, scheduler and optimizer scalars) — written atomically as one file,
so tensors and state always belong to the same epoch; ``checkpoint.json`` is a readable copy of the state.
Loading reads only safetensors and JSON, never pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hookmix.core.checks import check_int, is_number, modes_restored
from hookmix.core.devices import place_module
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write, load_state
from hookmix.headonly.distributed import rank_seed
from hookmix.headonly.streaming import BlockLayout, ShardedFeatures
from hookmix.headonly.tasks import MULTICLASS, Task, task_of
from hookmix.mixing.mixer import HookMixer
from hookmix.mixing.settings import MixSettings

__all__ = ["CHECKPOINT_STATE", "CHECKPOINT_WEIGHTS", "fit", "FitConfig", "FitResult", "predict"]

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit`: AdamW with a per-step cosine schedule, and how to mix (``mixing``, a
    :class:`hookmix.MixSettings`: mixup / cutmix, λ per batch or row, ``stop_epoch``, label
    smoothing, excluded classes). ``mix=False`` is the baseline: the same draws, nothing mixed. ``seed``
    seeds the data order, the views and the mixer. Every setting is checked when the config is built,
    so a bad one fails before a long feature extraction."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    mixing: MixSettings = MixSettings()
    mix: bool = True
    seed: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise UsageError(f"{name}={value!r} must be a finite number {'> 0' if name == 'lr' else '>= 0'}.")
        if not isinstance(self.mixing, MixSettings):
            raise TypeError(
                f"mixing must be a hookmix.MixSettings, got {type(self.mixing).__name__}; e.g. "
                "FitConfig(mixing=MixSettings(alpha=0.4))."
            )
        if not isinstance(self.mix, bool):
            raise TypeError(f"mix must be True or False, got {type(self.mix).__name__} {self.mix!r}.")
        check_int("seed", self.seed, 0)


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history, the λ drawn on mixed steps, the last validation
    logits (for the reliability diagram), and ``restarts``: the epochs (0-based) at which a resumed fit that
    was given more ``epochs`` than its finished checkpoint restarted the cosine schedule at ``lr``."""

    history: list[dict[str, float]]
    lams: list[float] = field(default_factory=list)
    val_logits: torch.Tensor | None = None
    restarts: list[int] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1]


def _freeze_mode(model: nn.Module) -> None:
    """Train mode for the part that trains, eval mode for the frozen part.

    The frozen part is every subtree that has parameters, all frozen, taken whole: its BatchNorm uses the
    running statistics (as the cache's extraction did) and its dropout / stochastic depth is off. A
    module holding a trainable parameter anywhere below it stays in train mode, and so does a
    parameterless module beside it (the head's dropout), so a timm ViT whose root owns the frozen
    ``cls_token`` still trains its head (and the mixer sees a training forward).
    """
    model.train()

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
            return
        for child in module.children():
            visit(child)

    visit(model)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(
            f"model ({type(model).__name__}) has no parameter with requires_grad=True: nothing to train; "
            "unfreeze the head (head.requires_grad_(True))."
        )
    return params


def _check_data(
    inputs: torch.Tensor | ShardedFeatures, labels: torch.Tensor, name: str, num_classes: int
) -> tuple[torch.Tensor | ShardedFeatures, Task]:
    """Return ``inputs`` as (V, N, ...) and the task of ``labels``: (N,) class indices in [0, num_classes),
    or (N, num_classes) multi-hot rows."""
    streamed = isinstance(inputs, ShardedFeatures)
    if streamed and name != "train":
        raise TypeError(
            f"{name}_inputs is a memory-mapped cache ({inputs!r}); only train_inputs are streamed: load the "
            "validation cache with FeatureCache.load(..., mmap=False)."
        )
    if not isinstance(inputs, (torch.Tensor, ShardedFeatures)) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{name}_inputs and {name}_labels must be tensors, got {type(inputs).__name__} and "
            f"{type(labels).__name__}; convert with torch.as_tensor(...)."
        )
    task = task_of(labels, f"{name}_labels")
    task.check(labels, num_classes, f"{name}_labels")
    if inputs.shape[0] == labels.shape[0] and not streamed:
        return inputs.unsqueeze(0), task
    if inputs.ndim > 1 and inputs.shape[1] == labels.shape[0]:
        return inputs, task
    raise UsageError(
        f"{name}_inputs {tuple(inputs.shape)} do not match {labels.shape[0]} {name}_labels: give (N, ...) or "
        "(V, N, ...) with V cached views."
    )


def _check_logits(output: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``output`` when it is (B, num_classes) logits; a ``ValueError`` naming both shapes otherwise."""
    if output.dim() != 2 or output.shape[1] != num_classes:
        raise UsageError(
            f"model returns {tuple(output.shape)} for a batch of {output.shape[0]} but num_classes={num_classes}; "
            f"give a head with {num_classes} outputs (B, {num_classes}), or the right num_classes."
        )
    return output


@torch.no_grad()
def predict(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024, *, device: str | torch.device | None = None
) -> torch.Tensor:
    """Logits (N, C) on the CPU of ``model`` on ``inputs`` (N, ...) in eval mode, batch by batch; the modes
    are restored. ``device``: as for :func:`fit` (``None``: where the model is)."""
    target = place_module(model, device)
    with modes_restored(model, False):
        return torch.cat(
            [
                model(inputs[i : i + batch_size].to(target, non_blocking=True).float()).cpu()
                for i in range(0, len(inputs), batch_size)
            ]
        )


def _placed(
    views: torch.Tensor | ShardedFeatures, device: torch.device, preload: bool | None
) -> torch.Tensor | ShardedFeatures:
    """The cached views where training reads them: moved to ``device`` once when they fit in half of its
    free memory (or ``preload=True``), else left in (pinned) host memory and copied batch by batch; a
    streamed cache stays on disk."""
    if device.type == "cpu" or isinstance(views, ShardedFeatures):
        return views
    if preload is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        preload = views.numel() * views.element_size() <= free // 2
    if preload:
        return views.to(device)
    return views.pin_memory() if device.type == "cuda" else views


def fit(
    model: nn.Module,
    layer: str | Sequence[str],
    train_inputs: torch.Tensor | ShardedFeatures,
    train_labels: torch.Tensor,
    val_inputs: torch.Tensor,
    val_labels: torch.Tensor,
    config: FitConfig,
    *,
    num_classes: int,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    preload: bool | None = None,
    blocks: BlockLayout | None = None,
    progress: bool = True,
    ddp: bool = False,
) -> FitResult:
    """Train the parameters of ``model`` that require grad, mixing at ``layer``; validate each epoch.

    Args:
        model: the head (cache path) or a model with a frozen backbone (hooked path).
        layer: where to mix (``"input"`` for cached features).
        train_inputs: (N, ...) or (V, N, ...) — V cached augmented views, one drawn per example per epoch —
            or a memory-mapped cache's :class:`hookmix.headonly.streaming.ShardedFeatures` (``FeatureCache.load(path,
            key, mmap=True).features``), read from disk block by block with bounded memory.
        train_labels: (N,) integer class indices (softmax cross-entropy, mixed as the loss), or (N, C) float
            multi-hot rows (multi-label: ``BCEWithLogitsLoss`` on the mixed targets).
        val_inputs / val_labels: (M, ...) / (M,) or (M, C) validation data (never mixed: eval mode).
        config: optimisation and mixing settings.
        num_classes: number of classes (checks the labels, the exclusion and the model's output width).
        checkpoint_dir: where to write a checkpoint after every epoch; with ``resume=True`` training
            continues from the checkpoint found there (with the same settings). A finished checkpoint of
            fewer ``epochs`` is trained further: its cosine schedule has annealed the learning rate to 0, so
            the extra epochs run a new cosine cycle from ``lr`` (a warm restart, in ``FitResult.restarts``)
            — not the single longer cycle a fresh fit of that many epochs would run.
        device: where to train: ``None`` — where the model's parameters are — or ``"auto"`` / ``"cpu"`` /
            ``"cuda"`` / ``"mps"`` (:func:`~hookmix.core.devices.resolve_device`), to which the model is moved.
        preload: move the training inputs to ``device`` once (``True``) or copy them batch by batch from
            pinned host memory (``False``); ``None`` preloads when they fit in half of the free device
            memory. Both give the same steps.
        blocks: the epoch order. ``None``: a permutation of all rows for tensors, and
            ``train_inputs.layout()`` for a streamed cache. A :class:`hookmix.headonly.streaming.BlockLayout`: its
            shards are visited in shuffled blocks, the rows of a block in a shuffled order
            (:meth:`hookmix.headonly.streaming.BlockLayout.order`) — for tensors too, so that in-memory training given
            ``blocks=cache.features.layout(k)`` of the streamed cache takes exactly the streamed steps.
        progress: show a tqdm bar of the epochs (rank 0 only under DDP).
        ddp: train with ``DistributedDataParallel`` across the ranks of the default process group (call
            ``fit`` on every rank, with the same arguments). ``config.batch_size`` is then the global batch G,
            a multiple of the W ranks: every rank draws the same order from the shared seed and trains its
            own G/W rows of each step — for tensors rank r takes the r-th slice of every global batch, so with
            ``mix=False`` the result equals a one-process fit of batch G (a last global batch of fewer than
            2W rows is left out; a smaller last one is split unevenly and each rank's loss weighted by its
            rows); a streamed cache deals its shards to the ranks (:meth:`hookmix.BlockLayout.order`), each
            reading only its own, for :meth:`hookmix.BlockLayout.fewest_rows` rows per rank and epoch. Rank
            r mixes with its own plans (``HookMixer`` seeded :func:`~hookmix.headonly.distributed.rank_seed`,
            ``seed + r``; dropout too), DDP averages the gradients, rank 0 validates and sends its history
            row to the others, and rank 0 writes the checkpoint, which holds every rank's generators: a
            resume needs the same number of ranks. ``FitResult.lams`` and ``val_logits`` are rank 0's.
    Returns:
        :class:`FitResult` with one history row per epoch: ``epoch``, ``train_loss``, ``val_nll``,
        ``val_accuracy`` (multi-label: ``val_map`` and ``val_f1`` at 0.5, torchmetrics), ``val_ece``, ``lr``.

    The global RNG (which dropout in the head draws from) is seeded with ``config.seed`` for the fit and
    restored afterwards; its state rides in the checkpoint. A last batch of one row is left out of each
    epoch (it cannot be mixed, and BatchNorm cannot train on it).
    """
    check_int("num_classes", num_classes, 2, " (the head's number of outputs)")
    if resume and checkpoint_dir is None:
        raise UsageError("resume=True needs checkpoint_dir=DIR, the directory the checkpoint was written to.")
    views, task = _check_data(train_inputs, train_labels, "train", num_classes)
    if _check_data(val_inputs, val_labels, "val", num_classes)[1] != task:
        raise UsageError(f"train_labels are {task.name} targets but val_labels are not; give both of one kind.")
    blocks = _check_blocks(blocks, views, train_labels.shape[0])
    rank, world = _ddp_ranks(ddp, config.batch_size)
    target = place_module(model, device)
    views, train_labels = _placed(views, target, preload), train_labels.to(target)
    optimizer = torch.optim.AdamW(_trainable(model), lr=config.lr, weight_decay=config.weight_decay)
    shares = _step_shares(train_labels.shape[0], config.batch_size, rank, world, views, blocks)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(shares))
    result = FitResult(history=[])
    settings = config.mixing if config.mix else replace(config.mixing, prob=0.0)
    devices = [target] if target.type == "cuda" else []
    seed = rank_seed(config.seed, rank=rank)
    with (
        torch.random.fork_rng(devices=devices),  # dropout in the head draws from the global RNG: seed it here
        # validate=False: the labels were checked once above (_check_data), so no step waits on the host
        HookMixer(
            model,
            layer,
            settings=settings,
            num_classes=num_classes,
            seed=seed,
            targets=task.targets,
            validate=False,
        ) as mixer,
    ):
        torch.manual_seed(seed)
        net = DistributedDataParallel(model, device_ids=[target] if target.type == "cuda" else None) if ddp else model
        generator = torch.Generator().manual_seed(config.seed)  # the data order: shared by the ranks
        state = _TrainState(config, model, optimizer, scheduler, mixer, generator, result, task, len(shares))
        state.net, state.rank, state.world, state.shares = net, rank, world, shares
        if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_WEIGHTS).exists():
            state.load(Path(checkpoint_dir))
        bar = tqdm(
            range(len(result.history), config.epochs), desc="epochs", disable=not progress or rank > 0, leave=False
        )
        for epoch in bar:
            train_loss = _train_epoch(state, epoch, views, train_labels, num_classes, blocks)
            row = _validate(state, epoch, train_loss, val_inputs, val_labels)
            result.history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", headline=f"{row[task.headline]:.3f}")
            if checkpoint_dir is not None:
                state.save(Path(checkpoint_dir))
    if result.val_logits is None and rank == 0:
        result.val_logits = predict(model, val_inputs, config.eval_batch_size)
    return result


def _ddp_ranks(ddp: bool, batch_size: int) -> tuple[int, int]:
    """``(rank, world)`` of a DDP fit (``(0, 1)`` without ``ddp``); refuses a missing process group or a global
    batch the ranks cannot share."""
    if not isinstance(ddp, bool):
        raise TypeError(f"ddp must be True or False, got {type(ddp).__name__} {ddp!r}.")
    if not ddp:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("ddp=True needs the default process group: launch with torchrun and init_process_group.")
    rank, world = dist.get_rank(), dist.get_world_size()
    if batch_size % world or batch_size // world < 2:
        raise UsageError(
            f"batch_size={batch_size} (the global batch under ddp=True) must be a multiple of the {world} ranks "
            f"with at least 2 rows per rank, e.g. {world * max(2, batch_size // world)}."
        )
    return rank, world


def _validate(
    state: "_TrainState", epoch: int, train_loss: float, val_inputs: torch.Tensor, val_labels: torch.Tensor
) -> dict[str, float]:
    """The epoch's history row: rank 0 predicts the validation rows (the head is the same on every rank) and
    sends the row to the other ranks."""
    row: dict[str, float] | None = None
    if state.rank == 0:
        logits = predict(state.model, val_inputs, state.config.eval_batch_size)
        row = {"epoch": epoch + 1, "train_loss": train_loss, **state.task.metrics(logits, val_labels.cpu())}
        row["lr"] = state.optimizer.param_groups[0]["lr"]
        state.result.val_logits = logits
    if state.world > 1:
        box = [row]
        dist.broadcast_object_list(box, src=0)
        row = box[0]
    assert row is not None
    return row


def _batch_starts(n: int, batch_size: int, world: int = 1) -> list[int]:
    """Where the batches of an epoch of ``n`` rows start. A last batch of fewer than 2 rows per rank is left
    out: one row cannot be mixed, and a BatchNorm in the head cannot train on it (fastai drops the last batch
    for this too)."""
    starts = list(range(0, n, batch_size))
    return starts[:-1] if len(starts) > 1 and n - starts[-1] < 2 * world else starts


def _step_shares(
    n: int,
    batch_size: int,
    rank: int,
    world: int,
    views: torch.Tensor | ShardedFeatures,
    blocks: BlockLayout | None,
) -> list[tuple[int, int, float]]:
    """Each step's rows of this rank as positions ``[begin, end)`` in its epoch order, and the weight of its
    loss (``W · rows / global rows``, 1 for full batches), so that DDP's mean of the ranks' gradients is the
    gradient of the global batch's mean loss. One process: the batches of :func:`_batch_starts`. Tensors
    under DDP: the rank's slice of each global batch of the shared order. A streamed cache under DDP: the
    rank's own order (its dealt shards) in batches of G/W, as many as the rank dealt the fewest rows has."""
    if world == 1:
        return [(start, min(start + batch_size, n), 1.0) for start in _batch_starts(n, batch_size)]
    if isinstance(views, ShardedFeatures):
        per_rank = batch_size // world
        steps = (blocks or views.layout()).fewest_rows(world) // per_rank
        if steps == 0:
            raise UsageError(
                f"a rank is dealt as few as {(blocks or views.layout()).fewest_rows(world)} rows of the streamed "
                f"cache, under one batch of {per_rank}; give a smaller batch_size or fewer ranks."
            )
        return [(i * per_rank, (i + 1) * per_rank, 1.0) for i in range(steps)]
    shares = []
    for start in _batch_starts(n, batch_size, world):
        rows = min(batch_size, n - start)
        begin, end = start + rows * rank // world, start + rows * (rank + 1) // world
        shares.append((begin, end, world * (end - begin) / rows))
    return shares


def _check_blocks(blocks: BlockLayout | None, views: torch.Tensor | ShardedFeatures, n: int) -> BlockLayout | None:
    """``blocks``, or a streamed cache's default layout; refuses a layout of other rows or shards."""
    if blocks is not None and not isinstance(blocks, BlockLayout):
        raise TypeError(
            f"blocks must be a hookmix.headonly.streaming.BlockLayout or None, got {type(blocks).__name__}."
        )
    if isinstance(views, ShardedFeatures):
        if blocks is not None and blocks.stops != views.stops:
            raise UsageError(
                f"blocks has shard ends {blocks.stops[:4]}... but the streamed cache {views.stops[:4]}...; "
                "use blocks=train_inputs.layout(shards_per_block)."
            )
        return blocks or views.layout()
    if blocks is not None and blocks.rows != n:
        raise UsageError(f"blocks covers {blocks.rows} rows but train_inputs has {n}; give the layout of these rows.")
    return blocks


def _train_epoch(
    state: "_TrainState",
    epoch: int,
    views: torch.Tensor | ShardedFeatures,
    labels: torch.Tensor,
    num_classes: int,
    blocks: BlockLayout | None,
) -> float:
    """One epoch over ``views`` (V, N, ...) in a fresh order, one view drawn per example; the mean loss.

    The order: a permutation of all rows, or with ``blocks`` its block order; a streamed cache's batches come
    from its block reader in that same order."""
    model, mixer, optimizer = state.model, state.mixer, state.optimizer
    mixer.set_epoch(epoch)
    _freeze_mode(model)
    n = labels.shape[0]
    streaming = isinstance(views, ShardedFeatures)
    dealt = (state.rank, state.world) if streaming else (0, 1)  # tensors: every rank takes the shared order
    epoch_order = blocks.order(state.data_gen, *dealt) if blocks is not None else None
    order = epoch_order.order if epoch_order is not None else torch.randperm(n, generator=state.data_gen)
    view = torch.randint(views.shape[0], (n,), generator=state.data_gen)
    per_batch = state.shares[0][1] - state.shares[0][0]
    gather_on = labels.device if labels.device.type == "cuda" else None  # whole blocks to the GPU, rows gathered there
    streamed = views.batches(epoch_order, view, per_batch, gather_on) if epoch_order and streaming else None
    order, view = order.to(labels.device), view.to(labels.device)
    criterion = state.task.criterion()
    total = torch.zeros(2, device=labels.device)  # the loss summed over rows, and the rows
    lams: list[torch.Tensor] = []  # read back once per epoch: no host sync per step
    for begin, end, weight in state.shares:
        idx = order[begin:end]
        step = mixer.plan(labels[idx])
        x = next(streamed) if streamed is not None else views[view[idx].to(views.device), idx.to(views.device)]
        x = x.to(labels.device, non_blocking=True)
        loss = step.loss(criterion, _check_logits(state.net(x.float()), num_classes))
        optimizer.zero_grad(set_to_none=True)
        (loss if weight == 1 else loss * weight).backward()
        optimizer.step()
        state.scheduler.step()
        total[0] += loss.detach() * len(idx)
        total[1] += len(idx)
        if step.mixed:
            lams.append(step.lam[0])
    if streamed is not None:
        streamed.close()  # unmaps the last block now
    state.result.lams.extend(torch.stack(lams).tolist() if lams else [])
    if state.world > 1:
        dist.all_reduce(total)
    return float(total[0]) / float(total[1])


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the mixing settings beside the others (their names do not clash): one flat diff."""
    return {**{k: v for k, v in config.items() if k != "mixing"}, **(config.get("mixing") or {})}


@dataclass
class _TrainState:
    """Everything a resumed :func:`fit` needs to continue bitwise: weights, optimizer and scheduler,
    the data and mixer generators, and the result so far. It owns the checkpoint format: one
    ``checkpoint.safetensors`` (tensors, and the JSON state in its metadata, written atomically) and a
    readable ``checkpoint.json`` copy; reading never unpickles."""

    config: FitConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mixer: HookMixer
    data_gen: torch.Generator
    result: FitResult
    task: Task = MULTICLASS
    steps_per_epoch: int = 1
    net: nn.Module | None = None  # what the steps call: the model, or its DistributedDataParallel wrapper
    rank: int = 0
    world: int = 1
    shares: list[tuple[int, int, float]] = field(default_factory=list)  # :func:`_step_shares`

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and the JSON-serialisable state of this point of training."""
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        optim_state = self.optimizer.state_dict()
        for index, entries in optim_state["state"].items():
            for key, value in entries.items():
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous()
        mixer_state = self.mixer.state_dict()
        tensors["rng.data"] = self.data_gen.get_state()
        tensors["rng.mixer"] = mixer_state.pop("generator")
        tensors["rng.torch"] = torch.get_rng_state()
        if self.world > 1:  # every rank's own generators, so that each continues its own plans
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (tensors["rng.mixer"], tensors["rng.torch"]))
            for rank, (mixer_rng, torch_rng) in enumerate(gathered):
                tensors[f"rng.mixer.{rank}"], tensors[f"rng.torch.{rank}"] = mixer_rng, torch_rng
        tensors["result.lams"] = torch.tensor(self.result.lams, dtype=torch.float32)
        state = {
            "format": 1,
            "config": asdict(self.config),
            "epoch": len(self.result.history),
            "history": self.result.history,
            "scheduler": self.scheduler.state_dict(),
            "optimizer_groups": optim_state["param_groups"],
            "mixer": mixer_state,
            "restarts": self.result.restarts,
            "world": self.world,
        }
        return tensors, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], source: str) -> None:
        """Restore :meth:`state_dict`; ``source`` names where it came from in the errors."""
        extend = self._check_settings(state, source)
        if state.get("world", 1) != self.world:
            raise UsageError(
                f"{source} was trained by {state.get('world', 1)} ranks, this fit runs on {self.world}: each rank "
                "continues its own plans, so resume it with as many ranks (torchrun --nproc_per_node, --nnodes)."
            )
        own = f".{self.rank}" if self.world > 1 else ""
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        load_state(
            self.model,
            weights,
            f"{source} (another head shape?)",
            "resume with the same model and layer, or fit with another checkpoint_dir",
        )
        optim_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_gen.set_state(tensors["rng.data"])
        if "rng.torch" + own in tensors:  # the head's dropout masks continue where they stopped
            torch.set_rng_state(tensors["rng.torch" + own])
        self.mixer.load_state_dict({**state["mixer"], "generator": tensors["rng.mixer" + own]})
        self.result.history.extend(state["history"])
        self.result.lams.extend(tensors["result.lams"].tolist())
        self.result.restarts.extend(state.get("restarts", []))
        if extend:
            self._restart_schedule(len(state["history"]))

    def _check_settings(self, state: dict[str, Any], source: str) -> bool:
        """Refuse a checkpoint of other settings; ``True`` when it is a finished fit of fewer epochs, which
        this fit trains further (:meth:`_restart_schedule`)."""
        stored, wanted = _settings(state["config"]), _settings(json.loads(json.dumps(asdict(self.config))))
        diff = {k: (stored.get(k), wanted[k]) for k in wanted if stored.get(k) != wanted[k]}
        done = len(state["history"])
        if set(diff) == {"epochs"} and done == stored["epochs"] < wanted["epochs"]:
            return True
        if set(diff) == {"epochs"}:
            now = "finished" if done == stored["epochs"] else f"at epoch {done}"
            raise UsageError(
                f"{source} is {now} of epochs={stored['epochs']}; resume it with epochs={stored['epochs']} "
                f"(a finished fit can then be trained further with more epochs), or start another fit."
            )
        if diff:
            raise UsageError(
                f"{source} was trained with other settings {diff} (stored, requested); "
                "resume with the same settings, or start another fit."
            )
        return False

    def _restart_schedule(self, done: int) -> None:
        """A new cosine cycle from ``lr`` over the epochs after ``done``: the finished schedule ended at 0."""
        steps = (self.config.epochs - done) * self.steps_per_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.scheduler.T_max, self.scheduler.last_epoch = steps, 0
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.result.restarts.append(done)

    def save(self, directory: Path) -> None:
        """Write the checkpoint of this point of training into ``directory``."""
        tensors, state = self.state_dict()  # on every rank: it gathers the ranks' generators
        if self.rank > 0:
            return
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(state, indent=1)
        atomic_write(directory / CHECKPOINT_WEIGHTS, save(tensors, metadata={"state": text}))
        atomic_write(directory / CHECKPOINT_STATE, text.encode())

    def load(self, directory: Path) -> None:
        """Continue from the checkpoint in ``directory``; a ``ValueError`` naming it when it cannot be read
        or does not fit."""
        try:
            with safe_open(directory / CHECKPOINT_WEIGHTS, framework="pt") as file:
                state = json.loads((file.metadata() or {}).get("state", "null"))
                tensors = {key: file.get_tensor(key) for key in file.keys()}
            if not isinstance(state, dict) or state.get("format") != 1:
                raise UsageError(f"{CHECKPOINT_WEIGHTS} carries no format-1 hookmix checkpoint state")
        except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: not safetensors (e.g. a pickle)
            raise UsageError(
                f"cannot read the checkpoint in {directory}: {exc}; resume from another checkpoint_dir, or train "
                "from the start with resume=False (its checkpoints then replace this one)."
            ) from None
        self.load_state_dict(tensors, state, f"the checkpoint in {directory}")
