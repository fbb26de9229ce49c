"""How images become a model's inputs, taken from the model itself rather than written by hand.

A ViT trained with mean/std 0.5, a CLIP-style model, or a model with its own crop ratio or interpolation
gets wrong features from a one-size ImageNet pipeline. So the configuration comes from where the model's
library keeps it:

* timm models: ``timm.data.resolve_model_data_config(model)`` (the ``pretrained_cfg``), turned into
  transforms by ``timm.data.create_transform``;
* torchvision models: the architecture's default weights' ``weights.transforms()`` (read offline: no
  download), also for random-init models and for a ``--weights`` file of that architecture;
* anything else: ImageNet mean/std, crop ratio 0.875, bilinear.

``--input-size`` overrides the crop size only. :class:`Preprocessing` records the resolved values
readably (``metrics.json``) and fingerprints them (the cache key), so a change of preprocessing never
reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import timm.data
import torchvision
from torch import nn
from torchvision import transforms
from torchvision.transforms._presets import ImageClassification

from hookmix.models import ModelSpec

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
    """A resolved preprocessing configuration.

    Attributes:
        source: where it came from, e.g. ``"timm:vit_tiny_patch16_224"`` or
            ``"torchvision:ResNet50_Weights.IMAGENET1K_V2"``.
        input_size: (C, H, W) of one model input; C = 1 reads images as grayscale.
        mean / std: per-channel normalisation.
        interpolation: resize interpolation (``"bilinear"``, ``"bicubic"``, ...).
        crop_pct: crop size / resize size: the short side is resized to ``H / crop_pct``, then the centre
            (H, W) is cropped.
    """

    source: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float

    @property
    def resize(self) -> int:
        """The short side before the centre crop."""
        return int(round(min(self.input_size[1:]) / self.crop_pct))

    def with_input_size(self, input_size: tuple[int, int, int] | None) -> Preprocessing:
        """The same configuration cropping to ``input_size`` (unchanged when ``None``)."""
        return self if input_size is None else replace(self, input_size=tuple(input_size))

    def _normalised(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        channels = self.input_size[0]
        return self.mean[:channels], self.std[:channels]

    def eval_transform(self) -> Callable[[Any], Any]:
        """Resize, centre crop, to tensor, normalise: the transform the model was evaluated with."""
        mean, std = self._normalised()
        if self.source.startswith("torchvision:"):  # torchvision's own preset, as weights.transforms() builds it
            core: Callable[[Any], Any] = ImageClassification(
                crop_size=self.input_size[1],
                resize_size=self.resize,
                mean=mean,
                std=std,
                interpolation=transforms.InterpolationMode(self.interpolation),
            )
        else:
            core = timm.data.create_transform(
                input_size=self.input_size,
                interpolation=self.interpolation,
                mean=mean,
                std=std,
                crop_pct=self.crop_pct,
            )
        return self._grayscale(core)

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
        """The configuration as readable JSON values (for ``metrics.json``)."""
        return asdict(self) | {"input_size": list(self.input_size), "resize": self.resize}

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
