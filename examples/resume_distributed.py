"""Two processes (DDP or FSDP) started by ``fabric.launch()``: train, save, and resume in fresh processes.

    python examples/resume_distributed.py --strategy fsdp --folder /tmp/run --phase first
    python examples/resume_distributed.py --strategy fsdp --folder /tmp/run --phase resume

The first phase trains an uninterrupted reference run and, separately, a run that stops and saves halfway. The
second phase (new processes, new objects with another initialisation) loads the halfway checkpoint and trains on;
its losses and final parameters must be bitwise those of the reference. ``fabric.launch()`` starts the second
process by re-running this command line; under ``torchrun`` it joins the processes torchrun started instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

from fabric_ckpt import Fabric

TOTAL_STEPS = 12
SAVE_AT = 6


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


def build(fabric: Fabric, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), Block(32), Block(32), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return fabric.setup(model, optimizer)


def train(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        # Each rank sees its own slice of the data: the batch depends on the step and the rank only.
        generator = torch.Generator().manual_seed(10_000 * step + fabric.global_rank)
        inputs = torch.randn(16, 8, generator=generator)
        targets = inputs[:, :3].sin()
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(fabric.all_reduce(loss.detach()).item())
    return losses


def first_phase(fabric: Fabric, folder: str) -> None:
    model, optimizer = build(fabric, seed=0)
    reference = train(fabric, model, optimizer, 0, TOTAL_STEPS)
    fabric.save(os.path.join(folder, "reference.ckpt"), {"model": model})

    model, optimizer = build(fabric, seed=0)
    before = train(fabric, model, optimizer, 0, SAVE_AT)
    fabric.save(os.path.join(folder, "halfway.ckpt"), {"model": model, "optimizer": optimizer, "step": SAVE_AT})
    if fabric.is_global_zero:
        with open(os.path.join(folder, "losses.json"), "w") as f:
            json.dump({"reference": reference, "before": before}, f)
    fabric.print(f"first phase: trained {TOTAL_STEPS} steps (reference) and {SAVE_AT} steps, saved halfway.ckpt")


def resume_phase(fabric: Fabric, folder: str) -> bool:
    model, optimizer = build(fabric, seed=123)  # another initialisation: only the checkpoint can make it right
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(os.path.join(folder, "halfway.ckpt"), state)
    after = train(fabric, model, optimizer, state["step"], TOTAL_STEPS)
    with open(os.path.join(folder, "losses.json")) as f:
        recorded = json.load(f)
    losses_equal = recorded["before"] + after == recorded["reference"]
    final = fabric.load(os.path.join(folder, "reference.ckpt"))["model"]  # full tensors on every rank
    mine = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    params_equal = all(torch.equal(mine[k], v) for k, v in final.items())
    ok = bool(fabric.all_reduce(torch.tensor(float(losses_equal and params_equal)), reduce_op="min").item())
    fabric.print(f"resume phase ({fabric.world_size} fresh processes, {type(fabric.strategy).__name__}):")
    fabric.print("  step | uninterrupted loss | resumed loss")
    for step in (SAVE_AT - 1, SAVE_AT, TOTAL_STEPS - 1):
        resumed = (recorded["before"] + after)[step]
        fabric.print(f"  {step:4d} | {recorded['reference'][step]:.10f}       | {resumed:.10f}")
    fabric.print(f"  losses identical: {losses_equal}; parameters bitwise equal on every rank: {ok}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--phase", choices=["first", "resume"], required=True)
    parser.add_argument("--folder", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", strategy=args.strategy, devices=2)
    fabric.launch()
    if args.phase == "first":
        first_phase(fabric, args.folder)
        return 0
    return 0 if resume_phase(fabric, args.folder) else 1


if __name__ == "__main__":
    sys.exit(main())
