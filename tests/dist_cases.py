"""Functions that run on every rank of a :class:`tests.distributed.WorkerGroup` (importable, hence module level).

They return plain data (full CPU tensors, flags, messages) that the test in the main process compares.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fabric_ckpt import CheckpointError, DDPStrategy, Fabric, FSDPStrategy, StorageOptions
from fabric_ckpt.core.wrappers import unwrap_module
from tests.sharded_files import live_generation


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


class Model(nn.Module):
    """Odd sizes on purpose: 3 and 7 rows do not split evenly across 2, 3 or 4 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 14)
        self.blocks = nn.Sequential(Block(14), Block(14))
        self.head = nn.Linear(14, 3)
        self.extra = nn.Parameter(torch.randn(7, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x))) + self.extra.sum()


def make_fabric(kind: str, **kwargs: Any) -> Fabric:
    if kind == "ddp":
        strategy: Any = DDPStrategy(accelerator="cpu", **kwargs)
    elif kind == "fsdp":
        strategy = FSDPStrategy(accelerator="cpu", auto_wrap_policy={Block}, **kwargs)
    elif kind == "fsdp-full":
        strategy = FSDPStrategy(accelerator="cpu", auto_wrap_policy={Block}, state_dict_type="full", **kwargs)
    else:
        raise ValueError(kind)
    fabric = Fabric(strategy=strategy)
    fabric.launch()
    return fabric


def build(fabric: Fabric, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    return fabric.setup(model, optimizer)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(1000 * step + rank))


def train(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        loss = model(batch(step, fabric.global_rank)).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(fabric.all_reduce(loss.detach()).item())
    return losses


def full(value: Any) -> Any:
    """Full CPU copies of (possibly sharded) tensors, recursively."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": full(model.state_dict()),
        "optimizer": full(optimizer.state_dict()["state"]),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }


# ---------------------------------------------------------------------------------------------------- cases
def save_trained(kind: str, path: str, steps: int = 3, seed: int = 0) -> dict[str, Any]:
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, seed)
    train(fabric, model, optimizer, 0, steps)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": steps, "meta": {"name": "run"}})
    exists_right_after = os.path.exists(path)
    return {**full_state(model, optimizer), "exists_right_after": exists_right_after, "rank": fabric.global_rank}


def load_fresh(kind: str, path: str, strict: bool = True, seed: int = 123) -> dict[str, Any]:
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, seed)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(path, state, strict=strict)
    return {**full_state(model, optimizer), "step": state["step"], "remainder": full(remainder)}


def load_everything(kind: str, path: str) -> dict[str, Any]:
    fabric = make_fabric(kind)
    return full(fabric.load(path))


def resume_matches_uninterrupted(kind: str, folder: str, total: int = 6, save_at: int = 3) -> dict[str, Any]:
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 0)
    reference = train(fabric, model, optimizer, 0, total)
    first, first_optimizer = build(fabric, 0)
    before = train(fabric, first, first_optimizer, 0, save_at)
    path = os.path.join(folder, "resume.ckpt")
    fabric.save(path, {"model": first, "optimizer": first_optimizer, "step": save_at})
    resumed, resumed_optimizer = build(fabric, 77)
    state = {"model": resumed, "optimizer": resumed_optimizer, "step": 0}
    fabric.load(path, state)
    after = train(fabric, resumed, resumed_optimizer, state["step"], total)
    return {
        "reference": reference,
        "resumed": before + after,
        "params": full(model.state_dict()),
        "resumed_params": full(resumed.state_dict()),
    }


class FailsOnRank:
    """A stateful object whose ``state_dict()`` raises on one rank only."""

    def __init__(self, rank: int, failing_rank: int) -> None:
        self.rank, self.failing_rank = rank, failing_rank

    def state_dict(self) -> dict[str, Any]:
        if self.rank == self.failing_rank:
            raise RuntimeError(f"snapshot failed on rank {self.rank}")
        return {"ok": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def save_failing(kind: str, path: str, failing_rank: int, phase: str) -> dict[str, Any]:
    """Save with a failure on one rank while building the state (``phase="state"``) or while writing it."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 5)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 99}
    if phase == "state":
        state["picky"] = FailsOnRank(fabric.global_rank, failing_rank)
    elif fabric.global_rank == failing_rank:
        state["unpicklable"] = lambda: None  # only this rank has it, so only this rank writes it
    started = time.monotonic()
    try:
        fabric.save(path, state)
    except Exception as err:
        chain = []
        cause: BaseException | None = err
        while cause is not None:
            chain.append(type(cause).__name__)
            cause = cause.__cause__
        return {
            "error": type(err).__name__,
            "message": str(err),
            "chain": chain,
            "is_checkpoint_error": isinstance(err, CheckpointError),
            "seconds": time.monotonic() - started,
        }
    return {"error": None}


def list_files_and_chunks(path: str) -> dict[str, Any]:
    """What each file of a sharded checkpoint holds (read on one rank; the answer is the same everywhere)."""
    from fabric_ckpt.formats.dcp import read_metadata
    from fabric_ckpt.storage import resolve

    path = live_generation(path)
    metadata = read_metadata(resolve(path))
    chunks: dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        for chunk in getattr(md, "chunks", []):
            info = metadata.storage_data[_storage_index(metadata, fqn, chunk.offsets)]
            chunks.setdefault(info.relative_path, []).append((fqn, tuple(chunk.offsets), tuple(chunk.sizes)))
    return {"files": sorted(os.listdir(path)), "chunks": chunks}  # the live generation's files


def _storage_index(metadata: Any, fqn: str, offsets: Any) -> Any:
    for index in metadata.storage_data:
        if index.fqn == fqn and tuple(index.offset) == tuple(offsets):
            return index
    raise KeyError(fqn)


def local_shapes(kind: str, seed: int = 0) -> dict[str, Any]:
    """The shape of this rank's shard of every parameter."""
    fabric = make_fabric(kind)
    model, _ = build(fabric, seed)
    return {
        name: tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
        for name, p in model.named_parameters()
    }


def load_missing_key(kind: str, path: str) -> dict[str, Any]:
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 8)
    try:
        fabric.load(path, {"model": model, "optimizer": optimizer, "epoch": 0})
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None}


def load_with_options(kind: str, path: str, **options: Any) -> dict[str, Any]:
    """Load into a fresh model/optimizer with fabric.load options; return the states or the error."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 8)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    try:
        remainder = fabric.load(path, state, **options)
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), **full_state(model, optimizer)}
    return {"error": None, **full_state(model, optimizer), "step": state["step"], "remainder": full(remainder)}


class Recorder:
    """A stateful object that records every state it is given."""

    def __init__(self) -> None:
        self.loaded: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"name": "fresh"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)


def load_damaged_leaves_everything(
    kind: str, path: str, absent_key: bool = False, hooked: bool = False
) -> dict[str, Any]:
    """Load a damaged checkpoint into a model, its optimizer and a stateful object; report what changed.

    ``absent_key``: the state also asks (strictly) for an entry the checkpoint lacks, which planning finds first.
    ``hooked``: the model has an ``on_load_checkpoint`` hook (which must only ever see checked data).
    """
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 8)
    train(fabric, model, optimizer, 0, 1)
    before = full_state(model, optimizer)
    hook_calls: list[list[str]] = []
    if hooked:
        unwrap_module(model).on_load_checkpoint = lambda checkpoint: hook_calls.append(sorted(checkpoint))
    recorder = Recorder()
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "meta": recorder, "step": -1}
    if absent_key:
        state["absent"] = 0
    try:
        fabric.load(path, state)
    except Exception as err:
        error: dict[str, Any] = {"error": type(err).__name__, "message": str(err)}
    else:
        error = {"error": None, "message": ""}
    return {
        **error,
        "before": before,
        "after": full_state(model, optimizer),
        "stateful": recorder.loaded,
        "step": state["step"],
        "hook_calls": hook_calls,
    }


class Shortener:
    """A stateful object whose restore shortens a shard file: another process truncating it mid-load.

    Sharded loads restore stateful objects after every rank's checks passed and before any tensor is copied, so
    the truncation lands between the checks and the copy.
    """

    def __init__(self, shard: str, on_rank: int, rank: int) -> None:
        self.shard, self.active = shard, on_rank == rank

    def state_dict(self) -> dict[str, Any]:
        return {"name": "fresh"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.active:
            self.active = False
            os.truncate(self.shard, 4096)


def load_while_a_shard_is_shortened(kind: str, path: str, shard: str, on_rank: int) -> dict[str, Any]:
    """Load ``path`` while ``shard`` is truncated by "another process" (on ``on_rank``) after the checks passed."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 8)
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "meta": Shortener(shard, on_rank, fabric.global_rank),
        "step": -1,
    }
    try:
        fabric.load(path, state)
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "alive": True}
    return {"error": None, "message": "", "alive": True}


def save_to(kind: str, path: str, seed: int) -> dict[str, Any]:
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, seed)
    train(fabric, model, optimizer, 0, 2)
    fabric.save(path, {"model": model, "optimizer": optimizer, "seed": seed, "step": 2})
    return full_state(model, optimizer)


def memory_url_round_trip(kind: str) -> dict[str, Any]:
    """Sharded save and load through fsspec (``memory://`` is per process, so run this on one rank)."""
    import fsspec

    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 3)
    train(fabric, model, optimizer, 0, 2)
    fabric.save("memory://runs/sharded.ckpt", {"model": model, "optimizer": optimizer, "step": 2})
    fabric.save("memory://runs/sharded.ckpt", {"model": model, "optimizer": optimizer, "step": 2})  # overwrite
    memory = fsspec.filesystem("memory")
    files = sorted(p.rsplit("/", 1)[-1] for p in memory.ls("/runs/sharded.ckpt", detail=False))
    manifest = json.loads(memory.cat_file("/runs/sharded.ckpt/fabric_ckpt.json"))["manifest"]
    live = manifest["generation"]
    shards = sorted(p.rsplit("/", 1)[-1] for p in memory.ls(f"/runs/sharded.ckpt/{live}", detail=False))
    fresh, fresh_optimizer = build(fabric, 4)
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load("memory://runs/sharded.ckpt", state)
    leftovers = sorted(p.rsplit("/", 1)[-1] for p in fsspec.filesystem("memory").ls("/runs", detail=False))
    return {
        "saved": full_state(model, optimizer),
        "loaded": full_state(fresh, fresh_optimizer),
        "step": state["step"],
        "files": files,
        "shards": shards,
        "folder": leftovers,
    }


def manager_resume(
    kind: str, folder: str, stop_after: int | None, filename: str = "ba{batch}", latest_filename: str = "latest"
) -> dict[str, Any]:
    """Train 6 batches with a manager saving every 2 (keeping 2), with dropout-like noise from every RNG.

    With ``stop_after`` the run stops there ("crash"); called again with ``None`` it resumes from ``latest``.
    """
    import random

    from fabric_ckpt import CheckpointManager

    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 0)
    manager = CheckpointManager(
        fabric,
        folder,
        filename=filename,
        latest_filename=latest_filename,
        save_interval="2ba",
        num_checkpoints_to_keep=2,
        run_name="test",
    )
    state = {"model": model, "optimizer": optimizer}
    random.seed(100 + fabric.global_rank)  # each rank its own stream; a resume must restore it, not reseed
    torch.manual_seed(100 + fabric.global_rank)
    resumed = manager.load_latest(state)
    losses, draws = [], []
    for step in range(manager.timestamp.batch, 6):
        noise = torch.rand(1).item() + random.random()  # differs per rank and per step unless RNG is restored
        draws.append(noise)
        loss = (model(batch(step, fabric.global_rank)) * noise).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(fabric.all_reduce(loss.detach()).item())
        manager.on_batch_end(state, samples=5)
        if stop_after is not None and step + 1 == stop_after:
            break
    return {
        "resumed": resumed is not None,
        "losses": losses,
        "draws": draws,
        "params": full(model.state_dict()),
        "files": sorted(os.listdir(folder)),
        "latest": os.readlink(os.path.join(folder, latest_filename.format(rank=0))),
    }


class HookedModel(Model):
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["from_hook"] = "saved"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["step"] = checkpoint["step"] + 100


def filter_hooks_and_load_raw(kind: str, folder: str, raw_file: str) -> dict[str, Any]:
    """``filter``, the module hooks and ``load_raw`` under a parallel strategy, as on one device."""
    fabric = make_fabric(kind)
    torch.manual_seed(0)
    module = HookedModel()
    model, _optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    path = os.path.join(folder, f"filtered-{kind}.ckpt")
    fabric.save(path, {"model": model, "step": 1}, filter={"model": lambda key, value: key.startswith("head.")})
    everything = full(fabric.load(path))
    torch.manual_seed(1)
    target = fabric.setup(HookedModel())
    state = {"model": target, "step": 0}
    fabric.load(path, state, strict=False)
    raw_target = fabric.setup(Model())
    fabric.load_raw(raw_file, raw_target)
    return {
        "saved_keys": sorted(everything["model"]),
        "from_hook": everything.get("from_hook"),
        "step_after_hook": state["step"],
        "head": full(target.state_dict())["head.weight"],
        "original_head": full(model.state_dict())["head.weight"],
        "raw": full(raw_target.state_dict()),
    }


def s3_sharded_round_trip(kind: str, url: str) -> dict[str, Any]:
    """Sharded save to an object store (twice: an overwrite), then load into fresh objects."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 6)
    train(fabric, model, optimizer, 0, 2)
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 1})
    train(fabric, model, optimizer, 2, 3)
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 2})
    fresh, fresh_optimizer = build(fabric, 7)
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load(url, state)
    return {"saved": full_state(model, optimizer), "loaded": full_state(fresh, fresh_optimizer), "step": state["step"]}


def async_save_while_training(kind: str, path: str, snapshot: str = "eager") -> dict[str, Any]:
    """save_async, then keep training (collectives on the default group) while the checkpoint is written."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 11)
    train(fabric, model, optimizer, 0, 2)
    expected = full_state(model, optimizer)
    handle = fabric.save_async(path, {"model": model, "optimizer": optimizer, "step": 2}, snapshot=snapshot)
    train(fabric, model, optimizer, 2, 5)  # overlaps with the background write
    handle.wait()
    fabric.wait_for_saves()
    fresh, fresh_optimizer = build(fabric, 12)
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load(path, state)
    return {"expected": expected, "loaded": full_state(fresh, fresh_optimizer), "step": state["step"]}


def load_bare_dcp_index_keyed(kind: str, path: str) -> dict[str, Any]:
    """An FSDP run loading a bare DCP folder whose optimizer state was saved by index (without FSDP)."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 21)
    fabric.load(path, {"model": model, "optimizer": optimizer})
    return full_state(model, optimizer)


def save_before_any_step_and_load(kind: str, path: str) -> dict[str, Any]:
    """A checkpoint saved before the optimizer's first step (its state is empty) loads back."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 31)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 0})
    fresh, fresh_optimizer = build(fabric, 32)
    fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer, "step": 0})
    return {"saved": full_state(model, optimizer), "loaded": full_state(fresh, fresh_optimizer)}


def distributed_batches(kind: str) -> dict[str, Any]:
    """What each rank reads from a set-up DataLoader over 10 items, two epochs, shuffled."""
    from torch.utils.data import DataLoader

    fabric = make_fabric(kind)
    loader = fabric.setup_dataloaders(DataLoader(list(range(10)), batch_size=2, shuffle=True))
    epochs = [[int(x) for batch in loader for x in batch] for _ in range(2)]
    return {"epochs": epochs, "length": len(loader)}


def writer_threads_round_trip(
    path: str, strategy_threads: int | None, option_threads: int | None, asynchronous: bool
) -> dict[str, Any]:
    """Save with writer threads set on the strategy and/or the storage options, then load into a fresh model."""
    strategy = FSDPStrategy(accelerator="cpu", auto_wrap_policy={Block}, writer_threads=strategy_threads)
    options = StorageOptions(writer_threads=option_threads) if option_threads is not None else None
    fabric = Fabric(strategy=strategy, storage_options=options)
    fabric.launch()
    model, optimizer = build(fabric, 21)
    train(fabric, model, optimizer, 0, 2)
    state = {"model": model, "optimizer": optimizer, "step": 2}
    if asynchronous:
        fabric.save_async(path, state).wait()
    else:
        fabric.save(path, state)
    fresh, fresh_optimizer = build(fabric, 22)
    fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer, "step": 0})
    return {
        "saved": full_state(model, optimizer),
        "loaded": full_state(fresh, fresh_optimizer),
        "files": sorted(os.listdir(live_generation(path))),
    }
