"""Lightning's FSDPStrategy arguments at construction: mapped onto FSDP2, accepted where FSDP2 already behaves so, or
refused at once with the FSDP2 way; nothing unknown reaches fully_shard (nor, for DDPStrategy, DDP)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    CPUOffloadPolicy,
    MixedPrecision,
    MixedPrecisionPolicy,
    ShardingStrategy,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy

from fabric_ckpt import FSDPStrategy
from fabric_ckpt.strategies.fsdp_options import FSDPOptions, select_modules


@pytest.mark.parametrize(
    "sharding, layout, reshard",
    [
        (None, "shard", True),
        ("FULL_SHARD", "shard", True),
        ("full_shard", "shard", True),
        ("SHARD_GRAD_OP", "shard", False),
        ("HYBRID_SHARD", "hybrid", True),
        ("_HYBRID_SHARD_ZERO2", "hybrid", False),
        ("NO_SHARD", "replicate", False),
        (ShardingStrategy.HYBRID_SHARD, "hybrid", True),
        (ShardingStrategy.NO_SHARD, "replicate", False),
    ],
)
def test_sharding_strategies_map_onto_a_mesh_layout_and_resharding(sharding, layout, reshard):
    options = FSDPStrategy(sharding_strategy=sharding).options
    assert (options.layout, options.reshard_after_forward) == (layout, reshard)


def test_mesh_shapes():
    assert FSDPOptions(layout="shard").mesh_shape(world_size=4, num_nodes=2) == (4,)
    assert FSDPOptions(layout="hybrid").mesh_shape(world_size=8, num_nodes=2) == (2, 4)  # shard within a node
    assert FSDPOptions(layout="hybrid", device_mesh=(4, 2)).mesh_shape(world_size=8, num_nodes=2) == (4, 2)
    assert FSDPOptions(layout="replicate").mesh_shape(world_size=4, num_nodes=1) == (4, 1)
    with pytest.raises(ValueError, match=r"device_mesh=\(3, 2\) covers 6 ranks, but the world size is 8"):
        FSDPOptions(layout="hybrid", device_mesh=(3, 2)).mesh_shape(world_size=8, num_nodes=1)
    with pytest.raises(ValueError, match="5 ranks do not split evenly over 2 nodes"):
        FSDPOptions(layout="hybrid").mesh_shape(world_size=5, num_nodes=2)


def test_a_device_mesh_tuple_alone_means_hybrid_sharding():
    assert FSDPStrategy(device_mesh=(2, 4)).options.layout == "hybrid"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sharding_strategy": "ZERO3"}, r"sharding_strategy='ZERO3'; choose one of \['FULL_SHARD', 'HYBRID_SHARD'"),
        ({"sharding_strategy": "FULL_SHARD", "device_mesh": (2, 2)}, "which is hybrid sharding: pass sharding_str"),
        ({"sharding_strategy": "NO_SHARD", "device_mesh": (2, 2)}, "'NO_SHARD' replicates over all ranks; it takes"),
        ({"device_mesh": (2, 0)}, r"device_mesh=\(2, 0\); pass \(replicas, shard_size\), two positive ints"),
        (
            {"sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": True},
            r"reshard_after_forward=True contradicts sharding_strategy='SHARD_GRAD_OP' \(which means "
            r"reshard_after_forward=False\)",
        ),
        ({"process_group": object()}, "FSDP2 shards over a device mesh: pass device_mesh="),
        ({"param_init_fn": lambda m: None}, r"under fabric.init_module\(empty_init=True\)"),
        ({"sync_module_states": True}, r"seed every rank alike \(fabric.seed_everything\)"),
        ({"use_orig_params": False}, "FSDP2 always trains the original parameters"),
        ({"forward_prefetch": True}, "set_modules_to_forward_prefetch"),
        ({"backward_prefetch": BackwardPrefetch.BACKWARD_POST}, "set_modules_to_backward_prefetch"),
        ({"ignored_modules": [nn.Linear(1, 1)]}, r"pass ignored_params=\{p for m in modules"),
        ({"device_id": 0}, r"Fabric\(accelerator=..., devices=...\)"),
        ({"mesh": None}, "pass the mesh as device_mesh="),
        ({"cpu_offload": True, "offload_policy": CPUOffloadPolicy()}, "either cpu_offload .* or offload_policy"),
        ({"cpu_offload": "yes"}, "cpu_offload='yes'; pass a bool, a CPUOffload"),
        (
            {"mixed_precision": MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)},
            r"buffer_dtype=...\) has no FSDP2 equivalent \(FSDP2 leaves buffers alone\)",
        ),
        (
            {"mixed_precision": MixedPrecision(param_dtype=torch.bfloat16, keep_low_precision_grads=True)},
            "keep_low_precision_grads=True",
        ),
        (
            {"mixed_precision": MixedPrecision(), "mp_policy": MixedPrecisionPolicy()},
            "either mixed_precision .* or mp_policy",
        ),
        ({"activation_checkpointing": nn.Linear, "activation_checkpointing_policy": {nn.Linear}}, "only"),
        ({"auto_wrap_policy": size_based_auto_wrap_policy}, "an FSDP1 functional policy"),
        ({"auto_wrap_policy": {"Block"}}, r"auto_wrap_policy holds \['Block'\]"),
    ],
)
def test_arguments_without_an_fsdp2_equivalent_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FSDPStrategy(**kwargs)


def test_an_unknown_argument_is_a_type_error_that_lists_the_known_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'resharding'; besides its named arguments"):
        FSDPStrategy(resharding=True)


def test_fsdp1_arguments_fsdp2_already_honours_are_accepted():
    strategy = FSDPStrategy(
        use_orig_params=True,
        limit_all_gathers=True,
        forward_prefetch=False,
        sync_module_states=False,
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        cpu_offload=False,
    )
    assert strategy.options.fully_shard_arguments(on_cuda=False) == {"reshard_after_forward": True}


def test_offload_and_mixed_precision_become_fsdp2_policies():
    offloaded = FSDPStrategy(cpu_offload=CPUOffload(offload_params=True)).options.fully_shard_arguments(on_cuda=False)
    assert isinstance(offloaded["offload_policy"], CPUOffloadPolicy) and offloaded["offload_policy"].pin_memory is False
    assert FSDPStrategy(cpu_offload=CPUOffload(offload_params=False)).options.offload_params is False
    mixed = FSDPStrategy(mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    assert mixed.options.fully_shard_kwargs["mp_policy"] == MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True
    )
    own = MixedPrecisionPolicy(param_dtype=torch.float16)
    assert FSDPStrategy(mp_policy=own).options.fully_shard_kwargs == {"mp_policy": own}


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)


def test_policies_select_modules_innermost_first():
    root = nn.Sequential(Inner(), nn.Sequential(Inner()))
    inner = [root[1][0], root[0]]
    assert select_modules(root, {Inner}) == inner
    assert select_modules(root, lambda module: isinstance(module, Inner)) == inner
    assert select_modules(root, ModuleWrapPolicy({Inner})) == inner
    assert select_modules(root, None) == []


def test_ddp_arguments_are_checked_at_construction_too():
    from fabric_ckpt import DDPStrategy

    assert DDPStrategy(find_unused_parameters=True, static_graph=False)._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": False,
    }
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'find_unused'; DistributedDataParallel takes"):
        DDPStrategy(find_unused=True)
    with pytest.raises(ValueError, match=r"DDPStrategy sets 'device_ids' itself"):
        DDPStrategy(device_ids=[0])
