"""hookmix: feature-level mixup through forward hooks.

Mix the activations of any named layer of an unmodified ``nn.Module`` (manifold mixup, input mixup,
logit mixup), with the targets mixed by the same plan.
"""

from hookmix.layers import LayerInfo, format_layers, list_layers, resolve_layers
from hookmix.mixer import HookMixer
from hookmix.plan import MixPlan, PlanSampler
from hookmix.targets import MixStep

__version__ = "0.1.0"

__all__ = [
    "HookMixer",
    "LayerInfo",
    "MixPlan",
    "MixStep",
    "PlanSampler",
    "format_layers",
    "list_layers",
    "resolve_layers",
    "__version__",
]
