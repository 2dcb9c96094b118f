"""FSDP2 on a real 2-process gloo group: sharded folders written by every rank, full files, and every direction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fabric_ckpt import CheckpointCorruptedError, Fabric, consolidate
from tests import dist_cases as cases
from tests.distributed import WorkerGroup
from tests.sharded_files import live_generation, tree_bytes
from tests.test_ddp import assert_states_equal


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


@pytest.fixture(scope="module")
def saved(group, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fsdp") / "sharded.ckpt")
    states = group.run(cases.save_trained, "fsdp", path)
    return path, states


def single_device_objects(seed=55):
    torch.manual_seed(seed)
    model = cases.Model()
    return model, torch.optim.AdamW(model.parameters(), lr=0.5)


def test_sharded_round_trip_restores_every_shard(group, saved):
    path, states = saved
    assert [s["exists_right_after"] for s in states] == [True, True]
    loaded = group.run(cases.load_fresh, "fsdp", path)
    for rank in range(2):
        assert_states_equal(loaded[rank], states[rank])
        assert loaded[rank]["step"] == 3 and loaded[rank]["remainder"] == {"meta": {"name": "run"}}


def test_every_rank_writes_only_its_own_shards(group, saved):
    path, _ = saved
    layout = group.run(cases.list_files_and_chunks, path)[0]
    assert layout["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    local = group.run(cases.local_shapes, "fsdp")
    for rank in range(2):
        shard_file = f"__{rank}_0.distcp"
        model_chunks = {fqn: sizes for fqn, _, sizes in layout["chunks"][shard_file] if fqn.startswith("model.")}
        for name, shape in local[rank].items():
            if 0 not in shape:
                assert model_chunks[f"model.{name}"] == shape, (rank, name)
        other = f"__{1 - rank}_0.distcp"
        mine = {(fqn, offsets) for fqn, offsets, _ in layout["chunks"][shard_file]}
        theirs = {(fqn, offsets) for fqn, offsets, _ in layout["chunks"][other]}
        assert not mine & theirs  # no chunk is written twice
    sizes = [os.path.getsize(os.path.join(live_generation(path), f"__{rank}_0.distcp")) for rank in range(2)]
    assert 0.3 < sizes[0] / sum(sizes) < 0.7  # each rank holds about half, nobody the whole model


def test_sharded_checkpoint_loads_on_a_single_device_consolidated(saved):
    path, states = saved
    model, optimizer = single_device_objects()
    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = Fabric(accelerator="cpu").load(path, state)
    assert state["step"] == 3 and remainder == {"meta": {"name": "run"}}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in states[0]["model"].items())
    for index, param_state in states[0]["optimizer"].items():
        for name, value in param_state.items():
            assert torch.equal(optimizer.state_dict()["state"][index][name], value), (index, name)


def test_sharded_checkpoint_loads_under_ddp(group, saved):
    path, states = saved
    loaded = group.run(cases.load_fresh, "ddp", path)
    for rank in range(2):
        assert_states_equal(loaded[rank], states[0])


def test_load_without_state_returns_the_full_checkpoint(group, saved):
    path, states = saved
    everywhere = [*group.run(cases.load_everything, "fsdp", path), Fabric(accelerator="cpu").load(path)]
    for checkpoint in everywhere:
        assert sorted(checkpoint) == ["meta", "model", "optimizer", "step"]
        assert all(torch.equal(checkpoint["model"][k], v) for k, v in states[0]["model"].items())


def test_full_layout_writes_one_single_device_file(group, tmp_path):
    path = tmp_path / "full.ckpt"
    states = group.run(cases.save_trained, "fsdp-full", str(path))
    assert path.is_file()
    plain = torch.load(path, weights_only=True)
    assert all(torch.equal(plain["model"][k], v) for k, v in states[0]["model"].items())
    model, optimizer = single_device_objects()
    Fabric(accelerator="cpu").load(path, {"model": model, "optimizer": optimizer})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in states[0]["model"].items())
    loaded = group.run(cases.load_fresh, "fsdp", str(path))
    for rank in range(2):
        assert_states_equal(loaded[rank], states[rank])


def test_single_device_file_loads_into_fsdp_shards(group, tmp_path):
    path = tmp_path / "single.ckpt"
    model, optimizer = single_device_objects(9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    Fabric(accelerator="cpu").save(path, {"model": model, "optimizer": optimizer, "step": 1})
    loaded = group.run(cases.load_fresh, "fsdp", str(path))
    for rank in range(2):
        assert all(torch.equal(loaded[rank]["model"][k], v) for k, v in model.state_dict().items())
        for index, param_state in optimizer.state_dict()["state"].items():
            for name, value in param_state.items():
                assert torch.equal(loaded[rank]["optimizer"][index][name], value)


def test_resumed_training_matches_the_uninterrupted_run(group, tmp_path):
    for result in group.run(cases.resume_matches_uninterrupted, "fsdp", str(tmp_path)):
        assert result["resumed"] == result["reference"]
        assert all(torch.equal(result["resumed_params"][k], v) for k, v in result["params"].items())


@pytest.mark.parametrize("phase", ["state", "write"])
def test_interrupted_sharded_save_keeps_the_previous_checkpoint(group, tmp_path, phase):
    path = tmp_path / "sharded.ckpt"
    previous = group.run(cases.save_trained, "fsdp", str(path))
    files_before = tree_bytes(path)
    outcomes = group.run(cases.save_failing, "fsdp", str(path), 1, phase)
    for outcome in outcomes:
        assert outcome["is_checkpoint_error"], outcome
        assert outcome["seconds"] < 60
    assert "rank 1" in outcomes[0]["message"]
    assert tree_bytes(path) == files_before  # the failed save's generation is gone, the committed one untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.ckpt"]  # no temporary folder left
    loaded = group.run(cases.load_fresh, "fsdp", str(path))
    for rank in range(2):
        assert_states_equal(loaded[rank], previous[rank])


def test_overwriting_a_sharded_checkpoint(group, tmp_path):
    path = tmp_path / "sharded.ckpt"
    group.run(cases.save_to, "fsdp", str(path), 1)
    second = group.run(cases.save_to, "fsdp", str(path), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.ckpt"]
    assert Fabric(accelerator="cpu").load(path)["seed"] == 2
    loaded = group.run(cases.load_fresh, "fsdp", str(path))
    for rank in range(2):
        assert_states_equal(loaded[rank], second[rank])


def test_strict_and_remainder_on_sharded_loads(group, saved):
    path, states = saved
    missing = group.run(cases.load_with_options, "fsdp", path, ignore_keys=["step"])
    assert [o["error"] for o in missing] == ["KeyError", "KeyError"]
    relaxed = group.run(cases.load_with_options, "fsdp", path, ignore_keys=["step"], strict=False)
    for rank in range(2):
        assert relaxed[rank]["error"] is None and relaxed[rank]["step"] == 0
        assert_states_equal(relaxed[rank], states[rank])
    weights = group.run(cases.load_with_options, "fsdp", path, load_weights_only=True)
    for rank in range(2):
        assert all(torch.equal(weights[rank]["model"][k], v) for k, v in states[rank]["model"].items())
        assert weights[rank]["optimizer"] == {}  # the optimizer was left alone
        assert sorted(weights[rank]["remainder"]) == ["meta", "optimizer", "step"]


def test_corrupted_shard_is_detected_before_anything_changes(group, tmp_path):
    path = tmp_path / "sharded.ckpt"
    group.run(cases.save_trained, "fsdp", str(path))
    shard = Path(live_generation(path)) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    outcomes = group.run(cases.load_with_options, "fsdp", str(path))
    fresh = group.run(cases.local_shapes, "fsdp")  # noqa: F841 - keeps the group warm for the next check
    for outcome in outcomes:
        assert "corrupted" in outcome["message"] and "__1_0.distcp" in outcome["message"]
    with pytest.raises(CheckpointCorruptedError, match=r"__1_0\.distcp"):
        Fabric(accelerator="cpu").load(path)


@pytest.mark.parametrize("damaged_rank", [0, 1])
def test_a_damaged_shard_changes_nothing_on_any_rank(group, tmp_path, damaged_rank):
    """The CRC-32 checks run while the load is planned; nothing (tensors, optimizer, stateful objects, plain
    values) may change on any rank unless every rank's checks passed."""
    path = tmp_path / "sharded.ckpt"
    group.run(cases.save_trained, "fsdp", str(path))
    intact = group.run(cases.load_damaged_leaves_everything, "fsdp", str(path), False, True)
    for outcome in intact:  # the control: intact, everything is restored and the model's load hook sees it once
        assert outcome["error"] is None and outcome["step"] == 3 and outcome["stateful"] == [{"name": "run"}]
        assert outcome["hook_calls"] == [["meta", "model", "optimizer", "step"]]
    shard = Path(live_generation(path)) / f"__{damaged_rank}_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    for hooked in (False, True):
        outcomes = group.run(cases.load_damaged_leaves_everything, "fsdp", str(path), False, hooked)
        for outcome in outcomes:
            assert outcome["error"] is not None
            assert "corrupted" in outcome["message"] and f"__{damaged_rank}_0.distcp" in outcome["message"]
            assert_states_equal(outcome["after"], outcome["before"])
            assert outcome["stateful"] == [] and outcome["step"] == -1
            assert outcome["hook_calls"] == []  # a load hook never sees unchecked data


def test_damage_is_reported_rather_than_a_missing_entry_found_while_the_checks_ran(group, tmp_path):
    """The checks overlap the load's planning; when planning fails too, the damage is the error reported (as when
    the checks ran first), and nothing changed."""
    path = tmp_path / "sharded.ckpt"
    group.run(cases.save_trained, "fsdp", str(path))
    intact = group.run(cases.load_damaged_leaves_everything, "fsdp", str(path), True)
    assert all("absent" in outcome["message"] for outcome in intact)  # planning's own error, with nothing damaged
    shard = Path(live_generation(path)) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    outcomes = group.run(cases.load_damaged_leaves_everything, "fsdp", str(path), True)
    for outcome in outcomes:
        assert "corrupted" in outcome["message"] and "__1_0.distcp" in outcome["message"]
        assert_states_equal(outcome["after"], outcome["before"])
        assert outcome["stateful"] == [] and outcome["step"] == -1


@pytest.mark.parametrize("shortened_rank", [0, 1])
def test_a_shard_shortened_by_another_process_during_the_load_is_an_error_not_a_crash(tmp_path, shortened_rank):
    """A shard truncated after the checks passed (another user's ``cp`` over it, say) must raise an error naming
    the file on every rank, as DCP's own reader would; reading it from a memory map killed the process (SIGBUS)."""
    path = tmp_path / "sharded.ckpt"
    workers = WorkerGroup(2)  # its own processes: a crashed worker must not take the module's group with it
    try:
        workers.run(cases.save_trained, "fsdp", str(path))
        shard = os.path.join(live_generation(path), f"__{shortened_rank}_0.distcp")
        outcomes = workers.run(cases.load_while_a_shard_is_shortened, "fsdp", str(path), shard, shortened_rank)
    finally:
        workers.close()
    for outcome in outcomes:
        assert outcome["alive"] and outcome["error"] == "CheckpointError", outcome
        assert (
            f"__{shortened_rank}_0.distcp" in outcome["message"]
            and "changed while it was being loaded" in outcome["message"]
        )
        assert "partly loaded" in outcome["message"]  # the copy had begun: the error says what that means


def test_consolidate_writes_a_single_device_file(saved, tmp_path):
    path, states = saved
    output = tmp_path / "consolidated.ckpt"
    consolidate(path, output)
    plain = torch.load(output, weights_only=True)
    assert sorted(plain) == ["meta", "model", "optimizer", "step"]
    assert all(torch.equal(plain["model"][k], v) for k, v in states[0]["model"].items())
    model, optimizer = single_device_objects()
    Fabric(accelerator="cpu").load(output, {"model": model, "optimizer": optimizer})
    for index, param_state in states[0]["optimizer"].items():
        for name, value in param_state.items():
            assert torch.equal(optimizer.state_dict()["state"][index][name], value)


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_filter_hooks_and_load_raw_behave_as_on_one_device(group, tmp_path, kind):
    source = cases.Model()
    raw_file = tmp_path / "weights.pt"
    torch.save(source.state_dict(), raw_file)
    results = group.run(cases.filter_hooks_and_load_raw, kind, str(tmp_path), str(raw_file))
    for result in results:
        assert result["saved_keys"] == ["head.bias", "head.weight"]
        assert result["from_hook"] == "saved"
        assert result["step_after_hook"] == 101  # what on_load_checkpoint changed is what was restored
        assert torch.equal(result["head"], result["original_head"])
        assert all(torch.equal(result["raw"][k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("snapshot", ["eager", "lazy"])
@pytest.mark.parametrize("kind", ["fsdp", "fsdp-full", "ddp"])
def test_async_save_while_training_writes_the_snapshot(group, tmp_path, kind, snapshot):
    """Lazy: the sharded parameters and optimizer state (DTensors) are staged and copied on the background thread."""
    results = group.run(cases.async_save_while_training, kind, str(tmp_path / f"async-{kind}.ckpt"), snapshot)
    for result in results:
        assert_states_equal(result["loaded"], result["expected"])
        assert result["step"] == 2


def test_bare_dcp_folder_with_an_index_keyed_optimizer_loads_into_fsdp(group, tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(30)
    model = cases.Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    dcp.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        checkpoint_id=str(tmp_path / "bare"),
        no_dist=True,
    )
    for loaded in group.run(cases.load_bare_dcp_index_keyed, "fsdp", str(tmp_path / "bare")):
        assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
        for index, param_state in optimizer.state_dict()["state"].items():
            for name, value in param_state.items():
                assert torch.equal(loaded["optimizer"][index][name], value), (index, name)


def test_a_checkpoint_saved_before_the_first_step_loads_back(group, tmp_path):
    path = tmp_path / "step0.ckpt"
    for result in group.run(cases.save_before_any_step_and_load, "fsdp", str(path)):
        assert result["loaded"]["optimizer"] == {} and result["saved"]["optimizer"] == {}
        assert all(torch.equal(result["loaded"]["model"][k], v) for k, v in result["saved"]["model"].items())
    model, optimizer = single_device_objects()
    Fabric(accelerator="cpu").load(path, {"model": model, "optimizer": optimizer})  # consolidated, on one device
    assert optimizer.state_dict()["state"] == {}
