"""hookmix: feature-level mixup through forward hooks.

Mix the activations of any named layer of an unmodified ``nn.Module`` (manifold mixup, input mixup,
logit mixup) with the targets mixed by the same plan, and fine-tune heads on cached, mixed features of
a frozen backbone.

The public names load on first use (PEP 562): ``import hookmix`` itself imports no torch, so the command
line answers ``--help`` and usage errors at once.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public API, listed once: each name and the module it lives in. ``__all__``, the lazy loader below,
# the type stub ``__init__.pyi`` and docs/api.md (both written by docs/gen_api.py) all read this table.
# Everything else is importable from its sub-package (``hookmix.graph.cutpoints.cut_points``) but is not
# the API a user starts from.
_WHERE = {
    # mixing in your own training loop
    "HookMixer": "mixing.mixer",
    "MixSettings": "mixing.settings",
    "MixStep": "mixing.targets",
    # where to mix
    "list_layers": "graph.layers",
    "mix_equivalence": "graph.equivalence",
    "split": "graph.splitting",
    # head-only fine-tuning
    "CacheKey": "headonly.cache",
    "FeatureCache": "headonly.cache",
    "build_head": "headonly.heads",
    "fit": "headonly.training",
    "FitConfig": "headonly.training",
    "FitResult": "headonly.training",
    "FinetunedConfig": "headonly.trained_model",
    "FinetunedModel": "headonly.trained_model",
    "load_finetuned": "headonly.trained_model",
    "save_finetuned": "headonly.trained_model",
    "sweep": "headonly.sweep",
    # evaluation
    "evaluate": "evaluation.metrics",
    "evaluate_multilabel": "evaluation.metrics",
    "fit_temperature": "evaluation.calibration",
    "mean_ci": "evaluation.metrics",
    "reliability": "evaluation.metrics",
    "tune_thresholds": "evaluation.metrics",
    # errors and warnings
    "HookmixWarning": "core.errors",
    "UsageError": "core.errors",
}

__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str) -> Any:
    """Import the public name's module on first use and keep the name here."""
    if name not in _WHERE:
        raise AttributeError(f"module 'hookmix' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hookmix.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
