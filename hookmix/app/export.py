"""``hookmix export``: a fine-tuned run as one file a program can load, and optionally as one ONNX file.

``FILE`` is the safetensors state dict of the backbone and the trained head with the JSON configuration in
its metadata (:func:`hookmix.save_finetuned`; ``hookmix.load_finetuned(FILE)`` rebuilds it), and
``FILE.json`` a readable copy of that configuration.

``--onnx`` also writes ``FILE.onnx`` (``FILE`` with the suffix ``.onnx``) through ``torch.onnx.export`` (the
dynamo exporter; a dynamic batch axis; input ``images`` ``(B, C, H, W)``, output ``logits`` ``(B, classes)``).
It is one self-contained file: torch writes the weights of a model exported to a path into a ``.onnx.data``
sidecar, so the program is exported in memory and serialised whole (a model over protobuf's 2 GB limit is the
exception: its weights go to ``FILE.onnx.data``, and the command names both files). Its ``metadata_props``
(:func:`onnx_metadata`) carry what a program needs to use it without hookmix: the class names, the task, the
temperature (divide the logits by it before softmax / sigmoid), the multi-label thresholds, and the
evaluation steps to apply to an image (channels, resize and its mode, interpolation, centre crop, mean, std),
plus the whole configuration. It needs the ``onnx`` extra (``pip install 'hookmix[onnx]'``: onnx, onnxscript,
and onnxruntime to run it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from hookmix.app.paths import writable_file
from hookmix.app.run import load_run
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.headonly.finetuned_config import FinetunedConfig
from hookmix.headonly.trained_model import FinetunedModel, save_finetuned

__all__ = ["export_onnx", "onnx_metadata", "run_export"]

ONE_FILE_LIMIT = 2**31 - 1
"""Protobuf's size limit for one serialised message: an ONNX model larger than this needs external data."""


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--onnx needs {' and '.join(missing)}: pip install 'hookmix[onnx]'.")


def onnx_metadata(config: FinetunedConfig) -> dict[str, str]:
    """The ONNX ``metadata_props`` of a model with ``config``: JSON values under ``hookmix.*`` keys."""
    steps = config.evaluation()
    values: dict[str, Any] = {
        "classes": list(config.classes),
        "task": config.task,
        "temperature": config.temperature,
        "thresholds": None if config.thresholds is None else list(config.thresholds),
        "preprocessing": None if steps is None else steps.record(),
        "output": "logits (B, classes): divide by hookmix.temperature, then softmax (multiclass) or sigmoid "
        "(multilabel); a label is predicted when its probability >= its threshold",
        "config": config.to_json(),
    }
    return {f"hookmix.{key}": json.dumps(value) for key, value in values.items()}


def _write_with_external_data(proto: Any, path: Path) -> list[Path]:
    """``proto`` at ``path`` with its weights in ``path.data`` (over the 2 GB limit), both written in a temporary
    folder beside ``path`` and moved into place, the weights first."""
    import onnx

    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as folder:
        staged = Path(folder) / path.name
        onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        os.replace(Path(folder) / data.name, data)
        os.replace(staged, path)
    return [path, data]


def export_onnx(model: FinetunedModel, path: Path) -> list[Path]:
    """Write ``model`` (eval mode, logits) as ONNX at ``path`` with a dynamic batch axis and its configuration in
    the metadata (:func:`onnx_metadata`); returns the files written: ``path`` alone below 2 GB."""
    _require_onnx()
    import onnx

    example = torch.zeros(2, *model.config.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not the user's model
        program = torch.onnx.export(
            model.eval(),
            (example,),
            None,  # in memory: exporting to a path writes the weights into a .onnx.data sidecar
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    proto = program.model_proto
    for key, value in onnx_metadata(model.config).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    if proto.ByteSize() > ONE_FILE_LIMIT:
        return _write_with_external_data(proto, path)
    atomic_write(path, proto.SerializeToString())
    return [path]


def run_export(run: str | Path, out: Path, *, onnx: bool = False) -> list[Path]:
    """Export the run ``run`` (a run directory, or an exported file) to ``out`` (and ``out.json``, and the
    ONNX file with ``onnx``); returns the files written.

    A missing ONNX extra and an unwritable ``out`` fail before the long work; the ONNX model is traced
    before anything else is written, so an interrupted or failed trace leaves no export behind."""
    if onnx:
        _require_onnx()
    writable_file("--out", out, "model.safetensors")
    loaded = load_run(run)
    model = loaded.model
    out.parent.mkdir(parents=True, exist_ok=True)
    traced = export_onnx(model, out.with_suffix(".onnx")) if onnx else []
    weights = save_finetuned(out, loaded.source_model, model.head, model.config)
    config = out.with_name(out.name + ".json")
    atomic_write(config, json.dumps(model.config.to_json(), indent=1).encode())
    return [weights, config, *traced]
