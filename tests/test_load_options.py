"""Composer's loading options on fabric.load: ignore_keys and load_weights_only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fabric_ckpt import CheckpointMismatchError
from fabric_ckpt.core.state import apply_ignore_keys
from tests.conftest import assert_same_state, make_net, snapshot, trained


@pytest.fixture
def saved(tmp_path, fabric):
    model, optimizer = trained(seed=1)
    path = tmp_path / "c.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 9, "rng": {"torch": torch.arange(3)}})
    return path, model, optimizer


class TestApplyIgnoreKeys:
    def checkpoint(self):
        return {
            "model": {"layer1.weight": 1, "layer1.bias": 2, "layer2.weight": 3},
            "optimizer": {"state": {0: {"exp_avg": 4, "step": 5}}, "param_groups": [6]},
            "rng": {"torch": 7},
            "step": 8,
        }

    @pytest.mark.parametrize(
        "patterns, expected_keys",
        [
            (["model/layer1.weight"], {"model": ["layer1.bias", "layer2.weight"]}),
            (["model/layer*.weight"], {"model": ["layer1.bias"]}),
            (["rng"], {"rng": None}),
            (["model/*"], {"model": None}),  # emptied containers count as absent
            (["optimizer/state/*/exp_avg"], {"optimizer": ["state", "param_groups"]}),
            ([], {}),
        ],
    )
    def test_glob_paths(self, patterns, expected_keys):
        checkpoint = self.checkpoint()
        apply_ignore_keys(checkpoint, patterns)
        for key, remaining in expected_keys.items():
            if remaining is None:
                assert key not in checkpoint
            else:
                assert list(checkpoint[key]) == remaining
        if patterns == ["optimizer/state/*/exp_avg"]:
            assert checkpoint["optimizer"]["state"] == {0: {"step": 5}}
        assert checkpoint["step"] == 8

    def test_callable_edits_in_place(self):
        checkpoint = self.checkpoint()
        apply_ignore_keys(checkpoint, lambda ckpt: ckpt.pop("rng"))
        assert "rng" not in checkpoint

    def test_a_bare_string_is_rejected(self):
        with pytest.raises(TypeError, match="list of path patterns or a callable"):
            apply_ignore_keys(self.checkpoint(), "rng")


def test_ignored_entries_count_as_absent_for_strict(saved, fabric):
    path, _, _ = saved
    with pytest.raises(KeyError, match="'rng' that does not exist"):
        fabric.load(path, {"rng": None}, ignore_keys=["rng"])
    state = {"rng": "kept"}
    fabric.load(path, state, ignore_keys=["rng"], strict=False)
    assert state["rng"] == "kept"


def test_ignoring_model_keys_for_fine_tuning(saved, fabric):
    path, model, _ = saved
    target = make_net(5)
    fc2_before = target.fc2.weight.clone()
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['fc2.weight'\]"):
        fabric.load(path, {"model": target}, ignore_keys=["model/fc2.weight"])
    fabric.load(path, {"model": target}, ignore_keys=["model/fc2.weight"], strict=False)
    assert torch.equal(target.fc1.weight, model.fc1.weight) and torch.equal(target.fc2.weight, fc2_before)


def test_load_weights_only_restores_modules_only(saved, fabric):
    path, model, _ = saved
    target, target_optimizer = trained(seed=7)
    optimizer_before = snapshot(target_optimizer)
    state = {"model": target, "optimizer": target_optimizer, "step": 0}
    remainder = fabric.load(path, state, load_weights_only=True)
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), optimizer_before)
    assert state["step"] == 0
    assert sorted(remainder) == ["optimizer", "rng", "step"]


def test_load_weights_only_with_renamed_layers(tmp_path, fabric):
    source = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    fabric.save(tmp_path / "c.ckpt", {"model": source, "epoch": 3})
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 5))  # a new head of another shape
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch for '1.weight'"):
        fabric.load(tmp_path / "c.ckpt", {"model": target}, load_weights_only=True, strict=False)
    fabric.load(
        tmp_path / "c.ckpt",
        {"model": target, "epoch": 0},
        load_weights_only=True,
        strict=False,
        ignore_keys=["model/1.*"],
    )
    assert torch.equal(target[0].weight, source[0].weight)
