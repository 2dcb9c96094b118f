"""`make gpu-check` is one prepared script: skipped cleanly without CUDA, and its checks run here on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_check import run_checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_without_cuda_the_check_is_skipped_cleanly():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped, no CUDA device is available" in result.stdout


def test_the_checks_pass_on_the_cpu(tmp_path):
    results = run_checks("cpu", size_gib=0.01, folder=str(tmp_path))
    assert results["round_trip_bitwise"] and results["staging_reused"] and results["lazy_exact"]
    assert results["payload_bytes"] > 0
    for figure in ("one_copy_to_host_s", "eager_blocked_s", "lazy_blocked_s", "sync_save_s", "warm_load_s"):
        assert 0 < results[figure]["min"] <= results[figure]["median"] <= results[figure]["max"]
