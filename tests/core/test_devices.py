"""Which device a module is on, and placing it on one: the single helpers of :mod:`hookmix.core.devices` that the
mixer, the extraction, ``fit`` and the heads share.

Bugs a maintainer could plausibly make here, and the test that catches each:

* a module with buffers but no parameters (a frozen ``BatchNorm(affine=False)``, a pooling head with a
  registered constant) taken to be on the CPU, or a parameter-less module crashing:
  ``test_module_device_reads_parameters_then_buffers_else_the_cpu``;
* ``device=None`` moving the module, or a named device ignored / not checked:
  ``test_place_module_keeps_the_module_for_none_and_refuses_an_unknown_name``,
  ``test_place_module_moves_to_a_named_cuda_device`` (GPU machines only);
* a mixer without targets planning on the CPU while its model is elsewhere:
  ``test_a_plan_without_targets_lives_where_the_model_is``.
"""

import pytest
import torch
from torch import nn

from hookmix import HookMixer
from hookmix.core.devices import module_device, place_module

META = torch.device("meta")


def test_module_device_reads_parameters_then_buffers_else_the_cpu() -> None:
    assert module_device(nn.Linear(2, 2, device="meta")) == META
    assert module_device(nn.BatchNorm1d(2, affine=False, device="meta")) == META  # buffers only
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_place_module_keeps_the_module_for_none_and_refuses_an_unknown_name() -> None:
    module = nn.Linear(2, 2, device="meta")
    assert place_module(module, None) == META
    assert module.weight.device == META
    cpu = nn.Linear(2, 2)
    assert place_module(cpu, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='tpu' is not one of"):
        place_module(cpu, "tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_place_module_moves_to_a_named_cuda_device() -> None:
    module = nn.BatchNorm1d(2)
    assert place_module(module, "cuda:0") == torch.device("cuda:0")
    assert module.weight.device.type == "cuda" and module.running_mean.device.type == "cuda"


def test_a_plan_without_targets_lives_where_the_model_is() -> None:
    model = nn.Sequential(nn.Linear(3, 4, device="meta"), nn.ReLU(), nn.Linear(4, 2, device="meta"))
    with HookMixer(model, "0", seed=0) as mixer:
        step = mixer.plan(batch_size=4)
        assert step.lam.device == META and step.perm.device == META
        mixer.discard()
