"""A managed run on an S3 object store is killed mid-training and resumes from ``latest`` with identical results.

    python examples/resume_object_store.py

Starts a local S3 API server (moto's), then runs three processes: an uninterrupted reference run, a run that
saves every 5 batches through a ``CheckpointManager`` (keeping the newest 2) and is killed with SIGKILL at batch 17,
and a fresh process that resumes from ``latest`` (batch 15). The model uses dropout, so the resumed run matches only
if the RNG state came back too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from fabric_ckpt import CheckpointManager, Fabric

BATCHES = 30
KILL_AT = 17


def train(folder: str, kill_at: int | None) -> dict[str, object]:
    fabric = Fabric(accelerator="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    state = {"model": model, "optimizer": optimizer}
    manager = CheckpointManager(
        fabric,
        folder,
        filename="ba{batch}.ckpt",
        latest_filename="latest",
        save_interval="5ba",
        num_checkpoints_to_keep=2,
        run_name="demo",
    )
    torch.manual_seed(1)  # the data and dropout stream; a resume must restore it, not reseed it
    resumed = manager.load_latest(state) is not None
    losses = {}
    for batch in range(manager.timestamp.batch, BATCHES):
        inputs = torch.randn(16, 8)
        loss = (model(inputs) - inputs.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses[batch] = loss.item()
        manager.on_batch_end(state, samples=16)
        if kill_at is not None and batch + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: nothing after this line runs
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"resumed": resumed, "from": manager.resumed_from, "losses": losses, "weights": weights.tolist()}


def start_s3_server() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the local S3 server did not start")


def run_phase(phase: str, folder: str, output: str) -> int:
    command = [sys.executable, __file__, "--phase", phase, "--folder", folder, "--output", output]
    return subprocess.run(command).returncode


def main() -> int:
    server, endpoint = start_s3_server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir("demo")
        with tempfile.TemporaryDirectory() as scratch:
            reference, resumed = os.path.join(scratch, "reference.json"), os.path.join(scratch, "resumed.json")
            assert run_phase("train", "s3://demo/reference", reference) == 0
            killed = run_phase("crash", "s3://demo/run", os.path.join(scratch, "unused.json"))
            assert killed == -signal.SIGKILL, killed
            assert run_phase("train", "s3://demo/run", resumed) == 0
            with open(reference) as f:
                expected = json.load(f)
            with open(resumed) as f:
                got = json.load(f)
        kept = sorted(path.rsplit("/", 1)[-1] for path in s3fs.S3FileSystem().ls("demo/run"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    same_losses = all(got["losses"][batch] == expected["losses"][batch] for batch in got["losses"])
    same_weights = got["weights"] == expected["weights"]
    print(f"object store: saved every 5 batches to s3://demo/run on a local S3 server, killed at batch {KILL_AT}")
    print(f"  resumed from {got['from']} (objects kept: {kept})")
    print("  batch | uninterrupted loss | resumed loss")
    for batch in sorted(got["losses"], key=int)[:2] + sorted(got["losses"], key=int)[-1:]:
        print(f"  {int(batch):5d} | {expected['losses'][batch]:.10f}       | {got['losses'][batch]:.10f}")
    print(f"  losses identical: {same_losses}; final weights bitwise equal: {same_weights}")
    return 0 if got["resumed"] and same_losses and same_weights else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["train", "crash"])
    parser.add_argument("--folder")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.phase is None:
        sys.exit(main())
    result = train(args.folder, KILL_AT if args.phase == "crash" else None)
    with open(args.output, "w") as f:
        json.dump(result, f)
