"""A drop-in for ``timm.data.Mixup`` in timm-style train loops that mixes at a layer instead of the input.

timm's loop calls ``x, y = mixup_fn(x, y)`` and trains on ``loss_fn(model(x), y)`` with
``SoftTargetCrossEntropy``. :class:`HookMixup` keeps that call: it returns ``x`` untouched and the soft
targets ``(B, num_classes)`` (label smoothing, then mixing), and arms the model's hooks so the next
training forward mixes the named layer with the same λ and partners. It takes timm's arguments, so
timm's ``train.py`` needs one line changed::

    mixup_fn = HookMixup(model, "layer3", **mixup_args)   # was: Mixup(**mixup_args)

Unlike timm's ``Mixup``, odd batch sizes are fine (partners are a random cycle, not the flipped batch).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from hookmix.core.errors import UsageError
from hookmix.core.wrappers import unwrap
from hookmix.mixing.mixer import HookMixer
from hookmix.mixing.targets import MixStep

__all__ = ["HookMixup"]

_LAM_MODES = {"batch": "batch", "pair": "sample", "elem": "sample"}


class HookMixup:
    """``x, y_soft = mixup_fn(x, y)`` with the mix done at ``layers`` of ``model`` during its next forward.

    Args:
        model: the model the train loop calls; DDP / ``torch.compile`` wrappers are looked through.
        layers: where to mix, as for :class:`~hookmix.HookMixer` (``"layer3"``, ``"blocks.6"``, a list).
        mixup_alpha: mixup λ ~ Beta(mixup_alpha, mixup_alpha) (timm's default 1.0; 0 turns mixup off).
        cutmix_alpha: > 0 turns on CutMix at the layer (a box of a (B, C, H, W) map, tokens of (B, N, D)).
        cutmix_minmax: timm's box-size range; not supported at a layer, must stay ``None``.
        prob: probability that a batch is mixed.
        switch_prob: with both alphas > 0, the probability that a batch uses cutmix.
        mode: timm's ``"batch"`` (one λ per batch), or ``"pair"`` / ``"elem"`` (one λ per row).
        label_smoothing: smoothing of the one-hot targets before mixing (timm's default 0.1).
        num_classes: number of classes of the soft targets.
        seed: seed of the mixer's generator (see :func:`hookmix.headonly.distributed.rank_seed` under DDP).
        **mixer_options: other :class:`~hookmix.HookMixer` arguments (``exclude_classes``, ``weights``, ...).

    ``mixup_enabled = False`` (what timm's loop sets at ``--mixup-off-epoch``) returns smoothed one-hot
    targets and arms nothing. With cutmix the λ each row really keeps is known only once the layer's
    map size is: the returned targets are updated in place when the training forward ends, so read
    them after ``model(x)`` — as timm's loop does.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        seed: int | None = None,
        **mixer_options: Any,
    ) -> None:
        if cutmix_minmax is not None:
            raise UsageError(
                f"cutmix_minmax={cutmix_minmax!r} is not supported at a layer; leave it None and set "
                "cutmix_alpha (the box area follows λ ~ Beta(cutmix_alpha, cutmix_alpha))."
            )
        if mode not in _LAM_MODES:
            raise UsageError(f"mode={mode!r} is not one of timm's modes {sorted(_LAM_MODES)}.")
        self._model = unwrap(model)
        self.mixer = HookMixer(
            self._model,
            layers,
            alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            switch_prob=switch_prob,
            prob=prob,
            lam_mode=_LAM_MODES[mode],
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            seed=seed,
            **mixer_options,
        )
        self.mixup_enabled = True
        self.step: MixStep | None = None
        self._pending: tuple[MixStep, torch.Tensor] | None = None
        self._handle = self._model.register_forward_hook(self._refresh)

    def __call__(self, x: Any, target: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Return ``(x, soft_targets)``: ``x`` unchanged, soft targets ``(B, num_classes)`` float32.

        Args:
            x: the input batch (any structure; it is not touched), e.g. ``(B, C, H, W)``.
            target: ``(B,)`` class indices (or ``(B, num_classes)`` labels) of the batch.
        """
        if isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor) and x.shape[0] != target.shape[0]:
            raise UsageError(
                f"x has {x.shape[0]} rows but target has {target.shape[0]}; pass the batch's input and targets."
            )
        if self.mixup_enabled:
            self.step = self.mixer.plan(target)
        else:
            with torch.no_grad():  # the mixer's documented gate: a step planned without grad mixes nothing
                self.step = self.mixer.plan(target)
        soft = self.step.targets
        # only cutmix changes λ inside the forward (to the area really pasted); mixup targets are final
        self._pending = (self.step, soft) if self.step.mixed and self.step.plan.method == "cutmix" else None
        return x, soft

    def _refresh(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After the training forward, write the targets of the λ the hook really applied (cutmix)."""
        if self._pending is None or self.mixer.armed:  # an eval forward: the plan still waits for its own
            return
        step, soft = self._pending
        self._pending = None
        soft.copy_(step.targets)

    def close(self) -> None:
        """Remove every hook (safe to call more than once)."""
        self._handle.remove()
        self.mixer.close()
        self._pending = None

    def __enter__(self) -> "HookMixup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HookMixup({self.mixer!r}, mixup_enabled={self.mixup_enabled})"
