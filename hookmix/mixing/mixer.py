"""HookMixer: mixup at any named layer of an unmodified ``nn.Module`` through forward hooks.

Each training step draws one :class:`hookmix.mixing.plan.MixPlan` (``mixer.plan(y)``) that *arms* the hooks
for exactly one forward of the model. A root-level pre-hook takes the armed plan when a *training*
forward starts (:mod:`hookmix.mixing.gate` decides which forwards train), the layer hooks mix their outputs with
it, and a root-level post-hook (always called, exceptions included) retires it. Everything else passes
through untouched: forwards of a model in ``eval()``, under ``torch.no_grad()`` /
``torch.inference_mode()``, and forwards that were not armed.

The mixer owns that arm / take / retire cycle and nothing else: the gate, the replay of a mixed forward
that gradient checkpointing recomputes inside backward (:mod:`hookmix.mixing.replay`), the CutMix layout of each
layer (:class:`~hookmix.graph.layouts.LayerLayouts`), the draw of the plans (:class:`hookmix.mixing.plan.PlanSampler`)
and the targets' checks (:mod:`hookmix.mixing.targets`) each live in their own module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hookmix.core.checks import check_int, is_int
from hookmix.core.devices import module_device
from hookmix.core.errors import UsageError
from hookmix.core.tree import tensor_leaves
from hookmix.core.wrappers import refuse_replicas, unwrap
from hookmix.graph.equivalence import warn_same_mix_points
from hookmix.graph.layers import INPUT, OUTPUT, check_resolved_mix_points, resolve_layers
from hookmix.graph.layouts import LayerLayouts
from hookmix.mixing.blend import Cut, mix_structure
from hookmix.mixing.gate import TrainGate
from hookmix.mixing.plan import MixPlan, PlanSampler, identity_plan
from hookmix.mixing.replay import BackwardReplays
from hookmix.mixing.settings import MixSettings
from hookmix.mixing.targets import MixStep, TargetRules

__all__ = ["HookMixer"]

_MIX_KEYWORDS = tuple(f.name for f in dataclasses.fields(MixSettings))
"""The keyword arguments of :class:`HookMixer` that build its :class:`hookmix.MixSettings`."""


def _describe(obj: Any) -> str:
    leaves = tensor_leaves(obj)
    if not leaves:
        return f"a {type(obj).__name__} holding no tensor"
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in leaves[:4])
    return f"{type(obj).__name__} with tensors {shapes}{' ...' if len(leaves) > 4 else ''}"


def _settings_of(settings: MixSettings | None, keywords: dict[str, Any]) -> MixSettings:
    """``settings``, or the :class:`MixSettings` the keyword arguments build; refuses both at once."""
    unknown = sorted(set(keywords) - set(_MIX_KEYWORDS))
    if unknown:
        raise TypeError(
            f"HookMixer got unexpected keyword argument(s) {unknown}; its mixing keywords are {_MIX_KEYWORDS}."
        )
    if settings is None:
        return MixSettings(**keywords)
    if not isinstance(settings, MixSettings):
        raise TypeError(f"settings must be a hookmix.MixSettings, got {type(settings).__name__}.")
    if keywords:
        raise UsageError(
            f"HookMixer got settings= and the mixing keywords {sorted(keywords)}; give one of them, e.g. "
            f"settings=dataclasses.replace(settings, {sorted(keywords)[0]}=...)."
        )
    return settings


def _unused_layers(plan: MixPlan, applied: set[str]) -> str | None:
    """What went wrong when the forward that took ``plan`` never called a layer it mixes (``None``: nothing)."""
    missing = [name for name in plan.layers if name not in applied]
    if not missing:
        return None
    return (
        f"the plan of step {plan.step} mixes {missing} but the model's forward never called "
        f"{'that layer' if len(missing) == 1 else 'those layers'}; choose layers the forward uses "
        "(list_layers marks unused ones '(not called)')."
    )


def _batch_size_of(targets: torch.Tensor | None, batch_size: int | None) -> int:
    """The step's batch size: the targets' rows, or ``batch_size`` when no targets are given."""
    if targets is None:
        if not is_int(batch_size, 1):
            raise UsageError(f"batch_size={batch_size!r}: give the targets, or batch_size=B (an int >= 1).")
        return batch_size
    if batch_size is not None and batch_size != targets.shape[0]:
        raise UsageError(f"batch_size={batch_size} but targets have {targets.shape[0]} rows; give one of them.")
    return targets.shape[0]


def _no_layout(t: torch.Tensor) -> None:
    """The layout of every leaf while cutmix is off: none is needed, mixup interpolates."""
    return None


class HookMixer:
    """Mix the activations of named layers, and the targets, with one plan per training step.

    Args:
        model: the ``nn.Module`` whose forward you call; it is not modified, only hooked. DDP,
            ``DataParallel`` and ``torch.compile`` wrappers are looked through: the module they run is hooked.
        layers: where to mix — a module name (``"layer4"``, ``"blocks.11"``), a glob (``"layer*"``,
            ``"blocks.*"``), ``"input"`` (input mixup), ``"output"`` (logit mixup) or a list of those.
            A list is manifold mixup: one layer drawn per step (``weights`` to bias the draw), or every
            listed layer with the same plan in one forward when ``mode="all"``.
        settings: how to mix, a :class:`hookmix.MixSettings` (default: ``MixSettings()``, mixup
            with alpha 0.4 at every step). With ``cutmix_alpha > 0`` a box of the partner's (B, C, H, W) map,
            or a random subset of its (B, N, D) tokens (the first ``prefix_tokens`` never swapped), replaces
            the row's own, and λ is corrected to the area really kept.
        **mixing: the fields of ``MixSettings`` as keywords instead (``alpha=0.4, cutmix_alpha=1.0, prob=...,
            lam_mode=..., mode=..., weights=..., stop_epoch=..., label_smoothing=..., exclude_classes=...``);
            a convenience that builds the settings. Give ``settings`` or these, not both.
        prefix_tokens: class / register tokens at the start of token sequences (default: the model's
            ``num_prefix_tokens`` as in timm ViTs, else 0).
        num_classes: number of classes; needed for soft targets from class indices, label smoothing and
            checks on the targets' range.
        targets: target kind — ``"auto"`` (inferred from dtype and shape), ``"index"``, ``"label"`` or
            ``"regression"``; see :mod:`hookmix.mixing.targets`.
        batch_dim: the batch dimension of the hooked outputs (1 for sequence-first modules).
        layout: for cutmix, where the channels of a layer's output are — ``"NCHW"``, ``"NHWC"``,
            ``"NCL"`` or ``"NLC"`` (tokens) — for every layer, or ``{layer: layout}``. By default it is
            taken from the model (:mod:`hookmix.graph.layouts`); cutmix refuses a layer whose layout is unknown.
        strict: refuse layers that are not cut points — layers a skip connection bypasses, where mixing
            spoils manifold mixup (default: one ``CutPointWarning`` each, see :mod:`hookmix.graph.cutpoints`).
        validate: check the targets at every ``plan()`` (one host synchronisation per step).
        seed: seed of the mixer's private ``torch.Generator``.

    Use it as a context manager (or call :meth:`close`) so the hooks are always removed::

        with HookMixer(model, "layer4", settings=MixSettings(alpha=0.4), seed=0) as mixer:
            for x, y in loader:
                step = mixer.plan(y)                   # arms the next forward
                loss = step.loss(criterion, model(x))  # layer4's output was mixed
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        settings: MixSettings | None = None,
        prefix_tokens: int | None = None,
        num_classes: int | None = None,
        targets: str = "auto",
        batch_dim: int = 0,
        layout: str | Mapping[str, str] | None = None,
        strict: bool = False,
        validate: bool = True,
        seed: int | None = None,
        **mixing: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        refuse_replicas(model)
        model = unwrap(model)
        settings = _settings_of(settings, mixing)
        self._targets = TargetRules.build(settings, num_classes, targets, validate)
        check_int("batch_dim", batch_dim, 0, " (0 for batch-first, 1 for sequence-first)")
        if prefix_tokens is None:
            prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.prefix_tokens = check_int("prefix_tokens", prefix_tokens, 0, " (class/register tokens)")
        resolved = resolve_layers(model, layers)
        check_resolved_mix_points(model, resolved, strict, mode=settings.mode, stacklevel=3)
        if settings.alpha > 0 and len(resolved) > 1:
            warn_same_mix_points(model, resolved, stacklevel=2)
        self._model = model
        self._sampler = PlanSampler(resolved, settings, seed=seed)
        self.batch_dim = batch_dim
        self._layouts = LayerLayouts(model, resolved, layout, cutmix=settings.cutmix_alpha > 0, batch_dim=batch_dim)
        self._gate = TrainGate(model)
        self._replays = BackwardReplays()
        self._armed: MixPlan | None = None
        self._active: MixPlan | None = None
        self._applied: set[str] = set()
        self._cut: Cut | None = None
        self._problem: str | None = None
        self._handles: list[RemovableHandle] = []
        self._register()

    # ----------------------------------------------------------------------------------- hooks
    def _register(self) -> None:
        modules = dict(self._model.named_modules())
        self._handles.append(self._model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._handles.append(self._model.register_forward_hook(self._on_model_end, always_call=True))
        for name in self.layers:
            if name not in (INPUT, OUTPUT):
                self._handles.append(modules[name].register_forward_hook(self._layer_hook(name)))

    def _blend(self, name: str, obj: Any, plan: MixPlan, cut: Cut | None) -> tuple[Any, Cut | None]:
        """``obj``, layer ``name``'s output, mixed with ``plan`` (pasting ``cut`` when given), and the cut made."""
        mixed, count, cut = mix_structure(
            obj,
            plan,
            batch_dim=self.batch_dim,
            prefix_tokens=self.prefix_tokens,
            layout=functools.partial(self._layouts.of, name) if self.settings.cutmix_alpha else _no_layout,
            cut=cut,
        )
        if count == 0:
            raise UsageError(
                f"layer {name!r} produced {_describe(obj)}: no floating tensor has the plan's batch size "
                f"{plan.batch_size} on batch_dim={self.batch_dim}. The plan's batch size comes from the "
                "targets given to plan(); pass this batch's targets, set batch_dim for sequence-first "
                "layers, or choose a layer whose output holds a floating (B, ...) tensor."
            )
        return mixed, cut

    def _mix(self, name: str, obj: Any, plan: MixPlan) -> Any:
        """Mix ``obj``, layer ``name``'s output in the training forward, with ``plan``; the first cut made
        is shared by the later layers, and the targets follow the area it really pasted."""
        self._applied.add(name)
        if not plan.mixed:
            return obj
        mixed, cut = self._blend(name, obj, plan, self._cut)
        if cut is not None and self._cut is None:
            plan.lam.copy_(cut.kept)
            self._cut = cut
        return mixed

    def _replay(self, name: str, output: Any) -> Any:
        """Mix ``output`` again if layer ``name`` is being recomputed inside a backward (checkpointing)."""
        found = self._replays.find(name)
        return None if found is None else self._blend(name, output, *found)[0]

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self._armed
        if plan is None or not self._gate.trains():
            return self._replay(INPUT, (args, kwargs)) if plan is None else None
        self._armed, self._active, self._applied, self._cut = None, plan, set(), None
        if INPUT in plan.layers:
            return self._mix(INPUT, (args, kwargs), plan)
        return None

    def _on_model_end(self, module: nn.Module, args: tuple, output: Any) -> Any:
        plan = self._active
        if plan is None:
            result = None if output is None else self._replay(OUTPUT, output)
        else:
            self._active = None
            if output is None:  # the forward raised (this hook is always called): nothing to check
                return None
            result = self._mix(OUTPUT, output, plan) if OUTPUT in plan.layers else None
            self._problem = _unused_layers(plan, self._applied)
        if output is not None:
            self._replays.attach(output if result is None else result, (plan, None if plan is None else self._cut))
        return result

    def _layer_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            plan = self._active
            if plan is None:
                return self._replay(name, output)
            if name not in plan.layers or name in self._applied:
                return None
            return self._mix(name, output, plan)

        return hook

    # ------------------------------------------------------------------------------ public API
    @property
    def layers(self) -> tuple[str, ...]:
        """The resolved layer names this mixer can mix."""
        return self._sampler.layers

    @property
    def settings(self) -> MixSettings:
        """How this mixer mixes now (with the :attr:`alpha` set since, if any)."""
        return self._sampler.settings

    @property
    def alpha(self) -> float:
        """λ ~ Beta(alpha, alpha); may be changed between steps (e.g. per epoch)."""
        return self._sampler.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._sampler.alpha = value

    @property
    def epoch(self) -> int:
        """The epoch last given to :meth:`set_epoch` (for ``stop_epoch``)."""
        return self._sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Tell the mixer the current epoch; with ``stop_epoch=E`` no step mixes from epoch E on."""
        self._sampler.set_epoch(epoch)

    @property
    def steps(self) -> int:
        """Plans drawn so far (training steps)."""
        return self._sampler.steps

    @property
    def mixed_steps(self) -> int:
        """Plans drawn so far that mixed."""
        return self._sampler.mixed_steps

    @property
    def armed(self) -> bool:
        """Whether a plan waits for its training forward (drawn by :meth:`plan`, not yet taken)."""
        return self._armed is not None

    @property
    def closed(self) -> bool:
        return not self._handles

    def _check_previous(self) -> None:
        armed, problem = self._armed, self._problem
        self._armed = self._problem = None
        if armed is not None:
            raise UsageError(
                f"the plan of step {armed.step} was never used: no training forward of the "
                f"{type(self._model).__name__} given to HookMixer ran since the last plan(). Call the model "
                "exactly once after each mixer.plan(y), in train mode with grad enabled; a forward of "
                "another module (a wrapper, a submodule) does not count."
            )
        if problem is not None:
            raise UsageError(problem)

    def plan(
        self,
        targets: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> MixStep:
        """Draw this step's plan and arm the hooks for the next forward of the model.

        Args:
            targets: this batch's targets (their first dim is the batch size); ``None`` to mix only
                the activations (then give ``batch_size``).
            batch_size: the batch size when no targets are given.
            device: where the plan's λ and partners live (default: the targets' device, else the
                model's (:func:`~hookmix.core.devices.module_device`)).

        When the next forward would not train — grad disabled, or the trainable part of the model in
        eval mode (:mod:`hookmix.mixing.gate`) — the step mixes nothing and nothing is armed (so validation
        loops may call it too). Raises ``UsageError`` if the previous plan was never used by a forward or
        never reached its layer.
        """
        if self.closed:
            raise UsageError("this HookMixer is closed (its hooks were removed); create a new one.")
        self._check_previous()
        kind, index_max = self._targets.read(targets)
        batch_size = _batch_size_of(targets, batch_size)
        if device is None:
            device = targets.device if targets is not None else module_device(self._model)
        if not self._gate.decide():
            plan = identity_plan(batch_size, self._sampler.steps, device)
            return self._targets.step(plan, targets, kind, index_max)
        self._targets.check_excludable(targets, kind)
        plan = self._targets.keep_excluded(self._sampler.draw(batch_size).to(device), targets, kind)
        self._armed = plan
        return self._targets.step(plan, targets, kind, index_max)

    def discard(self) -> None:
        """Drop the armed plan without a forward (a skipped batch); the next :meth:`plan` then draws afresh.

        The discarded plan still counts in :attr:`steps`, so a resumed run stays in step with this one.
        """
        self._armed = self._problem = None

    def state_dict(self) -> dict[str, Any]:
        """The mixer's generator state, counters and settings (save it with your checkpoint)."""
        return self._sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` so a resumed run draws the same plans as an uninterrupted one."""
        self._sampler.load_state_dict(state)

    def close(self) -> None:
        """Remove every hook this mixer registered (safe to call more than once)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._armed = self._active = None
        self._replays.clear()

    def __enter__(self) -> "HookMixer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HookMixer(layers={list(self.layers)}, alpha={self.alpha}, mode={self.settings.mode!r}, "
            f"steps={self.steps}, closed={self.closed})"
        )
