"""The train-mode gate on its own (:class:`hookmix.mixing.gate.TrainGate`): which forwards train, when the trainable
part is worked out, and the one warning. ``tests/mixing/test_gate.py`` checks the same rules through the mixer,
from the activations; here each rule is pinned where it lives.

Bugs a maintainer could plausibly make here, and the test that catches each:

* grad mode ignored (``no_grad`` / ``inference_mode`` forwards train):
  ``test_no_grad_and_inference_mode_never_train``;
* the root's flag decides instead of the trainable modules' (the linear probe never trains, a frozen
  model in train mode with its trainable head in eval trains):
  ``test_the_trainable_modules_decide_not_the_root``;
* nothing trainable: something other than the root's flag decides:
  ``test_without_trainable_parameters_the_root_decides``;
* the trainable set found once and never again (progressive unfreezing keeps the old set):
  ``test_decide_finds_the_trainable_part_afresh_after_unfreezing``;
* ``trains`` walks the modules itself, inside the forward, instead of reading the set the last ``decide``
  found: ``test_trains_reads_the_set_found_by_the_last_decide``;
* the warning on mixed modes shown at every step, never, or pointing into hookmix instead of the caller
  of ``plan`` (a ``stacklevel`` off by one after the move out of the mixer), naming the wrong modules, or
  ``all`` for ``any`` (trainable modules in both modes would then never mix):
  ``test_mixed_modes_warn_once_at_the_callers_line_naming_modules_of_each_mode``.
"""

import warnings

import pytest
import torch
from torch import nn

from hookmix import HookMixer
from hookmix.mixing.gate import GateWarning, TrainGate


def probe() -> nn.Sequential:
    """A frozen backbone (``0``: conv + BatchNorm) and a trainable head ``1``, all in train mode."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


def test_no_grad_and_inference_mode_never_train() -> None:
    gate = TrainGate(probe())
    assert gate.decide() is True
    with torch.no_grad():
        assert gate.trains() is False
        assert gate.decide() is False
    with torch.inference_mode():
        assert gate.trains() is False
        assert gate.decide() is False


def test_the_trainable_modules_decide_not_the_root() -> None:
    model = probe()
    gate = TrainGate(model)
    model.eval()
    model[1].train()  # the linear-probe idiom: the root in eval, the trainable head training
    assert gate.decide() is True
    model.train()
    model[1].eval()  # the frozen part training, the only trainable module in eval
    assert gate.decide() is False


def test_without_trainable_parameters_the_root_decides() -> None:
    model = probe().requires_grad_(False)
    gate = TrainGate(model)
    model[1].eval()
    assert gate.decide() is True  # the root trains
    model.eval()
    model[1].train()
    assert gate.decide() is False  # the root is in eval, whatever a child says


@pytest.mark.filterwarnings("ignore::hookmix.mixing.gate.GateWarning")  # both modes on purpose
def test_decide_finds_the_trainable_part_afresh_after_unfreezing() -> None:
    model = probe()
    gate = TrainGate(model)
    model[1].eval()
    assert gate.decide() is False  # the head, the only trainable module, is in eval
    model[0].requires_grad_(True)  # unfreeze the backbone, which trains
    assert gate.decide() is True
    model[0].requires_grad_(False)
    assert gate.decide() is False


@pytest.mark.filterwarnings("ignore::hookmix.mixing.gate.GateWarning")  # both modes on purpose
def test_trains_reads_the_set_found_by_the_last_decide() -> None:
    model = probe()
    gate = TrainGate(model)
    model[1].eval()
    assert gate.decide() is False
    model[0].requires_grad_(True)
    assert gate.trains() is False  # still the set of the last decide: only the head, in eval
    assert gate.decide() is True


def test_mixed_modes_warn_once_at_the_callers_line_naming_modules_of_each_mode() -> None:
    model = probe()
    model[0].requires_grad_(True)
    model[0][1].eval()  # BatchNorm kept in eval on purpose, the rest trains
    y = torch.tensor([0, 1, 0, 1])
    with HookMixer(model, "1", num_classes=2, seed=0) as mixer:
        with pytest.warns(GateWarning) as caught:
            mixer.plan(y)
        (warning,) = [w for w in caught if issubclass(w.category, GateWarning)]
        assert warning.filename == __file__, "the warning should point at the caller of plan()"
        text = str(warning.message)
        assert "['0.0', '1'] are in train mode and ['0.1'] in eval mode" in text
        assert "torch.no_grad()" in text and "eval()" in text
        mixer.discard()
        with warnings.catch_warnings():
            warnings.simplefilter("error", GateWarning)
            assert mixer.plan(y).mixed  # it mixes (some trainable modules train), and says so only once
