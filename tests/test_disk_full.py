"""Saving onto a full disk: a clear ``OSError`` (ENOSPC), the previous checkpoint intact, no temporaries left.

The disk is a real small tmpfs, filled with ballast to leave exactly the free space a case needs, so the kernel
refuses a write at every stage of a save (a tensor record, the directory, the manifest, a shard, ``.metadata``).
Mounting needs root; where it is not allowed those cases skip, and the fsspec filesystem that runs out of space
after N bytes (``SmallDiskFileSystem``) still covers the single-file save.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fabric_ckpt import Fabric
from fabric_ckpt.storage.temporaries import TEMP_MARKER
from tests import hostile_cases
from tests.conftest import assert_same_state, make_net, snapshot
from tests.distributed import WorkerGroup
from tests.reliability_figures import full_campaign, record
from tests.test_atomic import SmallDiskFileSystem

PAGE = 4096
SCALE = 10 if full_campaign() else 1
FAULTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for name, count in sorted(FAULTS.items()):
        record("disk-full", name, faults=count)


def _mount(target: Path, size: str) -> None:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")


def _unmount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)  # something still holds it open


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a fresh tmpfs of ``size`` (e.g. ``"4m"``) and returns it; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        _mount(target, size)
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        _unmount(target)


@pytest.fixture
def disk(tmpfs) -> Path:
    """A 4 MiB tmpfs (mounted once per test: hypothesis runs every example of a test on one fixture)."""
    return tmpfs("4m")


@pytest.fixture
def small_fs():
    fsspec.register_implementation("smalldisk", SmallDiskFileSystem, clobber=True)
    yield SmallDiskFileSystem
    SmallDiskFileSystem.store.clear()
    SmallDiskFileSystem.budget = 10**9


def fill(disk: Path, leave: int) -> None:
    """Replace the ballast so that ``leave`` bytes (rounded down to pages) stay free."""
    ballast = disk / "ballast"
    ballast.unlink(missing_ok=True)
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave // PAGE * PAGE))


def leftovers(folder: Path, settle_s: float = 5.0) -> list[str]:
    """Temporaries in ``folder`` once background deletion settled: a save replacing a checkpoint may remove the old
    one on a background thread, so a hidden name can outlive the save by a moment; a stray file stays for good."""
    deadline = time.monotonic() + settle_s
    while True:
        names = sorted(p.name for p in folder.iterdir() if TEMP_MARKER in p.name)
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.02)


def big_state(step: int) -> dict:
    """~2.3 MB in records large enough to be written one by one (so the disk can fill at any of them)."""
    generator = torch.Generator().manual_seed(step)
    return {"step": step, **{f"t{i}": torch.randn(96_000, generator=generator) for i in range(6)}}


def test_single_file_save_onto_a_full_disk_keeps_the_previous_checkpoint(tmpfs):
    disk = tmpfs("4m")
    path = disk / "c.ckpt"
    fabric = Fabric(accelerator="cpu")
    model = make_net(1)
    fabric.save(path, {"model": model, "step": 1})
    original = path.read_bytes()
    with pytest.raises(OSError) as info:
        fabric.save(path, {"big": torch.ones(2_000_000), "step": 2})  # 8 MB onto 4 MB
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == original
    assert sorted(p.name for p in disk.iterdir()) == ["c.ckpt"]
    target = make_net(2)
    assert fabric.load(path, {"model": target}) == {"step": 1}
    assert_same_state(snapshot(target), snapshot(model))
    fabric.save(path, {"model": model, "step": 3})  # the failed save gave its space back
    FAULTS["single file (tmpfs)"] += 1


@settings(max_examples=25 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(leave=st.integers(0, 2_600_000))
@example(leave=3_000_000)  # room enough: the save must succeed
def test_single_file_save_fails_cleanly_wherever_the_disk_fills(disk, leave):
    """Free space from none to more than the save needs: the save succeeds, or fails with ENOSPC changing nothing."""
    path = disk / "c.ckpt"
    fabric = Fabric(accelerator="cpu")
    (disk / "ballast").unlink(missing_ok=True)
    fabric.save(path, {"step": 1, "w": torch.arange(100.0)})
    original = path.read_bytes()
    fill(disk, leave)
    try:
        fabric.save(path, big_state(2))
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
        assert path.read_bytes() == original
        FAULTS["single file (tmpfs)"] += 1
    else:
        loaded = fabric.load(path)
        assert all(torch.equal(loaded[k], v) for k, v in big_state(2).items() if k != "step")
    assert leftovers(disk) == []


@settings(max_examples=25 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(0, 2_303_999))  # below the 2_304_000 bytes of tensor data: never enough
def test_single_file_save_onto_a_filesystem_that_runs_out_after_n_bytes(small_fs, budget):
    """Without root: an fsspec filesystem that raises ENOSPC after ``budget`` bytes of one file."""
    fabric = Fabric(accelerator="cpu")
    small_fs.store.clear()
    small_fs.budget = 10**9
    fabric.save("smalldisk://runs/c.ckpt", {"step": 1, "w": torch.arange(10.0)})
    small_fs.budget = budget
    with pytest.raises(OSError) as info:
        fabric.save("smalldisk://runs/c.ckpt", big_state(2))
    assert info.value.errno == errno.ENOSPC
    assert sorted(small_fs.store) == ["/runs/c.ckpt"]  # no temporary object left behind
    small_fs.budget = 10**9
    loaded = fabric.load("smalldisk://runs/c.ckpt")
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(10.0))
    FAULTS["single file (fsspec)"] += 1


# ---------------------------------------------------------------------------------------------- sharded FSDP
@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def _same_model(path: Path, expected: dict) -> bool:
    loaded = Fabric(accelerator="cpu").load(path)["model"]
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_sharded_save_onto_a_full_disk_keeps_the_previous_checkpoint(group, tmpfs):
    """Every rank writes its shard; the disk fills at a different file each time (a shard, .metadata, the
    manifest): the save fails on every rank naming ENOSPC, or succeeds; the checkpoint on disk is always whole."""
    disk = tmpfs("2m")
    path = disk / "sharded.ckpt"
    current = group.run(hostile_cases.try_save, "fsdp", str(path), 0)[0]
    assert current["error"] is None
    size = sum(p.stat().st_size for p in path.iterdir())
    failures = 0
    for attempt, leave in enumerate(range(0, size + 4 * PAGE, max(PAGE, size // (8 * SCALE) // PAGE * PAGE)), 1):
        fill(disk, leave)
        results = group.run(hostile_cases.try_save, "fsdp", str(path), attempt)
        if results[0]["error"] is None:
            assert results[1]["error"] is None
            current = results[0]
        else:
            failures += 1
            for result in results:
                assert "No space left on device" in result["message"], result
        (disk / "ballast").unlink()
        assert leftovers(disk) == []
        assert _same_model(path, current["model"]), f"attempt {attempt}, {leave} bytes free"
    assert failures >= 3
    FAULTS["sharded FSDP (tmpfs)"] += failures


def test_sharded_save_onto_a_full_disk_raises_the_oserror(group, tmpfs):
    disk = tmpfs("2m")
    path = disk / "sharded.ckpt"
    assert group.run(hostile_cases.try_save, "fsdp", str(path), 0)[0]["error"] is None
    fill(disk, PAGE)
    for result in group.run(hostile_cases.try_save, "fsdp", str(path), 1):
        assert result["is_oserror"], f"{result['error']} (caused by {result['chain'][1:]}): {result['message']}"
