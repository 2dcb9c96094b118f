"""A training run that saves and stops on SIGTERM, for tests/test_preemption.py (run as a program of its own).

    python tests/preemption_run.py --folder RUN [--devices 2] [--async-save] [--step-sleep 0.02]

It resumes from ``latest`` in ``RUN`` (if any) and trains to the end, or until SIGTERM makes the manager save and
stop. Dropout, a shuffling loader read mid-epoch and AdamW make every step depend on the whole saved state. What
the test watches, on stdout (one line each, flushed): ``ready rank=R pid=P`` once the handler is in place,
``resumed rank=R batch=B``, ``step rank=R batch=B`` after each ``on_batch_end``, ``stopped rank=R batch=B`` or
``finished rank=R batch=B``; a stopped run also prints ``signalled rank=R during=PHASE`` where a handler installed
before the manager's (it must still be called) saw the signal arrive: ``start`` (setting up, resuming), ``step``,
``hook`` (``on_batch_end``/``on_epoch_end`` without a save) or ``saving`` (a hook that saved). Each batch's item
indices are appended to ``RUN/consumed-rank{R}.jsonl``; a run that finishes writes its final parameters to
``RUN/final-rank{R}.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fabric_ckpt import CheckpointManager, Fabric

EPOCHS = 3
PHASE = ["start"]  # where the loop is; the handler below reads it
SEEN: list[str] = []
ITEMS = 48
BATCH_SIZE = 4


class Points(Dataset):
    """Item ``i``: fixed features of ``i``, jittered with the process's generator (so reading depends on the RNG)."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        features = torch.randn(6, generator=torch.Generator().manual_seed(index))
        return index, features + 0.01 * torch.randn(6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.02)
    parser.add_argument("--signal-timeout", type=float, default=60.0)
    parser.add_argument("--pause-at", type=int, default=-1, help="print 'paused rank=R batch=B' and pause in batch B")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of that pause")
    args = parser.parse_args()
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda number, frame: SEEN.append(PHASE[0]))  # the manager's chains to it
    fabric = Fabric(accelerator="cpu", strategy="ddp" if args.devices > 1 else "auto", devices=args.devices)
    fabric.launch()
    rank = fabric.global_rank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(Points(), batch_size=BATCH_SIZE, shuffle=True))
    manager = CheckpointManager(
        fabric,
        args.folder,
        save_interval="5ba",
        num_checkpoints_to_keep=2,
        async_save=args.async_save,
        run_name="preempt",
        save_on_signal=(signal.SIGTERM,),
        signal_timeout=args.signal_timeout,
    )
    say(f"ready rank={rank} pid={os.getpid()}")
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    manager.load_latest(state)
    say(f"resumed rank={rank} batch={manager.timestamp.batch}")

    with open(os.path.join(args.folder, f"consumed-rank{rank}.jsonl"), "a") as consumed:
        while manager.timestamp.epoch < EPOCHS and not manager.should_stop:
            for indices, features in loader:
                PHASE[0] = "step"
                loss = model(features).pow(2).mean()
                optimizer.zero_grad()
                fabric.backward(loss)
                optimizer.step()
                consumed.write(json.dumps(indices.tolist()) + "\n")
                consumed.flush()
                if manager.timestamp.batch + 1 == args.pause_at:  # the step's collectives are done
                    say(f"paused rank={rank} batch={args.pause_at}")
                    time.sleep(args.pause)
                time.sleep(args.step_sleep)  # a longer step: signals land in every part of it
                hook(manager.on_batch_end, state, samples=len(indices))
                say(f"step rank={rank} batch={manager.timestamp.batch}")
                if manager.should_stop:
                    break
            if manager.should_stop:
                break
            hook(manager.on_epoch_end, state)
    fabric.wait_for_saves()
    if manager.should_stop:
        say(f"signalled rank={rank} during={SEEN[0] if SEEN else 'none'}")
        say(f"stopped rank={rank} batch={manager.timestamp.batch}")
        return 0
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, final_path(args.folder, rank))
    say(f"finished rank={rank} batch={manager.timestamp.batch}")
    return 0


def hook(method, *args, **kwargs) -> None:
    """Call a manager hook, telling the signal handler whether it is inside one (and, after, whether it saved)."""
    PHASE[0] = "hook"
    seen_before = len(SEEN)
    saved = method(*args, **kwargs)
    if saved is not None and len(SEEN) > seen_before and SEEN[seen_before] == "hook":
        SEEN[seen_before] = "saving"


def final_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"final-rank{rank}.pt")


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())  # one write: the ranks share the pipe, lines stay whole


if __name__ == "__main__":
    sys.exit(main())
