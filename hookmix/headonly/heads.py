"""Heads to train on cached features: the model's own head, a fresh pooled linear head, or fastai's MLP head.

Which head sits after the mixed layer decides what mixing there means. A head that pools and then applies
one linear map is affine in the feature map, and mixing commutes with affine maps: mixing the map before it
gives the same logits, loss and gradients as mixing its logits. Before an MLP head (max pooling,
BatchNorm, ReLU) mixing the map is a different regulariser from mixing the logits. :func:`build_head`
builds the three kinds of :data:`HEAD_KINDS` for a feature of shape ``(C, H, W)`` (a conv map),
``(N, D)`` (tokens) or ``(D,)`` (a vector):

* ``"model"``: the head :func:`hookmix.split` cut off the model (its own pooling and classifier);
* ``"linear"``: pooling, then ``Linear(features, num_classes)``;
* ``"mlp"``: the layers of fastai's ``create_head`` with its defaults: concat pooling (max and average),
  flatten, ``BatchNorm1d``, dropout 0.25, ``Linear(→512, bias=False)``, ReLU, ``BatchNorm1d``, dropout 0.5,
  ``Linear(512→num_classes, bias=False)``, initialised as fastai's ``vision_learner`` does.

Conv maps are pooled over ``H, W`` (average for ``"linear"``, max and average concatenated for ``"mlp"``);
token maps with the model's own pooling (:class:`TokenPool`: a timm ViT's ``global_pool`` with its final
norm, or a torchvision ViT's class token); vectors are used as they are.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torchvision
from torch import nn

from hookmix.core.checks import check_int, is_int
from hookmix.core.devices import module_device
from hookmix.core.errors import UsageError

__all__ = ["AdaptiveConcatPool2d", "build_head", "HEAD_KINDS", "TokenPool"]

HEAD_KINDS = ("model", "linear", "mlp")
"""What :func:`build_head` builds: the model's own head, a pooled linear head, fastai's MLP head."""

_HIDDEN = 512
_DROPOUT = (0.25, 0.5)  # fastai's ps=0.5: half of it before the hidden layer, all of it before the last
_BN_BIAS = 1e-3  # fastai's BatchNorm init (weight 1, bias 1e-3)
_TOKEN_POOLS = ("token", "avg", "max", "avgmax")
_SHAPES = "(C, H, W) for a conv map, (N, D) for tokens, (D,) for a vector"


class AdaptiveConcatPool2d(nn.Module):
    """Max and average pooling of a ``(B, C, H, W)`` map, concatenated: ``(B, 2C, 1, 1)``, max first (fastai's
    ``AdaptiveConcatPool2d`` with ``size=1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool2d(1)
        self.ap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


class TokenPool(nn.Module):
    """A ViT's own pooling of its tokens ``(B, N, D)`` into one vector ``(B, D)``.

    As timm's ``VisionTransformer.forward_head``: ``norm`` (the final norm that precedes pooling), then
    ``pool`` — ``"token"`` (the class token ``x[:, 0]``), or ``"avg"`` / ``"max"`` / ``"avgmax"`` over the
    tokens after the first ``num_prefix_tokens`` (over all of them with ``include_prefix``) — then
    ``fc_norm`` (the norm timm applies after average pooling). The norms are frozen copies of the model's.
    """

    def __init__(
        self,
        pool: str,
        num_prefix_tokens: int,
        include_prefix: bool = False,
        norm: nn.Module | None = None,
        fc_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if pool not in _TOKEN_POOLS:
            raise UsageError(f"pool={pool!r} is not a token pooling build_head can copy; use one of {_TOKEN_POOLS}.")
        self.pool = pool
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, 0, " (class/register tokens)")
        self.include_prefix = include_prefix
        self.norm = _frozen_copy(norm)
        self.fc_norm = _frozen_copy(fc_norm)

    @classmethod
    def from_model(cls, model: nn.Module) -> "TokenPool":
        """The pooling of ``model``: a timm ViT-like model (``global_pool``, ``num_prefix_tokens``, ``norm``,
        ``fc_norm``) or a torchvision ``VisionTransformer`` (class token after ``encoder.ln``)."""
        if isinstance(model, torchvision.models.VisionTransformer):
            return cls("token", 1, norm=model.encoder.ln)
        pool = getattr(model, "global_pool", None)
        if not isinstance(pool, str) or not is_int(getattr(model, "num_prefix_tokens", None), 0):
            raise UsageError(
                f"model ({type(model).__name__}) has no ViT token pooling (a timm ViT's global_pool and "
                "num_prefix_tokens, or a torchvision VisionTransformer) to pool (N, D) tokens with; pass the "
                "ViT the features come from as model=, or use kind='model' (the model's own head)."
            )
        if getattr(model, "attn_pool", None) is not None or pool not in _TOKEN_POOLS:
            raise UsageError(
                f"model.global_pool={pool!r} ({type(model).__name__}) is not a pooling build_head can copy: it "
                f"copies {_TOKEN_POOLS}, not a learned attention pool or no pooling; use kind='model'."
            )
        return cls(
            pool,
            model.num_prefix_tokens,
            bool(getattr(model, "pool_include_prefix", False)),
            getattr(model, "norm", None),
            getattr(model, "fc_norm", None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.pool == "token":
            x = x[:, 0]
        else:
            tokens = x if self.include_prefix else x[:, self.num_prefix_tokens :]
            if self.pool == "avg":
                x = tokens.mean(dim=1)
            elif self.pool == "max":
                x = tokens.amax(dim=1)
            else:
                x = 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))
        return self.fc_norm(x)


def _frozen_copy(module: nn.Module | None) -> nn.Module:
    """A copy of ``module`` whose parameters do not train (the model's own stay as they are)."""
    return nn.Identity() if module is None else copy.deepcopy(module).requires_grad_(False)


def _check_feature_shape(feature_shape: Any) -> tuple[int, ...]:
    shape = tuple(feature_shape) if isinstance(feature_shape, (tuple, list, torch.Size)) else None
    if shape is None or not 1 <= len(shape) <= 3 or not all(is_int(n, 1) for n in shape):
        raise UsageError(
            f"feature_shape={feature_shape!r} is not the shape of one example's features (without the batch) "
            f"that a head can take: give {_SHAPES}, e.g. FeatureCache.feature_shape."
        )
    return shape


def _mlp(features: int, num_classes: int) -> list[nn.Module]:
    """fastai's ``create_head(features, num_classes, pool=False)`` layers: BN, dropout, linear (→512), ReLU,
    BN, dropout, linear; the linear layers have no bias since a BatchNorm precedes each."""
    return [
        nn.BatchNorm1d(features),
        nn.Dropout(_DROPOUT[0]),
        nn.Linear(features, _HIDDEN, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(_HIDDEN),
        nn.Dropout(_DROPOUT[1]),
        nn.Linear(_HIDDEN, num_classes, bias=False),
    ]


def _fastai_init(head: nn.Module) -> None:
    """As fastai's ``vision_learner`` leaves its head: Kaiming-normal linear weights, BatchNorm weight 1 and
    bias 1e-3."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.constant_(module.bias, _BN_BIAS)


def _fresh_head(kind: str, shape: tuple[int, ...], num_classes: int, model: nn.Module | None) -> nn.Sequential:
    mlp = kind == "mlp"
    if len(shape) == 3:
        pool: list[nn.Module] = [AdaptiveConcatPool2d() if mlp else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = shape[0] * (2 if mlp else 1)
    elif len(shape) == 2:
        if model is None:
            raise UsageError(
                f"feature_shape={shape} holds (N, D) tokens, which a fresh head pools as their model does: pass "
                "model= (the ViT the features come from), or use kind='model'."
            )
        pool, features = [TokenPool.from_model(model)], shape[1]
    else:
        pool, features = [], shape[0]
    return nn.Sequential(*pool, *(_mlp(features, num_classes) if mlp else [nn.Linear(features, num_classes)]))


def build_head(
    kind: str,
    *,
    feature_shape: Sequence[int],
    num_classes: int,
    model: nn.Module | None = None,
    model_head: nn.Module | None = None,
    seed: int = 0,
) -> nn.Module:
    """The head of ``kind`` (one of :data:`HEAD_KINDS`) that maps a batch of features ``(B, *feature_shape)``
    to logits ``(B, num_classes)``.

    Args:
        kind: ``"model"`` returns ``model_head`` itself; ``"linear"`` and ``"mlp"`` build fresh heads (see
            the module's docstring).
        feature_shape: one example's feature shape without the batch: ``(C, H, W)``, ``(N, D)`` tokens or
            ``(D,)`` (e.g. ``FeatureCache.feature_shape``).
        num_classes: the number of logits.
        model: the model the features come from. Needed for tokens (its pooling and final norm, copied and
            frozen); a fresh head is put on its device. Not modified.
        model_head: the head :func:`hookmix.split` returned; needed for ``kind="model"``.
        seed: initialises a fresh head; the global RNG is left as it was, so equal seeds give equal heads.

    A fresh head is in train mode with every parameter trainable except the copied norms. Its BatchNorm
    needs training batches of at least two examples.
    """
    if not isinstance(kind, str) or kind not in HEAD_KINDS:
        raise UsageError(f"kind={kind!r} is not a head kind; use one of {', '.join(map(repr, HEAD_KINDS))}.")
    shape = _check_feature_shape(feature_shape)
    check_int("num_classes", num_classes, 2, " (the head's number of outputs)")
    check_int("seed", seed, 0)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the features come from, got {type(model).__name__}.")
    if kind == "model":
        if not isinstance(model_head, nn.Module):
            raise UsageError(
                f"kind='model' needs model_head=, the head of `backbone, head = split(model, layer)`; got "
                f"{type(model_head).__name__}. Or build a fresh one with kind='linear' or 'mlp'."
            )
        return model_head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _fresh_head(kind, shape, num_classes, model)
        if kind == "mlp":
            _fastai_init(head)
    return head.to(module_device(model)) if model is not None else head
