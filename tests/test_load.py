"""fabric.load: in-place restore, the remainder, strictness, hooks, and memory that does not alias the file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fabric_ckpt import AttributeDict, CheckpointMismatchError, Fabric
from tests.conftest import assert_same_state, make_net, snapshot, trained


@pytest.fixture
def saved(tmp_path, fabric):
    """A checkpoint of a trained model, its optimizer, a scheduler and plain values; plus their snapshots."""
    model, optimizer = trained(seed=1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    path = tmp_path / "c.ckpt"
    fabric.save(
        path,
        {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "step": 42,
            "extra": {"t": torch.arange(4.0), "name": "run-1"},
        },
    )
    return path, snapshot(model), snapshot(optimizer), scheduler.state_dict()


def fresh(seed=99):
    model = make_net(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def test_restores_every_object_in_place_and_returns_the_remainder(saved, fabric):
    path, model_state, optimizer_state, scheduler_state = saved
    model, optimizer, scheduler = fresh()
    parameters_before = [(p, p.data_ptr()) for p in model.parameters()]
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}
    remainder = fabric.load(path, state)
    assert_same_state(snapshot(model), model_state)
    assert_same_state(snapshot(optimizer), optimizer_state)
    assert scheduler.state_dict() == scheduler_state
    assert state["step"] == 42 and state["model"] is model  # plain values replaced, objects kept
    assert all(
        p is q and p.data_ptr() == ptr for (p, ptr), q in zip(parameters_before, model.parameters(), strict=False)
    )
    assert list(remainder) == ["extra"]
    assert torch.equal(remainder["extra"]["t"], torch.arange(4.0)) and remainder["extra"]["name"] == "run-1"


def test_partial_request_returns_everything_else(saved, fabric):
    path, model_state, _, _ = saved
    model = make_net(5)
    remainder = fabric.load(path, {"model": model})
    assert_same_state(snapshot(model), model_state)
    assert sorted(remainder) == ["extra", "optimizer", "scheduler", "step"]
    assert remainder["step"] == 42
    assert remainder["optimizer"]["param_groups"][0]["lr"] == 0.005


@pytest.mark.parametrize("state", [None, {}])
def test_without_state_returns_the_whole_checkpoint_on_cpu(saved, fabric, state):
    path, model_state, _, _ = saved
    checkpoint = fabric.load(path, state)
    assert sorted(checkpoint) == ["extra", "model", "optimizer", "scheduler", "step"]
    assert_same_state(dict(checkpoint["model"]), model_state)
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())


def test_setup_and_compiled_objects_load_in_place(saved, fabric):
    path, model_state, optimizer_state, _ = saved
    model, optimizer, _ = fresh()
    wrapped, wrapped_optimizer = fabric.setup(torch.compile(model), optimizer)
    fabric.load(path, {"model": wrapped, "optimizer": wrapped_optimizer}, strict=False)
    assert_same_state(snapshot(model), model_state)
    assert_same_state(snapshot(optimizer), optimizer_state)


def test_attribute_dict_state_gets_plain_values(saved, fabric):
    path, *_ = saved
    state = AttributeDict(model=make_net(3), step=0)
    fabric.load(path, state)
    assert state.step == 42


class TestStrict:
    def test_missing_key_raises_key_error_naming_it(self, saved, fabric):
        path, *_ = saved
        model = make_net(7)
        before = snapshot(model)
        with pytest.raises(KeyError, match=r"'epoch' that does not exist in the loaded checkpoint.*strict=False"):
            fabric.load(path, {"model": model, "epoch": 0})
        assert_same_state(snapshot(model), before)  # checked before anything was restored

    def test_non_strict_skips_missing_keys(self, saved, fabric):
        path, model_state, _, _ = saved
        state = {"model": make_net(7), "epoch": 3}
        remainder = fabric.load(path, state, strict=False)
        assert state["epoch"] == 3
        assert_same_state(snapshot(state["model"]), model_state)
        assert "epoch" not in remainder

    def test_module_keys_must_match_when_strict(self, tmp_path, fabric):
        fabric.save(tmp_path / "c.ckpt", {"model": nn.Linear(2, 2, bias=True)})
        target = nn.Linear(2, 2, bias=False)
        before = snapshot(target)
        with pytest.raises(CheckpointMismatchError, match=r"missing keys \[\], unexpected keys \['bias'\]"):
            fabric.load(tmp_path / "c.ckpt", {"model": target})
        assert_same_state(snapshot(target), before)

    def test_non_strict_loads_the_matching_keys(self, tmp_path, fabric):
        # The example from Lightning's docs: the new model lacks a parameter.
        source = nn.Linear(2, 2, bias=True)
        fabric.save(tmp_path / "c.ckpt", {"model": source})
        target = nn.Linear(2, 2, bias=False)
        fabric.load(tmp_path / "c.ckpt", {"model": target}, strict=False)
        assert torch.equal(target.weight, source.weight)

    def test_strict_loading_attribute_false_wins_over_strict(self, tmp_path, fabric):
        class Partial(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = nn.Linear(2, 2)
                self.decoder = nn.Linear(2, 2)
                self.strict_loading = False

            def state_dict(self, *args, **kwargs):
                return {k: v for k, v in super().state_dict(*args, **kwargs).items() if "encoder" not in k}

        torch.manual_seed(0)
        source = Partial()
        fabric.save(tmp_path / "c.ckpt", {"model": source})
        torch.manual_seed(1)
        target = Partial()
        encoder_before = target.encoder.weight.clone()
        fabric.load(tmp_path / "c.ckpt", {"model": target}, strict=True)
        assert torch.equal(target.decoder.weight, source.decoder.weight)
        assert torch.equal(target.encoder.weight, encoder_before)


class TestOptimizerState:
    def test_live_optimizer_state_tensors_are_reused(self, saved, fabric):
        path, _, optimizer_state, _ = saved
        model, optimizer = trained(seed=8)  # has state of its own
        tensors_before = {(id(p), k): v for p, s in optimizer.state.items() for k, v in s.items()}
        fabric.load(path, {"model": model, "optimizer": optimizer})
        assert_same_state(snapshot(optimizer), optimizer_state)
        for p, s in optimizer.state.items():
            for k, v in s.items():
                assert v is tensors_before[(id(p), k)], k  # copied into, not replaced

    def test_restored_state_does_not_alias_the_checkpoint_file(self, saved, fabric):
        path, model_state, optimizer_state, _ = saved
        model, optimizer, _ = fresh()
        remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
        # Overwrite the file's bytes in place: anything still mapped from it would change.
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(b"\xff" * size)
        assert_same_state(snapshot(model), model_state)
        assert_same_state(snapshot(optimizer), optimizer_state)
        assert torch.equal(remainder["extra"]["t"], torch.arange(4.0))

    def test_training_continues_identically_after_resume(self, tmp_path, fabric):
        reference, reference_opt = trained(seed=2, steps=6)
        model, optimizer = trained(seed=2, steps=3)
        fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
        resumed = make_net(50)
        resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.01)
        fabric.load(tmp_path / "c.ckpt", {"model": resumed, "optimizer": resumed_opt})
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):  # the batches the first three steps consumed
            torch.randn(6, 4, generator=generator)
        for _ in range(3):
            loss = resumed(torch.randn(6, 4, generator=generator)).pow(2).mean()
            resumed_opt.zero_grad()
            loss.backward()
            resumed_opt.step()
        assert_same_state(snapshot(resumed), snapshot(reference))
        assert_same_state(snapshot(resumed_opt), snapshot(reference_opt))


class TestLoadHooks:
    def test_hooks_see_the_checkpoint_before_restoring_and_their_edits_are_restored(self, tmp_path):
        calls = []

        class HookedNet(nn.Linear):
            def on_load_checkpoint(self, checkpoint):
                calls.append(("module", sorted(checkpoint)))
                checkpoint["model"]["bias"] = torch.full((2,), 7.0)

        class Callback:
            def on_load_checkpoint(self, checkpoint):
                calls.append(("callback", sorted(checkpoint)))
                checkpoint["step"] = checkpoint["step"] + 1

        fabric = Fabric(accelerator="cpu", callbacks=Callback())
        fabric.save(tmp_path / "c.ckpt", {"model": HookedNet(2, 2), "step": 1})
        model = HookedNet(2, 2)
        state = {"model": model, "step": 0}
        fabric.load(tmp_path / "c.ckpt", state)
        assert calls == [("module", ["model", "step"]), ("callback", ["model", "step"])]
        assert torch.equal(model.bias, torch.full((2,), 7.0)) and state["step"] == 2

    def test_callback_hook_runs_when_loading_without_state(self, tmp_path):
        class Callback:
            def on_load_checkpoint(self, checkpoint):
                checkpoint["seen"] = True

        fabric = Fabric(accelerator="cpu", callbacks=[Callback()])
        fabric.save(tmp_path / "c.ckpt", {"step": 1})
        assert fabric.load(tmp_path / "c.ckpt") == {"step": 1, "seen": True}
