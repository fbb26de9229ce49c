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
    "FitConfig": "finetune",
    "FitResult": "finetune",
    "fit": "finetune",
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
    "GateWarning": "mixer",
    "HookMixer": "mixer",
    "MixPlan": "plan",
    "PlanSampler": "plan",
    "MixSettings": "settings",
    "split": "splitting",
    "MixStep": "targets",
    "UsageError": "_errors",
}

__all__ = [
    "CacheKey",
    "check_mix_points",
    "cut_points",
    "CutPointWarning",
    "evaluate",
    "FeatureCache",
    "fit",
    "FitConfig",
    "FitResult",
    "format_layers",
    "GateWarning",
    "HookMixer",
    "LayerInfo",
    "LAYOUTS",
    "list_layers",
    "mean_ci",
    "MixPlan",
    "MixSettings",
    "MixStep",
    "PlanSampler",
    "Reliability",
    "reliability",
    "resolve_layers",
    "split",
    "stage_names",
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
    from hookmix.cutpoints import CutPointWarning, cut_points, stage_names
    from hookmix.finetune import FitConfig, FitResult, fit
    from hookmix.layers import LayerInfo, check_mix_points, format_layers, list_layers, resolve_layers
    from hookmix.layouts import LAYOUTS
    from hookmix.metrics import Reliability, evaluate, mean_ci, reliability
    from hookmix.mixer import GateWarning, HookMixer
    from hookmix.plan import MixPlan, PlanSampler
    from hookmix.settings import MixSettings
    from hookmix.splitting import split
    from hookmix.targets import MixStep
