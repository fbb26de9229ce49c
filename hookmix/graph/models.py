"""Create torchvision and timm classification models by name, offline unless weights are asked for.

Names: ``"resnet50"`` (torchvision when it has the name, else timm), or explicit ``"torchvision:resnet50"``
/ ``"timm:convnext_tiny"``; ``"hookmix:digits-cnn"`` is the small CNN of the embedded digits tasks. With
``pretrained=False`` (the default) the model is randomly initialised and nothing is downloaded;
``pretrained=True`` loads the library's default weights (a download when not cached — the real loading
path, never used by the tests).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from hookmix.core.checks import is_int
from hookmix.core.errors import UsageError
from hookmix.core.files import load_state

__all__ = [
    "create_model",
    "DigitsCNN",
    "default_input_size",
    "load_weights",
    "ModelSpec",
    "resolve_model",
    "set_num_classes",
    "SOURCES",
]

SOURCES = ("torchvision", "timm", "hookmix")
_WEIGHTS_FIX = (
    "give a .safetensors file or a torch.save(model.state_dict()) file: only tensors are read, pickled code never."
)


class DigitsCNN(nn.Module):
    """A small CNN for ``(B, 1, 8, 8)`` digit images whose stages are top-level, named cut points.

    ``stem`` -> ``(B, 16, 8, 8)``, ``stage1`` -> ``(B, 32, 4, 4)``, ``stage2`` (the last conv stage) ->
    ``(B, 64, 2, 2)``, ``head`` (global average pool + linear) -> ``(B, num_classes)``. ``head`` is its
    own child so head-only fine-tuning can replace or reset it.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        if not is_int(num_classes, 1):
            raise UsageError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.num_classes = num_classes
        self.stem = self._conv_block(1, 16, pool=False)
        self.stage1 = self._conv_block(16, 32, pool=True)
        self.stage2 = self._conv_block(32, 64, pool=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    @staticmethod
    def _conv_block(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 1, 8, 8)``."""
        return self.head(self.stage2(self.stage1(self.stem(x))))


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, tuple[str, ...]]:
    return {
        "torchvision": tuple(torchvision.models.list_models(module=torchvision.models)),
        "timm": tuple(timm.list_models()),
        "hookmix": ("digits-cnn",),
    }


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: which library builds it."""

    source: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.name}"


def resolve_model(name: str) -> ModelSpec:
    """Resolve ``name`` (optionally prefixed ``torchvision:`` / ``timm:``) or raise a ``ValueError`` that
    lists close matches from both libraries."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty string, got {name!r}.")
    catalogue = _catalogue()
    source, _, bare = name.rpartition(":")
    if source and source not in SOURCES:
        raise UsageError(f"model={name!r}: unknown library prefix {source!r}; use 'torchvision:' or 'timm:'.")
    for lib in (source,) if source else SOURCES:
        if bare in catalogue[lib]:
            return ModelSpec(lib, bare)
    pool = list(dict.fromkeys(catalogue[source] if source else catalogue["torchvision"] + catalogue["timm"]))
    close = difflib.get_close_matches(bare, pool, n=5, cutoff=0.6)
    hint = (
        f"closest names: {', '.join(close)}" if close else "see torchvision.models.list_models() / timm.list_models()"
    )
    raise UsageError(f"model={name!r} is not a {source or 'torchvision or timm'} model; {hint}.")


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build the named classification model.

    Random init (from ``seed``, leaving the global RNG untouched) unless ``pretrained`` (the library's
    default weights) or ``weights`` (a ``.safetensors`` file, or a torch file loaded with
    ``weights_only=True``: never unpickled code) is given; then the classifier is resized to
    ``num_classes`` outputs when given.
    """
    spec = resolve_model(name)
    if pretrained and weights is not None:
        raise UsageError("give pretrained=True or weights=PATH, not both.")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.source == "hookmix":
            if pretrained:
                raise UsageError(f"{name} has no downloadable weights; give weights=PATH or none.")
            model = DigitsCNN()
        elif spec.source == "timm":
            model = timm.create_model(spec.name, pretrained=pretrained)
        else:
            model = torchvision.models.get_model(spec.name, weights="DEFAULT" if pretrained else None)
        if weights is not None:
            load_state(model, load_weights(weights), f"weights file {weights}", f"give weights saved from {name}")
        if num_classes is not None:
            set_num_classes(model, num_classes)
    return model


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        reason = str(exc).split(". ")[0].splitlines()[0]  # torch goes on to suggest weights_only=False: never
        raise UsageError(f"cannot load weights from {path} ({reason}); {_WEIGHTS_FIX}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file {path} does not hold a state dict of tensors; {_WEIGHTS_FIX}")
    return state


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give the model a fresh classifier with ``num_classes`` outputs (timm's ``reset_classifier``;
    torchvision: the last ``nn.Linear``, named ``fc``, ``classifier.N`` or ``heads.head`` by family)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__} has no nn.Linear classifier to resize to {num_classes} classes.")
    parent_name, _, child = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects: timm's ``pretrained_cfg`` when present, else (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return (int(size[0]), int(size[1]), int(size[2]))
