"""A model's evaluation preprocessing as a record of the steps it applies, and the transform built from it.

A configuration (mean, std, crop ratio, ...) is not what gets applied: timm and torchvision turn it into steps
with their own arithmetic (timm resizes to ``floor(224 / 0.9)`` = 248, not 249). So the evaluation transform
the library builds (timm's ``create_transform``, torchvision's ``weights.transforms()``) is read back step by
step (:func:`read_eval_transform`) into an :class:`EvalTransform` — grayscale or not, the resize and its mode,
interpolation, centre crop, mean and std as applied — and that record is what a fine-tuned model carries
(``run.json``, the exported file, the ONNX metadata). :meth:`EvalTransform.build` makes the same transform
again from the record alone, so a loaded model (:attr:`hookmix.FinetunedModel.transform`) prepares an image
exactly as its run did, whatever timm or torchvision compute later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from timm.data.transforms import ResizeKeepRatio
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from hookmix.core.errors import UsageError

__all__ = ["EvalTransform", "RESIZE_MODES", "read_eval_transform"]

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
