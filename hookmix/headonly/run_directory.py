"""The run directory: a fine-tuned model stored as its head's weights and the recipe of its backbone.

A finished run (``hookmix finetune --out DIR``) holds, besides its report and training checkpoint:

* ``run.json`` — the :class:`~hookmix.headonly.finetuned_config.FinetunedConfig` (model, layer, head, pooled
  cut, classes, task, preprocessing, temperature, thresholds), the :class:`BackboneSource` (how to rebuild the
  backbone's weights: a pretrained download, a weights file checked by its sha256, a seeded random init, or
  the embedded digits CNN) and what the run was trained on (``identity``);
* ``head.safetensors`` — the trained head's weights, bound to its ``run.json``: the head's metadata holds the
  run's fingerprint (a hash of everything ``run.json`` says), so a head copied from another run, or a
  ``run.json`` edited after the run, is refused naming both files instead of predicting with the wrong model.

:func:`save_run` writes them and :func:`read_run` reads them back, checked; :func:`hookmix.load_finetuned`
builds the model from what :func:`read_run` returns. A directory that is missing, unfinished or from another
format version (:data:`RUN_VERSION`) is refused with a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.graph.models import create_model, set_num_classes
from hookmix.headonly.digits_source import pretrain_source
from hookmix.headonly.finetuned_config import FinetunedConfig

__all__ = [
    "BackboneSource",
    "DIGITS_NAME",
    "HEAD_FILE",
    "RUN_FILE",
    "RUN_VERSION",
    "RunRecord",
    "finished_run",
    "read_run",
    "run_fingerprint",
    "save_run",
    "sha256_of",
]

RUN_FILE = "run.json"
HEAD_FILE = "head.safetensors"
RUN_VERSION = 2
"""The ``run.json`` layout this hookmix writes and reads; another version is refused (fine-tune again)."""
FINGERPRINT_KEY = "hookmix_run_fingerprint"
DIGITS_NAME = "hookmix:digits-cnn"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class BackboneSource:
    """Where a run's model weights come from; :meth:`build` makes the same model again.

    Attributes:
        model: the resolved architecture name, e.g. ``"torchvision:resnet50"``.
        pretrained: the library's default weights (downloaded when not cached).
        weights: a weights file, with its ``weights_sha256`` checked when the run is loaded.
        seed: the random init (and the classifier resize) of a model without weights.
        digits_seed: the seed of the embedded digits CNN's pretraining (``model == "hookmix:digits-cnn"``).
    """

    model: str
    pretrained: bool = False
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int = 0
    digits_seed: int | None = None

    @property
    def id(self) -> str:
        """The weights reference recorded in reports and cache keys."""
        if self.digits_seed is not None:
            return f"{DIGITS_NAME}(seed{self.digits_seed})"
        if self.pretrained:
            return f"{self.model}:pretrained"
        if self.weights is not None:
            return f"{self.model}:weights-sha256:{(self.weights_sha256 or '')[:16]}"
        return f"{self.model}:random-init-seed{self.seed}"

    def build(self) -> nn.Module:
        """The model with these weights and its own classifier (see :meth:`resize`)."""
        if self.digits_seed is not None:
            return pretrain_source(seed=self.digits_seed)
        if self.weights is not None and self.weights_sha256 is not None:
            path = Path(self.weights)
            if not path.is_file() or sha256_of(path) != self.weights_sha256:
                raise UsageError(
                    f"the run's weights file {path} is missing or changed since the run (sha256 differs); "
                    "restore it, or fine-tune again."
                )
        return create_model(self.model, pretrained=self.pretrained, weights=self.weights, seed=self.seed)

    def resize(self, model: nn.Module, num_classes: int) -> None:
        """Give ``model`` a classifier of ``num_classes`` outputs, initialised from :attr:`seed`."""
        if self.digits_seed is not None and getattr(model, "num_classes", None) == num_classes:
            return
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            set_num_classes(model, num_classes)


@dataclass(frozen=True)
class RunRecord:
    """A run directory read back and checked: its configuration, backbone recipe and head weights."""

    config: FinetunedConfig
    source: BackboneSource
    head_state: dict[str, torch.Tensor]


def run_fingerprint(payload: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of a ``run.json`` payload (all of it but its ``fingerprint`` entry)."""
    body = {k: v for k, v in payload.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def save_run(
    out: Path, config: FinetunedConfig, source: BackboneSource, head: nn.Module, identity: dict[str, Any]
) -> None:
    """Write ``head.safetensors`` and then ``run.json`` (the run is finished once ``run.json`` is there) into
    ``out``; ``identity`` is what the run was trained on (data, settings), which a resumed run checks."""
    payload: dict[str, Any] = {
        "run_version": RUN_VERSION,
        "finetuned": config.to_json(),
        "backbone": asdict(source),
        "identity": identity,
    }
    payload = json.loads(json.dumps(payload))  # the fingerprint of what the file will read back
    payload["fingerprint"] = run_fingerprint(payload)
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    atomic_write(out / HEAD_FILE, save(state, metadata={FINGERPRINT_KEY: payload["fingerprint"]}))
    atomic_write(out / RUN_FILE, json.dumps(payload, indent=1).encode())


def finished_run(directory: Path) -> dict[str, Any] | None:
    """The ``run.json`` payload of a finished run in ``directory``; ``None`` when there is none. A file that
    cannot be read as one still counts as a run (a dict without entries): it is never taken for free space."""
    path = directory / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_payload(run: Path) -> dict[str, Any]:
    path = run / RUN_FILE
    if not path.is_file():
        raise UsageError(
            f"{run} has no {RUN_FILE}: not a finished hookmix finetune run (or one from before hookmix wrote it); "
            "run hookmix finetune to the end."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); run hookmix finetune again.") from None
    if not isinstance(data, dict) or data.get("run_version") != RUN_VERSION:
        found = data.get("run_version") if isinstance(data, dict) else None
        raise UsageError(
            f"{path} is run format {found!r}; this hookmix reads {RUN_VERSION}: fine-tune again with this version."
        )
    return data


def _read_head(run: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The head's weights, refused unless its metadata carries ``fingerprint`` (the run's own)."""
    head_path = run / HEAD_FILE
    if not head_path.is_file():
        raise UsageError(f"{run} has no {HEAD_FILE}: the run did not finish; run hookmix finetune again.")
    try:
        with safe_open(head_path, framework="pt") as handle:
            bound = (handle.metadata() or {}).get(FINGERPRINT_KEY)
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{head_path} is not a readable safetensors file ({exc}); fine-tune again.") from None
    if bound != fingerprint:
        raise UsageError(
            f"{head_path} (run {bound}) does not belong to {run / RUN_FILE} (run {fingerprint}): the files "
            "come from different runs or one was edited; use the two files one run wrote."
        )
    return state


def read_run(run: Path) -> RunRecord:
    """The configuration, backbone recipe and head weights of the finished run in the directory ``run``,
    every file checked (format version, the head's fingerprint) before anything is built."""
    data = _read_payload(run)
    path = run / RUN_FILE
    config = FinetunedConfig.from_json(data.get("finetuned"), str(path))
    backbone = data.get("backbone")
    if not isinstance(backbone, dict) or "model" not in backbone:
        raise UsageError(f"{path} does not say where the backbone's weights come from; fine-tune again.")
    names = {f.name for f in fields(BackboneSource)}
    source = BackboneSource(**{k: v for k, v in backbone.items() if k in names})
    return RunRecord(config, source, _read_head(run, run_fingerprint(data)))
