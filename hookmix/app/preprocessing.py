"""How images become a model's inputs, taken from the model itself rather than written by hand.

A ViT trained with mean/std 0.5, a CLIP-style model, or a model with its own crop ratio or interpolation
gets wrong features from a one-size ImageNet pipeline. So the configuration comes from where the model's
library keeps it:

* timm models: ``timm.data.resolve_model_data_config(model)`` (the ``pretrained_cfg``), turned into
  transforms by ``timm.data.create_transform``;
* torchvision models: the architecture's default weights' ``weights.transforms()`` (read offline: no
  download), also for random-init models and for a ``--weights`` file of that architecture;
* anything else: ImageNet mean/std, crop ratio 0.875, bilinear.

``--input-size`` overrides the crop size only. A configuration (:class:`Preprocessing`) is not what gets
applied: the library turns it into steps with its own arithmetic (timm resizes to ``floor(224 / 0.9)`` =
248, not 249). So the evaluation transform the library builds is read back, step by step, into the
library's :class:`~hookmix.headonly.preprocessing.EvalTransform` — resize, interpolation, centre crop, mean and
std as applied — and that record is what ``hookmix finetune`` uses and writes into ``metrics.json``, ``run.json``
and the export, and what a loaded model rebuilds (:attr:`hookmix.FinetunedModel.transform`).
:meth:`Preprocessing.fingerprint` hashes both, so a change of preprocessing never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import timm.data
import torchvision
from timm.data.transforms import ResizeKeepRatio
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from hookmix.graph.models import ModelSpec
from hookmix.headonly.preprocessing import EvalTransform, read_eval_transform

__all__ = [
    "DIGITS_PREPROCESSING",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "default_preprocessing",
    "model_preprocessing",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """A resolved preprocessing configuration: what the model's library says, before it builds the steps.

    Attributes:
        source: where it came from, e.g. ``"timm:vit_tiny_patch16_224"`` or
            ``"torchvision:ResNet50_Weights.IMAGENET1K_V2"``.
        input_size: (C, H, W) of one model input; C = 1 reads images as grayscale.
        mean / std: per-channel normalisation.
        interpolation: resize interpolation (``"bilinear"``, ``"bicubic"``, ...).
        crop_pct: crop size / resize size, as the library states it (timm resizes to ``floor(H / crop_pct)``;
            :meth:`evaluation` says what is really applied).
        crop_mode: timm's ``"center"`` (keep the aspect ratio, crop the centre) or ``"squash"``.
    """

    source: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"

    @property
    def resize(self) -> int | tuple[int, int]:
        """The resize before the centre crop, as applied (:attr:`EvalTransform.resize`)."""
        return self.evaluation().resize

    def with_input_size(self, input_size: tuple[int, int, int] | None) -> Preprocessing:
        """The same configuration cropping to ``input_size`` (unchanged when ``None``)."""
        return self if input_size is None else replace(self, input_size=tuple(input_size))

    def _normalised(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        channels = self.input_size[0]
        return self.mean[:channels], self.std[:channels]

    def _library_eval_transform(self) -> Callable[[Any], Any]:
        """The evaluation transform as the model's library builds it from this configuration: torchvision's
        preset (for a non-square input, the same steps with timm's aspect-keeping resize), else timm's."""
        mean, std = self._normalised()
        _, height, width = self.input_size
        if not self.source.startswith("torchvision:"):
            return self._grayscale(
                timm.data.create_transform(
                    input_size=self.input_size,
                    interpolation=self.interpolation,
                    mean=mean,
                    std=std,
                    crop_pct=self.crop_pct,
                    crop_mode=self.crop_mode,
                )
            )
        mode = InterpolationMode(self.interpolation)
        if height == width:  # torchvision's own preset, as weights.transforms() builds it
            resize = int(round(height / self.crop_pct))
            core = ImageClassification(crop_size=height, resize_size=resize, mean=mean, std=std, interpolation=mode)
            return self._grayscale(core)
        cover = ResizeKeepRatio(tuple(int(round(s / self.crop_pct)) for s in (height, width)), interpolation=mode.value)
        steps = [cover, transforms.CenterCrop((height, width)), transforms.ToTensor(), transforms.Normalize(mean, std)]
        return self._grayscale(transforms.Compose(steps))

    def evaluation(self) -> EvalTransform:
        """What the evaluation transform does: read back from the one the library builds."""
        return read_eval_transform(self._library_eval_transform(), self.source)

    def eval_transform(self) -> Callable[[Any], Any]:
        """Resize, centre crop, to tensor, normalise: the transform the model was evaluated with, built from
        :meth:`evaluation` (so what runs is what is recorded)."""
        return self.evaluation().build()

    def train_transform(self) -> Callable[[Any], Any]:
        """The model's training augmentation (timm's ``create_transform(is_training=True)``: random
        resized crop, flip, colour jitter) at this input size and normalisation."""
        mean, std = self._normalised()
        core = timm.data.create_transform(
            input_size=self.input_size, is_training=True, interpolation=self.interpolation, mean=mean, std=std
        )
        return self._grayscale(core)

    def _grayscale(self, core: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return transforms.Compose([transforms.Grayscale(), core]) if self.input_size[0] == 1 else core

    def record(self) -> dict[str, Any]:
        """The configuration and, under ``"eval"``, the evaluation steps as applied, as readable JSON values
        (``metrics.json``, ``run.json``, the export); :meth:`EvalTransform.from_record` rebuilds the steps."""
        return asdict(self) | {"input_size": list(self.input_size), "eval": self.evaluation().record()}

    def fingerprint(self, training: bool = False) -> str:
        """A stable hash of the configuration and of the transform it builds (the training one when
        ``training``): what a feature cache depends on."""
        built = self.train_transform() if training else self.eval_transform()
        text = json.dumps([self.record(), training, repr(built)], sort_keys=True)
        return "preprocessing:" + hashlib.sha256(text.encode()).hexdigest()[:16]


DIGITS_PREPROCESSING = Preprocessing("hookmix:digits", (1, 8, 8), (0.0,), (1.0,), "bilinear", 1.0)
"""The embedded digits tasks' input: an 8x8 greyscale image scaled to [0, 1] (as ``load_digits`` / 16)."""


def default_preprocessing(input_size: tuple[int, int, int] = (3, 224, 224)) -> Preprocessing:
    """ImageNet statistics, crop ratio 0.875, bilinear: for models that state no configuration."""
    return Preprocessing("imagenet-default", tuple(input_size), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875)


def model_preprocessing(
    model: nn.Module, spec: ModelSpec, input_size: tuple[int, int, int] | None = None
) -> Preprocessing:
    """The preprocessing of ``model`` (built as ``spec``), cropping to ``input_size`` when given."""
    if spec.source == "hookmix":
        return DIGITS_PREPROCESSING.with_input_size(input_size)
    if spec.source == "timm":
        cfg = timm.data.resolve_model_data_config(model)
        found = Preprocessing(
            source=f"timm:{spec.name}",
            input_size=tuple(cfg["input_size"]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=str(cfg["interpolation"]),
            crop_pct=float(cfg["crop_pct"]),
            crop_mode=str(cfg.get("crop_mode") or "center"),
        )
        return found.with_input_size(input_size)
    try:
        weights = torchvision.models.get_model_weights(spec.name).DEFAULT
        preset = weights.transforms()
    except (ValueError, KeyError, AttributeError):  # an architecture without registered weights
        return default_preprocessing(input_size or (3, 224, 224))
    if not isinstance(preset, ImageClassification):
        return default_preprocessing(input_size or (3, 224, 224))
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    found = Preprocessing(
        source=f"torchvision:{weights}",
        input_size=(3, crop, crop),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
        crop_pct=crop / resize,
    )
    return found.with_input_size(input_size)
