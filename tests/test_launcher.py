"""Launching: fabric.launch() re-runs the script for the other ranks, or joins the processes torchrun started."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resume_distributed.py"


def run(command: list[str], timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_ddp_resume_in_fresh_processes_started_by_launch(tmp_path):
    first = run([sys.executable, str(EXAMPLE), "--strategy", "ddp", "--phase", "first", "--folder", str(tmp_path)])
    assert first.returncode == 0, first.stderr
    resumed = run([sys.executable, str(EXAMPLE), "--strategy", "ddp", "--phase", "resume", "--folder", str(tmp_path)])
    assert resumed.returncode == 0, resumed.stderr
    assert "losses identical: True; parameters bitwise equal on every rank: True" in resumed.stdout
    assert "2 fresh processes, DDPStrategy" in resumed.stdout


def test_torchrun_processes_are_joined(tmp_path):
    first = run([sys.executable, str(EXAMPLE), "--strategy", "fsdp", "--phase", "first", "--folder", str(tmp_path)])
    assert first.returncode == 0, first.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    resumed = run([*torchrun, str(EXAMPLE), "--strategy", "fsdp", "--phase", "resume", "--folder", str(tmp_path)])
    assert resumed.returncode == 0, resumed.stderr
    assert "losses identical: True; parameters bitwise equal on every rank: True" in resumed.stdout


def test_launch_runs_any_callable_in_every_process(tmp_path):
    script = tmp_path / "closure.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from fabric_ckpt import Fabric

        offset = 10
        fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2)
        result = fabric.launch(lambda f, scale: (f.global_rank + offset) * scale, 2)  # a closure, never pickled
        # One write per line: both processes share this pipe, and a single small write is never interleaved.
        sys.stdout.write(f"rank={fabric.global_rank} world={fabric.world_size} result={result}\\n")
        sys.stdout.flush()
    """)
    )
    outcome = run([sys.executable, str(script)])
    assert outcome.returncode == 0, outcome.stderr
    assert sorted(line for line in outcome.stdout.splitlines() if line.startswith("rank=")) == [
        "rank=0 world=2 result=20",
        "rank=1 world=2 result=22",
    ]


def test_a_crashing_rank_stops_the_job_instead_of_hanging(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from fabric_ckpt import Fabric

        fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2)
        fabric.launch()
        if fabric.global_rank == 1:
            raise SystemExit(3)
        fabric.barrier()  # rank 0 would wait here forever for rank 1
    """)
    )
    started = time.monotonic()
    outcome = run([sys.executable, str(script)], timeout=120)
    assert outcome.returncode != 0
    assert time.monotonic() - started < 60
    # Whichever notices first (gloo's broken connection, or the supervisor watching rank 1) ends the job,
    # and no rank is left running.
    leftovers = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
