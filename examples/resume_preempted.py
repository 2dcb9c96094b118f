"""A 2-process DDP job is preempted (SIGTERM to one rank, mid-epoch), saves, exits 0, and the next job resumes exactly.

    python examples/resume_preempted.py

Three jobs of the same training program, each two processes started by ``fabric.launch()``: an uninterrupted one; a
job that receives SIGTERM on rank 1 in the middle of epoch 1 (as a scheduler would send it), where both ranks save
the same step with ``CheckpointManager(save_on_signal=(signal.SIGTERM,))`` and exit 0; and a next job that resumes
from ``latest`` and continues with the very next batch of that epoch (the loader's position is in the checkpoint).
Each rank's batches over the whole run, and its final weights, must be those of the uninterrupted job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fabric_ckpt import CheckpointManager, Fabric

EPOCHS = 3
PREEMPT_AFTER = 9  # rank 1 is signalled once it reports batch 9: epoch 1, 3 of its 6 batches done


class Numbers(Dataset):
    """48 items; item ``i`` is ``(i, features)``, jittered by the process's generator while it is read."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        features = torch.randn(6, generator=torch.Generator().manual_seed(index))
        return index, features + 0.01 * torch.randn(6)


def job(folder: str) -> int:
    """One job: resume from ``latest`` if there is one, train to the end or until SIGTERM."""
    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2)
    fabric.launch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    loader = fabric.setup_dataloaders(DataLoader(Numbers(), batch_size=4, shuffle=True))
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    manager = CheckpointManager(
        fabric, os.path.join(folder, "checkpoints"), save_interval="1ep", save_on_signal=(signal.SIGTERM,)
    )
    say(f"rank {fabric.global_rank} pid {os.getpid()}")
    manager.load_latest(state)
    if manager.resumed_from:
        say(f"rank {fabric.global_rank}: resumed from {os.path.basename(manager.resumed_from)}")
    batches = []
    while manager.timestamp.epoch < EPOCHS:
        for indices, features in loader:
            loss = model(features).pow(2).mean()
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            batches.append((manager.timestamp.epoch, indices.tolist()))
            manager.on_batch_end(state, samples=len(indices))
            say(f"rank {fabric.global_rank} batch {manager.timestamp.batch}")
            if manager.should_stop:
                break
        if manager.should_stop:
            break
        manager.on_epoch_end(state)
    manager.close()
    with open(os.path.join(folder, f"batches-rank{fabric.global_rank}.jsonl"), "a") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in batches)
    if manager.should_stop:
        say(f"rank {fabric.global_rank}: stopped after batch {manager.timestamp.batch}, exiting 0")
        return 0
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    torch.save(weights, os.path.join(folder, f"weights-rank{fabric.global_rank}.pt"))
    return 0


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())  # one write: both ranks share the terminal


def start(folder: str) -> subprocess.Popen[str]:
    command = [sys.executable, os.path.abspath(__file__), "--job", folder]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_job(folder: str, preempt: bool = False) -> bool:
    """Run one job to its end, echoing what it says (but the batch counts); with ``preempt``, SIGTERM rank 1 after
    batch ``PREEMPT_AFTER``."""
    process = start(folder)
    assert process.stdout is not None
    pids: dict[str, int] = {}
    for line in process.stdout:
        if not re.fullmatch(r"rank \d batch \d+\n", line):
            print(f"    {line}", end="")
        if match := re.fullmatch(r"rank (\d) pid (\d+)\n", line):
            pids[match[1]] = int(match[2])
        if preempt and line == f"rank 1 batch {PREEMPT_AFTER}\n":
            print("    >>> SIGTERM to rank 1 (the scheduler wants the machine back)")
            os.kill(pids["1"], signal.SIGTERM)
    return process.wait() == 0


def read(folder: str, rank: int) -> list[tuple[int, list[int]]]:
    with open(os.path.join(folder, f"batches-rank{rank}.jsonl")) as f:
        return [tuple(json.loads(line)) for line in f]  # type: ignore[misc]


def run(root: str) -> bool:
    """The three jobs; ``True`` if the preempted-and-resumed run is the uninterrupted one, batch for batch."""
    reference, preempted = os.path.join(root, "uninterrupted"), os.path.join(root, "preempted")
    os.makedirs(reference)
    os.makedirs(preempted)
    print("uninterrupted job (2 processes, DDP):")
    ok = run_job(reference)
    print("job preempted in the middle of epoch 1:")
    ok = run_job(preempted, preempt=True) and ok
    before = len(read(preempted, 1))  # rank 1's batches until the preemption
    print("next job, resuming from latest:")
    ok = run_job(preempted) and ok
    same_batches = same_weights = True
    for rank in range(2):
        expected, got = read(reference, rank), read(preempted, rank)
        same_batches = same_batches and got == expected
        mine = torch.load(os.path.join(preempted, f"weights-rank{rank}.pt"), weights_only=True)
        theirs = torch.load(os.path.join(reference, f"weights-rank{rank}.pt"), weights_only=True)
        same_weights = same_weights and all(torch.equal(mine[name], theirs[name]) for name in theirs)
    batches = read(preempted, 1)
    first = [indices for epoch, indices in batches[:before] if epoch == 1]
    second = [indices for epoch, indices in batches[before:] if epoch == 1]
    print(f"rank 1's epoch 1: {first} | preempted, resumed | {second}")
    print(
        f"preempted mid-epoch and resumed: batches identical: {same_batches}; final weights bitwise equal: "
        f"{same_weights}"
    )
    return ok and same_batches and same_weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", metavar="FOLDER", help="run one job in FOLDER (what the demo starts)")
    args = parser.parse_args()
    if args.job:
        return job(args.job)
    with tempfile.TemporaryDirectory() as root:
        return 0 if run(root) else 1


if __name__ == "__main__":
    sys.exit(main())
