"""HookMixer: mixup at any named layer of an unmodified ``nn.Module`` through forward hooks.

Each training step draws one :class:`~hookmix.plan.MixPlan` (``mixer.plan(y)``) that *arms* the hooks
for exactly one forward of the model. A root-level pre-hook takes the armed plan when a *training*
forward starts, the layer hooks mix their outputs with it, and a root-level post-hook (always called,
exceptions included) retires it. Everything else passes through untouched: forwards of a model in
``eval()``, under ``torch.no_grad()`` / ``torch.inference_mode()``, and forwards that were not armed.

A forward trains when grad is enabled and the part of the model that trains — the modules that own a
parameter with ``requires_grad=True`` — is in train mode. The root's own flag is not enough: a frozen
timm ViT's root owns ``cls_token`` and ``pos_embed``, and the linear-probe idiom is ``model.eval();
model.fc.train()``. The trainable set is found when the plan is drawn, not inside the forward.

A plan lives until its backward is done: gradient checkpointing re-runs the mixed layer inside backward.
The post-hook leaves a pre-hook on the output's autograd node that, when backward reaches it, hands the
plan (and the cutmix box the forward pasted) to that backward; a layer that runs again while it lasts
is mixed again the same way, so the recomputed activations equal the original ones.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hookmix._checks import check_int, is_int
from hookmix._errors import UsageError
from hookmix._tree import tensor_leaves
from hookmix._wrappers import refuse_replicas, unwrap
from hookmix.blend import Cut, mix_structure
from hookmix.equivalence import warn_same_mix_points
from hookmix.layers import INPUT, OUTPUT, check_resolved_mix_points, resolve_layers
from hookmix.layouts import LAYOUTS, channel_axes, check_layout, layout_of
from hookmix.plan import MixPlan, PlanSampler, identity_plan
from hookmix.settings import MixSettings
from hookmix.targets import (
    KINDS,
    MixStep,
    check_classes,
    excluded_rows,
    infer_kind,
    validate_targets,
)

__all__ = ["GateWarning", "HookMixer"]


def _describe(obj: Any) -> str:
    leaves = tensor_leaves(obj)
    if not leaves:
        return f"a {type(obj).__name__} holding no tensor"
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in leaves[:4])
    return f"{type(obj).__name__} with tensors {shapes}{' ...' if len(leaves) > 4 else ''}"


class GateWarning(UserWarning):
    """The modes of the model's trainable modules disagree, so whether a forward trains is a judgement."""


_Replay = tuple[MixPlan | None, Cut | None]
"""What a backward needs to recompute a forward: its plan (``None``: not mixed) and the cut it pasted."""


def _replay_on_backward(mixer_ref: weakref.ref, replay: _Replay, grad_outputs: Any) -> None:
    """Autograd pre-hook on a forward's output node: the backward now running recomputes that forward."""
    mixer = mixer_ref()
    if mixer is not None:
        mixer._backward_reached(replay)


class HookMixer:
    """Mix the activations of named layers, and the targets, with one plan per training step.

    Args:
        model: the ``nn.Module`` whose forward you call; it is not modified, only hooked. DDP,
            ``DataParallel`` and ``torch.compile`` wrappers are looked through: the module they run is hooked.
        layers: where to mix — a module name (``"layer4"``, ``"blocks.11"``), a glob (``"layer*"``,
            ``"blocks.*"``), ``"input"`` (input mixup), ``"output"`` (logit mixup) or a list of those.
            A list is manifold mixup: one layer drawn per step (``weights`` to bias the draw), or every
            listed layer with the same plan in one forward when ``mode="all"``.
        alpha: mixup λ ~ Beta(alpha, alpha); 0.4 keeps one sample dominant most of the time; 0 turns
            mixup off (cutmix only).
        cutmix_alpha: > 0 turns on CutMix at the layer: a box of the partner's (B, C, H, W) map, or a random
            subset of its (B, N, D) tokens (the first ``prefix_tokens`` never swapped), replaces the row's
            own; λ is corrected to the area really kept.
        switch_prob: with both methods on, the probability that a step uses cutmix (as timm's ``Mixup``).
        prefix_tokens: class / register tokens at the start of token sequences (default: the model's
            ``num_prefix_tokens`` as in timm ViTs, else 0).
        stop_step / stop_epoch: plain training from this step / epoch on (see :meth:`set_epoch`).
        mode: ``"one"`` or ``"all"`` (see ``layers``).
        weights: relative probability of each resolved layer for ``mode="one"``.
        prob: probability that a step mixes at all.
        lam_mode: ``"batch"`` (one λ per batch) or ``"sample"`` (one λ per row).
        dominant: use ``max(λ, 1-λ)`` so each row's own sample dominates (fastai's choice).
        num_classes: number of classes; needed for soft targets from class indices, label smoothing and
            checks on the targets' range.
        targets: target kind — ``"auto"`` (inferred from dtype and shape), ``"index"``, ``"label"`` or
            ``"regression"``; see :mod:`hookmix.targets`.
        label_smoothing: smoothing of class targets, applied before mixing.
        exclude_classes: rows whose class (or whose partner's class) is listed are not mixed (λ = 1).
        batch_dim: the batch dimension of the hooked outputs (1 for sequence-first modules).
        layout: for cutmix, where the channels of a layer's output are — ``"NCHW"``, ``"NHWC"``,
            ``"NCL"`` or ``"NLC"`` (tokens) — for every layer, or ``{layer: layout}``. By default it is
            taken from the model (:mod:`hookmix.layouts`); cutmix refuses a layer whose layout is unknown.
        strict: refuse layers that are not cut points — layers a skip connection bypasses, where mixing
            spoils manifold mixup (default: one ``CutPointWarning`` each, see :mod:`hookmix.cutpoints`).
        validate: check the targets at every ``plan()`` (one host synchronisation per step).
        seed: seed of the mixer's private ``torch.Generator``.

    Use it as a context manager (or call :meth:`close`) so the hooks are always removed::

        with HookMixer(model, "layer4", alpha=0.4, seed=0) as mixer:
            for x, y in loader:
                step = mixer.plan(y)                   # arms the next forward
                loss = step.loss(criterion, model(x))  # layer4's output was mixed
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        alpha: float = 0.4,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        prefix_tokens: int | None = None,
        mode: str = "one",
        weights: Sequence[float] | None = None,
        prob: float = 1.0,
        lam_mode: str = "batch",
        dominant: bool = False,
        num_classes: int | None = None,
        targets: str = "auto",
        label_smoothing: float = 0.0,
        exclude_classes: Sequence[int] | None = None,
        batch_dim: int = 0,
        layout: str | Mapping[str, str] | None = None,
        stop_step: int | None = None,
        stop_epoch: int | None = None,
        strict: bool = False,
        validate: bool = True,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        refuse_replicas(model)
        model = unwrap(model)
        settings = MixSettings(
            alpha=alpha,
            cutmix_alpha=cutmix_alpha,
            switch_prob=switch_prob,
            lam_mode=lam_mode,
            prob=prob,
            dominant=dominant,
            mode=mode,
            weights=weights,
            stop_step=stop_step,
            stop_epoch=stop_epoch,
            label_smoothing=label_smoothing,
            exclude_classes=exclude_classes,
        )
        if num_classes is not None:
            check_int("num_classes", num_classes, 2, " (or None)")
        if targets not in KINDS:
            raise UsageError(f"targets={targets!r} is not one of {KINDS}.")
        if settings.label_smoothing and num_classes is None:
            raise UsageError("label_smoothing needs num_classes=C to know the uniform share s / C.")
        check_int("batch_dim", batch_dim, 0, " (0 for batch-first, 1 for sequence-first)")
        if prefix_tokens is None:
            prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.prefix_tokens = check_int("prefix_tokens", prefix_tokens, 0, " (class/register tokens)")
        resolved = resolve_layers(model, layers)
        check_resolved_mix_points(model, resolved, strict, mode=mode, stacklevel=3)
        if settings.alpha > 0 and len(resolved) > 1:
            warn_same_mix_points(model, resolved, stacklevel=2)
        self._model = model
        self._sampler = PlanSampler(resolved, settings, seed=seed)
        self.num_classes = num_classes
        self.target_kind = targets
        self._excluded = check_classes(settings.exclude_classes, num_classes)
        self.batch_dim = batch_dim
        self.validate = bool(validate)
        self._layouts = check_layout(layout, resolved)
        self._axes = channel_axes(model, [n for n in resolved if n not in self._layouts]) if cutmix_alpha else {}
        self._armed: MixPlan | None = None
        self._active: MixPlan | None = None
        self._applied: set[str] = set()
        self._cut: Cut | None = None
        self._owners = [(m, params) for m in model.modules() if (params := tuple(m.parameters(recurse=False)))]
        self._flags: list[bool] | None = None
        self._trainable_owners: list[nn.Module] = []
        self._trainable: list[nn.Module] = []
        self._gate_warned = False
        self._backward: dict[int, list[_Replay]] = {}
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

    def _find_trainable(self) -> list[nn.Module]:
        """The modules that own a parameter with ``requires_grad=True``.

        Worked out again only when some parameter's ``requires_grad`` changed (progressive unfreezing):
        reading the flags of the parameters known at construction costs microseconds, walking the
        module tree a millisecond per step. Like the hooks, this follows the modules the model had then.
        """
        flags = [p.requires_grad for _, params in self._owners for p in params]
        if flags != self._flags:
            self._flags = flags
            self._trainable_owners = [m for m, params in self._owners if any(p.requires_grad for p in params)]
        return self._trainable_owners

    def _trains(self) -> bool:
        """Whether a forward now is a training forward: grad enabled, and the trainable part (as found at
        the last ``plan()``) in train mode — any of it; the root's flag when nothing is trainable."""
        if not torch.is_grad_enabled():
            return False
        if not self._trainable:
            return self._model.training
        return any(m.training for m in self._trainable)

    def _gate(self) -> bool:
        """:meth:`_trains` for the step being planned, after finding the trainable part afresh."""
        self._trainable = self._find_trainable() if torch.is_grad_enabled() else []
        modes = {m.training for m in self._trainable}
        if len(modes) > 1 and not self._gate_warned:
            self._gate_warned = True
            names = {module: name for name, module in self._model.named_modules()}
            by_mode = {
                mode: [names[m] or "(root)" for m in self._trainable if m.training == mode][:3] for mode in modes
            }
            warnings.warn(
                f"of the modules that own trainable parameters, {by_mode[True]} are in train mode and "
                f"{by_mode[False]} in eval mode; hookmix mixes because some of them train. If these forwards are "
                "not training steps, run them under torch.no_grad() or put the model in eval(); if they are (e.g. "
                "BatchNorm kept in eval on purpose), this is right. Shown once per mixer.",
                GateWarning,
                stacklevel=3,
            )
        return self._trains()

    def _layout(self, name: str, t: torch.Tensor) -> str | None:
        """The layout cutmix uses for ``t``, a leaf of layer ``name``'s output (``None``: interpolate it)."""
        if self._sampler.settings.cutmix_alpha == 0:
            return None
        if self.batch_dim != 0:
            return "LNC" if self.batch_dim == 1 and t.dim() == 3 else None
        if t.dim() not in (3, 4):
            return None
        given = self._layouts.get(name)
        if given is not None:
            if len(given) != t.dim():
                raise UsageError(
                    f"layout={given!r} was given for layer {name!r}, but it produced a {t.dim()}-D tensor "
                    f"{tuple(t.shape)}; give a {t.dim()}-letter layout "
                    f"({', '.join(repr(x) for x in LAYOUTS if len(x) == t.dim())})."
                )
            return given
        found = layout_of(self._axes.get(name), t.dim())
        if found is None:
            raise UsageError(
                f"cutmix at layer {name!r} needs to know which axes of its output {tuple(t.shape)} are positions and "
                f"which are channels, and {type(self._model).__name__} does not say (hookmix reads it from the traced "
                f"graph or timm's output_fmt). Pass layout={{{name!r}: 'NCHW'}} (or 'NHWC', 'NCL', 'NLC' for tokens) "
                "to HookMixer, or use mixup at this layer (cutmix_alpha=0)."
            )
        return found

    def _mix(self, name: str, obj: Any, plan: MixPlan, replay: Cut | None = None, replaying: bool = False) -> Any:
        """Mix ``obj``, layer ``name``'s output, with ``plan``; ``replaying``: recompute it inside backward,
        pasting the forward's cut ``replay``."""
        if not replaying:
            self._applied.add(name)
        if not plan.mixed:
            return obj
        mixed, count, cut = mix_structure(
            obj,
            plan,
            batch_dim=self.batch_dim,
            prefix_tokens=self.prefix_tokens,
            layout=functools.partial(self._layout, name),
            cut=replay if replaying else self._cut,
        )
        if count == 0:
            raise UsageError(
                f"layer {name!r} produced {_describe(obj)}: no floating tensor has the plan's batch size "
                f"{plan.batch_size} on batch_dim={self.batch_dim}. The plan's batch size comes from the "
                "targets given to plan(); pass this batch's targets, set batch_dim for sequence-first "
                "layers, or choose a layer whose output holds a floating (B, ...) tensor."
            )
        if not replaying and cut is not None and self._cut is None:
            plan.lam.copy_(cut.kept)  # targets follow the area this forward really pasted
            self._cut = cut
        return mixed

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self._armed
        if plan is None or not self._trains():
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
            missing = [name for name in plan.layers if name not in self._applied]
            if missing:
                self._problem = (
                    f"the plan of step {plan.step} mixes {missing} but the model's forward never called "
                    f"{'that layer' if len(missing) == 1 else 'those layers'}; choose layers the forward uses "
                    "(list_layers marks unused ones '(not called)')."
                )
        if output is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._await_backward(output if result is None else result, (plan, None if plan is None else self._cut))
        return result

    def _await_backward(self, output: Any, replay: _Replay) -> None:
        """Leave ``replay`` on the autograd nodes of ``output`` for the backward that will reach them.

        Under ``torch.compile`` this is skipped: the compiled graph recomputes without Python hooks.
        """
        hook = functools.partial(_replay_on_backward, weakref.ref(self), replay)
        nodes = {leaf.grad_fn for leaf in tensor_leaves(output) if leaf.grad_fn is not None}
        for node in nodes:
            node.register_prehook(hook)

    def _backward_reached(self, replay: _Replay) -> None:
        """The backward running now recomputes the forward of ``replay``; forget it when that backward ends."""
        task = torch._C._current_graph_task_id()
        replays = self._backward.get(task)
        if replays is None:
            replays = self._backward[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._backward.pop(task, None))
        if all(r is not replay for r in replays):
            replays.append(replay)

    def _replay(self, name: str, output: Any) -> Any:
        """Mix ``output`` again if layer ``name`` is being recomputed inside a backward (checkpointing)."""
        if not self._backward:
            return None
        replays = self._backward.get(torch._C._current_graph_task_id())
        if not replays:
            return None
        mixing = [(plan, cut) for plan, cut in replays if plan is not None and plan.mixed and name in plan.layers]
        if len(replays) > 1 and mixing:
            raise UsageError(
                f"layer {name!r} is being recomputed inside a backward (gradient checkpointing) that runs through "
                f"{len(replays)} forwards of the model at once, so hookmix cannot tell which plan to mix it with. "
                "Call backward after each forward (e.g. loss.backward() per micro-batch when accumulating "
                "gradients), or turn gradient checkpointing off."
            )
        if not mixing:
            return None
        plan, cut = mixing[0]
        return self._mix(name, output, plan, replay=cut, replaying=True)

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
                model's first parameter's device).

        When the next forward would not train — grad disabled, or the trainable part of the model in
        eval mode — the step mixes nothing and nothing is armed (so validation loops may call it too).
        Raises ``ValueError`` if the previous plan was never used by a forward or never reached its layer.
        """
        if self.closed:
            raise UsageError("this HookMixer is closed (its hooks were removed); create a new one.")
        self._check_previous()
        kind, index_max = self._target_kind(targets)
        if targets is not None:
            if batch_size is not None and batch_size != targets.shape[0]:
                raise UsageError(f"batch_size={batch_size} but targets have {targets.shape[0]} rows; give one of them.")
            batch_size = targets.shape[0]
        elif not is_int(batch_size, 1):
            raise UsageError(f"batch_size={batch_size!r}: give the targets, or batch_size=B (an int >= 1).")
        if device is None:
            device = targets.device if targets is not None else self._model_device()
        if not self._gate():
            return self._step(identity_plan(batch_size, self._sampler.steps, device), targets, kind, index_max)
        if self._excluded is not None and (targets is None or kind == "regression"):
            raise UsageError("exclude_classes needs class targets: pass class indices or labels to plan(y).")
        plan = self._sampler.draw(batch_size).to(device)
        if self._excluded is not None and plan.mixed:
            excluded = excluded_rows(targets, kind, self._excluded).to(device)
            plan = plan.with_unmixed_rows(excluded | excluded[plan.perm])
        self._armed = plan
        return self._step(plan, targets, kind, index_max)

    def discard(self) -> None:
        """Drop the armed plan without a forward (a skipped batch); the next :meth:`plan` then draws afresh.

        The discarded plan still counts in :attr:`steps`, so a resumed run stays in step with this one.
        """
        self._armed = self._problem = None

    def _target_kind(self, targets: torch.Tensor | None) -> tuple[str | None, int | None]:
        """The kind of ``targets`` and, once validated, their largest class index (index targets)."""
        if targets is None:
            return None, None
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}.")
        kind = infer_kind(targets, self.num_classes) if self.target_kind == "auto" else self.target_kind
        index_max = None
        if self.validate:
            smoothing = self._sampler.settings.label_smoothing
            index_max = validate_targets(targets, kind, self.num_classes, label_smoothing=smoothing)
        return kind, index_max

    def _step(self, plan: MixPlan, targets: torch.Tensor | None, kind: str | None, index_max: int | None) -> MixStep:
        return MixStep(
            plan=plan,
            y=targets,
            kind=kind,
            num_classes=self.num_classes,
            label_smoothing=self._sampler.settings.label_smoothing if kind in ("index", "label", "multilabel") else 0.0,
            uniform_lam=self._sampler.settings.lam_mode == "batch" and self._excluded is None,
            index_max=index_max,
        )

    def _model_device(self) -> torch.device:
        param = next(iter(self._model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

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
        self._backward.clear()

    def __enter__(self) -> "HookMixer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HookMixer(layers={list(self.layers)}, alpha={self.alpha}, mode={self._sampler.settings.mode!r}, "
            f"steps={self.steps}, closed={self.closed})"
        )
