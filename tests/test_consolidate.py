"""consolidate() streams: peak memory stays near the largest tensor, not the size of the checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from fabric_ckpt import Fabric, consolidate
from tests.memory_peak import REPOSITORY

TENSOR_MB = 32
TENSORS = 8


def make_bare_dcp_folder(path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint written by DCP itself in one process (a "bare" folder, without our manifest)."""
    import torch.distributed.checkpoint as dcp

    tensors = {f"w{i}": torch.full((TENSOR_MB << 18,), float(i)) for i in range(TENSORS)}
    dcp.save({"model": tensors, "step": 7}, checkpoint_id=str(path), no_dist=True)
    return tensors


def test_bare_dcp_folder_consolidates_and_loads(tmp_path):
    tensors = make_bare_dcp_folder(tmp_path / "bare")
    consolidate(tmp_path / "bare", tmp_path / "single.ckpt", progress=False)
    loaded = Fabric(accelerator="cpu").load(tmp_path / "single.ckpt")
    assert loaded["step"] == 7
    assert all(torch.equal(loaded["model"][k], v) for k, v in tensors.items())


def test_peak_memory_stays_near_the_largest_tensor(tmp_path):
    make_bare_dcp_folder(tmp_path / "bare")
    script = textwrap.dedent(f"""
        from fabric_ckpt import consolidate
        from tests.memory_peak import PeakAnonymousMemory

        with PeakAnonymousMemory(interval=0.001) as memory:
            consolidate({str(tmp_path / "bare")!r}, {str(tmp_path / "out.ckpt")!r}, progress=False)
        print(memory.extra)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.split()[-1])
    checkpoint_bytes = TENSORS * TENSOR_MB << 20
    assert extra < 3 * (TENSOR_MB << 20), f"{extra >> 20} MiB extra for a {checkpoint_bytes >> 20} MiB checkpoint"


def test_missing_folder_is_file_not_found(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="nowhere"):
        consolidate(tmp_path / "nowhere", tmp_path / "out.ckpt")


def test_bare_dcp_optimizer_saved_by_index_loads_on_one_device(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tests.conftest import assert_same_state, snapshot, trained

    model, optimizer = trained(seed=3)
    dcp.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        checkpoint_id=str(tmp_path / "bare"),
        no_dist=True,
    )
    target, target_optimizer = trained(seed=4)
    Fabric(accelerator="cpu").load(tmp_path / "bare", {"model": target, "optimizer": target_optimizer})
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))
