"""The calls real Lightning Fabric programs make, on a real 2-process gloo group: collectives on numbers and
collections (compared with Lightning's own Fabric), rank_zero_first, FSDP's sharding strategies and Lightning's other
FSDP arguments, init_module(empty_init=True) under FSDP, and the compute threads of each process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests import calls_cases as cases
from tests.distributed import WorkerGroup
from tests.test_ddp import assert_states_equal

pytest.importorskip("lightning")


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


# ---------------------------------------------------------------------------------------------------- collectives
def test_collectives_on_numbers_and_collections_match_lightning(group):
    results = group.run(cases.collectives_as_lightning)
    for rank, result in enumerate(results):
        assert result["ours"] == result["lightning"], rank
    ours = results[0]["ours"]
    assert ours["gather"] == {
        "count": ("torch.int32", [1, 2]),
        "loss": ("torch.float32", [0.0, 0.5]),
        "flag": ("torch.uint8", [1, 0]),
        "array": ("torch.int64", [[0, 10], [1, 10]]),
    }
    assert ours["gather_nested"] == [("torch.int32", [0, 1]), (("torch.float32", [2.5, 2.5]), "tag")]
    assert ours["int_mean"] == ("torch.int32", 3) and ours["float_mean"] == ("torch.float32", 0.5)
    assert ours["sum"] == {"a": ("torch.int32", 1), "b": [("torch.float32", 3.0)]}
    assert ours["max_op"] == ("torch.int32", 1) and ours["avg_name"] == ("torch.float32", [1.0])
    assert ours["in_place"] == (True, [3.0])
    assert [r["ours"]["broadcast"] for r in results] == [{"rank": 1, "t": ("torch.int64", [1]), "l": [1, "s"]}] * 2


# ---------------------------------------------------------------------------------------------------- rank_zero_first
@pytest.mark.parametrize("local", [False, True])
def test_rank_zero_first_lets_rank_zero_finish_first(group, tmp_path, local):
    results = group.run(cases.rank_zero_first_order, str(tmp_path), local)
    assert results[1]["seen"] is True  # rank 1 entered only after rank 0 had written the file


def test_rank_zero_first_local_lets_each_machines_first_process_go(group):
    results = group.run(cases.rank_zero_first_per_node)
    assert results == [{"ran": [0], "local_rank": 0, "node_rank": 0}, {"ran": [1], "local_rank": 0, "node_rank": 1}]


def test_lightnings_rank_zero_only_follows_fabrics_rank(group):
    assert group.run(cases.lightning_rank_follows_fabric) == [
        {"rank": 0, "calls": ["logged"]},
        {"rank": 1, "calls": []},
    ]


# ---------------------------------------------------------------------------------------------------- FSDP sharding
SHARDINGS = {
    "FULL_SHARD": ({"sharding_strategy": "FULL_SHARD"}, (2,), True),
    "SHARD_GRAD_OP": ({"sharding_strategy": "shard_grad_op"}, (2,), False),
    "HYBRID_SHARD": ({"sharding_strategy": "HYBRID_SHARD"}, (1, 2), True),
    "HYBRID_SHARD-mesh": ({"sharding_strategy": "HYBRID_SHARD", "device_mesh": (2, 1)}, (2, 1), True),
    "HYBRID_SHARD-2-nodes": ({"sharding_strategy": "HYBRID_SHARD", "nodes_of_one": True}, (2, 1), True),
    "_HYBRID_SHARD_ZERO2": ({"sharding_strategy": "_HYBRID_SHARD_ZERO2"}, (1, 2), False),
    "NO_SHARD": ({"sharding_strategy": "NO_SHARD"}, (2, 1), False),
    "enum": ({"sharding_strategy": "enum:SHARD_GRAD_OP"}, (2,), False),
}


@pytest.fixture(scope="module")
def full_shard_losses(group, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reference") / "ckpt")
    return group.run(cases.sharding_round_trip, path, sharding_strategy="FULL_SHARD")[0]["losses"]


@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
@pytest.mark.parametrize("name", list(SHARDINGS))
def test_each_sharding_strategy_trains_the_same_and_round_trips_bitwise(
    group, tmp_path, full_shard_losses, name, state_dict_type
):
    options, mesh_shape, reshard = SHARDINGS[name]
    options = dict(options)
    if options["sharding_strategy"].startswith("enum:"):
        from torch.distributed.fsdp import ShardingStrategy

        options["sharding_strategy"] = ShardingStrategy[options["sharding_strategy"][5:]]
    path = str(tmp_path / "ckpt")
    results = group.run(cases.sharding_round_trip, path, state_dict_type=state_dict_type, **options)
    for result in results:
        assert result["mesh_shape"] == mesh_shape and result["reshard_after_forward"] is reshard
        assert result["losses"] == full_shard_losses  # sharding changes where numbers live, not what they are
        assert_states_equal(result["loaded"], result["saved"])
        assert result["step"] == 3
    assert os.path.isdir(path) == (state_dict_type == "sharded")
    if len(mesh_shape) == 2:
        assert results[0]["placements"] == ["R", "S(0)"]  # replicated across the first dim, sharded on the second
    assert_states_equal(group.run(cases.load_into, path)[0], results[0]["saved"])  # and into plain FULL_SHARD


def test_cpu_offload_round_trips(group, tmp_path):
    from torch.distributed.fsdp import CPUOffload

    for offload in (True, CPUOffload(offload_params=True)):
        path = str(tmp_path / f"offload-{type(offload).__name__}")
        for result in group.run(cases.sharding_round_trip, path, cpu_offload=offload):
            assert_states_equal(result["loaded"], result["saved"])


def test_fsdp1_mixed_precision_is_fsdp2_mp_policy(group, full_shard_losses):
    fsdp1 = group.run(cases.mixed_precision_losses, "fsdp1")
    assert fsdp1 == group.run(cases.mixed_precision_losses, "fsdp2")
    assert fsdp1[0] != full_shard_losses[:2]  # the bfloat16 parameters did take effect


@pytest.mark.parametrize("policy_kind", ["set", "predicate", "deprecated"])
def test_activation_checkpointing_recomputes_blocks_and_changes_nothing_else(group, policy_kind):
    plain = group.run(cases.activation_checkpointing, "none")
    checkpointed = group.run(cases.activation_checkpointing, policy_kind)
    for rank in range(2):
        assert checkpointed[rank]["losses"] == plain[rank]["losses"]
        assert checkpointed[rank]["names"] == plain[rank]["names"]  # no wrapper in the parameter names
        assert all(torch.equal(checkpointed[rank]["state"][k], v) for k, v in plain[rank]["state"].items())
        assert (plain[rank]["forward_calls"], checkpointed[rank]["forward_calls"]) == (2, 4)  # recomputed in backward


# ---------------------------------------------------------------------------------------------------- empty_init
@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_a_model_made_with_empty_init_under_fsdp_loads_a_checkpoint_bitwise(group, tmp_path, state_dict_type):
    results = group.run(cases.empty_init_loads_a_checkpoint, str(tmp_path / "ckpt"), state_dict_type)
    for result in results:
        assert result["on_meta"] and result["materialised"]
        # The root holds a parameter of its own and has no reset_parameters(): named, its values come from the load.
        assert len(result["warnings"]) == 1 and "['Model']" in result["warnings"][0]
        assert_states_equal(result["loaded"], result["saved"])
        assert result["next_losses"] == result["reference_losses"]
        assert_states_equal(result["after"], result["reference_after"])


# ---------------------------------------------------------------------------------------------------- threads
THREADS_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    if sys.argv[1] == "lightning":
        from lightning.fabric import Fabric
    else:
        from fabric_ckpt import Fabric

    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2)
    fabric.launch()
    sys.stdout.write(f"rank={fabric.global_rank} threads={torch.get_num_threads()} "
                     f"omp={os.environ.get('OMP_NUM_THREADS')}\\n")
    sys.stdout.flush()
""")


def run_threads_script(tmp_path, library: str, omp: str | None) -> list[str]:
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    outcome = subprocess.run(
        [sys.executable, str(script), library], capture_output=True, text=True, timeout=240, env=env
    )
    assert outcome.returncode == 0, outcome.stderr
    return sorted(line for line in outcome.stdout.splitlines() if line.startswith("rank="))


def test_ddp_processes_share_the_cpus_as_under_lightning(tmp_path):
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    ours = run_threads_script(tmp_path, "ours", None)
    assert ours == [f"rank=0 threads={share} omp={share}", f"rank=1 threads={share} omp={share}"]
    assert ours == run_threads_script(tmp_path, "lightning", None)


def test_an_explicit_omp_num_threads_is_left_alone(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("needs 2 CPUs to tell an explicit thread count from the default share")
    chosen = max(1, cpus // 2) + 1  # not the share Fabric would pick, and no more than torch allows (the CPUs)
    expected = [f"rank=0 threads={chosen} omp={chosen}", f"rank=1 threads={chosen} omp={chosen}"]
    assert run_threads_script(tmp_path, "ours", str(chosen)) == expected
