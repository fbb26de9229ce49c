"""Look through the wrappers that run a user's model: DDP, ``DataParallel`` and ``torch.compile``."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    """The module that DDP / ``DataParallel`` / ``torch.compile`` wrappers run (``.module``, ``._orig_mod``).

    Hook that module: the wrappers call it, so its hooks fire through them, and its layer names are the
    plain ones (``"layer4"``, not ``"module.layer4"``).
    """
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
