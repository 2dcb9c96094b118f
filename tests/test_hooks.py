"""Callbacks and LightningModules as Lightning Fabric runs them: what ``fabric.call``, ``setup`` and ``optimizer.step``
call, and a set-up LightningModule's ``self.log``, ``self.optimizers()`` and hooks (found by tests/programs/trainer.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fabric_ckpt import Fabric

lightning = pytest.importorskip("lightning")


class Recorder:
    """A logger that keeps what it was given."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((metrics, step))


class Classifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.epochs_started = 0
        self.saves = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.log("train_loss", loss)
        self.log_dict({"batch_idx": float(batch_idx)})
        return loss

    def on_train_epoch_start(self) -> None:
        self.epochs_started += 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.saves += 1


def test_a_set_up_lightning_module_logs_and_finds_its_optimizer_through_fabric():
    recorder = Recorder()
    fabric = Fabric(accelerator="cpu", loggers=recorder)
    module = Classifier()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))

    loss = model.training_step(torch.ones(4, 3), 5)

    assert recorder.logged == [({"train_loss": loss.item()}, None), ({"batch_idx": 5.0}, None)]
    assert module.fabric is fabric
    assert module.optimizers() is optimizer
    assert module.trainer.world_size == 1  # Lightning's shim: the trainer's attributes are the Fabric's


def test_fabric_call_reaches_a_set_up_lightning_modules_hooks_once():
    fabric = Fabric(accelerator="cpu")
    module = Classifier()
    fabric.setup_module(module)
    fabric.call("on_train_epoch_start")
    assert module.epochs_started == 1

    listed = Classifier()  # also passed as a callback: still called once
    other = Fabric(accelerator="cpu", callbacks=[listed])
    other.setup(listed)
    other.call("on_train_epoch_start")
    assert listed.epochs_started == 1


def test_a_lightning_modules_checkpoint_hook_runs_once_per_save_that_holds_it(tmp_path):
    """Checkpoint hooks run for the state's modules and the callbacks given to Fabric, as before the module was set
    up: once for a set-up LightningModule in the state, never for one a save leaves out."""
    fabric = Fabric(accelerator="cpu")
    module = Classifier()
    model = fabric.setup(module)
    fabric.save(tmp_path / "a.ckpt", {"model": model})
    assert module.saves == 1
    fabric.save(tmp_path / "b.ckpt", {"step": 1})
    assert module.saves == 1

    listed = Classifier()  # a callback the user gave: called on every save, once
    other = Fabric(accelerator="cpu", callbacks=[listed])
    other.save(tmp_path / "c.ckpt", {"model": other.setup(listed)})
    other.save(tmp_path / "d.ckpt", {"step": 1})
    assert listed.saves == 2


def test_call_passes_only_the_keyword_arguments_a_hook_takes():
    seen = []

    class Narrow:
        def on_epoch_end(self, position, epoch):
            seen.append(("narrow", position, epoch))

    class Wide:
        def on_epoch_end(self, *args, **kwargs):
            seen.append(("wide", args, kwargs))

    class NotAHook:
        on_epoch_end = 3

    fabric = Fabric(accelerator="cpu", callbacks=[Narrow(), Wide(), NotAHook()])
    with pytest.warns(UserWarning, match=r"NotAHook\.on_epoch_end.*not callable"):
        fabric.call("on_epoch_end", "first", epoch=2, loss=0.5)
    assert seen == [("narrow", "first", 2), ("wide", ("first",), {"epoch": 2, "loss": 0.5})]


def test_setup_tells_callbacks_the_set_up_module():
    seen = []

    class AfterSetup:
        def on_after_setup(self, fabric, module):
            seen.append((fabric, module))

    fabric = Fabric(accelerator="cpu", callbacks=[AfterSetup()])
    model = fabric.setup(nn.Linear(2, 2))
    assert seen == [(fabric, model)]
    fabric.setup_module(nn.Linear(2, 2))  # as in Lightning, setup_module does not call it
    assert len(seen) == 1


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_every_optimizer_step_is_followed_by_on_after_optimizer_step(scheduler_first):
    seen = []

    class AfterStep:
        def on_after_optimizer_step(self, strategy, optimizer):
            seen.append((strategy, optimizer, optimizer.state_dict()["state"][1]["momentum_buffer"].clone()))

    fabric = Fabric(accelerator="cpu", callbacks=[AfterStep()])
    module = nn.Linear(2, 1)
    original = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    # An LR scheduler patches the step it finds: the user's optimizer's before setup, the set-up one's after.
    scheduler = torch.optim.lr_scheduler.StepLR(original, 1) if scheduler_first else None
    model, optimizer = fabric.setup(module, original)
    scheduler = scheduler or torch.optim.lr_scheduler.StepLR(optimizer, 1)
    for _ in range(2):
        fabric.backward(model(torch.ones(1, 2)).sum())
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    optimizer.load_state_dict(optimizer.state_dict())  # torch re-patches the step of the optimizer's class here
    fabric.backward(model(torch.ones(1, 2)).sum())
    optimizer.step()

    assert [(strategy, opt) for strategy, opt, _ in seen] == [(fabric.strategy, original)] * 3
    assert [buffer.item() for *_, buffer in seen] == pytest.approx(
        [1.0, 1.9, 2.71]
    )  # the bias: one real step each time
