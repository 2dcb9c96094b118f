"""``Fabric(precision=...)``: every forward of a set-up module runs in it, exactly as in Lightning Fabric."""

from __future__ import annotations

import warnings

import lightning.fabric
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fabric_ckpt import Fabric, FSDPStrategy
from fabric_ckpt.core.precision import MixedPrecision, Precision, TruePrecision


class Probe(nn.Module):
    """Records the dtypes its forward sees; a LayerNorm, which autocast keeps in float32, makes them matter."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, x: torch.Tensor, *, steps: torch.Tensor) -> torch.Tensor:
        self.seen = {"input": x.dtype, "steps": steps.dtype, "created": torch.ones(1).dtype}
        return self.head(self.norm(self.linear(x))) * steps


def probe(seed: int = 0) -> Probe:
    torch.manual_seed(seed)
    return Probe()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(6, 4, generator=generator), torch.randn(6, 1, generator=generator)


def loss_and_grads(fabric, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], Probe]:
    model = fabric.setup(probe())
    inputs, targets = batch()
    loss = F.mse_loss(model(inputs, steps=torch.tensor(2)), targets)
    fabric.backward(loss)
    grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    return loss.detach(), grads, model.module


def test_bf16_mixed_autocasts_every_forward():
    inputs, targets = batch()
    model = Fabric(accelerator="cpu", precision="bf16-mixed").setup(probe())
    loss = F.mse_loss(model(inputs, steps=torch.tensor(2)), targets)

    reference = probe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(inputs.to(torch.bfloat16), steps=torch.tensor(2))
    expected_loss = F.mse_loss(expected.float(), targets)
    full_loss = F.mse_loss(probe()(inputs, steps=torch.tensor(2)), targets)

    assert torch.equal(loss, expected_loss)
    assert not torch.equal(loss, full_loss)
    assert model.module.seen["input"] == torch.bfloat16  # float inputs converted, as Lightning does
    assert model(inputs, steps=torch.tensor(2)).dtype == torch.float32  # outputs back in the default dtype


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("64-true", torch.float64)]
)
def test_true_precisions_convert_the_module_and_its_inputs(precision, dtype):
    fabric = Fabric(accelerator="cpu", precision=precision)
    inputs, _ = batch()
    model = fabric.setup(probe())
    assert {p.dtype for p in model.parameters()} == {dtype}
    output = model(inputs, steps=torch.tensor(2))
    assert model.module.seen == {"input": dtype, "steps": torch.int64, "created": dtype}
    assert output.dtype == torch.float32 and torch.get_default_dtype() == torch.float32
    with fabric.init_module():
        created = nn.Linear(2, 2)
    assert created.weight.dtype == dtype and torch.get_default_dtype() == torch.float32
    with fabric.autocast():
        assert torch.ones(1).dtype == dtype


@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", "bf16-true", "16-true", "64-true", None, 32, "32", 64, "64", "bf16"]
)
def test_losses_and_gradients_equal_lightning_fabric(precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes about aliases and devices
        theirs = lightning.fabric.Fabric(accelerator="cpu", devices=1, precision=precision)
    ours = Fabric(accelerator="cpu", precision=precision)
    assert ours.strategy.precision.precision == theirs.strategy.precision.precision
    our_loss, our_grads, our_module = loss_and_grads(ours, precision)
    their_loss, their_grads, their_module = loss_and_grads(theirs, precision)
    assert torch.equal(our_loss, their_loss)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        assert torch.equal(our_grads[name], their_grads[name]), name
    assert our_module.seen == their_module.seen


def test_16_mixed_on_the_cpu_runs_bf16_mixed_as_lightning_does():
    with pytest.warns(UserWarning, match="'bf16-mixed' instead"):
        fabric = Fabric(accelerator="cpu", precision="16-mixed")
    assert isinstance(fabric.strategy.precision, MixedPrecision)
    assert fabric.strategy.precision.precision == "bf16-mixed" and fabric.strategy.precision.scaler is None
    with pytest.warns(UserWarning, match="'bf16-mixed' instead"):
        assert Fabric(accelerator="cpu", precision=16).strategy.precision.precision == "bf16-mixed"


def test_the_precision_object():
    assert type(Fabric(accelerator="cpu").strategy.precision) is Precision
    assert isinstance(Fabric(accelerator="cpu", precision="bf16-true").strategy.precision, TruePrecision)
    precision = Fabric(accelerator="cpu", precision="bf16-mixed").strategy.precision
    args, kwargs = precision.convert_input(((torch.ones(2), torch.arange(2)), {"mask": torch.ones(1)}))
    assert [args[0].dtype, args[1].dtype, kwargs["mask"].dtype] == [torch.bfloat16, torch.int64, torch.bfloat16]
    assert precision.convert_output({"y": torch.ones(1, dtype=torch.bfloat16)})["y"].dtype == torch.float32
    module = nn.Linear(2, 2)
    assert precision.convert_module(module) is module and module.weight.dtype == torch.float32
    with precision.forward_context():
        assert module(torch.ones(1, 2)).dtype == torch.bfloat16
    with precision.module_init_context():
        assert nn.Linear(2, 2).weight.dtype == torch.float32
    assert precision.state_dict() == {}


@pytest.mark.parametrize("precision", ["transformer-engine", "transformer-engine-float16", "8-mixed", 8, "fp16", True])
def test_unsupported_precisions_are_refused(precision):
    with pytest.raises(ValueError, match=r"precision=.* is not supported .*choose one of \['32-true', '16-mixed'"):
        Fabric(accelerator="cpu", precision=precision)


@pytest.mark.parametrize("precision", ["16-mixed", "64-true"])
def test_fsdp_refuses_what_lightnings_fsdp2_strategy_refuses(precision):
    choices = r"choose one of \['32-true', 'bf16-mixed', '16-true', 'bf16-true'\]"
    with pytest.raises(ValueError, match=rf"precision='{precision}' is not supported \(.*\); {choices}"):
        Fabric(strategy=FSDPStrategy(accelerator="cpu", num_processes=2), precision=precision)


def train_scaled(fabric_or_none, scheduler_on: str, steps: int = 4) -> tuple[dict[str, torch.Tensor], float]:
    """Train with a float16 gradient scaler (CPU autocast), through Fabric or by hand, with an LR scheduler made
    before ``setup`` (on the user's optimizer) or after it (on the set-up one)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # large enough to overflow at first: steps skipped
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5) if scheduler_on == "user" else None
    if fabric_or_none is not None:
        fabric = fabric_or_none
        fabric.strategy.precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        model, optimizer = fabric.setup(module, optimizer)
    if scheduler_on == "setup":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(6, 4, generator=generator), torch.randn(6, 1, generator=generator)
        optimizer.zero_grad()
        if fabric_or_none is not None:
            loss = F.mse_loss(model(inputs), targets)
            fabric.backward(loss)
            fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False)
            optimizer.step()
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                output = module(inputs.half())
            scaler.scale(F.mse_loss(output.float(), targets)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
    return {name: p.detach().clone() for name, p in module.named_parameters()}, scaler.get_scale()


@pytest.mark.parametrize("scheduler_on", ["user", "setup"])
def test_a_gradient_scaler_steps_the_optimizer_even_behind_an_lr_scheduler(scheduler_on):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "optimizer.step() has been overridden after [the] scheduler"
        # A skipped first step (overflow) leaves the scheduler's call marker unset: torch warns, by hand as well.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        expected, expected_scale = train_scaled(None, scheduler_on)
        params, scale = train_scaled(Fabric(accelerator="cpu"), scheduler_on)
    assert scale == expected_scale < 2.0**20  # overflowing steps were skipped and the scale lowered
    for name in expected:
        assert torch.equal(params[name], expected[name]), name
