"""Several layers' features from ONE forward of a model: forward hooks on the layers, and the forward stopped
once the last of them has run.

:class:`LayerTaps` is the backbone of a multi-layer extraction (:meth:`hookmix.FeatureCache.extract_many`):
where :func:`hookmix.split` gives one backbone per layer, each running the model from its input, the taps run
the model once and return every requested layer's output, each through its own fixed ops when the cached
point is after them (e.g. ``layer4`` average-pooled and flattened to ``(B, 2048)``, ``layer3`` as its map
``(B, 1024, 14, 14)``). The model's eager forward computes the same ops as the split backbone's graph, so the
features are bitwise those of single-layer extraction (tested). Nothing after the deepest requested layer runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hookmix.core.errors import UsageError
from hookmix.graph.layers import module_names, unknown_layer_error

__all__ = ["LayerTaps"]


class _Reached(Exception):
    """Raised by the last tap to fire: the rest of the model's forward is not needed."""


class LayerTaps(nn.Module):
    """``{name: after(output of layer)}`` for the taps ``{name: (layer, after)}`` from one forward of ``model``.

    Args:
        model: the whole model; its submodules are shared, not copied (moving or switching the mode of the taps
            does so to the model).
        taps: per output name, the module name of the layer (a cut point, e.g. ``"layer3"``) and the fixed ops
            to apply to its output (``None``: the output itself), e.g. the pooling prefix that
            :func:`hookmix.headonly.trained_model.assemble` moved into a backbone. Several names may tap one layer.

    ``forward(x)`` returns a dict of the outputs (each ``(B, *F_name)``); the hooks live only during the call.
    A layer the forward never ran raises ``ValueError``.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, tuple[str, nn.Module | None]]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not taps:
            raise UsageError("taps is empty: name at least one layer to take features from.")
        names = module_names(model)
        for layer, _ in taps.values():
            if layer not in names:
                raise unknown_layer_error("layer", layer, names)
        self.model = model
        self.layers = {name: layer for name, (layer, _) in taps.items()}
        fixed = [(name, after) for name, (_, after) in taps.items() if after is not None]
        self.after = nn.ModuleList(after for _, after in fixed)  # a list: names may hold dots ("blocks.6")
        self.after_index = {name: index for index, (name, _) in enumerate(fixed)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self._layer_outputs(x)
        return {
            name: self.after[self.after_index[name]](outputs[layer]) if name in self.after_index else outputs[layer]
            for name, layer in self.layers.items()
        }

    def _layer_outputs(self, x: torch.Tensor) -> dict[str, Any]:
        """Each tapped layer's output for ``x``, from one forward stopped after the last of them."""
        wanted = set(self.layers.values())
        modules = dict(self.model.named_modules())
        outputs: dict[str, Any] = {}

        def tap(layer: str) -> Any:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                outputs[layer] = out
                if outputs.keys() == wanted:
                    raise _Reached

            return hook

        handles = [modules[layer].register_forward_hook(tap(layer)) for layer in sorted(wanted)]
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(wanted - outputs.keys())
        if missing:
            raise UsageError(f"the forward of {type(self.model).__name__} never ran the tapped layers {missing}.")
        return outputs
