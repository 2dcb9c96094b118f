"""Train a tiny model, save a checkpoint halfway, resume into fresh objects, and prove nothing changed.

Run it directly (``python examples/resume_single_device.py``) or through ``make demo``.
The uninterrupted run and the save-then-resume run must produce bitwise-identical losses, parameters and optimizer
state: the checkpoint captured everything the loop depends on.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from fabric_ckpt import Fabric

TOTAL_STEPS = 40
SAVE_AT = 20


def build(fabric: Fabric, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    return model, optimizer, scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic data that depends only on the step, so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(32, 16, generator=generator)
    targets = (inputs[:, :4] * 2.0 + 0.1 * torch.randn(32, 4, generator=generator)).sin()
    return inputs, targets


def train(
    fabric: Fabric,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: object,
    start: int,
    stop: int,
) -> list[float]:
    losses = []
    for step in range(start, stop):
        inputs, targets = batch(step)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses


def run(folder: Path) -> bool:
    fabric = Fabric(accelerator="cpu")
    checkpoint = folder / "step-20.ckpt"

    model, optimizer, scheduler = build(fabric, seed=0)
    reference = train(fabric, model, optimizer, scheduler, 0, TOTAL_STEPS)

    first, first_opt, first_sched = build(fabric, seed=0)
    before = train(fabric, first, first_opt, first_sched, 0, SAVE_AT)
    fabric.save(checkpoint, {"model": first, "optimizer": first_opt, "scheduler": first_sched, "step": SAVE_AT})
    del first, first_opt, first_sched  # the "crash"

    # Fresh objects with a different initialisation: only the checkpoint can make them match.
    resumed, resumed_opt, resumed_sched = build(fabric, seed=123)
    state = {"model": resumed, "optimizer": resumed_opt, "scheduler": resumed_sched, "step": 0}
    fabric.load(checkpoint, state)
    after = train(fabric, resumed, resumed_opt, resumed_sched, state["step"], TOTAL_STEPS)

    losses_equal = before + after == reference
    params_equal = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=False)
    )
    optimizer_equal = all(
        torch.equal(a[key], b[key])
        for a, b in zip(optimizer.state.values(), resumed_opt.state.values(), strict=False)
        for key in a
    )
    size = checkpoint.stat().st_size
    print(
        f"single device: trained {TOTAL_STEPS} steps; saved at step {SAVE_AT} ({size:,} bytes), "
        "resumed in fresh objects"
    )
    print("  step | uninterrupted loss | resumed loss")
    for step in (SAVE_AT - 1, SAVE_AT, SAVE_AT + 1, TOTAL_STEPS - 1):
        resumed_loss = (before + after)[step]
        print(f"  {step:4d} | {reference[step]:.10f}      | {resumed_loss:.10f}")
    print(
        f"  losses identical: {losses_equal}; parameters bitwise equal: {params_equal}; "
        f"optimizer state bitwise equal: {optimizer_equal}; lr {resumed_opt.param_groups[0]['lr']:g}"
    )
    return losses_equal and params_equal and optimizer_equal


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        return 0 if run(Path(folder)) else 1


if __name__ == "__main__":
    sys.exit(main())
