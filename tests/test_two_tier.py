"""Two-tier checkpoints (issue 19): committed in a local folder first, uploaded in the background to a bucket on the
local S3 server; `latest` on both tiers, separate retention, resuming from the newer tier, failed uploads reported,
retried and never lost."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import fsspec
import pytest
import torch

from fabric_ckpt import CheckpointError, CheckpointManager, Fabric, StorageOptions
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import resolve
from fabric_ckpt.tiers.transfer import copy_checkpoint
from tests.conftest import assert_same_state, snapshot
from tests.fault_proxy import FaultProxy
from tests.test_manager import build, seed_all, train


def s3():
    return fsspec.filesystem("s3", skip_instance_cache=True)


def remote_files(folder: str) -> list[str]:
    """Every object under ``folder`` (an ``s3://`` URL), relative to it."""
    base = folder[len("s3://") :].rstrip("/") + "/"
    return sorted(path[len(base) :] for path in s3().find(base))


def pointer(url: str) -> str:
    """The checkpoint a remote `latest` pointer object names."""
    body = json.loads(s3().cat_file(url))
    assert body["format"] == "fabric_ckpt.latest/1"
    return str(body["checkpoint"])


def epochs(manager: CheckpointManager, state: dict, count: int) -> None:
    for _ in range(count):
        manager.on_batch_end(state)
        manager.on_epoch_end(state)


@pytest.fixture
def outage(s3_endpoint, monkeypatch):
    """A proxy before the S3 server that we can take down: ``outage.rate = 1`` drops every new connection."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore gives up at once; our retries are what is tested
    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port), rate=0.0, faults=("drop", "http503"))
    yield proxy
    proxy.close()


def through(proxy: FaultProxy) -> Fabric:
    """A Fabric whose S3 traffic goes through ``proxy`` (a client of its own), tried twice per transfer."""
    options = StorageOptions(retries=2, filesystem_options={"client_kwargs": {"endpoint_url": proxy.endpoint}})
    return Fabric(accelerator="cpu", storage_options=options)


def go_down(proxy: FaultProxy) -> None:
    proxy.rate = 1.0
    proxy.cut_connections()


# ---------------------------------------------------------------------------------------------- saving
def test_each_checkpoint_is_committed_locally_then_uploaded_and_latest_moves_on_both_tiers(tmp_path, bucket, fabric):
    local = tmp_path / "local"
    manager = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", run_name="r")
    seed_all(0)
    train(manager, build(0), epochs=2)
    manager.wait()
    names = ["ep1-ba4-rank0", "ep2-ba8-rank0"]
    assert sorted(os.listdir(local)) == [*names, "latest-rank0"]
    assert os.readlink(local / "latest-rank0") == "ep2-ba8-rank0"
    assert remote_files(f"{bucket}/run") == [*names, "latest-rank0"]
    assert pointer(f"{bucket}/run/latest-rank0") == "ep2-ba8-rank0"
    for name in names:  # the remote copies are the local files, byte for byte
        assert s3().cat_file(f"{bucket}/run/{name}") == (local / name).read_bytes()


def test_remote_names_and_retention_are_the_remote_tiers_own(tmp_path, bucket, fabric):
    local = tmp_path / "local"
    manager = CheckpointManager(
        fabric,
        local,
        remote_folder=f"{bucket}/runs",
        remote_filename="{run_name}/ep{epoch:02d}.pt",
        num_checkpoints_to_keep=1,
        remote_num_checkpoints_to_keep=2,
        run_name="r",
    )
    epochs(manager, build(0), 4)
    manager.wait()
    assert sorted(os.listdir(local)) == ["ep4-ba4-rank0", "latest-rank0"]
    assert remote_files(f"{bucket}/runs") == ["latest-rank0", "r/ep03.pt", "r/ep04.pt"]
    assert pointer(f"{bucket}/runs/latest-rank0") == "r/ep04.pt"


def test_remote_keeps_everything_by_default_and_zero_keeps_no_local_copy(tmp_path, bucket, fabric):
    local = tmp_path / "local"
    manager = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", num_checkpoints_to_keep=0, run_name="r")
    state = build(0)
    epochs(manager, state, 3)
    manager.wait()
    assert os.listdir(local) == []  # each local copy (and `latest` with the last) went once its upload was confirmed
    assert remote_files(f"{bucket}/run") == ["ep1-ba1-rank0", "ep2-ba2-rank0", "ep3-ba3-rank0", "latest-rank0"]
    assert pointer(f"{bucket}/run/latest-rank0") == "ep3-ba3-rank0"


def test_asynchronous_saves_are_uploaded_once_complete(tmp_path, bucket, fabric):
    manager = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", async_save=True)
    state = build(0)
    epochs(manager, state, 3)
    manager.wait()
    assert pointer(f"{bucket}/run/latest-rank0") == "ep3-ba3-rank0"
    restored = build(1)
    fabric.load(f"{bucket}/run/ep3-ba3-rank0", restored)
    assert_same_state(snapshot(restored["model"]), snapshot(state["model"]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_checkpoints_to_keep": 0}, "num_checkpoints_to_keep=0 (delete the local copy once its upload is "),
        ({"remote_filename": "x-{epoch}"}, "remote_filename='x-{epoch}' needs a remote_folder"),
        ({"remote_num_checkpoints_to_keep": 2}, "remote_num_checkpoints_to_keep=2 needs a remote_folder"),
        ({"remote_folder": "memory://b/r", "remote_num_checkpoints_to_keep": 0}, "remote_num_checkpoints_to_keep=0 "),
        ({"remote_folder": "memory://b/r", "remote_num_checkpoints_to_keep": "2"}, "remote_num_checkpoints_to_keep='2"),
        ({"remote_folder": "memory://b/r", "remote_filename": "../x{epoch}"}, "remote_filename='../x{epoch}' gives"),
        ({"remote_folder": "memory://b/r", "remote_filename": "latest-rank{rank}"}, "latest_filename='latest-rank"),
        ({"remote_folder": "memory://b/r", "remote_filename": "{nope}"}, "remote_filename='{nope}' uses the unknown"),
    ],
)
def test_bad_two_tier_options_are_rejected_at_construction(tmp_path, fabric, options, message):
    with pytest.raises(ValueError) as raised:
        CheckpointManager(fabric, tmp_path, **options)
    assert str(raised.value).startswith(message)
    if options == {"num_checkpoints_to_keep": 0}:
        assert "valid only with a remote_folder" in str(raised.value)


def test_the_remote_folder_cannot_be_the_local_one(tmp_path, fabric):
    with pytest.raises(ValueError, match=r"remote_folder=.* is the local folder itself"):
        CheckpointManager(fabric, tmp_path / "run", remote_folder=str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- resuming
def test_losing_the_local_tier_resumes_from_the_remote_one_bitwise(tmp_path, bucket, fabric, caplog):
    seed_all(0)
    uninterrupted = build(0)
    train(CheckpointManager(fabric, tmp_path / "plain", run_name="r"), uninterrupted, epochs=4)

    seed_all(0)
    first = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    train(first, build(0), epochs=2)
    first.wait()
    shutil.rmtree(tmp_path / "local")  # the node is gone, and its disk with it

    seed_all(123)  # whatever the new node's state: the checkpoint restores it
    state = build(7)
    second = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    with caplog.at_level(logging.INFO, logger="fabric_ckpt"):
        assert second.load_latest(state) == {}
    assert second.resumed_from == f"{bucket}/run/ep2-ba8-rank0"
    assert f"CheckpointManager resumed from {bucket}/run/ep2-ba8-rank0" in caplog.text
    train(second, state, epochs=4)
    second.wait()
    assert_same_state(snapshot(state["model"]), snapshot(uninterrupted["model"]))
    assert_same_state(snapshot(state["optimizer"]), snapshot(uninterrupted["optimizer"]))
    assert pointer(f"{bucket}/run/latest-rank0") == "ep4-ba16-rank0"
    assert os.readlink(tmp_path / "local" / "latest-rank0") == "ep4-ba16-rank0"


def test_an_older_local_tier_loses_to_the_newer_remote_one(tmp_path, bucket, fabric):
    local = tmp_path / "local"
    manager = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", run_name="r")
    epochs(manager, build(0), 2)
    manager.wait()
    # The node's disk is older than the bucket (e.g. restored from a snapshot): ep2 is only remote.
    os.remove(local / "ep2-ba2-rank0")
    os.remove(local / "latest-rank0")
    os.symlink("ep1-ba1-rank0", local / "latest-rank0")
    resumed = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", run_name="r")
    resumed.load_latest(build(1))
    assert resumed.resumed_from == f"{bucket}/run/ep2-ba2-rank0"
    assert resumed.timestamp.epoch == 2


def test_when_both_tiers_are_as_far_the_local_copy_is_loaded(tmp_path, bucket, fabric):
    manager = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    epochs(manager, build(0), 2)
    manager.wait()
    resumed = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    resumed.load_latest(build(1))
    assert resumed.resumed_from == str(tmp_path / "local" / "ep2-ba2-rank0")


# ---------------------------------------------------------------------------------------------- failures
@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_a_failed_upload_is_reported_kept_and_retried_until_it_succeeds(tmp_path, bucket, outage):
    fabric = through(outage)
    local = tmp_path / "local"
    manager = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", num_checkpoints_to_keep=1, run_name="r")
    state = build(0)
    epochs(manager, state, 1)
    manager.wait()
    go_down(outage)
    epochs(manager, state, 1)  # the save returns: the loop never waits on the network
    assert os.readlink(local / "latest-rank0") == "ep2-ba2-rank0"
    with pytest.raises(CheckpointError, match=r"1 checkpoint upload\(s\) failed") as raised:
        manager.wait()
    assert f"{local / 'ep2-ba2-rank0'} -> {bucket}/run/ep2-ba2-rank0" in str(raised.value)
    assert pointer(f"{bucket}/run/latest-rank0") == "ep1-ba1-rank0"  # the remote `latest` waits for a complete copy

    with pytest.warns(UserWarning, match=f"uploading {local / 'ep2-ba2-rank0'} to {bucket}/run/ep2-ba2-rank0 failed"):
        epochs(manager, state, 1)  # the next save reports it, and queues it again
    with pytest.raises(CheckpointError, match=r"2 checkpoint upload\(s\) failed"):
        manager.wait()
    # Retention keeps 1 locally, but never a checkpoint whose upload is not confirmed.
    assert sorted(os.listdir(local)) == ["ep2-ba2-rank0", "ep3-ba3-rank0", "latest-rank0"]

    outage.rate = 0.0  # the network is back
    manager.wait()
    assert remote_files(f"{bucket}/run") == ["ep1-ba1-rank0", "ep2-ba2-rank0", "ep3-ba3-rank0", "latest-rank0"]
    assert pointer(f"{bucket}/run/latest-rank0") == "ep3-ba3-rank0"
    assert sorted(os.listdir(local)) == ["ep3-ba3-rank0", "latest-rank0"]  # pruned at the next save, as usual
    restored = build(1)
    fabric.load(f"{bucket}/run/ep3-ba3-rank0", restored)
    assert_same_state(snapshot(restored["model"]), snapshot(state["model"]))


@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_a_checkpoint_the_remote_tier_missed_is_resumed_from_and_uploaded(tmp_path, bucket, outage):
    fabric = through(outage)
    local = tmp_path / "local"
    first = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", num_checkpoints_to_keep=0, run_name="r")
    state = build(0)
    epochs(first, state, 1)
    first.wait()
    go_down(outage)
    epochs(first, state, 1)
    with pytest.raises(CheckpointError):
        first.wait()  # the run ends before ep2 reached the bucket: it stays in the local folder
    assert sorted(os.listdir(local)) == ["ep2-ba2-rank0", "latest-rank0"]
    del first  # the run is over (its process would have exited)
    gc.collect()
    outage.rate = 0.0

    resumed = CheckpointManager(fabric, local, remote_folder=f"{bucket}/run", num_checkpoints_to_keep=0, run_name="r")
    assert resumed.load_latest(build(1)) == {}
    assert resumed.resumed_from == str(local / "ep2-ba2-rank0")  # newer than the remote `latest`
    resumed.wait()  # its upload was queued when the run resumed
    assert pointer(f"{bucket}/run/latest-rank0") == "ep2-ba2-rank0"
    assert os.listdir(local) == []


# ---------------------------------------------------------------------------------------------- sharded folders
def test_a_sharded_folder_is_uploaded_into_a_new_generation_committed_by_its_manifest(tmp_path, bucket, fabric):
    source = resolve(str(tmp_path / "sharded"))
    weights = {"w": torch.randn(64, 8), "b": torch.arange(5.0)}
    sharded.write_in_one_process({"model": weights}, source)
    target = resolve(f"{bucket}/run/sharded")
    copy_checkpoint(source, target)
    first = sharded.read_manifest(target)
    assert first is not None and first["files"] == sharded.read_manifest(source)["files"]  # type: ignore[index]
    loaded = fabric.load(target.original)
    assert torch.equal(loaded["model"]["w"], weights["w"]) and torch.equal(loaded["model"]["b"], weights["b"])

    # A damaged local shard is refused before it reaches the bucket; the remote checkpoint stays as it was.
    live = source.child(sharded.read_manifest(source)["generation"])  # type: ignore[index]
    shard = next(name for name in live.listdir() if name.endswith(".distcp"))
    with open(live.child(shard).path, "r+b") as damaged:
        damaged.seek(-1, os.SEEK_END)
        last = damaged.read(1)
        damaged.seek(-1, os.SEEK_END)
        damaged.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=f"file '{shard}' does not match its manifest"):
        copy_checkpoint(source, target)
    assert sharded.read_manifest(target) == first
    assert torch.equal(fabric.load(target.original)["model"]["w"], weights["w"])


# ---------------------------------------------------------------------------------------------- processes
WRITER = """
import sys
import time

import torch

import fabric_ckpt.tiers.uploads
from fabric_ckpt import CheckpointManager, Fabric

local, remote, saves, exit_wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fabric_ckpt.tiers.uploads.EXIT_WAIT_S = exit_wait
fabric = Fabric(accelerator="cpu")
manager = CheckpointManager(
    fabric, local, remote_folder=remote, save_interval="1ba", num_checkpoints_to_keep=0, run_name="r"
)
if "--resume" in sys.argv:
    manager.load_latest({})
for step in range(manager.timestamp.batch + 1, manager.timestamp.batch + 1 + saves):
    manager.on_batch_end({"weights": torch.full((50_000,), float(step)), "step": step})
print("saved", flush=True)
if "--linger" in sys.argv:
    time.sleep(120)
"""


def write_writer(tmp_path) -> str:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return str(script)


def writer_environment(endpoint: str) -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}


def step_of(url: str) -> int:
    """The step a checkpoint of the writer holds, checked against its content."""
    loaded = Fabric(accelerator="cpu").load(url)
    assert torch.equal(loaded["weights"], torch.full((50_000,), float(loaded["step"])))
    return int(loaded["step"])


def test_an_exiting_process_waits_for_its_uploads(tmp_path, bucket, outage):
    outage.faults, outage.delay_s, outage.rate = ("delay",), 0.1, 1.0  # every connection is slow: uploads lag
    local, remote = tmp_path / "local", f"{bucket}/run"
    result = subprocess.run(
        [sys.executable, write_writer(tmp_path), str(local), remote, "3", "900"],
        env=writer_environment(outage.endpoint),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert remote_files(remote) == ["ep0-ba1-rank0", "ep0-ba2-rank0", "ep0-ba3-rank0", "latest-rank0"]
    assert pointer(f"{remote}/latest-rank0") == "ep0-ba3-rank0"
    assert step_of(f"{remote}/ep0-ba3-rank0") == 3
    assert os.listdir(local) == []


def test_an_exiting_process_gives_up_on_uploads_after_a_bounded_wait_and_says_so(tmp_path, bucket, outage):
    outage.faults, outage.delay_s, outage.rate = ("delay",), 30.0, 1.0  # the network hangs
    local, remote = tmp_path / "local", f"{bucket}/run"
    result = subprocess.run(
        [sys.executable, write_writer(tmp_path), str(local), remote, "2", "1"],
        env=writer_environment(outage.endpoint),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"waiting up to 1 s for 2 checkpoint upload(s) to {remote} before exiting" in result.stderr
    assert "giving up at exit: 2 upload(s)" in result.stderr and str(local / "ep0-ba2-rank0") in result.stderr
    assert remote_files(remote) == []
    assert sorted(os.listdir(local)) == ["ep0-ba1-rank0", "ep0-ba2-rank0", "latest-rank0"]  # nothing lost


def test_a_writer_killed_during_uploads_loses_nothing_and_the_next_run_catches_up(tmp_path, bucket, outage):
    outage.faults, outage.delay_s, outage.rate = ("delay",), 0.3, 1.0
    local, remote = tmp_path / "local", f"{bucket}/run"
    writer = subprocess.Popen(
        [sys.executable, write_writer(tmp_path), str(local), remote, "4", "900", "--linger"],
        env=writer_environment(outage.endpoint),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "saved\n"
        writer.send_signal(signal.SIGKILL)  # while uploads are queued or running
    finally:
        writer.kill()
        writer.wait(timeout=30)
    fsspec.filesystem("s3").invalidate_cache()
    on_remote = [name for name in remote_files(remote) if name != "latest-rank0"]
    on_local = [name for name in os.listdir(local) if name != "latest-rank0"]
    # Nothing lost: every saved step is on one tier at least, and each copy is whole.
    assert {f"ep0-ba{step}-rank0" for step in range(1, 5)} <= {*on_remote, *on_local}
    for name in on_remote:
        assert step_of(f"{remote}/{name}") == int(name.split("-ba")[1].split("-")[0])
    if on_remote:  # the remote `latest` names a complete copy
        assert pointer(f"{remote}/latest-rank0") in on_remote
    assert os.readlink(local / "latest-rank0") == "ep0-ba4-rank0"  # not uploaded yet, so still local

    # The next run resumes from the newest checkpoint (local), uploads it first, then goes on.
    result = subprocess.run(
        [sys.executable, write_writer(tmp_path), str(local), remote, "1", "900", "--resume"],
        env=writer_environment(os.environ["AWS_ENDPOINT_URL"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert {"ep0-ba4-rank0", "ep0-ba5-rank0"} <= set(remote_files(remote))
    assert pointer(f"{remote}/latest-rank0") == "ep0-ba5-rank0" and step_of(f"{remote}/ep0-ba5-rank0") == 5
    assert step_of(f"{remote}/ep0-ba4-rank0") == 4


# Each run SIGKILLs itself right after its last upload moved the remote `latest`: before that upload's pruning ran.
DYING_WRITER = """
import os
import signal
import sys

import torch

from fabric_ckpt import CheckpointManager, Fabric
from fabric_ckpt.tiers.folder import CheckpointFolder

local, remote, saves = sys.argv[1], sys.argv[2], int(sys.argv[3])
point_latest = CheckpointFolder.point_latest
moved = []


def point_latest_then_die(folder, latest, name):
    point_latest(folder, latest, name)
    if folder.root.original.startswith("s3://"):
        moved.append(name)
        if len(moved) == saves:
            os.kill(os.getpid(), signal.SIGKILL)


CheckpointFolder.point_latest = point_latest_then_die
manager = CheckpointManager(
    Fabric(accelerator="cpu"), local, remote_folder=remote, save_interval="1ba", num_checkpoints_to_keep=0,
    remote_num_checkpoints_to_keep=1, run_name="r",
)
manager.load_latest({})
for step in range(manager.timestamp.batch + 1, manager.timestamp.batch + 1 + saves):
    manager.on_batch_end({"weights": torch.full((50_000,), float(step)), "step": step})
manager.wait()
"""


def test_runs_killed_before_pruning_one_after_another_do_not_grow_the_remote_tier(tmp_path, bucket):
    """Each killed run leaves its last upload unpruned; the next run prunes what it finds before uploading, so the
    bucket stays at keep + 2 (the checkpoint resumed from, and the one committed before the kill) however many
    runs die that way."""
    script = tmp_path / "dying_writer.py"
    script.write_text(DYING_WRITER)
    local, remote = tmp_path / "local", f"{bucket}/run"
    for saves in (3, 1, 1, 1):
        result = subprocess.run(
            [sys.executable, str(script), str(local), remote, str(saves)],
            env=writer_environment(os.environ["AWS_ENDPOINT_URL"]),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == -signal.SIGKILL, result.stderr
    # Steps 1-6 were saved; the last run resumed from step 5 and died after uploading step 6, before pruning.
    on_remote = [name for name in remote_files(remote) if name != "latest-rank0"]
    assert on_remote == ["ep0-ba5-rank0", "ep0-ba6-rank0"]
    assert pointer(f"{remote}/latest-rank0") == "ep0-ba6-rank0"
    assert [step_of(f"{remote}/{name}") for name in on_remote] == [5, 6]


@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_resuming_while_the_remote_tier_is_unreachable_raises_instead_of_going_back(tmp_path, bucket, outage):
    fabric = through(outage)
    manager = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    epochs(manager, build(0), 1)
    manager.wait()
    go_down(outage)
    state = build(1)
    before = snapshot(state["model"])
    resumed = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    with pytest.raises(OSError):  # not a silent resume from the local tier, which may be the older one
        resumed.load_latest(state)
    assert resumed.resumed_from is None
    assert_same_state(snapshot(state["model"]), before)
    outage.rate = 0.0


ASYNC_WRITER = """
import sys

import torch

from fabric_ckpt import CheckpointManager, Fabric

fabric = Fabric(accelerator="cpu")
manager = CheckpointManager(
    fabric, sys.argv[1], remote_folder=sys.argv[2], save_interval="1ba", async_save=True, run_name="r"
)
for step in range(1, 4):
    manager.on_batch_end({"weights": torch.full((50_000,), float(step)), "step": step})
"""


def test_an_exiting_process_finishes_its_asynchronous_save_then_uploads_it(tmp_path):
    script = tmp_path / "async_writer.py"
    script.write_text(ASYNC_WRITER)
    local, remote = tmp_path / "local", tmp_path / "remote"  # another filesystem in real use (NFS, a bucket)
    result = subprocess.run(
        [sys.executable, str(script), str(local), str(remote)],
        env=writer_environment(os.environ.get("AWS_ENDPOINT_URL", "")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(remote)) == ["ep0-ba1-rank0", "ep0-ba2-rank0", "ep0-ba3-rank0", "latest-rank0"]
    assert os.readlink(remote / "latest-rank0") == "ep0-ba3-rank0" and step_of(str(remote / "ep0-ba3-rank0")) == 3


@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_wait_with_a_timeout_raises_timeout_error_naming_the_uploads_still_running(tmp_path, bucket, outage):
    fabric = through(outage)
    manager = CheckpointManager(fabric, tmp_path / "local", remote_folder=f"{bucket}/run", run_name="r")
    outage.faults, outage.delay_s, outage.rate = ("delay",), 60.0, 1.0  # the network hangs
    outage.cut_connections()
    epochs(manager, build(0), 1)
    with pytest.raises(TimeoutError, match=f"1 upload.* to {bucket}/run still running after 1 s: .*ep1-ba1-rank0"):
        manager.wait(timeout=1)
    outage.rate = 0.0
    outage.cut_connections()  # the hung connection fails now; the retry goes through
    manager.wait()
    assert pointer(f"{bucket}/run/latest-rank0") == "ep1-ba1-rank0"
