"""A fine-tuned model in use: the backbone and the trained head assembled, saved as one file, loaded back.

:func:`assemble` builds what head-only fine-tuning trains from a model: the backbone up to a layer, the head
of a kind (:mod:`hookmix.headonly.heads`), and — when allowed and only fixed linear ops start the head — the cut moved
past them (:mod:`hookmix.graph.equivalence`), so that the features to cache are the pooled ones.

The file :func:`save_finetuned` writes is one safetensors state dict — ``model.*`` (the whole model the
backbone was cut from, its own head included) and ``head.*`` (the trained head) — with a JSON
:class:`FinetunedConfig` in its metadata: model name, weights reference, layer, head kind, whether the cut
was moved past the fixed ops, classes, task, preprocessing, temperature and thresholds. :func:`load_finetuned`
rebuilds the architecture by name (random init: nothing is downloaded), loads both state dicts, and returns a
:class:`FinetunedModel` whose output is the run's ``head(backbone(x))``. Only safetensors and JSON are read,
never pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from hookmix.core.checks import modes_restored
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write, load_state
from hookmix.graph.equivalence import mix_equivalence
from hookmix.graph.models import create_model
from hookmix.graph.splitting import split
from hookmix.headonly.heads import build_head

__all__ = [
    "FinetunedConfig",
    "FinetunedModel",
    "TASKS",
    "assemble",
    "example_shape",
    "load_finetuned",
    "rebuild",
    "save_finetuned",
]

FORMAT = "hookmix-finetuned"
FORMAT_VERSION = 1
TASKS = ("multiclass", "multilabel")
_METADATA_KEY = "hookmix_finetuned"


@dataclass(frozen=True)
class FinetunedConfig:
    """What a fine-tuned model is, besides its weights.

    Attributes:
        model: the architecture's name, e.g. ``"torchvision:resnet50"`` (:func:`hookmix.graph.models.create_model`).
        weights: where the backbone's weights came from, e.g. ``"torchvision:resnet50:pretrained"``.
        layer: the layer the model was cut at.
        head: the head kind, one of :data:`hookmix.headonly.heads.HEAD_KINDS`.
        pooled: the cut was moved past the fixed linear ops at the head's input.
        classes: the class names, in logit order.
        task: ``"multiclass"`` (softmax) or ``"multilabel"`` (a sigmoid per class).
        input_size: ``(C, H, W)`` of one input.
        preprocessing: the resolved preprocessing record (``hookmix finetune``'s), or ``None``.
        temperature: divides the logits before softmax / sigmoid (1.0: not calibrated).
        thresholds: per-class decision thresholds of a multi-label model (``None``: 0.5).
        seed: the seed the head was initialised from (its structure does not depend on it).
    """

    model: str
    weights: str
    layer: str
    head: str
    pooled: bool
    classes: tuple[str, ...]
    task: str
    input_size: tuple[int, ...]
    preprocessing: dict[str, Any] | None = None
    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"task={self.task!r} is not one of {TASKS}.")
        if len(self.classes) < 2:
            raise UsageError(f"classes={self.classes!r}: a classifier needs at least two classes.")
        if not self.temperature > 0:
            raise UsageError(f"temperature={self.temperature!r} must be > 0.")
        if self.thresholds is not None and len(self.thresholds) != len(self.classes):
            raise UsageError(f"{len(self.thresholds)} thresholds for {len(self.classes)} classes; give one per class.")
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "input_size", tuple(self.input_size))
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(self.thresholds))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, source: str) -> FinetunedConfig:
        """Parse what :meth:`to_json` wrote; a ``UsageError`` naming ``source`` when it is not that."""
        fix = "save the trained model again with this version of hookmix (save_finetuned)"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"{source} is not a hookmix fine-tuned model; {fix}.")
        if data.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"{source} is format version {data.get('format_version')!r}; this hookmix reads "
                f"{FORMAT_VERSION}; {fix}."
            )
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise UsageError(f"{source} has an incomplete configuration ({exc}); {fix}.") from None


def example_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one example after ``module`` (run in eval mode, no grad, on one zero example)."""
    with modes_restored(module, False), torch.no_grad():
        return tuple(module(torch.zeros(1, *shape)).shape[1:])


def assemble(
    model: nn.Module,
    layer: str,
    head: str,
    *,
    input_size: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    pool: bool = True,
) -> tuple[nn.Module, nn.Module, tuple[str, ...]]:
    """Cut ``model`` at ``layer`` into ``(backbone, head, fixed_ops)`` for head-only fine-tuning.

    The head is the model's own after the cut (``head="model"``, made trainable) or a fresh ``"linear"`` /
    ``"mlp"`` one (:func:`hookmix.build_head`, seeded by ``seed``). With ``pool=True``, fixed linear ops
    at the head's input (average pool, flatten) move into the backbone, which then returns e.g. (B, 2048)
    pooled features instead of (B, 2048, 7, 7) maps; ``fixed_ops`` names them (``()``: none moved). Mixup of
    the backbone's output trains the head the same either way; CutMix needs the maps (pass ``pool=False``).
    """
    backbone, own = split(model, layer)
    own.requires_grad_(True)
    trained = build_head(
        head,
        feature_shape=example_shape(backbone, input_size),
        num_classes=num_classes,
        model=model,
        model_head=own,
        seed=seed,
    )
    if hasattr(model, "num_prefix_tokens"):  # so that CutMix on cached ViT tokens keeps the class token
        trained.num_prefix_tokens = int(model.num_prefix_tokens)
    fixed = mix_equivalence(trained, "input").fixed_ops if pool else ()
    if not fixed:
        return backbone, trained, ()
    prefix, rest = split(trained, "input", past_fixed_ops=True)
    return nn.Sequential(backbone, prefix), rest, fixed


class FinetunedModel(nn.Module):
    """``head(backbone(x))``: logits ``(B, C)`` of images ``(B, *input_size)``, with the run's config.

    :meth:`probabilities` applies the temperature and softmax (multi-class) or a sigmoid per class
    (multi-label); :meth:`decide` turns them into the predicted class or label set.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, config: FinetunedConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` probabilities of ``x`` in eval mode, after dividing the logits by the temperature."""
        with modes_restored(self, False):
            logits = self(x).float() / self.config.temperature
        return torch.sigmoid(logits) if self.config.task == "multilabel" else torch.softmax(logits, dim=1)

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Multi-class: the top class ``(B,)``; multi-label: ``(B, C)`` bools, each label at its threshold."""
        if self.config.task == "multiclass":
            return probabilities.argmax(dim=1)
        thresholds = self.config.thresholds or (0.5,) * len(self.config.classes)
        return probabilities >= torch.tensor(thresholds, dtype=probabilities.dtype)


def save_finetuned(path: str | Path, model: nn.Module, head: nn.Module, config: FinetunedConfig) -> Path:
    """Write ``model``'s and ``head``'s state dicts and ``config`` to one safetensors file at ``path``."""
    path = Path(path)
    # clones: the model's own head shares its tensors with the model, and safetensors stores no aliases
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tensors |= {f"head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(tensors, metadata={_METADATA_KEY: json.dumps(config.to_json())}))
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], FinetunedConfig]:
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuned model file {path} does not exist; write it with hookmix export.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({exc}); export the run again.") from None
    if _METADATA_KEY not in metadata:
        raise UsageError(f"{path} holds no hookmix configuration; it is not a file hookmix export wrote.")
    return tensors, FinetunedConfig.from_json(json.loads(metadata[_METADATA_KEY]), str(path))


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}


def load_finetuned(path: str | Path) -> FinetunedModel:
    """Rebuild the fine-tuned model :func:`save_finetuned` (``hookmix export``) wrote, in eval mode.

    The architecture is built by name without downloading anything, then both state dicts are loaded
    (strictly: a missing or unexpected tensor is a ``ValueError`` naming it).
    """
    path = Path(path)
    tensors, config = _read(path)
    model = create_model(config.model, num_classes=len(config.classes))
    load_state(model, _part(tensors, "model."), f"{path} (model)", "export the run again")
    return rebuild(model, config, _part(tensors, "head."), str(path))


def rebuild(
    model: nn.Module, config: FinetunedConfig, head_state: dict[str, torch.Tensor], source: str
) -> FinetunedModel:
    """The :class:`FinetunedModel` of ``config`` cut from ``model`` (which holds the backbone's weights), its
    head loaded from ``head_state``; ``source`` names where they came from in error messages."""
    backbone, head, fixed = assemble(
        model,
        config.layer,
        config.head,
        input_size=config.input_size,
        num_classes=len(config.classes),
        seed=config.seed,
        pool=config.pooled,
    )
    if bool(fixed) != config.pooled:
        raise UsageError(f"{source} was cut past fixed linear ops this hookmix does not find; make it again.")
    load_state(head, head_state, f"{source} (head)", "make it again with this version of hookmix")
    return FinetunedModel(backbone, head, config).eval()
