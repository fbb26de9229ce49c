"""hookmix in other training loops; each module imports only its own framework.

* :mod:`hookmix.integrations.timm` — :class:`~hookmix.integrations.timm.HookMixup`, called like
  ``timm.data.Mixup`` (``x, y = mixup_fn(x, y)``) in timm-style train loops.
* :mod:`hookmix.integrations.lightning` — :class:`~hookmix.integrations.lightning.HookMixCallback` for
  Lightning 2.x (``pip install hookmix[lightning]``).
* :mod:`hookmix.integrations.fastai` — :class:`~hookmix.integrations.fastai.HookMixUp` for fastai 2.x
  (``pip install hookmix[fastai]``).
"""

__all__ = []
