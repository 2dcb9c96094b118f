"""Step methods of a set-up module on one device: nothing is redirected (2 processes: test_runtime_distributed)."""

from __future__ import annotations

import pytest
import torch

from fabric_ckpt import Fabric
from tests.runtime_cases import StepModel, step_batch


def test_on_one_device_methods_are_plain_calls(fabric):
    torch.manual_seed(0)
    module = StepModel()
    model = fabric.setup(module)
    batch = step_batch(0, 0)
    # Unmarked methods that run submodules are fine on one device: there is no wrapper to bypass.
    assert torch.equal(model.custom_step(batch), module.custom_step(batch))
    assert torch.equal(model.training_step(batch), module.training_step(batch))
    assert model.describe() == "49 parameters"
    assert "forward" not in vars(module)


def test_mark_forward_method_checks_its_argument_on_one_device(fabric):
    model = fabric.setup(StepModel())
    model.mark_forward_method("custom_step")
    model.mark_forward_method(model.module.describe)
    model.mark_forward_method(model.custom_step)  # the method as the set-up module hands it out
    with pytest.raises(TypeError, match="got int"):
        model.mark_forward_method(3)
    with pytest.raises(ValueError, match="'forward'"):
        model.mark_forward_method("forward")
    with pytest.raises(AttributeError, match=r"StepModel\.missing does not exist"):
        model.mark_forward_method("missing")
    with pytest.raises(AttributeError, match=r"StepModel\.encoder does not exist or is not a method"):
        model.mark_forward_method("encoder")


def test_a_missing_step_method_stays_missing():
    model = Fabric(accelerator="cpu").setup(torch.nn.Linear(2, 2))
    assert not hasattr(model, "training_step")
