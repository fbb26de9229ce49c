"""``HookMixer(model, layers, settings=MixSettings(...))``: the settings object taken as given, the keyword
arguments kept as a convenience that builds the same object, and the two never mixed.

Bugs a maintainer could plausibly make here, and the test that catches each:

* ``settings=`` ignored or a field of it dropped on the way to the sampler (defaults drawn instead), or
  a keyword mapped to the wrong field: ``test_settings_and_the_same_keywords_draw_the_same_plans``;
* ``settings=`` together with keywords silently preferring one of them:
  ``test_settings_and_keywords_together_are_one_line_naming_both``;
* an unknown keyword accepted and ignored, or ``settings=`` of another type accepted:
  ``test_unknown_keywords_and_settings_of_another_type_are_refused``.
"""

import pytest
import torch
from torch import nn

from hookmix import HookMixer, MixSettings

SETTINGS = {"alpha": 1.0, "lam_mode": "sample", "prob": 0.7, "weights": (1.0, 3.0), "dominant": True}


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))


def plans(mixer: HookMixer, net: nn.Module, steps: int = 8) -> list[tuple]:
    """(layers, λ, partners) of ``steps`` planned training steps, each taken by a forward."""
    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    drawn = []
    for _ in range(steps):
        step = mixer.plan(y)
        net(x)
        drawn.append((step.layers, step.lam.tolist(), step.perm.tolist()))
    return drawn


def test_settings_and_the_same_keywords_draw_the_same_plans() -> None:
    given = MixSettings(**SETTINGS)
    net = model()
    with HookMixer(net, ["0", "2"], settings=given, num_classes=4, seed=5) as mixer:
        assert mixer.settings == given
        from_settings = plans(mixer, net)
    with HookMixer(net, ["0", "2"], num_classes=4, seed=5, **SETTINGS) as mixer:
        from_keywords = plans(mixer, net)
    with HookMixer(net, ["0", "2"], num_classes=4, seed=5) as mixer:
        defaults = plans(mixer, net)
    assert from_settings == from_keywords
    assert from_settings != defaults
    lams = [lam for layers, lam, _ in from_settings if layers]
    assert lams and all(len(set(lam)) > 1 for lam in lams)  # lam_mode="sample": one λ per row
    assert all(min(lam) >= 0.5 for lam in lams)  # dominant: max(λ, 1 - λ)
    assert {layers for layers, _, _ in from_settings} <= {(), ("0",), ("2",)}


def test_settings_and_keywords_together_are_one_line_naming_both() -> None:
    with pytest.raises(ValueError, match=r"settings= and the mixing keywords \['alpha'\]") as caught:
        HookMixer(model(), "0", settings=MixSettings(), alpha=1.0)
    assert "\n" not in str(caught.value)
    assert "dataclasses.replace(settings, alpha=...)" in str(caught.value)


def test_unknown_keywords_and_settings_of_another_type_are_refused() -> None:
    with pytest.raises(TypeError, match=r"\['alhpa'\].*'alpha'"):
        HookMixer(model(), "0", alhpa=1.0)
    with pytest.raises(TypeError, match="settings must be a hookmix.MixSettings, got dict"):
        HookMixer(model(), "0", settings={"alpha": 1.0})
