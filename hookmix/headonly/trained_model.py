"""A fine-tuned model in use: the backbone and the trained head assembled, saved, loaded back by one loader.

:func:`assemble` builds what head-only fine-tuning trains from a model: the backbone up to a layer, the head
of a kind (:mod:`hookmix.headonly.heads`), and — when allowed and only fixed linear ops start the head — the cut moved
past them (:mod:`hookmix.graph.equivalence`), so that the features to cache are the pooled ones.

A fine-tuned model has one format — its :class:`FinetunedConfig` as JSON (:mod:`hookmix.headonly.finetuned_config`),
the trained head's weights, and the backbone's weights or how to rebuild them — in two containers:

* the run directory ``hookmix finetune --out`` writes (:mod:`hookmix.headonly.run_directory`): ``run.json`` with
  the config and the backbone's recipe, and ``head.safetensors`` bound to it by the run's fingerprint;
* one safetensors file (:func:`save_finetuned`, ``hookmix export``): ``model.*`` (the whole model the backbone
  was cut from, its own head included) and ``head.*`` (the trained head), the config JSON in its metadata.

:func:`load_finetuned` reads either (only safetensors and JSON, never pickle) and returns a
:class:`FinetunedModel` whose output is the run's ``head(backbone(x))``, with the run's evaluation transform
(:attr:`FinetunedModel.transform`) and :meth:`FinetunedModel.predict`, which gives what ``hookmix predict``
writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from hookmix.core.checks import check_int, modes_restored
from hookmix.core.devices import module_device
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write, load_state
from hookmix.graph.equivalence import mix_equivalence
from hookmix.graph.models import create_model
from hookmix.graph.splitting import split
from hookmix.headonly.finetuned_config import TASKS, FinetunedConfig
from hookmix.headonly.heads import build_head
from hookmix.headonly.images import UnreadableImage, read_rgb, to_rgb
from hookmix.headonly.run_directory import RUN_FILE, read_run

__all__ = [
    "FinetunedConfig",
    "FinetunedModel",
    "Predictions",
    "TASKS",
    "assemble",
    "example_shape",
    "load_finetuned",
    "load_finetuned_with_source",
    "rebuild",
    "save_finetuned",
]

_METADATA_KEY = "hookmix_finetuned"


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


@dataclass(frozen=True)
class Predictions:
    """What :meth:`FinetunedModel.predict` gives for ``N`` images: what ``hookmix predict`` writes.

    Attributes:
        probabilities: ``(N, C)`` float32 on the CPU, columns in :attr:`classes` order, after dividing the
            logits by the temperature: softmax rows (multi-class) or a sigmoid per class (multi-label).
        predicted: per image, the decided class names: ``(top class,)`` for a multi-class model; for a
            multi-label one every class whose probability reaches its threshold (``p >= t``), in class order,
            possibly none (``hookmix predict``'s ``predicted`` column).
        classes: the class names.
    """

    probabilities: torch.Tensor
    predicted: tuple[tuple[str, ...], ...]
    classes: tuple[str, ...]


class FinetunedModel(nn.Module):
    """``head(backbone(x))``: logits ``(B, C)`` of images ``(B, *input_size)``, with the run's config.

    :meth:`probabilities` applies the temperature and softmax (multi-class) or a sigmoid per class
    (multi-label); :meth:`decide` turns them into the predicted class or label set; :attr:`transform` turns
    one PIL image into an input as the run did, and :meth:`predict` does all three for images or files.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, config: FinetunedConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config
        steps = config.evaluation()
        self._transform = None if steps is None else steps.build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The run's evaluation transform: an RGB PIL image -> a ``(C, H, W)`` float tensor (``C, H, W`` =
        ``config.input_size``), rebuilt from the recorded steps (:meth:`FinetunedConfig.evaluation`)."""
        if self._transform is None:
            raise UsageError(
                "this model's config records no preprocessing (preprocessing=None), so it has no transform; "
                "transform images yourself and call probabilities(x), or save it with a preprocessing record."
            )
        return self._transform

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
        return probabilities >= torch.tensor(thresholds, dtype=probabilities.dtype, device=probabilities.device)

    def predict(self, images: Sequence[str | Path | Image.Image], *, batch_size: int = 64) -> Predictions:
        """Classify ``images`` (files, read as ``hookmix predict`` reads them, or PIL images, converted to RGB
        the same way) with :attr:`transform`, :meth:`probabilities` and :meth:`decide`, in batches of
        ``batch_size`` on the model's device. An unreadable file is a ``UsageError`` naming it."""
        if isinstance(images, (str, Path, Image.Image)) or not isinstance(images, Sequence):
            raise UsageError(
                f"images={type(images).__name__}: give a list of image paths or PIL images (one image: [image])."
            )
        check_int("batch_size", batch_size, 1)
        device, classes = module_device(self), self.config.classes
        rows = [
            self.probabilities(torch.stack([self.transform(_rgb(item)) for item in chunk]).to(device)).cpu()
            for chunk in (images[start : start + batch_size] for start in range(0, len(images), batch_size))
        ]
        probabilities = torch.cat(rows) if rows else torch.zeros(0, len(classes))
        decided = self.decide(probabilities)
        if self.config.task == "multiclass":
            predicted = tuple((classes[i],) for i in decided.tolist())
        else:
            predicted = tuple(tuple(c for c, on in zip(classes, row) if on) for row in decided.tolist())
        return Predictions(probabilities, predicted, classes)


def _rgb(item: str | Path | Image.Image) -> Image.Image:
    """One input of :meth:`FinetunedModel.predict` as an 8-bit RGB image; an unreadable one is a ``UsageError``."""
    try:
        return to_rgb(item) if isinstance(item, Image.Image) else read_rgb(item)
    except UnreadableImage as exc:
        name = f"image {item}" if not isinstance(item, Image.Image) else f"a {item.mode} PIL image"
        raise UsageError(f"{name} is not readable as RGB: {exc}.") from None


def save_finetuned(path: str | Path, model: nn.Module, head: nn.Module, config: FinetunedConfig) -> Path:
    """Write ``model``'s and ``head``'s state dicts and ``config`` to one safetensors file at ``path``."""
    path = Path(path)
    # clones: the model's own head shares its tensors with the model, and safetensors stores no aliases
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tensors |= {f"head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(tensors, metadata={_METADATA_KEY: json.dumps(config.to_json())}))
    return path


def _read_file(path: Path) -> tuple[nn.Module, FinetunedConfig, dict[str, torch.Tensor]]:
    """The model (its architecture by name, its ``model.*`` weights), config and head weights of a file
    :func:`save_finetuned` wrote."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({exc}); export the run again.") from None
    if _METADATA_KEY not in metadata:
        raise UsageError(f"{path} holds no hookmix configuration; it is not a file hookmix export wrote.")
    config = FinetunedConfig.from_json(json.loads(metadata[_METADATA_KEY]), str(path))
    model = create_model(config.model, num_classes=len(config.classes))
    load_state(model, _part(tensors, "model."), f"{path} (model)", "export the run again")
    return model, config, _part(tensors, "head.")


def _read_run(path: Path) -> tuple[nn.Module, FinetunedConfig, dict[str, torch.Tensor]]:
    """The model (rebuilt from its recorded source, its classifier resized), config and head weights of a run
    directory."""
    record = read_run(path)
    model = record.source.build()
    record.source.resize(model, len(record.config.classes))
    return model, record.config, record.head_state


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}


def load_finetuned(path: str | Path) -> FinetunedModel:
    """Rebuild a fine-tuned model, in eval mode, from a run directory (``hookmix finetune --out``; its
    ``run.json`` also works) or from the file :func:`save_finetuned` / ``hookmix export`` wrote.

    A file's architecture is built by name without downloading anything and both state dicts are loaded
    strictly (a missing or unexpected tensor is a ``UsageError`` naming it); a run's backbone is rebuilt from
    its recorded source (pretrained weights, a checked weights file, a seeded init or the digits CNN) and its
    head is refused unless it carries the run's fingerprint.
    """
    return load_finetuned_with_source(path)[0]


def load_finetuned_with_source(path: str | Path) -> tuple[FinetunedModel, nn.Module]:
    """:func:`load_finetuned`, and the whole model the backbone was cut from (what :func:`save_finetuned`
    stores as ``model.*``)."""
    path = Path(path)
    if path.name == RUN_FILE and path.is_file():
        path = path.parent
    if path.is_dir():
        model, config, head_state = _read_run(path)
    elif path.is_file():
        model, config, head_state = _read_file(path)
    else:
        raise UsageError(
            f"{path} does not exist; give a run directory hookmix finetune wrote or a file hookmix export wrote."
        )
    return rebuild(model, config, head_state, str(path)), model


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
