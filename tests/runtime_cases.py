"""Training-loop behaviour on every rank of a :class:`tests.distributed.WorkerGroup` (module level, so importable).

LightningModule-style models called through ``training_step`` and friends, and stateful data loaders; each function
returns plain data (full CPU tensors, error types and messages) for the test in the main process to compare.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from fabric_ckpt import DDPStrategy, Fabric, FSDPStrategy
from tests.dist_cases import full


class StepModel(nn.Module):
    """A model with the methods a LightningModule-style loop calls instead of ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.mse_loss(self(inputs), targets)

    def custom_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Not a Lightning step name: runs through the wrapper only once marked."""
        inputs, targets = batch
        return F.mse_loss(self.head(self.encoder(inputs)), targets)

    def describe(self) -> str:
        """Runs no submodule: a plain call wherever the model lives."""
        return f"{sum(p.numel() for p in self.parameters())} parameters"


def make_fabric(kind: str, precision: str = "32-true") -> Fabric:
    if kind == "ddp":
        strategy: Any = DDPStrategy(accelerator="cpu")
    elif kind == "fsdp":
        # The encoder is its own FSDP unit, so its parameters are unsharded by its own hooks, the head's by the root's.
        strategy = FSDPStrategy(accelerator="cpu", auto_wrap_policy={nn.Sequential})
    else:
        raise ValueError(kind)
    fabric = Fabric(strategy=strategy, precision=precision)
    fabric.launch()
    return fabric


def step_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 4, generator=generator), torch.randn(6, 1, generator=generator)


def train_with(kind: str, call: str, steps: int = 4, precision: str = "32-true") -> dict[str, Any]:
    """Train from the same start with different data per rank, the loss computed by ``call``:

    ``"forward"`` (``model(x)`` in the loop), ``"training_step"``, ``"custom_step"`` marked by name, or
    ``"custom_step_bound"`` marked with the bound method.
    """
    fabric = make_fabric(kind, precision)
    torch.manual_seed(0)
    module = StepModel()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    model, optimizer = fabric.setup(module, optimizer)
    if call == "custom_step":
        model.mark_forward_method("custom_step")
    elif call == "custom_step_bound":
        model.mark_forward_method(module.custom_step)
    losses = []
    for step in range(steps):
        batch = step_batch(step, fabric.global_rank)
        if call == "forward":
            loss = F.mse_loss(model(batch[0]), batch[1])
        elif call == "training_step":
            loss = model.training_step(batch)
        else:
            loss = model.custom_step(batch)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.detach())
    return {"params": parameters(model), "losses": losses, "forward_patched": "forward" in vars(module)}


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each rank's own view: DDP replicas as they are, FSDP parameters gathered from the shards."""
    return full({name: param.detach() for name, param in model.named_parameters()})


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}


def forward_method_errors(kind: str) -> dict[str, Any]:
    """What an unmarked method running submodules, a plain method, and bad ``mark_forward_method`` calls do."""
    fabric = make_fabric(kind)
    torch.manual_seed(0)
    module = StepModel()
    model = fabric.setup(module)
    batch = step_batch(0, fabric.global_rank)
    before = parameters(model)
    results = {
        "unmarked": _outcome(lambda: model.custom_step(batch)),
        "plain": _outcome(model.describe),
        "not_a_method": _outcome(lambda: model.mark_forward_method(42)),
        "forward": _outcome(lambda: model.mark_forward_method("forward")),
        "missing": _outcome(lambda: model.mark_forward_method("no_such_step")),
        "attribute": _outcome(lambda: model.mark_forward_method("head")),
    }
    # After the refusal the model still works, through the wrapper, and nothing was left patched.
    results["after"] = _outcome(lambda: model.training_step(batch).item())
    results["forward_patched"] = "forward" in vars(module)
    results["unchanged"] = all(torch.equal(before[k], v) for k, v in parameters(model).items())
    return results


# ---------------------------------------------------------------------------------------------------- data loaders
class Items(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class TaggedLoader(StatefulDataLoader):
    """A user's subclass with an argument of its own (kept as an attribute of the same name)."""

    def __init__(self, dataset: Any, tag: str, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


def stateful_loader_resumes(kind: str) -> dict[str, Any]:
    """A StatefulDataLoader subclass set up on 2 ranks keeps its class and arguments, and its saved position resumes
    the same next batches in a fresh loader."""
    fabric = make_fabric(kind)
    torch.manual_seed(1234)  # as seed_everything would: nothing below may depend on it differing per rank
    original = TaggedLoader(Items(24), tag="train", batch_size=2, shuffle=True, snapshot_every_n_steps=2)
    loader = fabric.setup_dataloaders(original)
    inner = loader.loader
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    expected = [batch for batch in iterator]
    fresh = fabric.setup_dataloaders(
        TaggedLoader(Items(24), tag="train", batch_size=2, shuffle=True, snapshot_every_n_steps=2)
    )
    fresh.load_state_dict(state)
    resumed = list(fresh)
    return {
        "class": type(inner).__name__,
        "same_class": type(inner) is type(original),
        "tag": inner.tag,
        "batch_size": inner.batch_size,
        "snapshot_every_n_steps": inner.snapshot_every_n_steps,
        "sampler": type(inner.sampler).__name__,
        "batch_sampler": f"{type(inner.batch_sampler).__module__}.{type(inner.batch_sampler).__name__}",
        "shuffles": isinstance(inner.sampler, DistributedSampler) and inner.sampler.shuffle,
        "consumed": [b.flatten().tolist() for b in consumed],
        "expected": [b.flatten().tolist() for b in expected],
        "resumed": [b.flatten().tolist() for b in resumed],
        "state_keys": sorted(state["loader"]),
    }


def stateful_loader_checkpoint(kind: str, path: str) -> dict[str, Any]:
    """The loader's position saved with fabric.save and restored with fabric.load into a fresh loader."""
    fabric = make_fabric(kind)

    def make() -> Any:
        return fabric.setup_dataloaders(TaggedLoader(Items(24), tag="train", batch_size=2, shuffle=True))

    loader = make()
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    fabric.save(path, {"loader": loader, "step": 2})
    expected = [b.flatten().tolist() for b in iterator]
    fresh = make()
    state = {"loader": fresh, "step": 0}
    fabric.load(path, state)
    return {"expected": expected, "resumed": [b.flatten().tolist() for b in fresh], "step": state["step"]}
