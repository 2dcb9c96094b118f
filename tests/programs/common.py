"""What the programs share with the tests: the command line, and a record of each run for the tests to compare."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Which Fabric a program imports: "lightning" (lightning.fabric.Fabric) or "fabric_ckpt".
IMPLEMENTATION = os.environ.get("PROGRAM_FABRIC", "fabric_ckpt")


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every program takes; a program adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--devices", type=int, default=1, help="processes: 1, or 2+ for DDP on gloo")
    parser.add_argument("--out", type=Path, required=True, help="where the run's record (losses, weights) goes")
    parser.add_argument("--checkpoints", type=Path, required=True, help="the checkpoint folder")
    parser.add_argument("--resume", action="store_true", help="load the latest checkpoint in --checkpoints first")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop at the first checkpoint after this many optimizer steps"
    )
    return parser


def strategy(devices: int) -> str:
    return "ddp" if devices > 1 else "auto"


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint that sorts last in ``folder`` (the programs name them so that the newest sorts last)."""
    candidates = sorted(path for path in folder.iterdir() if not path.name.startswith(".")) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def write_record(out: Path, rank: int, model: nn.Module, **facts: Any) -> None:
    """This rank's record of the run: ``facts`` (losses, counts) and the model's final weights, cloned on the CPU."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    torch.save({"implementation": IMPLEMENTATION, "weights": weights, **facts}, out / f"record-rank{rank}.pt")
