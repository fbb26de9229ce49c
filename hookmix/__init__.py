"""hookmix: feature-level mixup through forward hooks.

Mix the activations of any named layer of an unmodified ``nn.Module`` (manifold mixup, input mixup,
logit mixup) with the targets mixed by the same plan, and fine-tune heads on cached, mixed features of
a frozen backbone.
"""

from hookmix.cache import CacheKey, FeatureCache, transform_fingerprint
from hookmix.cutpoints import CutPointWarning, cut_points, stage_names
from hookmix.finetune import FitConfig, FitResult, fit
from hookmix.layers import LayerInfo, check_mix_points, format_layers, list_layers, resolve_layers
from hookmix.layouts import LAYOUTS
from hookmix.metrics import Reliability, evaluate, mean_ci, reliability
from hookmix.mixer import GateWarning, HookMixer
from hookmix.plan import MixPlan, PlanSampler
from hookmix.settings import MixSettings
from hookmix.split import split
from hookmix.targets import MixStep

__version__ = "0.1.0"

__all__ = [
    "CacheKey",
    "CutPointWarning",
    "FeatureCache",
    "FitConfig",
    "FitResult",
    "GateWarning",
    "HookMixer",
    "LAYOUTS",
    "LayerInfo",
    "MixPlan",
    "MixSettings",
    "MixStep",
    "PlanSampler",
    "Reliability",
    "check_mix_points",
    "cut_points",
    "evaluate",
    "fit",
    "format_layers",
    "list_layers",
    "mean_ci",
    "reliability",
    "resolve_layers",
    "split",
    "stage_names",
    "transform_fingerprint",
    "__version__",
]
