"""The fine-tuned model behind ``--run``, for ``hookmix predict`` and ``hookmix export``.

The run directory's format (``run.json`` + ``head.safetensors`` bound by the run's fingerprint) is the
library's (:mod:`hookmix.headonly.run_directory`), and so is its one loader
(:func:`hookmix.headonly.trained_model.load_finetuned_with_source`), which also reads an exported file. This
module only names the flag: a file that cannot be used is one line starting ``--run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from hookmix.core.errors import UsageError
from hookmix.headonly.trained_model import FinetunedModel, load_finetuned_with_source

__all__ = ["LoadedRun", "load_run"]


@dataclass
class LoadedRun:
    """A run rebuilt: the model (``head(backbone(x))``, with its ``transform``) and the full model it was cut
    from (what ``hookmix export`` saves)."""

    model: FinetunedModel
    source_model: nn.Module


def load_run(run: str | Path) -> LoadedRun:
    """The fine-tuned model of ``--run`` (a run directory or an exported file), in eval mode, every file
    checked first; the library's one-line refusals are prefixed with the flag."""
    try:
        model, source_model = load_finetuned_with_source(run)
    except UsageError as exc:
        said = str(exc)
        raise UsageError(f"--run {said}" if said.startswith(str(run)) else f"--run {run}: {said}") from None
    return LoadedRun(model, source_model)
