"""A Lightning 2.x callback that mixes a layer of the LightningModule in every training step.

It arms one plan per training batch in ``on_train_batch_start`` (from the batch's targets), so the
forward in ``training_step`` mixes the layer; ``training_step`` turns its output into the mixed loss
with the exposed step::

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)
            self.mix = HookMixCallback("layer3", module="net", alpha=0.4, num_classes=10, seed=0)

        def configure_callbacks(self):
            return [self.mix]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.mix.step.loss(F.cross_entropy, self.net(x))

Validation, test and predict never mix: they run in eval mode without grad, where the mixer's hooks
pass everything through, and only ``fit`` creates a mixer at all. The mixer's generator state is saved
in every checkpoint (``state_dict``), so ``trainer.fit(..., ckpt_path=...)`` resumes the same plans.
Under DDP each rank seeds its mixer with :func:`hookmix.headonly.distributed.rank_seed`. A fit stopped by an
exception (Ctrl-C, an error in a batch) removes the mixer's hooks in ``on_exception``, so its armed plan
never reaches a later forward, and the next ``trainer.fit`` continues the plans where it stopped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch

from hookmix.core.errors import UsageError
from hookmix.headonly.distributed import rank_seed
from hookmix.mixing.mixer import HookMixer
from hookmix.mixing.targets import MixStep

__all__ = ["HookMixCallback"]


def _second_item(batch: Any) -> torch.Tensor:
    """The targets of an ``(x, y)`` batch."""
    return batch[1]


class HookMixCallback(pl.Callback):
    """Arm a :class:`~hookmix.HookMixer` plan for each training batch; expose it as :attr:`step`.

    Args:
        layers: where to mix, named relative to ``module`` (``"layer3"``, ``"blocks.6"``, a list).
        module: dotted attribute path of the submodule that ``training_step`` calls (e.g. ``"net"``);
            ``None`` (default) hooks the LightningModule itself, for a ``training_step`` that calls
            ``self(x)``. Exactly one forward of that module must run per training batch.
        targets: picks the targets out of a batch (default ``batch[1]``, for ``(x, y)`` batches).
        seed: base seed; rank r seeds its mixer with ``rank_seed(seed, rank=r, shared=shared_seed)``.
            ``None`` draws a seed from the OS (then a resumed run still continues the saved stream).
        shared_seed: give every rank the same plans instead of one stream per rank.
        **mixer_options: other :class:`~hookmix.HookMixer` arguments (``alpha``, ``num_classes``,
            ``label_smoothing``, ``lam_mode``, ``stop_epoch``, ...).
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        module: str | None = None,
        targets: Callable[[Any], torch.Tensor] = _second_item,
        seed: int | None = None,
        shared_seed: bool = False,
        **mixer_options: Any,
    ) -> None:
        if not callable(targets):
            raise TypeError(f"targets must be a function batch -> targets, got {type(targets).__name__}.")
        self.layers = layers
        self.module = module
        self.targets = targets
        self.seed = seed
        self.shared_seed = shared_seed
        self.mixer_options = mixer_options
        self.mixer: HookMixer | None = None
        self._step: MixStep | None = None
        self._saved: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, module=self.module)

    @property
    def step(self) -> MixStep:
        """The current training batch's :class:`~hookmix.MixStep` (``step.loss(criterion, out)``, ``step.targets``)."""
        if self._step is None:
            raise UsageError(
                "no training step was planned: HookMixCallback.step exists only inside training_step "
                "of trainer.fit (use the plain loss in validation_step / test_step)."
            )
        return self._step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._close()
        target = pl_module if self.module is None else pl_module.get_submodule(self.module)
        seed = None if self.seed is None else rank_seed(self.seed, rank=trainer.global_rank, shared=self.shared_seed)
        self.mixer = HookMixer(target, self.layers, seed=seed, **self.mixer_options)
        if self._saved is not None:
            self.mixer.load_state_dict(self._saved)
            self._saved = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_mixer().set_epoch(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = self._require_mixer().plan(self.targets(batch))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # another callback's on_train_batch_start may have returned -1 (skip the rest of the epoch)
        # after this one armed a plan: drop it so the next epoch starts clean.
        self._require_mixer().discard()
        self._step = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit stopped by an exception: remove the hooks and the armed plan (Lightning skips teardown)."""
        self._close()

    def _close(self) -> None:
        if self.mixer is not None:
            self._saved = self.mixer.state_dict()  # a later fit() continues the stream
            self.mixer.close()
        self.mixer = self._step = None

    def state_dict(self) -> dict[str, Any]:
        """The mixer's generator state and counters (Lightning stores it in each checkpoint)."""
        if self.mixer is not None:
            return self.mixer.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint, before or after ``setup``."""
        if not state_dict:
            return
        if self.mixer is not None:
            self.mixer.load_state_dict(state_dict)
        else:
            self._saved = dict(state_dict)

    def _require_mixer(self) -> HookMixer:
        if self.mixer is None:
            raise UsageError("HookMixCallback has no mixer: it is created in setup(stage='fit'); use trainer.fit.")
        return self.mixer
