"""What a fine-tuned model is besides its weights, as the JSON every saved form of it carries.

A :class:`FinetunedConfig` names the architecture, the weights reference, the layer and head, the classes and
task, the preprocessing (with the evaluation steps as applied, :mod:`hookmix.headonly.preprocessing`), the
temperature and the multi-label thresholds. The run directory (``run.json``), the exported file's metadata
and the ONNX metadata all hold this one record (:meth:`FinetunedConfig.to_json`), read back by
:meth:`FinetunedConfig.from_json`, which refuses another format or version in one line naming the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from hookmix.core.errors import UsageError
from hookmix.headonly.preprocessing import EvalTransform

__all__ = ["FORMAT", "FORMAT_VERSION", "FinetunedConfig", "TASKS"]

FORMAT = "hookmix-finetuned"
FORMAT_VERSION = 1
TASKS = ("multiclass", "multilabel")


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
        preprocessing: the resolved preprocessing record (``hookmix finetune``'s), or ``None``. When given, its
            ``"eval"`` entry must be an :class:`~hookmix.headonly.preprocessing.EvalTransform` record that
            produces ``input_size`` (checked here): the steps a loaded model applies to an image.
        temperature: divides the logits before softmax / sigmoid (1.0: not calibrated).
        thresholds: per-class decision thresholds of a multi-label model, in class order (``None``: 0.5).
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
        if self.thresholds is not None and self.task != "multilabel":
            raise UsageError("thresholds apply to a multilabel task only; give thresholds=None for multiclass.")
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "input_size", tuple(self.input_size))
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(self.thresholds))
        self.evaluation()  # a record that rebuilds into no transform, or into another input size, is refused now

    def evaluation(self) -> EvalTransform | None:
        """The evaluation steps recorded in :attr:`preprocessing` (``None`` when there is no preprocessing);
        a ``UsageError`` when they are malformed or produce another size than :attr:`input_size`."""
        if self.preprocessing is None:
            return None
        steps = EvalTransform.from_record(self.preprocessing.get("eval"), "preprocessing")
        produces = (steps.channels, *steps.crop)
        if produces != self.input_size:
            raise UsageError(
                f"preprocessing makes {produces} inputs (channels, crop) but input_size is {self.input_size}; "
                "record the evaluation transform the model was trained with."
            )
        return steps

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
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None
