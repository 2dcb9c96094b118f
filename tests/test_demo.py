"""The demo's scenarios run in the suite, so `make demo` cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import resume_single_device


def test_single_device_resume_matches_uninterrupted_run(tmp_path, capsys):
    assert resume_single_device.run(tmp_path) is True
    assert "losses identical: True" in capsys.readouterr().out


def test_object_store_run_killed_and_resumed_from_latest():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "resume_object_store.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "losses identical: True; final weights bitwise equal: True" in result.stdout


def test_a_preempted_ddp_job_resumes_mid_epoch_batch_for_batch():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "resume_preempted.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 1: stopped after batch" in result.stdout and "rank 0: resumed from ep1-ba" in result.stdout
    assert "batches identical: True; final weights bitwise equal: True" in result.stdout
