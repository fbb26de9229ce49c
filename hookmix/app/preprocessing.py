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
248, not 249). So the evaluation transform the library builds is read back, step by step, into an
:class:`EvalTransform` — resize, interpolation, centre crop, mean and std as applied — and that record is
what ``hookmix finetune`` uses, writes into ``metrics.json``, ``run.json`` and the export, and what
``hookmix predict`` rebuilds (:meth:`EvalTransform.from_record`). :meth:`Preprocessing.fingerprint` hashes
both, so a change of preprocessing never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import timm.data
import torch
import torchvision
from timm.data.transforms import ResizeKeepRatio
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from hookmix.core.errors import UsageError
from hookmix.graph.models import ModelSpec

__all__ = [
    "DIGITS_PREPROCESSING",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "RESIZE_MODES",
    "default_preprocessing",
    "model_preprocessing",
    "read_eval_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shorter", "squash", "cover")
"""How :attr:`EvalTransform.resize` applies: ``"shorter"`` resizes the shorter side to ``resize`` keeping
the aspect ratio (torchvision ``Resize(int)``); ``"squash"`` resizes to ``(h, w)`` exactly (timm
``crop_mode="squash"``); ``"cover"`` keeps the aspect ratio at the smallest size covering ``(h, w)`` (timm
``ResizeKeepRatio``, its centre crop of a non-square input)."""


def _float32(values: Any) -> tuple[float, ...]:
    """Per-channel values as the shortest decimals of their float32 (what ``Normalize`` applies): 0.485,
    not the 0.48500001430511475 a float32 tensor reads back as."""
    return tuple(float(str(np.float32(v))) for v in torch.as_tensor(values).flatten().tolist())


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation transform as the steps it applies to a PIL image: ``Grayscale`` when ``channels`` is
    1, the resize (:data:`RESIZE_MODES`) with ``interpolation``, a centre ``crop`` ``(h, w)``, ``ToTensor``
    (pixels / 255) and ``Normalize(mean, std)``. Read back from a built transform by
    :func:`read_eval_transform`; :meth:`build` makes the same transform again from these values alone."""

    channels: int
    resize: int | tuple[int, int]
    resize_mode: str
    interpolation: str
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def build(self) -> Callable[[Any], torch.Tensor]:
        """The transform (a ``torchvision.transforms.Compose``): PIL image in, ``(C, H, W)`` float tensor out."""
        mode = InterpolationMode(self.interpolation)
        if self.resize_mode == "cover":
            resize: Callable[[Any], Any] = ResizeKeepRatio(self.resize, interpolation=self.interpolation)
        else:  # torchvision's Resize: an int resizes the shorter side, (h, w) squashes
            resize = transforms.Resize(self.resize, interpolation=mode)
        steps = [
            resize,
            transforms.CenterCrop(self.crop),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ]
        return transforms.Compose([transforms.Grayscale(), *steps] if self.channels == 1 else steps)

    def record(self) -> dict[str, Any]:
        """The steps as JSON values (``run.json``, ``metrics.json``, the export)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_record(cls, record: Any, where: str) -> EvalTransform:
        """The steps :meth:`record` wrote; a one-line error naming ``where`` (the file) when they are missing
        or malformed."""
        try:
            resize = record["resize"]
            found = cls(
                channels=int(record["channels"]),
                resize=resize if isinstance(resize, int) else (int(resize[0]), int(resize[1])),
                resize_mode=str(record["resize_mode"]),
                interpolation=InterpolationMode(record["interpolation"]).value,
                crop=(int(record["crop"][0]), int(record["crop"][1])),
                mean=tuple(map(float, record["mean"])),
                std=tuple(map(float, record["std"])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UsageError(
                f"{where} records no usable evaluation transform ({type(exc).__name__}: {exc}); it was written by "
                "an older hookmix or edited by hand: fine-tune again."
            ) from None
        if found.resize_mode not in RESIZE_MODES or isinstance(found.resize, int) != (found.resize_mode == "shorter"):
            raise UsageError(
                f"{where} records the resize {found.resize!r} in mode {found.resize_mode!r}; expected an int with "
                "'shorter', or [h, w] with 'squash' or 'cover': fine-tune again."
            )
        return found


def _steps(built: Any) -> Iterator[Any]:
    """The steps of a built transform, nested ``Compose`` lists flattened."""
    if isinstance(built, transforms.Compose):
        for step in built.transforms:
            yield from _steps(step)
    else:
        yield built


def _read_step(step: Any) -> dict[str, Any] | None:
    """What one step contributes to an :class:`EvalTransform`, or ``None`` for a step it cannot express."""
    if isinstance(step, ImageClassification):  # torchvision's preset: resize_size [s] (shorter side), crop_size [c]
        return {
            "resize": int(step.resize_size[0]),
            "resize_mode": "shorter",
            "interpolation": step.interpolation.value,
            "crop": (int(step.crop_size[0]),) * 2,
            "mean": _float32(step.mean),
            "std": _float32(step.std),
        }
    if isinstance(step, transforms.Grayscale) and step.num_output_channels == 1:
        return {"channels": 1}
    if isinstance(step, transforms.Resize) and step.max_size is None:
        size = step.size if isinstance(step.size, int) else tuple(step.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        mode = "shorter" if isinstance(size, int) else "squash"
        return {"resize": size, "resize_mode": mode, "interpolation": step.interpolation.value}
    if (
        isinstance(step, ResizeKeepRatio)
        and step.longest == 0
        and not (step.random_scale_prob or step.random_aspect_prob)
    ):
        return {"resize": tuple(step.size), "resize_mode": "cover", "interpolation": step.interpolation.value}
    if isinstance(step, transforms.CenterCrop):
        return {"crop": tuple(step.size)}
    if isinstance(step, transforms.Normalize):
        return {"mean": _float32(step.mean), "std": _float32(step.std)}
    return {} if isinstance(step, transforms.ToTensor) else None


def read_eval_transform(built: Any, source: str) -> EvalTransform:
    """What the evaluation transform ``built`` (timm's ``create_transform``, torchvision's
    ``weights.transforms()``, either after ``Grayscale``) really does, read from its step objects.

    A step hookmix cannot express, or a missing resize, crop or normalisation, is a one-line error naming
    the step and ``source`` (the model's preprocessing) rather than a record that rebuilds into another
    transform."""
    values: dict[str, Any] = {"channels": 3}
    for step in _steps(built):
        found = _read_step(step)
        if found is None:
            raise UsageError(
                f"the evaluation transform of {source} has a step hookmix cannot record ({' '.join(repr(step).split())}"
                "), so its predictions could not be reproduced from the run; use another model, or report it."
            )
        values |= found
    missing = {"resize", "crop", "mean"} - values.keys()
    if missing:
        names = ", ".join(type(step).__name__ for step in _steps(built))
        raise UsageError(f"the evaluation transform of {source} ({names}) has no {'/'.join(sorted(missing))} step.")
    return EvalTransform(**values)


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
