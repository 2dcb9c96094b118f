"""A save that fails part-way leaves the previous checkpoint intact and no temporary file behind."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from fabric_ckpt import Fabric
from fabric_ckpt.storage.local import _KEEP_ASIDE_FROM
from fabric_ckpt.storage.temporaries import wait_for_deletions
from tests.conftest import assert_same_state, make_net, snapshot


def test_write_failing_mid_file_keeps_previous_checkpoint(tmp_path, fabric):
    """The kernel stops the write at a file-size limit (EFBIG) in the middle of the tensor data."""
    path = tmp_path / "c.ckpt"
    model = make_net(1)
    fabric.save(path, {"model": model, "step": 1})
    original = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from fabric_ckpt import Fabric
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        try:
            Fabric(accelerator="cpu").save({str(path)!r}, {{"big": torch.ones(2_000_000), "step": 2}})
        except OSError as err:
            print("OSError", err.errno)
            sys.exit(0)
        sys.exit("the save did not fail")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["OSError", str(errno.EFBIG)]
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]
    target = make_net(2)
    assert fabric.load(path, {"model": target}) == {"step": 1}
    assert_same_state(snapshot(target), snapshot(model))


class _FullFile(MemoryFile):
    def __init__(self, *args, budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._budget = budget

    def write(self, data):
        self._budget -= memoryview(data).nbytes
        if self._budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


class SmallDiskFileSystem(MemoryFileSystem):
    """An in-memory filesystem with a per-file byte budget: writes past it fail with ENOSPC."""

    protocol = "smalldisk"
    store: dict = {}  # noqa: RUF012 - fsspec keeps the store on the class
    pseudo_dirs = [""]  # noqa: RUF012
    budget = 10**9

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("smalldisk://"))

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            file = _FullFile(self, self._strip_protocol(path), budget=self.budget)
            file.commit()  # as MemoryFileSystem does: the object exists from open on
            return file
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def small_disk():
    fsspec.register_implementation("smalldisk", SmallDiskFileSystem, clobber=True)
    SmallDiskFileSystem.store.clear()
    SmallDiskFileSystem.budget = 10**9
    yield SmallDiskFileSystem
    SmallDiskFileSystem.store.clear()


def test_remote_write_failing_mid_file_keeps_previous_checkpoint(small_disk, fabric):
    fabric.save("smalldisk://runs/c.ckpt", {"step": 1, "w": torch.arange(10.0)})
    small_disk.budget = 100_000
    with pytest.raises(OSError, match="No space left on device"):
        fabric.save("smalldisk://runs/c.ckpt", {"step": 2, "w": torch.ones(1_000_000)})
    assert sorted(small_disk.store) == ["/runs/c.ckpt"]  # no temporary object left behind
    loaded = fabric.load("smalldisk://runs/c.ckpt")
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(10.0))


def test_exception_while_building_the_state_writes_nothing(tmp_path, fabric):
    class Broken:
        def state_dict(self):
            raise RuntimeError("cannot snapshot")

        def load_state_dict(self, state):
            pass

    fabric.save(tmp_path / "c.ckpt", {"step": 1})
    with pytest.raises(RuntimeError, match="cannot snapshot"):
        fabric.save(tmp_path / "c.ckpt", {"step": 2, "broken": Broken()})
    assert fabric.load(tmp_path / "c.ckpt") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]


def test_a_folder_in_the_way_is_refused(tmp_path, fabric):
    (tmp_path / "c.ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"c\.ckpt"):
        fabric.save(tmp_path / "c.ckpt", {"step": 1})


def test_file_permissions_follow_the_umask_like_torch_save(tmp_path, fabric):
    fabric.save(tmp_path / "ours.ckpt", {"step": 1})
    torch.save({"step": 1}, tmp_path / "torch.ckpt")
    assert (tmp_path / "ours.ckpt").stat().st_mode == (tmp_path / "torch.ckpt").stat().st_mode


def test_concurrent_savers_never_share_a_temporary_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    fabric = Fabric(accelerator="cpu")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: fabric.save(tmp_path / "c.ckpt", {"i": i, "w": torch.full((50_000,), i)}), range(8)))
    loaded = fabric.load(tmp_path / "c.ckpt")
    assert torch.equal(loaded["w"], torch.full((50_000,), loaded["i"]))
    wait_for_deletions()  # each save frees the checkpoint it replaced in the background
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]


def test_a_large_replaced_checkpoint_is_freed_in_the_background_and_leaves_nothing(tmp_path, fabric):
    """Above the size where unlinking costs time, the old file is linked aside and removed off the save's path."""
    path = tmp_path / "big.ckpt"
    elements = _KEEP_ASIDE_FROM // 4 + 1  # float32: just over the threshold
    fabric.save(path, {"w": torch.zeros(elements), "step": 1})
    fabric.save(path, {"w": torch.ones(elements), "step": 2})
    loaded = fabric.load(path)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.ones(elements))
    wait_for_deletions()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.ckpt"]


def test_the_next_save_removes_what_a_killed_save_left(tmp_path, fabric):
    """A save killed mid-write (SIGKILL, no cleanup ran) leaves a temporary; the next save removes it."""
    import signal

    path = tmp_path / "c.ckpt"
    fabric.save(path, {"step": 1})
    # The child kills itself right after the first tensor record is written: a crash at a known point.
    script = textwrap.dedent(f"""
        import os, signal, torch
        import fabric_ckpt.formats.torch_format as fmt
        from fabric_ckpt import Fabric

        write_record = fmt.ZipWriter.add

        def write_then_die(self, name, data, **kwargs):
            entry = write_record(self, name, data, **kwargs)
            if name.endswith("data/0"):
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        fmt.ZipWriter.add = write_then_die
        Fabric(accelerator="cpu").save({str(path)!r}, {{"big": torch.ones(5_000_000), "step": 2}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "c.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".c.ckpt.fabric-tmp-")
    assert fabric.load(path) == {"step": 1}
    fabric.save(path, {"step": 3})
    wait_for_deletions()  # the save frees the checkpoint it replaced in the background
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]
    assert fabric.load(path) == {"step": 3}
