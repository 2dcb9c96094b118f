"""DDP on a real 2-process gloo group: rank 0 writes the single-device file, every rank restores from it."""

from __future__ import annotations

import pytest
import torch

from fabric_ckpt import Fabric
from tests import dist_cases as cases
from tests.distributed import WorkerGroup


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def assert_states_equal(a, b):
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index in a["optimizer"]:
        for name, value in a["optimizer"][index].items():
            assert torch.equal(value, b["optimizer"][index][name]), (index, name)
    assert a["groups"] == b["groups"]


def test_round_trip_in_place_on_every_rank(group, tmp_path):
    path = str(tmp_path / "ddp.ckpt")
    saved = group.run(cases.save_trained, "ddp", path)
    assert [s["exists_right_after"] for s in saved] == [True, True]  # save returns only once the file is complete
    assert_states_equal(saved[0], saved[1])  # DDP keeps replicas identical
    loaded = group.run(cases.load_fresh, "ddp", path)
    for rank in range(2):
        assert_states_equal(loaded[rank], saved[rank])
        assert loaded[rank]["step"] == 3
        assert loaded[rank]["remainder"] == {"meta": {"name": "run"}}


def test_the_file_is_the_single_device_format(group, tmp_path):
    path = tmp_path / "ddp.ckpt"
    saved = group.run(cases.save_trained, "ddp", str(path))[0]
    plain = torch.load(path, weights_only=True)
    assert sorted(plain) == ["meta", "model", "optimizer", "step"]
    assert all(torch.equal(plain["model"][k], v) for k, v in saved["model"].items())  # no "module." prefix
    model = cases.Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    Fabric(accelerator="cpu").load(path, {"model": model, "optimizer": optimizer})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())


def test_single_device_checkpoint_loads_under_ddp(group, tmp_path):
    path = tmp_path / "single.ckpt"
    model, optimizer = cases.Model(), None
    torch.manual_seed(4)
    model = cases.Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    Fabric(accelerator="cpu").save(path, {"model": model, "optimizer": optimizer, "step": 1})
    loaded = group.run(cases.load_fresh, "ddp", str(path))
    for rank in range(2):
        assert all(torch.equal(loaded[rank]["model"][k], v) for k, v in model.state_dict().items())


def test_resumed_training_matches_the_uninterrupted_run(group, tmp_path):
    results = group.run(cases.resume_matches_uninterrupted, "ddp", str(tmp_path))
    for result in results:
        assert result["resumed"] == result["reference"]
        assert all(torch.equal(result["resumed_params"][k], v) for k, v in result["params"].items())


def test_a_failure_on_one_rank_fails_the_save_everywhere_and_keeps_the_previous_file(group, tmp_path):
    path = tmp_path / "ddp.ckpt"
    saved = group.run(cases.save_trained, "ddp", str(path))[0]
    before = path.read_bytes()
    outcomes = group.run(cases.save_failing, "ddp", str(path), 1, "state")
    for outcome in outcomes:
        assert outcome["is_checkpoint_error"], outcome
        assert "failed on rank 1: RuntimeError: snapshot failed on rank 1" in outcome["message"]
        assert outcome["seconds"] < 60
    assert outcomes[1]["chain"] == ["CheckpointError", "RuntimeError"]  # the original kept as the cause
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.ckpt"]
    reloaded = Fabric(accelerator="cpu").load(path)
    assert all(torch.equal(reloaded["model"][k], v) for k, v in saved["model"].items())


def test_a_strict_error_on_every_rank_keeps_its_type(group, tmp_path):
    path = str(tmp_path / "ddp.ckpt")
    group.run(cases.save_trained, "ddp", path)
    outcomes = group.run(cases.load_missing_key, "ddp", path)
    assert [o["error"] for o in outcomes] == ["KeyError", "KeyError"]
    assert all("'epoch' that does not exist" in o["message"] for o in outcomes)


def test_setup_dataloaders_gives_each_rank_its_own_part_reshuffled_per_epoch(group):
    results = group.run(cases.distributed_batches, "ddp")
    for epoch in range(2):
        seen = results[0]["epochs"][epoch] + results[1]["epochs"][epoch]
        assert sorted(seen) == list(range(10))  # together the ranks read everything once
        assert not set(results[0]["epochs"][epoch]) & set(results[1]["epochs"][epoch])
    assert results[0]["epochs"][0] != results[0]["epochs"][1]  # the sampler is told the epoch
    assert [r["length"] for r in results] == [3, 3]
