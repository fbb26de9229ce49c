"""``hookmix export``: a fine-tuned run as one file a program can load, and optionally as ONNX.

``FILE`` is the safetensors state dict of the backbone and the trained head with the JSON configuration in
its metadata (:func:`hookmix.save_finetuned`; ``hookmix.load_finetuned(FILE)`` rebuilds it), and
``FILE.json`` a readable copy of that configuration. ``--onnx`` also writes ``FILE.onnx`` through
``torch.onnx.export`` (the dynamo exporter; a dynamic batch axis; input ``images`` ``(B, C, H, W)``, output
``logits`` ``(B, classes)`` — divide by the configuration's ``temperature`` before softmax / sigmoid). It
needs the ``onnx`` extra (``pip install 'hookmix[onnx]'``: onnx, onnxscript, and onnxruntime to run it).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

from hookmix.app.paths import writable_file
from hookmix.app.run import load_run
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.headonly.trained_model import FinetunedModel, save_finetuned

__all__ = ["export_onnx", "run_export"]


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--onnx needs {' and '.join(missing)}: pip install 'hookmix[onnx]'.")


def export_onnx(model: FinetunedModel, path: Path) -> Path:
    """Write ``model`` (eval mode, logits) as ONNX at ``path`` with a dynamic batch axis."""
    _require_onnx()
    example = torch.zeros(2, *model.config.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not the user's model
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return path


def run_export(run: str | Path, out: Path, *, onnx: bool = False) -> list[Path]:
    """Export the run directory ``run`` to ``out`` (and ``out.json``, ``out.onnx`` with ``onnx``); returns
    the files written.

    A missing ONNX extra and an unwritable ``out`` fail before the long work; the ONNX model is traced
    before anything is written, so an interrupted or failed trace leaves no export behind."""
    if onnx:
        _require_onnx()
    writable_file("--out", out, "model.safetensors")
    loaded = load_run(run)
    model = loaded.model
    out.parent.mkdir(parents=True, exist_ok=True)
    traced = [export_onnx(model, out.with_suffix(".onnx"))] if onnx else []
    weights = save_finetuned(out, loaded.source_model, model.head, model.config)
    config = out.with_name(out.name + ".json")
    atomic_write(config, json.dumps(model.config.to_json(), indent=1).encode())
    return [weights, config, *traced]
