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
    "CacheKey": "cache",
    "FeatureCache": "cache",
    "transform_fingerprint": "cache",
    "CutPointWarning": "cutpoints",
    "cut_points": "cutpoints",
    "stage_names": "cutpoints",
    "MixEquivalence": "equivalence",
    "SameMixPointWarning": "equivalence",
    "mix_equivalence": "equivalence",
    "fit_temperature": "calibration",
    "FinetunedConfig": "finetuned",
    "FinetunedModel": "finetuned",
    "load_finetuned": "finetuned",
    "save_finetuned": "finetuned",
    "FitConfig": "finetune",
    "FitResult": "finetune",
    "fit": "finetune",
    "AdaptiveConcatPool2d": "heads",
    "build_head": "heads",
    "HEAD_KINDS": "heads",
    "TokenPool": "heads",
    "LayerInfo": "layers",
    "check_mix_points": "layers",
    "format_layers": "layers",
    "list_layers": "layers",
    "resolve_layers": "layers",
    "LAYOUTS": "layouts",
    "Reliability": "metrics",
    "evaluate": "metrics",
    "mean_ci": "metrics",
    "reliability": "metrics",
    "apply_thresholds": "metrics",
    "evaluate_multilabel": "metrics",
    "reliability_multilabel": "metrics",
    "tune_thresholds": "metrics",
    "GateWarning": "gate",
    "HookMixer": "mixer",
    "MixPlan": "plan",
    "PlanSampler": "plan",
    "MixSettings": "settings",
    "BlockLayout": "streaming",
    "default_memory_budget": "streaming",
    "ShardedFeatures": "streaming",
    "split": "splitting",
    "MixStep": "targets",
    "UsageError": "_errors",
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
    from hookmix._errors import UsageError
    from hookmix.cache import CacheKey, FeatureCache, transform_fingerprint
    from hookmix.calibration import fit_temperature
    from hookmix.cutpoints import CutPointWarning, cut_points, stage_names
    from hookmix.equivalence import MixEquivalence, SameMixPointWarning, mix_equivalence
    from hookmix.finetune import FitConfig, FitResult, fit
    from hookmix.finetuned import FinetunedConfig, FinetunedModel, load_finetuned, save_finetuned
    from hookmix.gate import GateWarning
    from hookmix.heads import HEAD_KINDS, AdaptiveConcatPool2d, TokenPool, build_head
    from hookmix.layers import LayerInfo, check_mix_points, format_layers, list_layers, resolve_layers
    from hookmix.layouts import LAYOUTS
    from hookmix.metrics import (
        Reliability,
        apply_thresholds,
        evaluate,
        evaluate_multilabel,
        mean_ci,
        reliability,
        reliability_multilabel,
        tune_thresholds,
    )
    from hookmix.mixer import HookMixer
    from hookmix.plan import MixPlan, PlanSampler
    from hookmix.settings import MixSettings
    from hookmix.splitting import split
    from hookmix.streaming import BlockLayout, ShardedFeatures, default_memory_budget
    from hookmix.targets import MixStep
