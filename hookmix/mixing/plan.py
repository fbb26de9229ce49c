"""The mix plan: one draw per training step that the hook, the targets and the report all read.

A :class:`MixPlan` holds, for a batch of ``B`` rows: ``lam`` (B,) — the weight of each row's own sample
(1.0 for rows that do not mix) — ``perm`` (B,) — the partner of each row — and the layer(s) to mix. The
:class:`PlanSampler` draws plans from its own seedable ``torch.Generator`` (never the global RNG), always
in the same order (mix-probability coin, layer, λ, partners) so the stream of plans depends only on the
seed and the batch sizes, and carries its generator and counters in ``state_dict()`` so a resumed run
draws exactly the plans the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from hookmix.core.checks import check_alpha, check_int
from hookmix.core.errors import UsageError
from hookmix.mixing.settings import MixSettings

__all__ = ["identity_plan", "MixPlan", "PlanSampler", "TOKEN_SLOTS"]

TOKEN_SLOTS = 1024
"""Virtual token slots R drawn per cutmix plan: token cutmix works on layers with up to R swappable tokens."""


@dataclass(frozen=True)
class MixPlan:
    """What one training step mixes.

    Attributes:
        lam: (B,) float32 weight of each row's own sample in the targets; rows that do not mix have exactly
            1.0. For cutmix the hook overwrites it in place with the fraction each row really keeps (the box
            clipped at the borders and rounded to whole pixels / tokens), so targets read after the forward
            follow the real area.
        perm: (B,) int64 partner index of each row: the mixed row is ``lam*a + (1-lam)*a[perm]``;
            no row is its own partner.
        layers: the layer name(s) this step mixes (one name, or every listed name with ``mode="all"``).
        mixed: False when the step does not mix at all (mix-probability coin, schedule, batch of 1, eval).
        step: index of this plan in the sampler's stream (0-based).
        method: ``"mixup"`` (interpolate) or ``"cutmix"`` (paste a box / a subset of tokens from the
            partner).
        drawn: (B,) the λ as drawn, never changed: cutmix boxes and token subsets are cut from it, so a
            recomputation (gradient checkpointing) cuts the same box after ``lam`` was corrected. For
            mixup it is ``lam`` itself.
        centers: cutmix only — (B, 2) box centres as fractions of (H, W), in [0, 1).
        token_scores: cutmix only — (B, R) uniform scores of R virtual token slots; a layer with F
            swappable tokens ranks its tokens by the scores of slots ``floor(i * R / F)``.
    """

    lam: torch.Tensor
    perm: torch.Tensor
    layers: tuple[str, ...]
    mixed: bool
    step: int
    method: str = "mixup"
    centers: torch.Tensor | None = None
    token_scores: torch.Tensor | None = None
    drawn: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.drawn is None:
            object.__setattr__(self, "drawn", self.lam if self.method == "mixup" else self.lam.clone())

    @property
    def batch_size(self) -> int:
        return self.lam.shape[0]

    def to(self, device: torch.device | str) -> "MixPlan":
        """The same plan with its tensors on ``device`` (a no-op for tensors already there)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        lam = move(self.lam)
        return replace(
            self,
            lam=lam,
            perm=move(self.perm),
            centers=move(self.centers),
            token_scores=move(self.token_scores),
            drawn=lam if self.drawn is self.lam else move(self.drawn),
        )

    def with_unmixed_rows(self, keep: torch.Tensor) -> "MixPlan":
        """The same plan with ``lam`` forced to 1 where ``keep`` (B,) bool is True (a cutmix box of
        area 0 for those rows)."""
        lam = self.lam.masked_fill(keep, 1.0)
        return replace(self, lam=lam, drawn=lam if self.drawn is self.lam else self.drawn.masked_fill(keep, 1.0))


def identity_plan(batch_size: int, step: int, device: torch.device | str = "cpu") -> MixPlan:
    """A plan that mixes nothing: λ = 1 and each row its own partner."""
    return MixPlan(
        lam=torch.ones(batch_size, device=device),
        perm=torch.arange(batch_size, device=device),
        layers=(),
        mixed=False,
        step=step,
    )


def _random_cycle(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation made of one cycle through all rows: no row is its own partner
    (a plain ``randperm`` leaves about one fixed point per batch, which silently does not mix)."""
    order = torch.randperm(batch_size, generator=generator)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm


class PlanSampler:
    """Draws :class:`MixPlan` s from a private ``torch.Generator``.

    Args:
        layers: candidate layer names; one is drawn per step (manifold mixup), or all are used together
            when ``settings.mode == "all"``.
        settings: how to mix (:class:`hookmix.MixSettings`: α, cutmix, λ per batch or row,
            probability, layer weights, schedule); ``alpha`` stays settable between steps.
        seed: seed of the generator; ``None`` draws a seed from the OS once.

    Every step draws the same things in the same order whether or not it ends up mixing, so a
    schedule change never shifts the plans of later steps. ``stop_epoch`` counts the epoch that
    :meth:`set_epoch` was last told.
    """

    def __init__(
        self, layers: Sequence[str], settings: MixSettings = MixSettings(), *, seed: int | None = None
    ) -> None:
        if not isinstance(settings, MixSettings):
            raise TypeError(f"settings must be a hookmix.MixSettings, got {type(settings).__name__}.")
        self.layers = tuple(layers)
        self.settings = settings
        if settings.weights is not None and len(settings.weights) != len(self.layers):
            raise UsageError(
                f"weights has {len(settings.weights)} entries but layers resolved to {len(self.layers)} names "
                f"{list(self.layers)}; give one weight per layer."
            )
        self._weights = torch.tensor(settings.weights or [1.0] * len(self.layers), dtype=torch.float64)
        self.epoch = 0
        self.generator = torch.Generator()
        self.seed = int(seed) if seed is not None else int(torch.seed())
        self.generator.manual_seed(self.seed)
        self.steps = 0
        self.mixed_steps = 0

    @property
    def alpha(self) -> float:
        """Mixup's λ ~ Beta(alpha, alpha); may change between steps (0 only while cutmix is on)."""
        return self.settings.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.settings = replace(self.settings, alpha=check_alpha(value, allow_zero=self.settings.cutmix_alpha > 0))

    def set_epoch(self, epoch: int) -> None:
        """Tell the sampler the current epoch (for ``stop_epoch``)."""
        self.epoch = check_int("epoch", epoch, 0)

    def _scheduled(self, step: int) -> bool:
        stop_step, stop_epoch = self.settings.stop_step, self.settings.stop_epoch
        return (stop_step is None or step < stop_step) and (stop_epoch is None or self.epoch < stop_epoch)

    def _use_cutmix(self, coin: torch.Tensor) -> bool:
        if self.settings.cutmix_alpha == 0:
            return False
        return self.settings.alpha == 0 or bool(coin < self.settings.switch_prob)

    def draw(self, batch_size: int) -> MixPlan:
        """Draw the plan of the next step for a batch of ``batch_size`` rows (on the CPU)."""
        step, settings = self.steps, self.settings
        self.steps += 1
        g = self.generator
        coin, switch = torch.rand(2, generator=g, dtype=torch.float64)
        layer_index = torch.multinomial(self._weights, 1, generator=g)
        cutmix = self._use_cutmix(switch)
        n_lam = batch_size if settings.lam_mode == "sample" else 1
        alpha = settings.cutmix_alpha if cutmix else settings.alpha
        concentration = torch.full((n_lam, 2), alpha, dtype=torch.float64)
        # Beta(α, α) is the first coordinate of Dirichlet(α, α). torch.distributions.Beta draws from the
        # global RNG only; the private _sample_dirichlet is what it calls, and it takes our generator.
        lam = torch._sample_dirichlet(concentration, generator=g)[:, 0].float()
        perm = _random_cycle(batch_size, g)
        centers = token_scores = None
        if cutmix:
            centers = torch.rand(n_lam, 2, generator=g).expand(batch_size, 2).contiguous()
            token_scores = torch.rand(n_lam, TOKEN_SLOTS, generator=g).expand(batch_size, TOKEN_SLOTS).contiguous()
        if batch_size < 2 or coin >= settings.prob or not self._scheduled(step):
            return identity_plan(batch_size, step)
        if settings.dominant:
            lam = torch.maximum(lam, 1.0 - lam)
        layers = self.layers if settings.mode == "all" else (self.layers[int(layer_index)],)
        self.mixed_steps += 1
        return MixPlan(
            lam=lam.expand(batch_size).contiguous(),
            perm=perm,
            layers=layers,
            mixed=True,
            step=step,
            method="cutmix" if cutmix else "mixup",
            centers=centers,
            token_scores=token_scores,
        )

    _SETTINGS = ("alpha", "cutmix_alpha", "switch_prob", "prob", "stop_step", "stop_epoch")

    def state_dict(self) -> dict[str, Any]:
        """Generator state, counters, schedule and settings: enough to continue the exact stream."""
        return {
            "generator": self.generator.get_state(),
            "seed": self.seed,
            "steps": self.steps,
            "mixed_steps": self.mixed_steps,
            "layers": list(self.layers),
            "mode": self.settings.mode,
            "lam_mode": self.settings.lam_mode,
            "epoch": self.epoch,
            **{name: getattr(self.settings, name) for name in self._SETTINGS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state saved for other layers or another mode."""
        for key in ("layers", "mode", "lam_mode"):
            stored = tuple(state[key]) if key == "layers" else state[key]
            mine = self.layers if key == "layers" else getattr(self.settings, key)
            if stored != mine:
                raise UsageError(
                    f"state_dict was saved with {key}={stored!r} but this mixer has {key}={mine!r}; "
                    "create the mixer with the same settings before loading."
                )
        self.settings = replace(self.settings, **{name: state[name] for name in self._SETTINGS})
        self.generator.set_state(state["generator"])
        self.seed = int(state["seed"])
        self.steps = int(state["steps"])
        self.mixed_steps = int(state["mixed_steps"])
        self.set_epoch(int(state["epoch"]))
