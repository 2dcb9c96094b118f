"""Several writers on one volume (pods sharing it, hosts on NFS), failed renames and `latest` links (issue 16)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fabric_ckpt import CheckpointManager, Fabric
from fabric_ckpt.storage.temporaries import FOREIGN_TEMPORARY_AGE_S, TEMP_MARKER, wait_for_deletions
from tests.conftest import assert_same_state, make_net, snapshot
from tests.reliability_figures import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A writer in its own PID namespace: it starts a save and stops in the middle of writing until `go` exists.
_NAMESPACED_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from fabric_ckpt.formats import save_file
    from fabric_ckpt.formats.torch_format import LazyTensor

    path, go = sys.argv[1], sys.argv[2]

    def wait_for_go():
        while not os.path.exists(go):
            time.sleep(0.05)
        return torch.arange(3.0)

    save_file(path, {"step": 2, "late": LazyTensor((3,), torch.float32, wait_for_go)})
""")


def _unused_pid() -> int:
    """A PID no process has in this namespace (so a PID check here would judge its owner dead)."""
    for pid in range(30000, 20000, -7):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    pytest.skip("no free PID to give the other namespace's writer")


def _temporaries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if TEMP_MARKER in name)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_a_live_writer_in_another_pid_namespace_keeps_its_temporary(tmp_path, fabric):
    path, go = tmp_path / "c.ckpt", tmp_path / "go"
    fabric.save(path, {"step": 1})
    pid = _unused_pid()
    # The other "pod": its own PID namespace, its writer given a PID that is free here.
    command = (
        f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "
        f"{sys.executable} -c {_shell_quote(_NAMESPACED_WRITER)} {path} {go}"
    )
    writer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", command],
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _temporaries(tmp_path):
            assert writer.poll() is None, writer.communicate()[0]
            assert time.monotonic() < deadline, "the other namespace's writer never started its save"
            time.sleep(0.05)
        (theirs,) = _temporaries(tmp_path)
        assert f"{TEMP_MARKER}{pid}@" in theirs and not os.path.exists(f"/proc/{pid}")

        fabric.save(path, {"step": 3})  # sweeps the temporaries of c.ckpt: theirs must stay
        assert theirs in _temporaries(tmp_path)
        assert fabric.load(path) == {"step": 3}

        go.touch()
        output, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0, output  # their save completed: nobody removed its temporary
    finally:
        go.touch()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    loaded = fabric.load(path)
    assert loaded["step"] == 2 and torch.equal(loaded["late"], torch.arange(3.0))
    wait_for_deletions()
    assert _temporaries(tmp_path) == []
    record("shared-volume", "writer in another PID namespace", writers=2, sweeps=1, lost=0, failed_saves=0)


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _foreign_temporary(folder, final: str, age_s: float, unique: str) -> str:
    """A temporary as a writer on another host leaves it: another namespace id, last written ``age_s`` ago."""
    name = f".{final}{TEMP_MARKER}4242@0badf00d-{unique}"
    (folder / name).write_bytes(b"partial checkpoint")
    stamp = time.time() - age_s
    os.utime(folder / name, (stamp, stamp))
    return name


def test_another_hosts_temporary_is_swept_only_once_unchanged_for_an_hour(tmp_path, fabric):
    fresh = _foreign_temporary(tmp_path, "c.ckpt", age_s=60, unique="0123456789ab")
    _foreign_temporary(tmp_path, "c.ckpt", age_s=FOREIGN_TEMPORARY_AGE_S + 60, unique="ba9876543210")
    fabric.save(tmp_path / "c.ckpt", {"step": 1})
    wait_for_deletions()
    assert sorted(os.listdir(tmp_path)) == sorted(["c.ckpt", fresh])


def test_a_failed_final_rename_leaves_only_the_checkpoints(tmp_path, fabric, monkeypatch):
    path = tmp_path / "c.ckpt"
    fabric.save(path, {"step": 1, "w": torch.arange(1000.0)})
    real_replace = os.replace

    def no_space_for_the_rename(source, target, *args, **kwargs):
        # The kernel's answer when the folder cannot take the new entry (ENOSPC), only for the checkpoint's rename.
        if TEMP_MARKER in os.fspath(source) and os.fspath(target) == str(path):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", no_space_for_the_rename)
    with pytest.raises(OSError) as caught:
        fabric.save(path, {"step": 2, "w": torch.arange(2000.0)})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    wait_for_deletions()
    assert os.listdir(tmp_path) == ["c.ckpt"]  # no temporary, no hidden link to the previous checkpoint
    assert os.stat(path).st_nlink == 1
    assert fabric.load(path)["step"] == 1


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_a_latest_symlink_pointing_outside_the_run_folder_is_refused(tmp_path, absolute):
    fabric = Fabric(accelerator="cpu")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    planted = make_net(7)
    fabric.save(outside / "ep9-ba0-rank0", {"model": planted})  # a valid checkpoint, outside the folder
    folder = tmp_path / "run"
    manager = CheckpointManager(fabric, folder, run_name="r")
    model = make_net(1)
    manager.on_epoch_end({"model": model})
    (folder / "latest-rank0").unlink()
    target = outside / "ep9-ba0-rank0"
    (folder / "latest-rank0").symlink_to(target if absolute else os.path.relpath(target, folder))

    resumed = make_net(3)
    again = CheckpointManager(fabric, folder, run_name="r")
    with pytest.warns(UserWarning, match="outside the folder"):
        assert again.load_latest({"model": resumed}) is not None
    assert again.resumed_from == str(folder / "ep1-ba0-rank0")
    assert_same_state(snapshot(resumed), snapshot(model))  # the folder's own checkpoint, never the planted one

    (folder / "ep1-ba0-rank0").unlink()  # only the link is left: nothing is loaded, the state is untouched
    untouched = make_net(4)
    before = snapshot(untouched)
    assert CheckpointManager(fabric, folder, run_name="r").load_latest({"model": untouched}) is None
    assert_same_state(snapshot(untouched), before)


class _FolderAtSave:
    """A state entry that records the run folder's checkpoints at the moment the save collects it (before commit)."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.seen: list[str] = []

    def state_dict(self) -> dict:
        self.seen = sorted(name for name in os.listdir(self.folder) if name.startswith("ep"))
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_a_resumed_run_prunes_what_killed_runs_left_before_its_first_commit(tmp_path, fabric):
    # Runs killed between a commit and its pruning each leave one checkpoint too many; a resumed run that is killed
    # the same way must not add to them, so it prunes before its first commit too.
    folder = tmp_path / "run"
    model = make_net(1)
    leftover = CheckpointManager(fabric, folder, save_interval="1ba", run_name="r")  # keeps all: as kills left it
    for _ in range(4):
        leftover.on_batch_end({"model": model})
    assert len([n for n in os.listdir(folder) if n.startswith("ep")]) == 4

    manager = CheckpointManager(fabric, folder, save_interval="1ba", num_checkpoints_to_keep=2, run_name="r")
    manager.load_latest({"model": model})
    probe = _FolderAtSave(folder)
    manager.on_batch_end({"model": model, "probe": probe})
    assert probe.seen == ["ep0-ba3-rank0", "ep0-ba4-rank0"]  # before the new checkpoint was committed
    assert sorted(n for n in os.listdir(folder) if n.startswith("ep")) == ["ep0-ba4-rank0", "ep0-ba5-rank0"]
