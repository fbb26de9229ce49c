"""The train-mode gate: whether a forward of the model is a training step, the only kind hookmix mixes.

A forward trains when grad is enabled and the part of the model that trains — the modules that own a
parameter with ``requires_grad=True`` — is in train mode. The root's own flag is not enough: a frozen
timm ViT's root owns ``cls_token`` and ``pos_embed``, and the linear-probe idiom is ``model.eval();
model.fc.train()``. Forwards in ``eval()``, under ``torch.no_grad()`` or ``torch.inference_mode()`` never
mix. When the trainable modules disagree (some train, some are in eval) the gate mixes and warns once
(:class:`GateWarning`) with the fix.

The trainable set is worked out when a step is planned (:meth:`TrainGate.decide`), not by walking the
modules inside the forward: :meth:`TrainGate.trains`, called by the mixer's hooks, reads a few flags, so
the gate costs microseconds per step and adds no graph break under ``torch.compile``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from hookmix.core.errors import HookmixWarning

__all__ = ["GateWarning", "TrainGate"]


class GateWarning(HookmixWarning):
    """The modes of the model's trainable modules disagree, so whether a forward trains is a judgement."""


class TrainGate:
    """Decides for one model whether a forward trains; :class:`~hookmix.HookMixer` mixes only those.

    Like the mixer's hooks, it follows the modules (and their parameters) the model had when the gate
    was built.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._owners = [(m, params) for m in model.modules() if (params := tuple(m.parameters(recurse=False)))]
        self._flags: list[bool] | None = None
        self._trainable_owners: list[nn.Module] = []
        self._trainable: list[nn.Module] = []
        self._warned = False

    def _find_trainable(self) -> list[nn.Module]:
        """The modules that own a parameter with ``requires_grad=True``.

        Worked out again only when some parameter's ``requires_grad`` changed (progressive unfreezing):
        reading the flags of the parameters known at construction costs microseconds, walking the
        module tree a millisecond per step.
        """
        flags = [p.requires_grad for _, params in self._owners for p in params]
        if flags != self._flags:
            self._flags = flags
            self._trainable_owners = [m for m, params in self._owners if any(p.requires_grad for p in params)]
        return self._trainable_owners

    def trains(self) -> bool:
        """Whether a forward now is a training forward: grad enabled, and the trainable part (as found by
        the last :meth:`decide`) in train mode — any of it; the root's flag when nothing is trainable."""
        if not torch.is_grad_enabled():
            return False
        if not self._trainable:
            return self._model.training
        return any(m.training for m in self._trainable)

    def decide(self) -> bool:
        """:meth:`trains` for the step being planned, after finding the trainable part afresh; warns once
        (:class:`GateWarning`, pointing at the caller of the mixer's ``plan``) when its modes disagree."""
        self._trainable = self._find_trainable() if torch.is_grad_enabled() else []
        modes = {m.training for m in self._trainable}
        if len(modes) > 1 and not self._warned:
            self._warned = True
            warnings.warn(self._mixed_modes_message(), GateWarning, stacklevel=3)
        return self.trains()

    def _mixed_modes_message(self) -> str:
        """What :meth:`decide` warns: up to three trainable modules in each mode, and the two fixes."""
        names = {module: name for name, module in self._model.named_modules()}
        listed = {
            mode: [names[m] or "(root)" for m in self._trainable if m.training == mode][:3] for mode in (True, False)
        }
        return (
            f"of the modules that own trainable parameters, {listed[True]} are in train mode and "
            f"{listed[False]} in eval mode; hookmix mixes because some of them train. If these forwards are "
            "not training steps, run them under torch.no_grad() or put the model in eval(); if they are (e.g. "
            "BatchNorm kept in eval on purpose), this is right. Shown once per mixer."
        )
