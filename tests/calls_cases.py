"""Functions run on every rank of a :class:`tests.distributed.WorkerGroup` for tests/test_calls_distributed.py."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.distributed as dist

from fabric_ckpt import DDPStrategy, Fabric, FSDPStrategy
from tests.dist_cases import Block, Model, batch, full, full_state, train


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block, restoring them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def as_nodes_of_one() -> contextlib.AbstractContextManager[None]:
    """Make each rank of the group look like the only process of its own machine (2 ranks: 2 nodes)."""
    return environment(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=os.environ["RANK"])


def described(data: Any) -> Any:
    """Tensors as (dtype, values), recursively, for comparing across processes and libraries."""
    if isinstance(data, torch.Tensor):
        return (str(data.dtype), data.tolist())
    if isinstance(data, dict):
        return {key: described(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(described(value) for value in data)
    return data


# ---------------------------------------------------------------------------------------------------- collectives
def collective_calls(fabric: Any) -> dict[str, Any]:
    rank = fabric.global_rank
    in_place = torch.tensor([1.0 + rank])
    returned = fabric.all_reduce(in_place, reduce_op="sum")
    return {
        "gather": described(
            fabric.all_gather(
                {"count": rank + 1, "loss": 0.5 * rank, "flag": rank == 0, "array": numpy.array([rank, 10])}
            )
        ),
        "gather_nested": described(fabric.all_gather([rank, (2.5, "tag")])),
        "int_mean": described(fabric.all_reduce(3 * rank + 2)),  # (2 + 5) / 2, truncated as Lightning does
        "float_mean": described(fabric.all_reduce(float(rank))),
        "sum": described(fabric.all_reduce({"a": rank, "b": [1.5]}, reduce_op="sum")),
        "max_op": described(fabric.all_reduce(rank, reduce_op=dist.ReduceOp.MAX)),
        "avg_name": described(fabric.all_reduce(torch.tensor([2.0 * rank]), reduce_op="AVG")),
        "in_place": (returned is in_place, in_place.tolist()),
        "broadcast": described(fabric.broadcast({"rank": rank, "t": torch.tensor([rank]), "l": [rank, "s"]}, src=1)),
    }


def collectives_as_lightning() -> dict[str, Any]:
    from lightning.fabric import Fabric as LightningFabric

    ours = Fabric(strategy=DDPStrategy(accelerator="cpu"))
    ours.launch()
    theirs = LightningFabric(accelerator="cpu", strategy="ddp", devices=2)
    theirs.launch()  # joins the existing process group, as under torchrun
    return {"ours": collective_calls(ours), "lightning": collective_calls(theirs)}


# ---------------------------------------------------------------------------------------------------- rank_zero_first
def rank_zero_first_order(folder: str, local: bool) -> dict[str, Any]:
    fabric = Fabric(strategy=DDPStrategy(accelerator="cpu"))
    marker = Path(folder) / f"written-by-rank-0-{local}"
    seen_by_rank_1 = None
    with fabric.rank_zero_first(local=local):
        if fabric.global_rank == 0:
            time.sleep(0.5)  # slow work: rank 1 must not enter before it is done
            marker.write_text("done")
        else:
            seen_by_rank_1 = marker.exists()
    return {"seen": seen_by_rank_1}


def rank_zero_first_per_node() -> dict[str, Any]:
    with as_nodes_of_one():
        fabric = Fabric(strategy=DDPStrategy(accelerator="cpu"))
        ran = []
        with fabric.rank_zero_first(local=True):  # every rank is its node's first: nobody waits
            ran.append(fabric.global_rank)
        return {"ran": ran, "local_rank": fabric.local_rank, "node_rank": fabric.node_rank}


def lightning_rank_follows_fabric() -> dict[str, Any]:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = 0  # as if Lightning had been imported without a rank in the environment
    fabric = Fabric(strategy=DDPStrategy(accelerator="cpu"))
    fabric.launch()
    calls = []
    rank_zero_only(calls.append)("logged")
    return {"rank": rank_zero_only.rank, "calls": calls}


# ---------------------------------------------------------------------------------------------------- FSDP
def fsdp_fabric(nodes_of_one: bool = False, **options: Any) -> Fabric:
    strategy = FSDPStrategy(accelerator="cpu", auto_wrap_policy={Block}, **options)
    if nodes_of_one:
        with as_nodes_of_one():
            fabric = Fabric(strategy=strategy)
            fabric.launch()
            _ = strategy.device_mesh  # built while the ranks look like separate machines
    else:
        fabric = Fabric(strategy=strategy)
        fabric.launch()
    return fabric


def build(fabric: Fabric, seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = Model()
    return fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1))


def sharding_round_trip(path: str, nodes_of_one: bool = False, **options: Any) -> dict[str, Any]:
    """Train 3 steps, save, load into a differently initialised model: the states must be bitwise equal."""
    fabric = fsdp_fabric(nodes_of_one, **options)
    model, optimizer = build(fabric, 0)
    losses = train(fabric, model, optimizer, 0, 3)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    saved = full_state(model, optimizer)
    fresh, fresh_optimizer = build(fabric, 123)
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load(path, state)
    mesh = fabric.strategy.device_mesh
    return {
        "losses": losses,
        "saved": saved,
        "loaded": full_state(fresh, fresh_optimizer),
        "step": state["step"],
        "mesh_shape": tuple(mesh.shape),
        "placements": [str(p) for p in fresh.embed.weight.placements],
        "reshard_after_forward": fabric.strategy.options.reshard_after_forward,
    }


def load_into(path: str, **options: Any) -> dict[str, Any]:
    fabric = fsdp_fabric(**options)
    model, optimizer = build(fabric, 321)
    fabric.load(path, {"model": model, "optimizer": optimizer})
    return full_state(model, optimizer)


def empty_init_loads_a_checkpoint(path: str, state_dict_type: str) -> dict[str, Any]:
    """A model created under init_module(empty_init=True) (meta device) is materialised by setup and loads exactly."""
    fabric = fsdp_fabric(state_dict_type=state_dict_type)
    trained, trained_optimizer = build(fabric, 0)
    train(fabric, trained, trained_optimizer, 0, 3)
    fabric.save(path, {"model": trained, "optimizer": trained_optimizer})
    saved = full_state(trained, trained_optimizer)
    with fabric.init_module(empty_init=True):
        model = Model()
    on_meta = all(p.is_meta for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)  # made from the meta parameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer = fabric.setup(model, optimizer)
    materialised = not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    fabric.load(path, {"model": model, "optimizer": optimizer})
    loaded = full_state(model, optimizer)
    next_losses = train(fabric, model, optimizer, 3, 5)
    reference_losses = train(fabric, trained, trained_optimizer, 3, 5)
    return {
        "on_meta": on_meta,
        "materialised": materialised,
        "warnings": [str(w.message) for w in caught if "reset_parameters" in str(w.message)],
        "saved": saved,
        "loaded": loaded,
        "next_losses": next_losses,
        "reference_losses": reference_losses,
        "after": full_state(model, optimizer),
        "reference_after": full_state(trained, trained_optimizer),
    }


def activation_checkpointing(policy_kind: str) -> dict[str, Any]:
    """Training with activation checkpointing gives the same numbers and names; blocks run forward twice."""
    options: dict[str, Any] = {}
    if policy_kind == "set":
        options["activation_checkpointing_policy"] = {Block}
    elif policy_kind == "predicate":
        options["activation_checkpointing_policy"] = lambda module: isinstance(module, Block)
    elif policy_kind == "deprecated":
        options["activation_checkpointing"] = Block
    fabric = fsdp_fabric(**options)
    model, optimizer = build(fabric, 0)
    calls = []
    model.blocks[0].linear.register_forward_hook(lambda *_: calls.append(1))
    losses = train(fabric, model, optimizer, 0, 2)
    return {
        "losses": losses,
        "forward_calls": len(calls),
        "names": sorted(name for name, _ in model.named_parameters()),
        "state": full(model.state_dict()),
    }


def mixed_precision_losses(kind: str) -> list[float]:
    from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

    if kind == "fsdp1":
        options: dict[str, Any] = {
            "mixed_precision": MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        }
    else:
        options = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    fabric = fsdp_fabric(**options)
    model, optimizer = build(fabric, 0)
    losses = []
    for step in range(2):
        loss = model(batch(step, fabric.global_rank)).float().pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses
