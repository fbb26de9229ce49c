"""Look through the wrappers that run a user's model: DDP, ``DataParallel`` and ``torch.compile``."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from hookmix.core.errors import UsageError

__all__ = ["refuse_replicas", "unwrap", "unwrap_once"]


def refuse_replicas(model: nn.Module) -> None:
    """Raise for ``DataParallel`` over several devices: its replicas run one forward each on a slice of
    the batch, while a mix plan (λ, partners) is drawn for the whole batch."""
    while model is not unwrap_once(model):
        if isinstance(model, DataParallel) and len(model.device_ids) > 1:
            raise UsageError(
                f"DataParallel over devices {list(model.device_ids)} splits each batch across replicas, but a mix "
                "plan pairs rows of the whole batch, so the replicas cannot mix correctly. Use "
                "DistributedDataParallel (torchrun; one process per device, each mixing its own batch, see "
                "hookmix.headonly.distributed.rank_seed), or DataParallel on one device."
            )
        model = unwrap_once(model)


def unwrap_once(model: nn.Module) -> nn.Module:
    """The module one DDP / ``DataParallel`` / ``torch.compile`` wrapper runs (``model`` when it is none)."""
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        return model._orig_mod
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module that DDP / ``DataParallel`` / ``torch.compile`` wrappers run (``.module``, ``._orig_mod``).

    Hook that module: the wrappers call it, so its hooks fire through them, and its layer names are the
    plain ones (``"layer4"``, not ``"module.layer4"``).
    """
    while model is not (inner := unwrap_once(model)):
        model = inner
    return model
