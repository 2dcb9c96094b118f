"""Two-tier manager runs on every rank of a :class:`tests.distributed.WorkerGroup` (importable by the workers)."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from fabric_ckpt import CheckpointManager
from tests.dist_cases import batch, build, full, make_fabric


def two_tier_resume(kind: str, folder: str, remote: str, stop_after: int | None, keep: int) -> dict[str, Any]:
    """:func:`tests.dist_cases.manager_resume`'s training (same seeds, same noise) with a remote tier; waits for the
    uploads at the end."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 0)
    manager = CheckpointManager(
        fabric,
        folder,
        filename="ba{batch}",
        latest_filename="latest",
        save_interval="2ba",
        num_checkpoints_to_keep=keep,
        remote_folder=remote,
        run_name="test",
    )
    state = {"model": model, "optimizer": optimizer}
    random.seed(100 + fabric.global_rank)
    torch.manual_seed(100 + fabric.global_rank)
    manager.load_latest(state)
    losses = []
    for step in range(manager.timestamp.batch, 6):
        noise = torch.rand(1).item() + random.random()
        loss = (model(batch(step, fabric.global_rank)) * noise).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(fabric.all_reduce(loss.detach()).item())
        manager.on_batch_end(state, samples=5)
        if stop_after is not None and step + 1 == stop_after:
            break
    manager.wait()
    return {
        "resumed_from": manager.resumed_from,
        "losses": losses,
        "params": full(model.state_dict()),
        "local": sorted(os.listdir(folder)) if os.path.isdir(folder) else [],
    }
