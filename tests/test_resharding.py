"""Sharded checkpoints saved on 2 ranks load on 1, 3 and 4: DCP reshards parameters and optimizer state."""

from __future__ import annotations

import pytest

from tests import dist_cases as cases
from tests.distributed import WorkerGroup
from tests.test_ddp import assert_states_equal


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reshard") / "sharded.ckpt")
    group = WorkerGroup(2)
    try:
        states = group.run(cases.save_trained, "fsdp", path)
    finally:
        group.close()
    return path, states[0]


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_load_at_another_world_size(saved_on_two_ranks, world_size):
    path, saved = saved_on_two_ranks
    group = WorkerGroup(world_size)
    try:
        shapes = group.run(cases.local_shapes, "fsdp")
        loaded = group.run(cases.load_fresh, "fsdp", path)
        if world_size == 1:
            memory = group.run(cases.memory_url_round_trip, "fsdp")[0]
    finally:
        group.close()
    rows = [s["extra"][0] for s in shapes]  # a 7-row parameter, cut into this world size's shards
    assert sum(rows) == 7 and (world_size == 1 or max(rows) < 7)
    for rank in range(world_size):
        assert_states_equal(loaded[rank], saved)
        assert loaded[rank]["step"] == 3
    if world_size == 1:
        assert_states_equal(memory["loaded"], memory["saved"])
        assert memory["step"] == 2
        # The manifest names the live generation; the one the overwrite replaced stays for its grace period.
        generations = [name for name in memory["files"] if name.startswith(".gen-")]
        assert memory["files"] == [*generations, "fabric_ckpt.json"] and 1 <= len(generations) <= 2
        assert memory["shards"] == [".metadata", "__0_0.distcp"]
        assert memory["folder"] == ["sharded.ckpt"]
