"""Lightning Fabric's behaviours that a user switching by import relies on (issue 17): errors catchable as
Lightning's, ``fabric.call`` and the hooks Fabric calls itself, strategies' call forms, ``CheckpointIO`` plugins."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest
import torch

from fabric_ckpt import (
    AttributeDict,
    CheckpointError,
    DDPStrategy,
    Fabric,
    FolderNotACheckpointError,
    FSDPStrategy,
)
from tests.conftest import make_net


class TestErrorsCatchableAsLightnings:
    def test_a_folder_that_is_not_a_checkpoint_is_an_is_a_directory_error(self, tmp_path, fabric):
        (tmp_path / "notes.txt").write_text("not a checkpoint")
        for load in (lambda: fabric.load(tmp_path), lambda: fabric.load(tmp_path, {"model": make_net()})):
            with pytest.raises(IsADirectoryError, match="does not point to a valid checkpoint") as info:
                load()
            assert isinstance(info.value, CheckpointError) and isinstance(info.value, FolderNotACheckpointError)
            assert str(tmp_path) in str(info.value)
        with pytest.raises(IsADirectoryError):
            fabric.load_raw(tmp_path, make_net())

    def test_under_fsdp_the_same_error_is_a_value_error(self, tmp_path):
        with pytest.raises(ValueError, match="does not point to a valid checkpoint") as info:
            FSDPStrategy().load_checkpoint(tmp_path, {"step": 0})  # Lightning's FSDP raises ValueError here
        assert isinstance(info.value, CheckpointError)

    def test_deleting_a_missing_key_of_attribute_dict_is_a_key_error_and_an_attribute_error(self):
        state = AttributeDict(step=1)
        with pytest.raises(KeyError, match="no attribute 'epoch'"):
            del state.epoch
        with pytest.raises(AttributeError, match="no attribute 'epoch'"):
            del state.epoch
        del state.step
        assert state == {}


class TestCallbacks:
    def test_call_passes_each_callback_only_the_keywords_its_hook_takes(self):
        class TakesEpoch:
            def on_epoch_end(self, epoch):
                self.seen = {"epoch": epoch}

        class TakesEverything:
            def on_epoch_end(self, epoch, **rest):
                self.seen = {"epoch": epoch, **rest}

        class TakesNothing:
            def on_epoch_end(self):
                self.seen = {}

        class TakesPositionalAndKeyword:
            def on_epoch_end(self, tag, *, loss):
                self.seen = {"tag": tag, "loss": loss}

        callbacks = [TakesEpoch(), TakesEverything(), TakesNothing()]
        Fabric(accelerator="cpu", callbacks=callbacks).call("on_epoch_end", epoch=2, loss=0.5)
        assert [c.seen for c in callbacks] == [{"epoch": 2}, {"epoch": 2, "loss": 0.5}, {}]

        mixed = TakesPositionalAndKeyword()
        Fabric(accelerator="cpu", callbacks=[mixed]).call("on_epoch_end", "val", loss=0.25, epoch=3)
        assert mixed.seen == {"tag": "val", "loss": 0.25}

    def test_a_hook_taking_keywords_through_a_partial_gets_every_keyword(self):
        seen = []

        class Recorder:
            def __init__(self):
                self.on_epoch_end = functools.partial(lambda **kw: seen.append(kw))

        Fabric(accelerator="cpu", callbacks=[Recorder()]).call("on_epoch_end", epoch=1, loss=2.0)
        assert seen == [{"epoch": 1, "loss": 2.0}]

    def test_a_non_callable_attribute_is_skipped_with_lightnings_warning(self):
        class Configured:
            on_epoch_end = "not a method"

        calls = []

        class Listening:
            def on_epoch_end(self):
                calls.append(1)

        fabric = Fabric(accelerator="cpu", callbacks=[Configured(), Listening()])
        with pytest.warns(UserWarning, match=r"Skipping the callback `Configured.on_epoch_end` because it is not call"):
            fabric.call("on_epoch_end")
        assert calls == [1]

    def test_fabric_calls_on_after_setup_and_on_after_optimizer_step_as_lightning(self):
        events = []

        class Watcher:
            def on_after_setup(self, fabric, module):
                events.append(("setup", fabric, module))

            def on_after_optimizer_step(self, strategy, optimizer):
                events.append(("step", strategy, optimizer, optimizer.state_dict()["state"][0]["step"].item()))

        fabric = Fabric(accelerator="cpu", callbacks=[Watcher()])
        model = make_net()
        optimizer = torch.optim.Adam(model.parameters())
        wrapped_model, wrapped_optimizer = fabric.setup(model, optimizer)
        assert events == [("setup", fabric, wrapped_model)]
        scheduler = torch.optim.lr_scheduler.StepLR(wrapped_optimizer, step_size=1)
        for _ in range(2):
            fabric.backward(wrapped_model(torch.randn(4, 4)).sum())
            wrapped_optimizer.step()
            scheduler.step()
        assert events[1:] == [("step", fabric.strategy, optimizer, 1.0), ("step", fabric.strategy, optimizer, 2.0)]
        fabric.setup_module(make_net())  # Lightning calls on_after_setup from setup() only
        assert len(events) == 3

    def test_a_callback_appended_after_setup_still_sees_every_step(self, fabric):
        # A LightningModule set up later becomes a callback after optimizers were set up: every set-up optimizer
        # steps through Fabric, so a callback added afterwards is reached too.
        model = make_net()
        _, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        steps = []

        class Late:
            def on_after_optimizer_step(self, strategy, optimizer):
                steps.append(optimizer)

        fabric._callbacks.append(Late())
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        assert len(steps) == 1


class TestStrategyNames:
    @pytest.mark.parametrize("name", ["ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true"])
    def test_lightnings_cpu_ddp_names_give_a_ddp_strategy_of_the_requested_size(self, name):
        fabric = Fabric(accelerator="cpu", strategy=name, devices=3)
        assert isinstance(fabric.strategy, DDPStrategy)
        assert fabric.world_size == 3
        expected = {"find_unused_parameters": True} if name.endswith("_true") else {}
        assert fabric.strategy._ddp_kwargs == expected

    def test_launch_under_main_runs_the_function_with_its_arguments_in_each_process(self, tmp_path):
        script = tmp_path / "spawned.py"
        script.write_text(
            textwrap.dedent("""
            import sys
            from fabric_ckpt import Fabric

            def train(fabric, scale, *, label):
                sys.stdout.write(f"{label} rank={fabric.global_rank}/{fabric.world_size} got={scale * 2}\\n")
                sys.stdout.flush()
                return fabric.global_rank

            if __name__ == "__main__":
                fabric = Fabric(accelerator="cpu", strategy="ddp_spawn", devices=2)
                fabric.launch(train, 21, label="run")
            """)
        )
        outcome = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
        assert outcome.returncode == 0, outcome.stderr
        lines = sorted(line for line in outcome.stdout.splitlines() if line.startswith("run "))
        assert lines == ["run rank=0/2 got=42", "run rank=1/2 got=42"]


class TestSetUpObjectsActAsLightnings:
    """What Lightning's wrapper tests check, through the public ``fabric.setup`` (their private constructors take
    Lightning's own strategy objects)."""

    def test_a_set_up_module_reads_and_writes_the_users_module(self, fabric):
        original = make_net()
        model = fabric.setup(original)
        assert model.fc1 is original.fc1 and model.module is original
        model.temperature = 2.0
        assert original.temperature == 2.0
        assert list(model.state_dict()) == list(original.state_dict())  # no wrapper prefix
        replacement = make_net(seed=9).state_dict()
        model.load_state_dict(replacement)
        assert torch.equal(original.fc1.weight, replacement["fc1.weight"])

    def test_a_set_up_optimizer_is_the_users_class_and_shares_its_state(self, fabric):
        model = make_net()
        original = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _, optimizer = fabric.setup(model, original)
        assert isinstance(optimizer, torch.optim.SGD) and type(optimizer).__name__ == "FabricSGD"
        assert optimizer.optimizer is original
        fabric.backward(model(torch.randn(4, 4)).sum())
        optimizer.step()
        assert optimizer.state_dict()["state"].keys() == original.state_dict()["state"].keys() != set()
        fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        _, fresh_wrapped = Fabric(accelerator="cpu").setup(make_net(), fresh)
        fresh_wrapped.load_state_dict(original.state_dict())
        assert fresh.param_groups[0]["lr"] == 0.1 and fresh.state

    def test_zero_grad_takes_the_optimizers_own_arguments(self, fabric):
        calls = []

        class CustomSGD(torch.optim.SGD):
            def zero_grad(self, set_grads_to_None=False):
                calls.append(set_grads_to_None)

        model = make_net()
        _, optimizer = fabric.setup(model, CustomSGD(model.parameters(), lr=0.1))
        optimizer.zero_grad()
        optimizer.zero_grad(set_grads_to_None=True)
        assert calls == [False, True]


def test_launch_refuses_what_it_cannot_call_with_lightnings_words(fabric):
    def no_arguments():
        pass

    with pytest.raises(TypeError, match="needs to take at least one argument"):
        fabric.launch(no_arguments)
    with pytest.raises(TypeError, match=r"needs to be a callable, but got None\. HINT"):
        fabric.launch(None)  # e.g. launch(train(fabric)) instead of launch(train)
    assert fabric.launch(lambda f, x: (f is fabric, x), 3) == (True, 3)
