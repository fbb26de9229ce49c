"""Create torchvision and timm classification models by name, offline unless weights are asked for.

Names: ``"resnet50"`` (torchvision when it has the name, else timm), or explicit ``"torchvision:resnet50"``
/ ``"timm:convnext_tiny"``. With ``pretrained=False`` (the default) the model is randomly initialised
and nothing is downloaded; ``pretrained=True`` loads the library's default weights (a download when not
cached — the real loading path, never used by the tests).
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

from hookmix._errors import UsageError
from hookmix._io import load_state

__all__ = [
    "create_model",
    "default_input_size",
    "load_weights",
    "ModelSpec",
    "resolve_model",
    "set_num_classes",
    "SOURCES",
]

SOURCES = ("torchvision", "timm")
_WEIGHTS_FIX = (
    "give a .safetensors file or a torch.save(model.state_dict()) file: only tensors are read, pickled code never."
)


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, tuple[str, ...]]:
    return {
        "torchvision": tuple(torchvision.models.list_models(module=torchvision.models)),
        "timm": tuple(timm.list_models()),
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
        if spec.source == "timm":
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
