"""A fastai 2.x callback: fastai's ``MixUp`` moved from the input to a named layer of the model.

``Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=HookMixUp("layer3", alpha=0.4))``: before each
training batch the callback arms a :class:`~hookmix.HookMixer` plan from the batch's targets, so the
model call mixes the layer. As in fastai's ``MixUp``, the loss function is wrapped during training:
class-index targets get the loss mixed, ``λ·L(out, y) + (1−λ)·L(out, y[perm])`` per row, and one-hot /
multi-label / regression targets are replaced by their mix ``λ·y + (1−λ)·y[perm]`` (``learn.yb``) before
the unchanged loss sees them. Validation runs unmixed, with the original loss function.

As in fastai's ``MixUp``, λ is drawn per row and each row's own sample dominates (``max(λ, 1−λ)``), so
swapping ``MixUp`` for ``HookMixUp`` changes only where the mixing happens. A fit stopped by an exception
(Ctrl-C, an error inside a batch) skips fastai's ``after_fit``; the callback then mends itself at the
learner's next ``before_fit`` — which ``fit``, ``validate`` and ``get_preds`` all send — by restoring the
user's loss function and removing the interrupted fit's hooks and armed plan, and its loss wrapper falls
back to the user's loss whenever no training step is planned.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from fastai.callback.core import Callback

from hookmix.headonly.distributed import rank_seed
from hookmix.mixing.mixer import HookMixer
from hookmix.mixing.targets import MixStep

__all__ = ["HookMixUp"]


class HookMixUp(Callback):
    """Mix ``layer`` of ``learn.model`` (and the targets, with the same λ and partners) in training.

    Args:
        layer: where to mix, as for :class:`~hookmix.HookMixer` (``"layer3"``, ``"1.2"``, ``"input"``, a list).
        alpha: λ ~ Beta(alpha, alpha) (fastai's ``MixUp`` default 0.4).
        lam_mode: ``"sample"`` (one λ per row, fastai's ``MixUp``) or ``"batch"``.
        dominant: draw ``max(λ, 1−λ)`` so each row's own sample dominates (fastai's ``MixUp``).
        seed: seed of the mixer's generator; under ``torch.distributed`` rank r uses ``seed + r``
            (:func:`hookmix.headonly.distributed.rank_seed`). ``None`` draws one from the OS.
        **mixer_options: other :class:`~hookmix.HookMixer` arguments (``num_classes``, ``stop_epoch``, ...).

    The mixer exists from ``before_fit`` to ``after_fit`` (hooks removed in between fits); its generator
    state carries over from one ``fit`` to the next, so successive fits continue one stream of plans.
    """

    run_valid = False

    def __init__(
        self,
        layer: str | Sequence[str],
        alpha: float = 0.4,
        *,
        lam_mode: str = "sample",
        dominant: bool = True,
        seed: int | None = None,
        **mixer_options: Any,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.alpha = alpha
        self.seed = seed
        self.mixer_options = {"lam_mode": lam_mode, "dominant": dominant, **mixer_options}
        self.mixer: HookMixer | None = None
        self.mix_step: MixStep | None = None
        self._saved: dict[str, Any] | None = None
        self._old_lf: Any = None

    def before_fit(self) -> None:
        self._restore_loss()  # left wrapped by a fit that an exception stopped before after_fit
        self._close()
        seed = None if self.seed is None else rank_seed(self.seed)
        self.mixer = HookMixer(self.learn.model, self.layer, alpha=self.alpha, seed=seed, **self.mixer_options)
        if self._saved is not None:
            self.mixer.load_state_dict(self._saved)

    def before_train(self) -> None:
        self.mixer.set_epoch(self.epoch)
        if not self._wraps_loss():
            self._old_lf, self.learn.loss_func = self.learn.loss_func, self.lf

    def before_batch(self) -> None:
        self.mix_step = self.mixer.plan(self.y)
        if self.mix_step.kind != "index":
            self.learn.yb = (self.mix_step.targets,)

    def after_cancel_batch(self) -> None:
        """A ``CancelBatchException`` (another callback skipping the batch) leaves the plan unused: drop it."""
        self.mixer.discard()

    def lf(self, pred: torch.Tensor, *yb: torch.Tensor) -> torch.Tensor:
        """The training loss: the wrapped loss function under this batch's mixing (the plain wrapped loss
        outside a planned training step)."""
        if self.mix_step is None or not self.training:
            return self._old_lf(pred, *yb)
        return self.mix_step.loss(self._old_lf, pred)

    def _wraps_loss(self) -> bool:
        return getattr(self.learn.loss_func, "__func__", None) is HookMixUp.lf and self.learn.loss_func.__self__ is self

    def _restore_loss(self) -> None:
        if self._wraps_loss():
            self.learn.loss_func = self._old_lf
        self._old_lf = None

    def after_train(self) -> None:
        self._restore_loss()

    def after_fit(self) -> None:
        self._restore_loss()  # a CancelFitException inside the training phase skips after_train
        self._close()

    def _close(self) -> None:
        if self.mixer is not None:
            self._saved = self.mixer.state_dict()
            self.mixer.close()
            self.mixer = self.mix_step = None
