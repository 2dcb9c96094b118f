"""fabric.save: what is written, filters, wrappers, stateful objects and hooks."""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fabric_ckpt import AttributeDict, Fabric
from fabric_ckpt.core.collector import collector_paused
from fabric_ckpt.storage.temporaries import wait_for_deletions
from tests.conftest import assert_same_state, make_net, snapshot, trained


def read(path):
    return torch.load(path, weights_only=True)


def test_writes_exactly_the_given_state(tmp_path, fabric):
    model, optimizer = trained()
    fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "step": 7, "note": "hi"})
    saved = read(tmp_path / "c.ckpt")
    assert list(saved) == ["model", "optimizer", "step", "note"]
    assert list(saved["model"]) == list(model.state_dict())
    assert "scratch" not in saved["model"]  # non-persistent buffers are not state
    assert saved["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert saved["step"] == 7 and saved["note"] == "hi"


def test_overwrites_an_existing_checkpoint_and_creates_parent_folders(tmp_path, fabric):
    path = tmp_path / "a" / "b" / "c.ckpt"
    fabric.save(path, {"step": 1})
    fabric.save(path, {"step": 2, "other": [1, 2]})
    assert read(path) == {"step": 2, "other": [1, 2]}
    wait_for_deletions()  # the save frees the checkpoint it replaced in the background
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.ckpt"]


def test_setup_module_and_optimizer_are_saved_without_wrapper_prefixes(tmp_path, fabric):
    model, optimizer = trained()
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_optimizer = optimizer.state_dict()
    wrapped_model, wrapped_optimizer = fabric.setup(model, optimizer)
    fabric.save(tmp_path / "c.ckpt", {"model": wrapped_model, "optimizer": wrapped_optimizer})
    saved = read(tmp_path / "c.ckpt")
    assert list(saved["model"]) == list(expected_model)
    assert all(torch.equal(saved["model"][k], v) for k, v in expected_model.items())
    assert saved["optimizer"]["param_groups"] == expected_optimizer["param_groups"]


def test_compiled_module_is_saved_without_orig_mod_prefix(tmp_path, fabric):
    model = make_net()
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    fabric.save(tmp_path / "plain.ckpt", {"model": compiled})
    fabric.save(tmp_path / "setup.ckpt", {"model": fabric.setup(torch.compile(make_net()))})
    assert list(read(tmp_path / "plain.ckpt")["model"]) == list(model.state_dict())
    assert list(read(tmp_path / "setup.ckpt")["model"]) == list(model.state_dict())


def test_stateful_objects_are_saved_as_their_state_dicts(tmp_path, fabric):
    _model, optimizer = trained()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    class Counter:
        def __init__(self):
            self.count = 5

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    fabric.save(tmp_path / "c.ckpt", {"scheduler": scheduler, "scaler": scaler, "counter": Counter()})
    saved = read(tmp_path / "c.ckpt")
    assert saved["scheduler"] == scheduler.state_dict()
    assert saved["scaler"] == scaler.state_dict()
    assert saved["counter"] == {"count": 5}


def test_attribute_dict_state_and_values_become_plain_dicts_loadable_safely(tmp_path, fabric):
    state = AttributeDict(step=3, hparams=AttributeDict(lr=0.1, layers=[AttributeDict(width=4)]))
    fabric.save(tmp_path / "c.ckpt", state)
    saved = read(tmp_path / "c.ckpt")  # weights_only=True would refuse an AttributeDict
    assert saved == {"step": 3, "hparams": {"lr": 0.1, "layers": [{"width": 4}]}}
    assert type(saved["hparams"]) is dict and type(saved["hparams"]["layers"][0]) is dict


class TestFilter:
    def test_keeps_only_accepted_items_and_the_module_state_dict_type(self, tmp_path, fabric):
        model = make_net()
        fabric.save(tmp_path / "c.ckpt", {"model": model, "foo": 123}, filter={"model": lambda k, v: "weight" in k})
        saved = read(tmp_path / "c.ckpt")
        assert list(saved["model"]) == [k for k in model.state_dict() if "weight" in k]
        assert isinstance(saved["model"], OrderedDict)
        assert saved["model"]._metadata == model.state_dict()._metadata  # version info kept for loading
        assert saved["foo"] == 123

    def test_receives_keys_and_values(self, tmp_path, fabric):
        model = make_net()
        seen = []
        fabric.save(
            tmp_path / "c.ckpt",
            {"model": model},
            filter={"model": lambda k, v: seen.append((k, v.shape)) or v.dim() == 1},
        )
        assert seen == [(k, v.shape) for k, v in model.state_dict().items()]
        assert list(read(tmp_path / "c.ckpt")["model"]) == [k for k, v in model.state_dict().items() if v.dim() == 1]

    def test_applies_to_optimizer_and_plain_dict_entries(self, tmp_path, fabric):
        _model, optimizer = trained()
        fabric.save(
            tmp_path / "c.ckpt",
            {"optimizer": optimizer, "meta": {"a": 1, "b": 2}},
            filter={"optimizer": lambda k, v: k == "param_groups", "meta": lambda k, v: v > 1},
        )
        saved = read(tmp_path / "c.ckpt")
        assert list(saved["optimizer"]) == ["param_groups"]
        assert saved["meta"] == {"b": 2}

    def test_rejecting_everything_drops_the_entry_and_the_file_still_loads(self, tmp_path, fabric):
        model, optimizer = trained()
        state = {"model": model, "optimizer": optimizer, "meta": {"a": 1}, "step": 3}
        fabric.save(tmp_path / "c.ckpt", state, filter=dict.fromkeys(state, lambda k, v: False))
        assert read(tmp_path / "c.ckpt") == {"step": 3}  # as Lightning: emptied entries are left out
        fresh_model = make_net(seed=9)
        fresh_optimizer = torch.optim.Adam(fresh_model.parameters())
        before = snapshot(fresh_model)
        remainder = fabric.load(tmp_path / "c.ckpt", {"model": fresh_model, "optimizer": fresh_optimizer}, strict=False)
        assert remainder == {"step": 3}
        assert_same_state(snapshot(fresh_model), before)
        with pytest.raises(KeyError, match=r"contains a key 'model' that does not exist"):
            fabric.load(tmp_path / "c.ckpt", {"model": fresh_model})

    def test_not_a_dict_is_a_type_error(self, tmp_path, fabric):
        with pytest.raises(TypeError, match=r"Filter should be a dictionary, given \[<function"):
            fabric.save(tmp_path / "c.ckpt", {"model": make_net()}, filter=[lambda k, v: True])

    def test_key_not_in_state_is_a_value_error_naming_it(self, tmp_path, fabric):
        with pytest.raises(ValueError, match=r"filter keys \{'modle'\} are not present in the state keys \{'model'\}"):
            fabric.save(tmp_path / "c.ckpt", {"model": make_net()}, filter={"modle": lambda k, v: True})
        assert not (tmp_path / "c.ckpt").exists()

    def test_non_callable_is_a_type_error_naming_the_key(self, tmp_path, fabric):
        with pytest.raises(TypeError, match=r"filter=...\)` for key 'model' to be a callable, given 'weight'"):
            fabric.save(tmp_path / "c.ckpt", {"model": make_net()}, filter={"model": "weight"})

    def test_filter_on_a_non_dict_entry_saves_it_unfiltered(self, tmp_path, fabric):
        fabric.save(tmp_path / "c.ckpt", {"step": 3, "tags": ["a"]}, filter={"step": lambda k, v: False, "tags": bool})
        assert read(tmp_path / "c.ckpt") == {"step": 3, "tags": ["a"]}


def test_state_must_be_a_dict(tmp_path, fabric):
    with pytest.raises(TypeError, match=r"`state` must be a dict .* got list"):
        fabric.save(tmp_path / "c.ckpt", [make_net()])


class TestSaveHooks:
    def test_module_and_callback_hooks_add_entries_before_writing(self, tmp_path):
        calls = []

        class HookedNet(nn.Linear):
            def on_save_checkpoint(self, checkpoint):
                calls.append(("module", sorted(checkpoint)))
                checkpoint["from_module"] = torch.arange(3)

        class Callback:
            def on_save_checkpoint(self, checkpoint):
                calls.append(("callback", sorted(checkpoint)))
                checkpoint["from_callback"] = {"epoch": 4}

        fabric = Fabric(accelerator="cpu", callbacks=[Callback()])
        model = fabric.setup(HookedNet(2, 2))
        fabric.save(tmp_path / "c.ckpt", {"model": model, "step": 1})
        assert calls == [("callback", ["model", "step"]), ("module", ["from_callback", "model", "step"])]
        saved = read(tmp_path / "c.ckpt")
        assert torch.equal(saved["from_module"], torch.arange(3)) and saved["from_callback"] == {"epoch": 4}

    def test_a_module_listed_twice_is_called_once(self, tmp_path, fabric):
        calls = []

        class HookedNet(nn.Linear):
            def on_save_checkpoint(self, checkpoint):
                calls.append(1)

        model = HookedNet(2, 2)
        fabric.save(tmp_path / "c.ckpt", {"a": model, "b": fabric.setup(model)})
        assert calls == [1]


def _many_small_tensors(count: int = 3000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(8, generator=generator) for i in range(count)}


def test_a_save_of_many_small_tensors_pauses_the_garbage_collector_and_resumes_it(tmp_path, fabric):
    """Full collections would walk the heap hundreds of times while a many-tensor save builds its small objects."""
    state = _many_small_tensors()
    collections: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        fabric.save(tmp_path / "paused.ckpt", state)
        during = len(collections)
        collections.clear()
        with open(tmp_path / "unpaused.pt", "wb") as f:  # the same object, pickled by torch with the collector on
            torch.save(state, f)
        by_torch = len(collections)
    finally:
        gc.callbacks.remove(count)
    assert gc.isenabled()
    assert by_torch >= 10 and during <= by_torch // 4, (during, by_torch)
    loaded = fabric.load(tmp_path / "paused.ckpt")
    assert all(torch.equal(loaded[name], value) for name, value in state.items())


def test_a_save_leaves_a_disabled_garbage_collector_disabled(tmp_path, fabric):
    gc.disable()
    try:
        fabric.save(tmp_path / "c.ckpt", _many_small_tensors(100))
        fabric.save_async(tmp_path / "d.ckpt", _many_small_tensors(100)).wait()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_nested_and_concurrent_pauses_resume_the_collector_once_at_the_last():
    assert gc.isenabled()
    inner_entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            inner_entered.set()
            release.wait(10)

    with collector_paused():
        thread = threading.Thread(target=other)
        thread.start()
        assert inner_entered.wait(10)
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause is still open
    release.set()
    thread.join(10)
    assert gc.isenabled()
