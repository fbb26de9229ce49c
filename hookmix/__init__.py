"""hookmix: feature-level mixup through forward hooks.

Mix the activations of any named layer of an unmodified ``nn.Module`` (manifold mixup, input mixup,
logit mixup) with the targets mixed by the same plan, and fine-tune heads on cached, mixed features of
a frozen backbone.

The public names load on first use (PEP 562): ``import hookmix`` itself imports no torch, so the command
line answers ``--help`` and usage errors at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "CacheKey": "headonly.cache",
    "FeatureCache": "headonly.cache",
    "transform_fingerprint": "headonly.cache",
    "CutPointWarning": "graph.cutpoints",
    "cut_points": "graph.cutpoints",
    "stage_names": "graph.cutpoints",
    "MixEquivalence": "graph.equivalence",
    "SameMixPointWarning": "graph.equivalence",
    "mix_equivalence": "graph.equivalence",
    "fit_temperature": "evaluation.calibration",
    "FinetunedConfig": "headonly.trained_model",
    "FinetunedModel": "headonly.trained_model",
    "load_finetuned": "headonly.trained_model",
    "save_finetuned": "headonly.trained_model",
    "FitConfig": "headonly.training",
    "FitResult": "headonly.training",
    "fit": "headonly.training",
    "AdaptiveConcatPool2d": "headonly.heads",
    "build_head": "headonly.heads",
    "HEAD_KINDS": "headonly.heads",
    "TokenPool": "headonly.heads",
    "LayerInfo": "graph.layers",
    "check_mix_points": "graph.layers",
    "format_layers": "graph.layers",
    "list_layers": "graph.layers",
    "resolve_layers": "graph.layers",
    "LAYOUTS": "graph.layouts",
    "Reliability": "evaluation.metrics",
    "evaluate": "evaluation.metrics",
    "mean_ci": "evaluation.metrics",
    "reliability": "evaluation.metrics",
    "apply_thresholds": "evaluation.metrics",
    "evaluate_multilabel": "evaluation.metrics",
    "reliability_multilabel": "evaluation.metrics",
    "tune_thresholds": "evaluation.metrics",
    "GateWarning": "mixing.gate",
    "HookMixer": "mixing.mixer",
    "MixPlan": "mixing.plan",
    "PlanSampler": "mixing.plan",
    "MixSettings": "mixing.settings",
    "BlockLayout": "headonly.streaming",
    "default_memory_budget": "headonly.streaming",
    "ShardedFeatures": "headonly.streaming",
    "split": "graph.splitting",
    "sweep": "headonly.sweep",
    "SweepResult": "headonly.sweep",
    "MixStep": "mixing.targets",
    "UsageError": "core.errors",
}

__all__ = [
    "apply_thresholds",
    "evaluate_multilabel",
    "reliability_multilabel",
    "tune_thresholds",
    "AdaptiveConcatPool2d",
    "build_head",
    "CacheKey",
    "check_mix_points",
    "cut_points",
    "CutPointWarning",
    "evaluate",
    "FeatureCache",
    "fit",
    "fit_temperature",
    "FinetunedConfig",
    "FinetunedModel",
    "FitConfig",
    "FitResult",
    "format_layers",
    "GateWarning",
    "HEAD_KINDS",
    "HookMixer",
    "LayerInfo",
    "LAYOUTS",
    "list_layers",
    "load_finetuned",
    "mean_ci",
    "mix_equivalence",
    "MixEquivalence",
    "MixPlan",
    "MixSettings",
    "BlockLayout",
    "default_memory_budget",
    "ShardedFeatures",
    "MixStep",
    "PlanSampler",
    "Reliability",
    "reliability",
    "resolve_layers",
    "save_finetuned",
    "SameMixPointWarning",
    "split",
    "stage_names",
    "sweep",
    "SweepResult",
    "TokenPool",
    "transform_fingerprint",
    "UsageError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the public name's module on first use and keep the name here."""
    if name not in _WHERE:
        raise AttributeError(f"module 'hookmix' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hookmix.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ serves these names
    from hookmix.core.errors import UsageError
    from hookmix.evaluation.calibration import fit_temperature
    from hookmix.evaluation.metrics import (
        Reliability,
        apply_thresholds,
        evaluate,
        evaluate_multilabel,
        mean_ci,
        reliability,
        reliability_multilabel,
        tune_thresholds,
    )
    from hookmix.graph.cutpoints import CutPointWarning, cut_points, stage_names
    from hookmix.graph.equivalence import MixEquivalence, SameMixPointWarning, mix_equivalence
    from hookmix.graph.layers import LayerInfo, check_mix_points, format_layers, list_layers, resolve_layers
    from hookmix.graph.layouts import LAYOUTS
    from hookmix.graph.splitting import split
    from hookmix.headonly.cache import CacheKey, FeatureCache, transform_fingerprint
    from hookmix.headonly.heads import HEAD_KINDS, AdaptiveConcatPool2d, TokenPool, build_head
    from hookmix.headonly.streaming import BlockLayout, ShardedFeatures, default_memory_budget
    from hookmix.headonly.sweep import SweepResult, sweep
    from hookmix.headonly.trained_model import FinetunedConfig, FinetunedModel, load_finetuned, save_finetuned
    from hookmix.headonly.training import FitConfig, FitResult, fit
    from hookmix.mixing.gate import GateWarning
    from hookmix.mixing.mixer import HookMixer
    from hookmix.mixing.plan import MixPlan, PlanSampler
    from hookmix.mixing.settings import MixSettings
    from hookmix.mixing.targets import MixStep
