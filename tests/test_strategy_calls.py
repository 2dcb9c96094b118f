"""Strategies take Lightning's call forms, and ``Fabric(plugins=[CheckpointIO])`` hands all single-file I/O to a
user's ``CheckpointIO`` (issue 17)."""

from __future__ import annotations

import io

import pytest
import torch

from fabric_ckpt import CheckpointMismatchError, Fabric, FSDPStrategy, SingleDeviceStrategy, StorageOptions, verify
from fabric_ckpt.strategies.checkpoint_io import FabricCheckpointIO
from tests.conftest import assert_same_state, make_net, snapshot, trained


class DictCheckpointIO:
    """A user's CheckpointIO with no base class: keeps checkpoints as bytes in a dict, records every call."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.calls: list[tuple[str, object]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.calls.append(("save", path, storage_options))
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.blobs[str(path)] = buffer.getvalue()

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        self.calls.append(("load", path, weights_only))
        return torch.load(io.BytesIO(self.blobs[str(path)]), weights_only=weights_only)

    def remove_checkpoint(self, path):
        self.calls.append(("remove", path))
        self.blobs.pop(str(path), None)


class TestLightningCallForms:
    def test_save_checkpoint_takes_storage_options_and_filter(self, tmp_path):
        strategy = SingleDeviceStrategy()
        model = make_net()
        strategy.save_checkpoint(tmp_path / "a.ckpt", {"model": model}, None, {"model": lambda k, v: "fc1" in k})
        strategy.save_checkpoint(
            path=tmp_path / "b.ckpt", state={"step": 1}, storage_options=StorageOptions(retries=1), filter=None
        )
        assert list(torch.load(tmp_path / "a.ckpt")["model"]) == ["fc1.weight", "fc1.bias"]
        assert torch.load(tmp_path / "b.ckpt") == {"step": 1}
        with pytest.raises(
            TypeError, match=r"SingleDeviceStrategy.save_checkpoint\(..., storage_options=...\)` is not"
        ):
            strategy.save_checkpoint(tmp_path / "c.ckpt", {"step": 1}, storage_options={"anon": True})
        assert not (tmp_path / "c.ckpt").exists()

    def test_load_checkpoint_with_strict_as_lightning_calls_it(self, tmp_path):
        strategy = SingleDeviceStrategy()
        model, optimizer = trained(seed=1)
        strategy.save_checkpoint(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "step": 4})
        fresh = make_net(seed=2)
        remainder = strategy.load_checkpoint(tmp_path / "c.ckpt", {"model": fresh, "extra": 0}, False)
        assert_same_state(snapshot(fresh), snapshot(model))
        assert sorted(remainder) == ["optimizer", "step"]
        with pytest.raises(KeyError, match="contains a key 'extra' that does not exist"):
            strategy.load_checkpoint(tmp_path / "c.ckpt", {"extra": 0}, strict=True)

    def test_load_checkpoint_into_a_module_or_optimizer_is_a_raw_load_returning_nothing(self, tmp_path):
        strategy = SingleDeviceStrategy()
        model, optimizer = trained(seed=1)
        torch.save(model.state_dict(), tmp_path / "model.pt")
        torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
        fresh, fresh_optimizer = trained(seed=2)
        assert strategy.load_checkpoint(tmp_path / "model.pt", state=fresh) == {}
        assert strategy.load_checkpoint(tmp_path / "optimizer.pt", state=fresh_optimizer) == {}
        assert_same_state(snapshot(fresh), snapshot(model))
        assert_same_state(snapshot(fresh_optimizer), snapshot(optimizer))

    def test_load_module_state_dict_is_strict_by_default(self):
        strategy = SingleDeviceStrategy()
        model = make_net()
        partial = {k: v for k, v in make_net(seed=3).state_dict().items() if k != "fc2.bias"}
        with pytest.raises(RuntimeError, match="Missing key"):
            strategy.load_module_state_dict(model, partial)
        strategy.load_module_state_dict(model, partial, strict=False)
        assert torch.equal(model.fc1.weight, partial["fc1.weight"])

    def test_a_strategy_written_for_lightnings_signatures_is_called_with_them(self, tmp_path):
        calls = []

        class LightningStyle(SingleDeviceStrategy):
            def save_checkpoint(self, path, state, storage_options=None, filter=None):
                calls.append(("save", path, sorted(state), filter))
                super().save_checkpoint(path, state, storage_options, filter)

            def load_checkpoint(self, path, state=None, strict=True, weights_only=None):
                calls.append(("load", path, strict, weights_only))
                return super().load_checkpoint(path, state, strict, weights_only)

        fabric = Fabric(strategy=LightningStyle())
        model = make_net()
        path = tmp_path / "c.ckpt"
        fabric.save(path, {"model": model, "step": 1})
        assert fabric.load(path, {"model": make_net(seed=5)}, strict=False) == {"step": 1}
        assert calls == [("save", path, ["model", "step"], None), ("load", path, False, None)]


class TestCheckpointIOPlugin:
    def test_a_users_checkpoint_io_does_all_the_io_once_per_save_and_load(self, tmp_path):
        checkpoint_io = DictCheckpointIO()
        fabric = Fabric(accelerator="cpu", plugins=[checkpoint_io])
        assert fabric.strategy.checkpoint_io is checkpoint_io
        model, optimizer = trained(seed=1)
        path = tmp_path / "run" / "last.ckpt"
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": 7})
        assert checkpoint_io.calls == [("save", path, None)]  # the path exactly as given
        assert not (tmp_path / "run").exists()  # we touched nothing on disk

        fresh, fresh_optimizer = trained(seed=2)
        remainder = fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer})
        assert remainder == {"step": 7}
        assert checkpoint_io.calls[1:] == [("load", path, True)]
        assert_same_state(snapshot(fresh), snapshot(model))
        assert_same_state(snapshot(fresh_optimizer), snapshot(optimizer))

    def test_validation_still_guards_loads_through_a_users_checkpoint_io(self, tmp_path):
        checkpoint_io = DictCheckpointIO()
        fabric = Fabric(accelerator="cpu", plugins=checkpoint_io)  # one plugin, not in a list, as Lightning allows
        fabric.save("mem/c.ckpt", {"model": make_net(width=8)})
        wider = make_net(width=16)
        before = snapshot(wider)
        with pytest.raises(CheckpointMismatchError, match="shape"):
            fabric.load("mem/c.ckpt", {"model": wider})
        assert_same_state(snapshot(wider), before)
        with pytest.raises(KeyError, match="contains a key 'step'"):
            fabric.load("mem/c.ckpt", {"step": 0})

    def test_save_async_and_load_raw_go_through_it_too(self, tmp_path):
        checkpoint_io = DictCheckpointIO()
        fabric = Fabric(accelerator="cpu", plugins=[checkpoint_io])
        model = make_net()
        fabric.save_async("mem/async.ckpt", {"model": model}).wait()
        checkpoint_io.save_checkpoint(model.state_dict(), "mem/raw.pt")
        fresh = make_net(seed=4)
        fabric.load_raw("mem/raw.pt", fresh)
        assert_same_state(snapshot(fresh), snapshot(model))
        assert [call[0] for call in checkpoint_io.calls] == ["save", "save", "load"]

    def test_lightnings_fabric_ckpt_io_plugs_into_our_fabric(self, tmp_path):
        pytest.importorskip("lightning")
        from fabric_ckpt.lightning import FabricCkptIO

        fabric = Fabric(accelerator="cpu", plugins=[FabricCkptIO()])
        model, optimizer = trained(seed=1)
        fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
        assert verify(tmp_path / "c.ckpt").ok
        fresh, fresh_optimizer = trained(seed=2)
        fabric.load(tmp_path / "c.ckpt", {"model": fresh, "optimizer": fresh_optimizer})
        assert_same_state(snapshot(fresh), snapshot(model))

    def test_the_default_checkpoint_io_is_ours_and_a_replaced_method_is_honoured(self, tmp_path):
        fabric = Fabric(accelerator="cpu")
        assert isinstance(fabric.strategy.checkpoint_io, FabricCheckpointIO)
        fabric.save(tmp_path / "c.ckpt", {"step": 1})
        assert verify(tmp_path / "c.ckpt").ok
        seen = []
        fabric.strategy.checkpoint_io.load_checkpoint = lambda path, **kw: seen.append(path) or {"step": 2}
        assert fabric.load(tmp_path / "c.ckpt") == {"step": 2}
        assert seen == [tmp_path / "c.ckpt"]

    def test_what_is_not_a_checkpoint_io_is_refused(self):
        with pytest.raises(ValueError, match=r"takes a CheckpointIO .*got 'bf16-mixed'.*precision="):
            Fabric(accelerator="cpu", plugins=["bf16-mixed"])
        with pytest.raises(ValueError, match="got 2 CheckpointIO plugins"):
            Fabric(accelerator="cpu", plugins=[DictCheckpointIO(), DictCheckpointIO()])
        with pytest.raises(TypeError, match=r"has no callable \['remove_checkpoint'\]"):
            SingleDeviceStrategy().checkpoint_io = type(
                "Partial", (), {"save_checkpoint": print, "load_checkpoint": print}
            )()

    def test_fsdp_sharded_folders_cannot_go_through_a_checkpoint_io(self):
        with pytest.raises(ValueError, match="state_dict_type='full'"):
            Fabric(accelerator="cpu", strategy=FSDPStrategy(), plugins=[DictCheckpointIO()])
        strategy = FSDPStrategy(state_dict_type="full")
        strategy.checkpoint_io = DictCheckpointIO()  # one file from rank 0: it can


def test_checkpoint_hooks_can_be_turned_off(tmp_path):
    class Hooked(torch.nn.Linear):
        calls = 0

        def on_save_checkpoint(self, checkpoint):
            Hooked.calls += 1

        def on_load_checkpoint(self, checkpoint):
            Hooked.calls += 1

    class Callback:
        def on_save_checkpoint(self, checkpoint):
            Hooked.calls += 1

    for enabled, expected in ((True, 3), (False, 0)):
        Hooked.calls = 0
        fabric = Fabric(accelerator="cpu", callbacks=[Callback()], checkpoint_hooks=enabled)
        model = Hooked(2, 2)
        fabric.save(tmp_path / "c.ckpt", {"model": model})
        fabric.load(tmp_path / "c.ckpt", {"model": model})
        assert Hooked.calls == expected
    with pytest.raises(TypeError, match="checkpoint_hooks must be True or False"):
        Fabric(accelerator="cpu", checkpoint_hooks="no")
