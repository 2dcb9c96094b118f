"""Composer's load surface on fabric_ckpt (issue 17): path variables, ``ignore_keys`` with Composer's paths,
``latest`` pointers on object stores, weights-only checkpoints, ``progress_bar``; and saves that fail early."""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings

import pytest
import torch

from fabric_ckpt import (
    CheckpointError,
    CheckpointManager,
    Fabric,
    SingleDeviceStrategy,
    StorageOptions,
    UnpicklableStateError,
    UnsafeCheckpointError,
)
from tests import parity_cases
from tests.conftest import assert_same_state, make_net, snapshot, trained
from tests.distributed import WorkerGroup


@dataclasses.dataclass
class Config:
    lr: float = 0.1


class RankOne(SingleDeviceStrategy):
    """One process that calls itself rank 1 of 2 on node 1: what fills the path variables."""

    global_rank = 1  # type: ignore[assignment]
    local_rank = 1  # type: ignore[assignment]
    node_rank = 1  # type: ignore[assignment]
    world_size = 2  # type: ignore[assignment]


class TestPathVariables:
    def test_rank_variables_in_load_paths_are_this_processs(self, tmp_path):
        fabric = Fabric(strategy=RankOne())
        for rank in (0, 1):
            torch.save({"owner": rank}, tmp_path / f"ep1-rank{rank}.pt")
        assert fabric.load(str(tmp_path / "ep1-rank{rank}.pt")) == {"owner": 1}
        torch.save({"owner": "n1l1"}, tmp_path / "node1-local01-of2.pt")
        assert fabric.load(str(tmp_path / "node{node_rank}-local{local_rank:02d}-of{world_size}.pt")) == {
            "owner": "n1l1"
        }
        model = make_net()
        torch.save(model.state_dict(), tmp_path / "weights-1.pt")
        fresh = make_net(seed=3)
        fabric.load_raw(tmp_path / "weights-{rank}.pt", fresh)  # a Path works as well as a str
        assert_same_state(snapshot(fresh), snapshot(model))

    def test_other_braces_are_kept(self, tmp_path):
        torch.save({"owner": "braces"}, tmp_path / "run{a}-0.pt")
        assert Fabric(accelerator="cpu").load(str(tmp_path / "run{a}-{rank}.pt")) == {"owner": "braces"}


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def test_every_rank_of_a_ddp_run_fills_its_own_rank(group, tmp_path):
    for rank in (0, 1):
        torch.save({"owner": rank}, tmp_path / f"ckpt-rank{rank}.ckpt")
        torch.save(
            {"weight": torch.full((2, 2), float(rank)), "bias": torch.zeros(2)},
            tmp_path / f"ckpt-rank{rank}-weights.pt",
        )
    results = group.run(parity_cases.load_per_rank_path, "ddp", str(tmp_path / "ckpt-rank{rank}.ckpt"))
    assert [(r["rank"], r["owner"]) for r in results] == [(0, 0), (1, 1)]
    assert [r["weight"].unique().tolist() for r in results] == [[0.0], [1.0]]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_an_unpicklable_value_fails_every_ranks_save_and_writes_nothing(group, tmp_path, kind):
    path = str(tmp_path / "c.ckpt")
    results = group.run(parity_cases.save_unpicklable, kind, path)
    for result in results:
        assert result["error"] is not None and "state['hparams']['fn'] cannot be pickled" in result["error"]
    assert results[0]["unchanged"]
    assert results[0]["entries"] == ["c.ckpt"]


class TestIgnoreKeys:
    def saved(self, tmp_path, fabric):
        model, optimizer = trained(seed=1)
        fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "rng": {"seed": 3}, "step": 2})
        return model, optimizer

    def test_composers_state_paths_name_our_entries(self, tmp_path, fabric):
        model, _ = self.saved(tmp_path, fabric)
        fresh = make_net(seed=7)
        before = snapshot(fresh)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            remainder = fabric.load(
                tmp_path / "c.ckpt",
                {"model": fresh},
                strict=False,
                ignore_keys=["state/model/fc1.*", "state/optimizer", "rng"],
            )
        assert remainder == {"step": 2}
        after = snapshot(fresh)
        assert torch.equal(after["fc1.weight"], before["fc1.weight"])  # dropped: left as it was
        assert torch.equal(after["fc2.weight"], model.state_dict()["fc2.weight"])

    def test_a_pattern_that_matches_nothing_is_named_in_a_warning(self, tmp_path, fabric):
        self.saved(tmp_path, fabric)
        with pytest.warns(UserWarning, match=r"\['model/fc9\.\*', 'state/rank_zero_seed'\] match no entry"):
            fabric.load(tmp_path / "c.ckpt", ignore_keys=["model/fc9.*", "rng", "state/rank_zero_seed"])

    def test_a_pattern_inside_a_dropped_entry_is_not_reported(self, tmp_path, fabric):
        self.saved(tmp_path, fabric)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            remainder = fabric.load(tmp_path / "c.ckpt", ignore_keys=["model", "model/fc1.weight"])
        assert "model" not in remainder


class TestLatestOnObjectStores:
    def test_fabric_load_follows_the_managers_pointer_object(self, fabric):
        model, optimizer = trained(seed=1)
        manager = CheckpointManager(fabric, "memory://runs/exp", save_interval="1ba")
        manager.on_batch_end({"model": model, "optimizer": optimizer})
        fresh, fresh_optimizer = trained(seed=2)
        remainder = fabric.load("memory://runs/exp/latest-rank0", {"model": fresh, "optimizer": fresh_optimizer})
        assert sorted(remainder) == ["rng", "timestamp"]
        assert_same_state(snapshot(fresh), snapshot(model))
        assert_same_state(snapshot(fresh_optimizer), snapshot(optimizer))

    def test_on_s3(self, fabric, bucket):
        model = make_net(seed=1)
        manager = CheckpointManager(
            fabric, f"{bucket}/run", filename="ep{epoch}-rank{rank}.pt", latest_filename="latest-rank{rank}.pt"
        )
        manager.on_epoch_end({"model": model})
        fresh = make_net(seed=2)
        fabric.load(f"{bucket}/run/latest-rank{{rank}}.pt", {"model": fresh}, strict=False)
        assert_same_state(snapshot(fresh), snapshot(model))

    def test_a_pointer_outside_its_folder_is_refused(self, fabric):
        import fsspec

        fsspec.filesystem("memory").pipe(
            "/runs/latest", b'{"format": "fabric_ckpt.latest/1", "checkpoint": "../elsewhere.ckpt"}'
        )
        with pytest.raises(CheckpointError, match="outside its folder"):
            fabric.load("memory://runs/latest")


class TestWeightsOnly:
    def test_a_weights_only_checkpoint_loaded_strictly_says_so_and_how(self, tmp_path, fabric):
        model, optimizer = trained(seed=1)
        manager = CheckpointManager(fabric, tmp_path, save_weights_only=True, save_interval="1ba")
        path = manager.on_batch_end({"model": model, "optimizer": optimizer})
        fresh, fresh_optimizer = trained(seed=2)
        optimizer_before = snapshot(fresh_optimizer)
        with pytest.raises(
            KeyError, match=r"'optimizer' that does not exist.*weights-only.*load_weights_only=True.*strict=False"
        ):
            fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer})
        fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer}, load_weights_only=True)
        assert_same_state(snapshot(fresh), snapshot(model))
        assert_same_state(snapshot(fresh_optimizer), optimizer_before)

    def test_a_full_checkpoint_missing_a_key_keeps_lightnings_message(self, tmp_path, fabric):
        fabric.save(tmp_path / "c.ckpt", {"model": make_net(), "step": 1})
        with pytest.raises(KeyError) as info:
            fabric.load(tmp_path / "c.ckpt", {"model": make_net(), "optimizer": trained()[1]})
        assert "weights-only" not in str(info.value) and "To disable strict loading, set `strict=False`" in str(
            info.value
        )


class TestProgressBar:
    def test_progress_bar_forces_the_bar_on_or_off_for_one_call(self, capsys):
        quiet = Fabric(accelerator="cpu", storage_options=StorageOptions(progress=False))
        loud = Fabric(accelerator="cpu", storage_options=StorageOptions(progress=True))
        quiet.save("memory://bars/c.ckpt", {"weight": torch.ones(8)})
        capsys.readouterr()
        quiet.load("memory://bars/c.ckpt", progress_bar=True)
        assert "download c.ckpt" in capsys.readouterr().err
        loud.load("memory://bars/c.ckpt", progress_bar=False)
        assert "download" not in capsys.readouterr().err
        loud.load("memory://bars/c.ckpt")
        assert "download c.ckpt" in capsys.readouterr().err
        manager = CheckpointManager(quiet, "memory://bars/run", save_interval="1ba")
        manager.on_batch_end({"weight": torch.ones(2)})
        capsys.readouterr()
        manager.load_latest({}, progress_bar=True)
        assert "download" in capsys.readouterr().err


class TestSavesThatFailEarly:
    def test_an_unpicklable_value_is_named_and_nothing_is_written(self, tmp_path, fabric):
        path = tmp_path / "c.ckpt"
        fabric.save(path, {"step": 1})
        before = path.read_bytes()
        for save in (fabric.save, fabric.save_async):
            with pytest.raises(UnpicklableStateError, match=r"state\['hparams'\]\['fn'\] cannot be pickled") as info:
                save(path, {"model": make_net(), "hparams": {"lr": 0.1, "fn": lambda x: x}})
            assert isinstance(info.value, pickle.PicklingError) and isinstance(info.value, CheckpointError)
        fabric.wait_for_saves()
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["c.ckpt"]

    def test_a_value_a_safe_load_refuses_is_reported_at_save_with_the_fix(self, tmp_path, fabric):
        path = tmp_path / "c.ckpt"
        with pytest.warns(UserWarning) as record:
            fabric.save(path, {"model": make_net(), "config": Config(), "history": [1, {"best": Config(lr=0.2)}]})
        message = str(record[0].message)
        assert "state['config']" in message and "state['history'][1]['best']" in message
        assert "torch.serialization.add_safe_globals" in message and "weights_only=False" in message
        with pytest.raises(UnsafeCheckpointError):
            fabric.load(path)
        with torch.serialization.safe_globals([Config]):
            assert fabric.load(path)["config"] == Config()

    def test_plain_state_saves_without_a_warning(self, tmp_path, fabric):
        model, optimizer = trained()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fabric.save(
                tmp_path / "c.ckpt",
                {
                    "model": model,
                    "optimizer": optimizer,
                    "scheduler": scheduler,
                    "meta": {"name": "run", "dims": (1, 2)},
                },
            )
