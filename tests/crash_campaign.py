"""Crash campaign: real writer processes saving in a loop, killed with SIGKILL, and the disk checked after each kill.

    python -m tests.crash_campaign --scenario all --kills 100 --json out.json

Each round forks fresh writer processes from this (single-threaded) process: one for ``single`` and ``manager``, two
joined in a gloo group for ``ddp`` and ``fsdp``. A writer resumes from what is on disk, then saves step after step;
the content of step ``s`` is a deterministic function of ``s`` (every tensor is a rotation of a fixed random tensor
by an amount that depends on ``s``), so any checkpoint can be checked bitwise. After each save *returned*, rank 0
appends ``step digest`` to a journal and fsyncs it: the journal is what the run knows was saved.

The parent kills the writers (the whole process group, or one rank and the other shortly after) at a random moment
and then checks, without trusting anything the writers said:

- the checkpoint (for ``manager``: the one ``latest`` points at) exists and loads, holds the last journalled step or
  the one that was in flight, and is bitwise that step's content (its digest also matches the journal's);
- every checkpoint in the folder loads and is bitwise right; ``latest`` never dangles; retention keeps at most
  ``num_checkpoints_to_keep`` + 2 (the one this run resumed from, and one committed before the kill pruned);
- every temporary left by the kill is either refused on load (a partial checkpoint) or loads bitwise right;
- the temporaries a kill left are gone once the next round saved successfully.

Kill points (``--points``) kill a writer at a chosen line instead (the writer wraps a library function to SIGKILL
itself there, the way a crash at that instant would); a recovery round that must finish cleanly follows each.

The ``s3-*`` scenarios save to a bucket on an S3 API server (``AWS_ENDPOINT_URL``; moto's, started here when the
variable is unset) through s3fs (:class:`S3Storage`). An object store has no rename and no visible temporaries, so
their checks say what the same promises mean there:

- a single file is one multipart upload to its final key: a kill leaves either the previous object or the new one
  (never a visible partial object); what it leaves is an incomplete upload, which no listing shows (counted);
- ``latest`` is a small pointer object naming a checkpoint in the folder, which loads bitwise right;
- a sharded folder is committed by its manifest (written last), which names the live generation ``.gen-<id>/``; a
  kill leaves generations the manifest does not name (the temporaries here: each is refused on load or loads
  bitwise right), and the next successful save removes them (the same protocol as on a local disk);
- nothing else is visible in the bucket, and a run that finished cleanly leaves no incomplete upload.

s3fs starts an event-loop thread on first use, and writers must be forked from a single-threaded process, so this
process never touches the bucket itself: its checks run in a forked child (:func:`in_child`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import pickle
import posixpath
import random
import re
import select
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn

from fabric_ckpt import CheckpointError, CheckpointManager, DDPStrategy, Fabric, FSDPStrategy
from fabric_ckpt.formats.sharded import GENERATION_PREFIX, MANIFEST_NAME
from fabric_ckpt.storage.temporaries import TEMP_MARKER
from tests.s3 import CREDENTIALS

TIMEOUT_S = 90  # the longest a round may take before the campaign gives up on it
ERROR_EXIT = 3
MISMATCH_EXIT = 4


# ---------------------------------------------------------------------------------------------- the trained state
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class CrashModel(nn.Module):
    """Odd output size on purpose: 5 rows do not split evenly across 2 FSDP ranks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 5)


def build(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW whose state exists (so every save holds ``step``, ``exp_avg``, ``exp_avg_sq``)."""
    torch.manual_seed(0)
    model = CrashModel(width)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Patterns:
    """Fixed random tensors, one per key; step ``s`` of a key is its rotation by an amount that depends on ``s``.

    Rotating is as cheap as a copy, so a writer spends its time saving, which is where kills should land.
    """

    def __init__(self) -> None:
        self._bases: dict[str, torch.Tensor] = {}

    def full(self, key: str, shape: torch.Size, dtype: torch.dtype, step: int) -> torch.Tensor:
        if key.endswith("/step"):  # AdamW's step counter: a scalar tensor
            return torch.tensor(float(step), dtype=dtype).reshape(shape)
        base = self._bases.get(key)
        if base is None or base.numel() != shape.numel():
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            base = self._bases[key] = torch.randn(shape.numel(), generator=generator).to(dtype)
        return torch.roll(base, shifts=(step * 7919) % max(base.numel(), 1)).view(shape)


def fill(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, patterns: Patterns) -> None:
    """Make the parameters and the optimizer state exactly step ``step``'s content (sharded or not)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            _assign(param, patterns.full(name, param.shape, param.dtype, step))
            for key, value in optimizer.state[param].items():
                if isinstance(value, torch.Tensor):
                    _assign(value, patterns.full(f"{name}/{key}", value.shape, value.dtype, step))


def _assign(target: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # Every rank holds the same full tensor, so each cuts its own shard locally, without communication.
        shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(shard)
    else:
        target.copy_(full)


def digest(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> str:
    """SHA-256 of the full parameters and optimizer state, by name (collective for sharded tensors)."""
    hasher = hashlib.sha256(f"step={step}".encode())
    for name, param in sorted(model.named_parameters()):
        hasher.update(name.encode() + _bytes(param))
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            hasher.update(f"{name}/{key}".encode())
            hasher.update(_bytes(value) if isinstance(value, torch.Tensor) else repr(value).encode())
    return hasher.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return repr((str(flat.dtype), tuple(tensor.shape))).encode() + flat.view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------- storage
class LocalStorage:
    """A folder on the local disk; the one place that knows how names become paths and how to list them."""

    remote = False

    def __init__(self, root: str) -> None:
        self.root = root
        self.environment: dict[str, str] = dict(WRITER_ENVIRONMENT)
        self.scratch = root  # the campaign's own files (journal, error log)
        os.makedirs(root, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def names(self, folder: str = "") -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.root, folder)))
        except FileNotFoundError:
            return []

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def temporaries(self, folder: str = "") -> list[str]:
        return [os.path.join(folder, n) if folder else n for n in self.names(folder) if TEMP_MARKER in n]

    def incomplete_uploads(self) -> set[str]:
        return set()


class S3Storage:
    """A fresh bucket on the S3 API server that ``AWS_ENDPOINT_URL`` names, reached through s3fs as users do.

    Writers and checkers use it, never the campaign process (see :func:`in_child`). The journal and the error log
    stay in the local ``scratch`` folder: they are the campaign's records, not storage under test.
    """

    remote = True

    def __init__(self, scratch: str, bucket: str) -> None:
        self.scratch = scratch
        self.bucket = bucket
        # Handed to every writer explicitly, whatever environment it would inherit.
        self.environment = {key: os.environ[key] for key in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
        self.environment.update(WRITER_ENVIRONMENT)
        os.makedirs(scratch, exist_ok=True)

    @classmethod
    def create(cls, scratch: str) -> S3Storage:
        import s3fs  # noqa: F401 - once here (importing starts no thread), not in every writer and checker

        bucket = f"crash-{random.SystemRandom().getrandbits(48):012x}"
        in_child(lambda: cls._fs().mkdir(bucket))
        return cls(scratch, bucket)

    @staticmethod
    def _fs() -> Any:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.invalidate_cache()  # listings must show the store as it is now, not as this process last saw it
        return fs

    def _key(self, name: str) -> str:
        return f"{self.bucket}/{name}".rstrip("/")

    def path(self, name: str) -> str:
        return f"s3://{self._key(name)}"

    def names(self, folder: str = "") -> list[str]:
        try:
            paths = self._fs().ls(self._key(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)

    def exists(self, name: str) -> bool:
        return bool(self._fs().exists(self._key(name)))

    def read(self, name: str) -> bytes:
        return bytes(self._fs().cat_file(self._key(name)))

    def temporaries(self, folder: str = "") -> list[str]:
        return [posixpath.join(folder, n) for n in self.names(folder) if TEMP_MARKER in n]

    def incomplete_uploads(self) -> set[str]:
        """Ids of multipart uploads started and neither completed nor aborted (a writer killed mid-upload leaves
        one; the next save to its folder aborts it)."""
        return {upload["UploadId"] for upload in self._fs().list_multipart_uploads(self.bucket)}


Storage = LocalStorage | S3Storage
T = TypeVar("T")


def in_child(function: Callable[[], T]) -> T:
    """Run ``function`` in a forked child and return its result (pickled back through a pipe).

    Forking writers is safe only while this process has one thread, and s3fs starts an event-loop thread on first
    use: everything that touches the object store from this side runs in a child, which then exits.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            payload = pickle.dumps((True, function()))
        except BaseException:
            payload = pickle.dumps((False, traceback.format_exc()))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + TIMEOUT_S
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            if select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                chunk = pipe.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    _reap([pid], timeout=1.0 if time.monotonic() >= deadline else 10.0)
    if not chunks:
        raise RuntimeError("the checking process died or hung without an answer")
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise RuntimeError(f"the checking process failed:\n{value}")
    return value  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- the journal
class Journal:
    """``step digest time`` lines, appended and fsynced by the writer after a save returned."""

    def __init__(self, path: str) -> None:
        self.path = path

    def append(self, step: int, value: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{step} {value} {time.monotonic():.6f}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[int, str, float]]:
        """Complete lines only: a writer killed while appending leaves a torn last line, which never counts."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")[:-1]
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            step, value, stamp = line.decode().split()
            entries.append((int(step), value, float(stamp)))
        return entries


def record_error(path: str, rank: int, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, json.dumps({"rank": rank, "t": time.monotonic(), "error": text}).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_errors(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------- scenarios
class Scenario:
    """One way of saving. ``make_fabric``/``resume``/``save`` run in the writers; the rest in the parent."""

    name = ""
    world_size = 1
    width = 512
    checkpoint = "last.ckpt"

    def make_fabric(self) -> Fabric:
        return Fabric(accelerator="cpu")

    remote = False  # saves to the S3 server (S3Storage) instead of the local disk

    def present(self, storage: Storage) -> bool:
        """Whether a checkpoint was committed under ``checkpoint`` (a user's "is there one to resume from?")."""
        return storage.exists(self.checkpoint)

    def temporaries(self, storage: Storage) -> list[str]:
        """What a save in progress leaves behind until it commits (hidden siblings on local disks)."""
        return storage.temporaries()

    def resume(self, fabric: Fabric, state: dict[str, Any], storage: Storage) -> int:
        if not self.present(storage):
            return 0
        fabric.load(storage.path(self.checkpoint), state)  # plain values such as "step" are updated in place
        return int(state["step"])

    def save(self, fabric: Fabric, state: dict[str, Any], storage: Storage) -> None:
        fabric.save(storage.path(self.checkpoint), state)

    def finish(self) -> None:
        """After a writer's last save (a killed writer never gets here)."""

    def verify(self, campaign: Campaign) -> None:
        campaign.verify_checkpoint(self.checkpoint)
        for name in self.temporaries(campaign.storage):
            campaign.verify_temporary(name)


class SingleFile(Scenario):
    name = "single"
    width = 1024  # ~25 MB per checkpoint: a save takes long enough for random kills to land inside it


class DDP(Scenario):
    name = "ddp"
    world_size = 2
    width = 1024

    def make_fabric(self) -> Fabric:
        fabric = Fabric(strategy=DDPStrategy(accelerator="cpu", timeout=timedelta(seconds=60)))
        fabric.launch()
        return fabric


class FSDP(Scenario):
    """Sharded on 2 ranks: the manifest names the live generation; generations it does not name are temporaries."""

    name = "fsdp"
    world_size = 2
    width = 384
    checkpoint = "sharded.ckpt"

    def make_fabric(self) -> Fabric:
        strategy = FSDPStrategy(accelerator="cpu", auto_wrap_policy={Block}, timeout=timedelta(seconds=60))
        fabric = Fabric(strategy=strategy)
        fabric.launch()
        return fabric

    def present(self, storage: Storage) -> bool:
        # A killed first save leaves `sharded.ckpt/.gen-*`: the folder exists before any commit.
        return storage.exists(f"{self.checkpoint}/{MANIFEST_NAME}")

    def live_generation(self, storage: Storage) -> str | None:
        """The generation the manifest names, read here rather than through the library."""
        if not self.present(storage):
            return None
        try:
            return str(json.loads(storage.read(f"{self.checkpoint}/{MANIFEST_NAME}"))["manifest"]["generation"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None  # a damaged manifest: the checkpoint then fails to load, which is the violation to report

    def temporaries(self, storage: Storage) -> list[str]:
        """Generations the manifest does not name, and a killed manifest commit's temporary file."""
        live = self.live_generation(storage)
        names = storage.names(self.checkpoint)
        leftovers = [n for n in names if (n.startswith(GENERATION_PREFIX) and n != live) or TEMP_MARKER in n]
        return storage.temporaries() + [f"{self.checkpoint}/{n}" for n in leftovers]

    def verify(self, campaign: Campaign) -> None:
        storage = campaign.storage
        present = self.present(storage)
        if not present and storage.exists(self.checkpoint):
            campaign.verify_temporary(self.checkpoint)  # only uncommitted generations: it must not load as valid
        campaign.verify_checkpoint(self.checkpoint, present=present)
        for name in self.temporaries(storage):
            campaign.verify_temporary(name)
        if storage.remote:  # a local root also holds the campaign's journal; the hidden temporaries are checked above
            campaign.check_visible("", {self.checkpoint}.__contains__)
        campaign.check_visible(
            self.checkpoint, lambda n: n == MANIFEST_NAME or n.startswith(GENERATION_PREFIX) or TEMP_MARKER in n
        )

    def verify_clean(self, campaign: Campaign) -> None:
        left = self.temporaries(campaign.storage)
        if left:
            campaign.violation(f"after a clean run, temporaries or unnamed generations remain: {left}")


class Manager(Scenario):
    """A CheckpointManager saving every batch, keeping 2, with the default names (``ep0-ba7-rank0``, ``latest-rank0``).

    ``overwrite=True`` here: with the default ``False``, a kill between a commit and the move of ``latest`` makes
    the next run fail (a known bug, pinned by the kill point ``manager/before-latest``), which would stop the
    random campaign from exercising anything else.
    """

    name = "manager"
    width = 512
    folder = "ckpts"
    keep = 2
    latest = "latest-rank0"
    overwrite = True
    _pattern = re.compile(r"ep0-ba(\d+)-rank0")

    def manager(self, fabric: Fabric, storage: Storage) -> CheckpointManager:
        return CheckpointManager(
            fabric,
            storage.path(self.folder),
            save_interval="1ba",
            num_checkpoints_to_keep=self.keep,
            run_name="crash",
            overwrite=self.overwrite,
        )

    def resume(self, fabric: Fabric, state: dict[str, Any], storage: Storage) -> int:
        self._manager = self.manager(fabric, storage)
        self._manager.load_latest(state)
        return self._manager.timestamp.batch

    def save(self, fabric: Fabric, state: dict[str, Any], storage: Storage) -> None:
        saved = self._manager.on_batch_end(state)
        assert saved is not None and self._manager.timestamp.batch == state["step"]

    def temporaries(self, storage: Storage) -> list[str]:
        return storage.temporaries() + storage.temporaries(self.folder)

    def latest_target(self, campaign: Campaign, latest: str) -> str | None:
        """Where ``latest`` points: a symlink on local disks (anything else is a violation, and ``None``)."""
        path = campaign.storage.path(latest)
        if not os.path.islink(path):
            campaign.violation(f"`{latest}` is not a symlink")
            return None
        return os.readlink(path)

    def verify(self, campaign: Campaign) -> None:
        storage = campaign.storage
        latest = os.path.join(self.folder, self.latest)
        checkpoints = [n for n in storage.names(self.folder) if self._pattern.fullmatch(n)]
        if storage.exists(latest):
            target = self.latest_target(campaign, latest)
            if target is not None and target not in checkpoints:
                campaign.violation(f"`{latest}` points at {target!r}, which is not a checkpoint in the folder")
            elif target is not None:
                campaign.verify_checkpoint(os.path.join(self.folder, target))
        elif campaign.floor > 0:
            campaign.violation(f"`{latest}` is missing although step {campaign.floor} was saved")
        for name in checkpoints:
            step = int(self._pattern.fullmatch(name).group(1))  # type: ignore[union-attr]
            campaign.check_loads_as(os.path.join(self.folder, name), step)
        if len(checkpoints) > self.keep + 2:
            self.retention_exceeded(campaign, checkpoints)
        for name in self.temporaries(storage):
            campaign.verify_temporary(name)

    def retention_exceeded(self, campaign: Campaign, checkpoints: list[str]) -> None:
        campaign.violation(f"retention kept {len(checkpoints)} checkpoints: {checkpoints}")

    def verify_clean(self, campaign: Campaign) -> None:
        checkpoints = [n for n in campaign.storage.names(self.folder) if self._pattern.fullmatch(n)]
        if len(checkpoints) > self.keep + 1:  # + the one the last run resumed from, which it never prunes
            campaign.violation(f"after a clean run, retention kept {len(checkpoints)}: {checkpoints}")
        # A fresh manager resumes from `latest` without falling back (a fallback means `latest` was broken).
        model, optimizer = build(self.width)
        init_optimizer_state(model, optimizer)
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": -1}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.manager(campaign.fabric, campaign.storage).load_latest(state)
        if caught:
            campaign.violation(f"load_latest fell back: {caught[0].message}")
        if state["step"] != campaign.floor:
            campaign.violation(f"load_latest resumed step {state['step']}, the last saved is {campaign.floor}")


class S3SingleFile(SingleFile):
    name = "s3-single"
    remote = True
    width = 512  # ~6.5 MB: one save to the local S3 server takes ~0.1 s, most of it in the upload

    def verify(self, campaign: Campaign) -> None:
        super().verify(campaign)
        campaign.check_visible("", {self.checkpoint}.__contains__)


class S3FSDP(FSDP):
    """Sharded on 2 ranks to the bucket: the same generations and manifest as on a local disk."""

    name = "s3-fsdp"
    remote = True


class S3Manager(Manager):
    """The manager on the bucket, with its default ``overwrite=False`` (the next run rewrites a checkpoint that a
    killed one committed past ``latest``); ``latest`` is a pointer object."""

    name = "s3-manager"
    remote = True
    overwrite = False

    def latest_target(self, campaign: Campaign, latest: str) -> str | None:
        raw = campaign.storage.read(latest)  # type: ignore[union-attr]
        try:
            pointer = json.loads(raw)
            if pointer["format"] != "fabric_ckpt.latest/1":
                raise ValueError(pointer["format"])
            return str(pointer["checkpoint"])
        except (ValueError, KeyError, TypeError):
            campaign.violation(f"`{latest}` is not a pointer object: {raw[:100]!r}")
            return None

    def verify(self, campaign: Campaign) -> None:
        super().verify(campaign)
        campaign.check_visible("", {self.folder}.__contains__)
        campaign.check_visible(self.folder, lambda n: n == self.latest or bool(self._pattern.fullmatch(n)))


class S3TwoTier(S3Manager):
    """A two-tier manager: each save committed in a local folder (in the campaign's scratch folder), then uploaded to
    the bucket in the background; no local copy kept once uploaded (``num_checkpoints_to_keep=0``), 2 remote ones.

    Kills land while uploads are queued or running. A run must resume from the newest checkpoint of either tier, and
    that must never be older than the last journalled save (the local copy stays until its upload is confirmed).
    """

    name = "s3-twotier"
    local_keep = 0

    def local_root(self, storage: Storage) -> str:
        return os.path.join(storage.scratch, "local")

    def manager(self, fabric: Fabric, storage: Storage) -> CheckpointManager:
        return CheckpointManager(
            fabric,
            self.local_root(storage),
            save_interval="1ba",
            num_checkpoints_to_keep=self.local_keep,
            remote_folder=storage.path(self.folder),
            remote_num_checkpoints_to_keep=self.keep,
            run_name="crash",
            overwrite=self.overwrite,
        )

    def finish(self) -> None:
        self._manager.wait()  # a clean run ends with its uploads done

    def temporaries(self, storage: Storage) -> list[str]:
        return []  # nothing temporary is visible in the bucket; the local folder's are checked in verify

    def verify(self, campaign: Campaign) -> None:
        storage = campaign.storage
        remote = [n for n in storage.names(self.folder) if self._pattern.fullmatch(n)]
        latest = posixpath.join(self.folder, self.latest)
        remote_latest = self.latest_target(campaign, latest) if storage.exists(latest) else None
        newest = self._check_tier(campaign, self.folder, remote, remote_latest)
        root = self.local_root(storage)
        found = os.listdir(root) if os.path.isdir(root) else []
        local = [n for n in found if self._pattern.fullmatch(n)]
        link, local_latest = os.path.join(root, self.latest), None
        if os.path.islink(link):
            local_latest = os.readlink(link)
        elif os.path.lexists(link):
            campaign.violation(f"`{link}` is not a symlink")
        newest = max(newest, self._check_tier(campaign, root, local, local_latest))
        floor = campaign.floor
        if newest < floor:
            campaign.figures.lost += 1
            campaign.violation(f"the newest checkpoint of either tier is step {newest}, but step {floor} was saved")
        elif newest > floor + 1:
            campaign.violation(f"a tier holds step {newest}, but at most {floor + 1} was being saved")
        campaign.observed = max(campaign.observed, newest)
        if len(remote) > self.keep + 2:
            self.retention_exceeded(campaign, remote)
        for name in found:
            if TEMP_MARKER in name:
                campaign.verify_temporary(os.path.join(root, name))
        campaign.check_visible("", {self.folder}.__contains__)
        campaign.check_visible(self.folder, lambda n: n == self.latest or bool(self._pattern.fullmatch(n)))

    def _check_tier(self, campaign: Campaign, folder: str, names: list[str], latest: str | None) -> int:
        """Every checkpoint of a tier loads bitwise right, and ``latest`` names one; returns its step (0: none)."""
        for name in names:
            step = int(self._pattern.fullmatch(name).group(1))  # type: ignore[union-attr]
            campaign.check_loads_as(posixpath.join(folder, name), step)
        if latest is None:
            return 0
        if latest not in names:
            campaign.violation(f"`latest` in {folder} points at {latest!r}, which is not a checkpoint there")
            return 0
        return int(self._pattern.fullmatch(latest).group(1))  # type: ignore[union-attr]

    def verify_clean(self, campaign: Campaign) -> None:
        super().verify_clean(campaign)  # the bucket: retention, and a fresh manager resumes the last step from it
        local_root = self.local_root(campaign.storage)
        left = os.listdir(local_root) if os.path.isdir(local_root) else []
        if left:
            campaign.violation(f"after a clean run (uploads done), the local folder still holds {left}")


SCENARIOS: dict[str, type[Scenario]] = {
    s.name: s for s in (SingleFile, DDP, FSDP, Manager, S3SingleFile, S3FSDP, S3Manager, S3TwoTier)
}


# ---------------------------------------------------------------------------------------------- kill points
@dataclasses.dataclass(frozen=True)
class KillPoint:
    """SIGKILL a writer of ``rank`` at the ``call``-th matching call of ``target`` (``module:attr[.attr]``)."""

    name: str
    scenario: str
    target: str
    when: str = "before"  # or "after" the call
    call: int = 2  # the second save, so that a previous checkpoint exists
    rank: int = 0
    match: str = ""  # only calls whose first argument's text contains this count
    overwrite: bool = False  # the manager's default


# Writers free superseded sharded generations at once (no grace period), so a clean run leaves none behind.
# They abort the incomplete uploads killed writers left at once too (one writer at a time here, so none is live;
# users keep the default age of a day).
WRITER_ENVIRONMENT = {"FABRIC_CKPT_RETIRE_AFTER": "0", "FABRIC_CKPT_ABORT_UPLOADS_AFTER": "0"}

KILL_POINTS = [
    KillPoint(
        "single/mid-data", "single", "fabric_ckpt.formats.torch_format:ZipWriter.add", "after", 2, match="data/3"
    ),
    KillPoint("single/before-rename", "single", "os:replace", "before", 2, match=TEMP_MARKER),
    KillPoint("single/before-folder-fsync", "single", "fabric_ckpt.storage.local:fsync_folder", "before", 2),
    KillPoint("ddp/rank1-in-agree", "ddp", "fabric_ckpt.strategies.parallel:ParallelStrategy.gather_objects", call=3,
              rank=1),
    KillPoint("fsdp/before-manifest", "fsdp", "fabric_ckpt.formats.sharded:commit"),
    KillPoint("fsdp/before-generation-sync", "fsdp", "fabric_ckpt.storage.local:LocalStorage.sync_folder"),
    KillPoint("fsdp/manifest-temporary", "fsdp", "os:replace", "before", 2, match=MANIFEST_NAME + TEMP_MARKER),
    KillPoint("fsdp/old-not-removed", "fsdp", "fabric_ckpt.formats.sharded:remove_later", call=1),
    KillPoint("fsdp/rank1-checksumming", "fsdp", "fabric_ckpt.formats.sharded:file_checksums", rank=1),
    KillPoint("manager/before-latest", "manager", "fabric_ckpt.storage.local:LocalStorage.symlink"),
    # overwrite=True, so that the bug of manager/before-latest (the same moment, seen from the next run) stays out.
    KillPoint("manager/latest-temporary", "manager", "os:replace", "before", 2, match=".latest-rank0" + TEMP_MARKER,
              overwrite=True),
    KillPoint("manager/before-prune", "manager", "fabric_ckpt.manager:CheckpointManager._prune", call=3),
    KillPoint("manager/mid-prune", "manager", "fabric_ckpt.tiers.folder:CheckpointFolder.delete", "after", 1),
    # Object stores: the multipart upload is complete but not committed; the manifest is not written yet; the
    # manifest names the new generation but the old one is not deleted yet; `latest` not moved yet.
    KillPoint("s3-single/before-complete", "s3-single", "fabric_ckpt.storage.s3:S3Storage._complete"),
    KillPoint("s3-fsdp/before-manifest", "s3-fsdp", "fabric_ckpt.formats.sharded:commit"),
    KillPoint("s3-fsdp/old-generation-kept", "s3-fsdp", "fabric_ckpt.formats.sharded:remove_later", call=1),
    KillPoint("s3-manager/before-latest", "s3-manager", "fabric_ckpt.manager:CheckpointManager._point_latest"),
    KillPoint("s3-manager/mid-prune", "s3-manager", "fabric_ckpt.tiers.folder:CheckpointFolder.delete", "after", 1),
    # Two tiers (uploads on a background thread): the second checkpoint's upload is complete but not committed; it is
    # committed but the remote `latest` not moved; both done but the local copy not deleted yet.
    KillPoint("s3-twotier/mid-upload", "s3-twotier", "fabric_ckpt.storage.s3:S3Storage._complete", call=3),
    KillPoint("s3-twotier/before-remote-latest", "s3-twotier", "fabric_ckpt.tiers.folder:CheckpointFolder.point_latest"),  # noqa: E501
    KillPoint("s3-twotier/before-local-release", "s3-twotier", "fabric_ckpt.tiers.remote:RemoteTier._prune_local"),
]  # fmt: skip


def arm(point: KillPoint, killed_at: str) -> None:
    """In a writer: wrap the target so that its chosen call SIGKILLs this process (nothing else changes).

    The moment is written to ``killed_at`` first, so the parent can tell the other ranks' reactions from failures.
    """
    module_name, _, attr_path = point.target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, attr)
    calls = 0

    def die() -> NoReturn:
        with open(killed_at, "w") as f:
            f.write(repr(time.monotonic()))
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        first = args[1] if parents and len(args) > 1 else (args[0] if args else "")
        hit = False
        if point.match in str(first):
            calls += 1
            hit = calls == point.call
        if hit and point.when == "before":
            die()
        result = original(*args, **kwargs)
        if hit:
            die()
        return result

    setattr(owner, attr, wrapper)


# ---------------------------------------------------------------------------------------------- the writer
@dataclasses.dataclass
class WriterSpec:
    scenario: Scenario
    storage: Storage
    rank: int
    port: int
    ready_fd: int
    max_saves: int
    point: KillPoint | None = None


def writer_main(spec: WriterSpec, journal: Journal, errors: str) -> NoReturn:
    """The body of a forked writer: never returns (``os._exit``), so no parent cleanup runs twice."""
    code = 0
    try:
        _write_loop(spec, journal)
    except _Mismatch as err:
        record_error(errors, spec.rank, f"RESUME MISMATCH: {err}")
        code = MISMATCH_EXIT
    except BaseException:
        record_error(errors, spec.rank, traceback.format_exc())
        code = ERROR_EXIT
    os._exit(code)


class _Mismatch(Exception):
    pass


def _write_loop(spec: WriterSpec, journal: Journal) -> None:
    scenario = spec.scenario
    os.environ.update(spec.storage.environment)  # the S3 endpoint and credentials, as a user's job would have them
    if scenario.world_size > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(spec.port),
            RANK=str(spec.rank),
            WORLD_SIZE=str(scenario.world_size),
            LOCAL_RANK=str(spec.rank),
            LOCAL_WORLD_SIZE=str(scenario.world_size),
            GROUP_RANK="0",
        )
    if spec.point is not None and spec.point.rank == spec.rank:
        arm(spec.point, os.path.join(spec.storage.scratch, "killed-at"))
    fabric = scenario.make_fabric()
    raw_model, raw_optimizer = build(scenario.width)
    model, optimizer = fabric.setup(raw_model, raw_optimizer)
    init_optimizer_state(raw_model, raw_optimizer)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0, "meta": {}}
    start = scenario.resume(fabric, state, spec.storage)
    if start:  # what was loaded must be what the journal says was saved (the in-flight step is not journalled)
        recorded = {step: value for step, value, _ in journal.entries()}
        loaded = digest(raw_model, raw_optimizer, start)
        if start in recorded and recorded[start] != loaded:
            raise _Mismatch(f"resumed step {start}, whose digest differs from the journal's")
    if spec.rank == 0:
        os.write(spec.ready_fd, b"r")
    patterns = Patterns()
    for step in range(start + 1, start + 1 + spec.max_saves):
        fill(raw_model, raw_optimizer, step, patterns)
        state["step"] = step
        state["meta"] = {"step": step, "tag": f"step-{step}"}
        scenario.save(fabric, state, spec.storage)
        value = digest(raw_model, raw_optimizer, step)
        if spec.rank == 0:
            journal.append(step, value)
    scenario.finish()


# ---------------------------------------------------------------------------------------------- the parent
# Exceptions a known library bug lets through where a documented error belongs: counted, reported, not a
# violation here. None at the moment.
KNOWN_BUGS: dict[str, str] = {}
PORT_CLASH = "Address already in use"  # the free port we picked was taken before the writers bound it


@dataclasses.dataclass
class Figures:
    scenario: str
    kills: int = 0
    kill_modes: dict[str, int] = dataclasses.field(default_factory=dict)
    kills_before_ready: int = 0
    kills_mid_save: int = 0  # a temporary was left behind: the kill landed inside a save
    saves_journalled: int = 0
    checkpoints_verified: int = 0
    partial_refused: int = 0
    complete_temporaries: int = 0
    temporaries_cleaned: int = 0
    uploads_left_incomplete: int = 0  # object stores: multipart uploads a kill left (invisible to listings)
    uploads_aborted: int = 0  # ... and that a later save to the same folder aborted
    survivor_stopped_alone: int = 0
    survivor_errors: int = 0
    clean_rounds: int = 0
    known_bugs: dict[str, int] = dataclasses.field(default_factory=dict)
    port_clashes: int = 0
    lost: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


class WrongData(Exception):
    """A checkpoint loaded, but not with the content its step must have."""


class Campaign:
    """The killing and checking for one scenario in one folder (or bucket, with ``root`` for the journal)."""

    # What a check changes, carried back from the child that ran it (see _check).
    _CARRIED = ("figures", "observed", "_expected", "_pending", "_uploads_seen")

    def __init__(self, scenario: Scenario, root: str, rng: random.Random, point: KillPoint | None = None) -> None:
        self.scenario = scenario
        self.storage: Storage = S3Storage.create(root) if scenario.remote else LocalStorage(root)
        self.journal = Journal(os.path.join(root, "journal.txt"))
        self.errors = os.path.join(root, "errors.jsonl")
        self.rng = rng
        self.point = point
        self.figures = Figures(scenario.name if point is None else point.name)
        self.fabric = Fabric(accelerator="cpu")
        build(8)  # the first optimizer imports torch._dynamo (~1 s): here once, not in every forked writer and checker
        self.observed = 0  # the newest step seen on disk so far
        self._expected: dict[int, str] = {}
        self._patterns = Patterns()
        self._pending: list[str] = []  # temporaries seen after the previous round
        self._uploads_seen: set[str] = set()  # incomplete multipart uploads found after the previous round
        self._periods: list[float] = []
        self._errors_seen = 0
        self._round = "start"

    # ------------------------------------------------------------------ bookkeeping
    def violation(self, message: str) -> None:
        self.figures.violations.append(f"[{self.figures.scenario}, {self._round}] {message}")

    @property
    def floor(self) -> int:
        """No checkpoint may be older than this: the newest step journalled or seen on disk."""
        entries = self.journal.entries()
        return max(self.observed, entries[-1][0] if entries else 0)

    def expected_digest(self, step: int) -> str:
        if step not in self._expected:
            model, optimizer = build(self.scenario.width)
            init_optimizer_state(model, optimizer)
            fill(model, optimizer, step, self._patterns)
            self._expected[step] = digest(model, optimizer, step)
        return self._expected[step]

    # ------------------------------------------------------------------ checks
    def load(self, name: str) -> tuple[int, str]:
        """Load into fresh live objects, as a user would; return the step and the digest of what arrived."""
        model, optimizer = build(self.scenario.width)
        init_optimizer_state(model, optimizer)
        fill(model, optimizer, 10**6, self._patterns)  # anything the load fails to overwrite shows in the digest
        path = name if os.path.isabs(name) else self.storage.path(name)  # absolute: a local file (two tiers)
        remainder = self.fabric.load(path, {"model": model, "optimizer": optimizer})
        step = int(remainder["step"])
        if remainder.get("meta") != {"step": step, "tag": f"step-{step}"}:
            raise WrongData(f"plain entries of step {step} are wrong: {remainder.get('meta')}")
        if "timestamp" in remainder and remainder["timestamp"]["batch"] != step:
            raise WrongData(f"the timestamp says batch {remainder['timestamp']['batch']}, the step is {step}")
        value = digest(model, optimizer, step)
        if value != self.expected_digest(step):
            raise WrongData(f"it loads, but its tensors are not step {step}'s")
        return step, value

    def check_loads_as(self, name: str, step: int | None = None) -> int | None:
        """The checkpoint loads and is bitwise its step's content (and the journal's, if journalled)."""
        try:
            loaded_step, value = self.load(name)
        except WrongData as err:
            self.violation(f"{name}: wrong data: {err}")
            return None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:
            self.violation(f"{name} does not load: {type(err).__name__}: {err}")
            return None
        self.figures.checkpoints_verified += 1
        if step is not None and loaded_step != step:
            self.violation(f"{name} holds step {loaded_step}, its name says {step}")
        recorded = {s: v for s, v, _ in self.journal.entries()}
        if loaded_step in recorded and recorded[loaded_step] != value:
            self.violation(f"{name} holds step {loaded_step}, but not what the writer journalled for it")
        return loaded_step

    def verify_checkpoint(self, name: str, present: bool | None = None) -> None:
        """The checkpoint a user would resume from is there, complete, and no older than the last saved step.

        ``present`` says whether it was committed, where the name existing does not (a sharded folder on an object
        store exists once a generation is being written; its manifest commits it).
        """
        floor = self.floor
        if not (self.storage.exists(name) if present is None else present):
            if floor > 0:
                self.figures.lost += 1
                self.violation(f"{name} is missing although step {floor} was saved")
            return
        step = self.check_loads_as(name)
        if step is None:
            self.figures.lost += 1
            return
        if step < floor:
            self.figures.lost += 1
            self.violation(f"{name} went back to step {step}; step {floor} was saved")
        elif step > floor + 1:
            self.violation(f"{name} holds step {step}, but at most {floor + 1} was being saved")
        self.observed = max(self.observed, step)

    def verify_temporary(self, name: str) -> None:
        """A temporary is either refused on load (partial) or, if complete, bitwise right."""
        try:
            self.load(name)
        except WrongData as err:
            self.violation(f"the temporary {name} loads with wrong data: {err}")
            return
        except (FileNotFoundError, CheckpointError):
            self.figures.partial_refused += 1
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:
            known = KNOWN_BUGS.get(type(err).__name__)
            if known is not None:
                self.figures.known_bugs[known] = self.figures.known_bugs.get(known, 0) + 1
                self.figures.partial_refused += 1  # refused, though with the wrong exception type
                return
            self.violation(f"loading the temporary {name} raised an undocumented {type(err).__name__}: {err}")
            return
        self.figures.complete_temporaries += 1

    def check_visible(self, folder: str, expected: Callable[[str], bool]) -> None:
        """A listing shows committed checkpoints (and ``latest``) only, never a partial upload or stray file."""
        for name in self.storage.names(folder):
            if not expected(name):
                self.violation(f"{posixpath.join(folder, name)!r} is listed, which is no checkpoint")

    def _check(self, check: Callable[[], None]) -> None:
        """Run ``check``; for an object store, in a forked child (see :func:`in_child`), keeping what it changed."""
        if not self.storage.remote:
            check()
            return

        def checked() -> dict[str, Any]:
            try:
                check()
            except Exception:
                self.violation(f"the check itself failed:\n{traceback.format_exc()}")
            return {name: getattr(self, name) for name in self._CARRIED}

        try:
            self.__dict__.update(in_child(checked))
        except RuntimeError as err:
            self.violation(str(err))

    # ------------------------------------------------------------------ rounds
    def _spawn(self, max_saves: int, point: KillPoint | None) -> tuple[list[int], int]:
        assert threading.active_count() == 1, "fork from a single-threaded parent only"
        port = _free_port() if self.scenario.world_size > 1 else 0
        ready_r, ready_w = os.pipe()
        pids: list[int] = []
        for rank in range(self.scenario.world_size):
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                with contextlib.suppress(OSError):
                    os.setpgid(0, pids[0] if pids else 0)  # one process group per round: killpg kills them all
                spec = WriterSpec(self.scenario, self.storage, rank, port, ready_w, max_saves, point)
                writer_main(spec, self.journal, self.errors)
            with contextlib.suppress(OSError):
                os.setpgid(pid, pids[0] if pids else pid)  # both sides set it: whichever runs first wins the race
            pids.append(pid)
        os.close(ready_w)
        return pids, ready_r

    def _wait_ready(self, ready_r: int, timeout: float) -> bool:
        readable, _, _ = select.select([ready_r], [], [], timeout)
        return bool(readable) and os.read(ready_r, 1) == b"r"

    def kill_round(self) -> None:
        """Start writers, kill them at a random moment, and check everything."""
        figures = self.figures
        figures.kills += 1
        self._round = f"kill {figures.kills}"
        before = len(self.journal.entries())
        pids, ready_r = self._spawn(max_saves=100_000, point=None)
        try:
            if self.rng.random() < 0.1:  # sometimes while starting or resuming: kills there must be harmless too
                time.sleep(self.rng.uniform(0.0, 0.3))
                figures.kills_before_ready += 1
            elif not self._wait_ready(ready_r, TIMEOUT_S):
                if not any(PORT_CLASH in e["error"] for e in read_errors(self.errors)[self._errors_seen :]):
                    # How each writer ended (-9: SIGKILL, -6: abort, 3: a Python error, logged) says who failed.
                    self.violation(f"the writers never became ready (exit statuses {_reap(list(pids), 5.0)})")
                    pids.clear()
            else:
                window = 2.5 * (statistics.median(self._periods) if self._periods else 0.3)
                time.sleep(self.rng.uniform(0.0, window))
            t_kill = self._kill(pids)
        finally:
            os.close(ready_r)
            _reap(pids)
        entries = self.journal.entries()
        self._periods.extend(b[2] - a[2] for a, b in zip(entries[before:], entries[before + 1 :], strict=False))
        self._check_errors(t_kill)
        self._after_round(saved=len(entries) > before)

    def _kill(self, pids: list[int]) -> float:
        """SIGKILL the whole group, or one rank and the rest a moment later (as a launcher would). Returns when
        the first kill happened."""
        if not pids:  # the writers already ended (and were reaped)
            return time.monotonic()
        mode = "group" if len(pids) == 1 else self.rng.choice(["group", "rank0-first", "rank1-first"])
        self.figures.kill_modes[mode] = self.figures.kill_modes.get(mode, 0) + 1
        t_kill = time.monotonic()
        if mode == "group":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pids[0], signal.SIGKILL)
            return t_kill
        first = int(mode[4])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[first], signal.SIGKILL)
        # The survivor should notice the dead peer and stop by itself; give it a moment before killing it too.
        survivor = pids[1 - first]
        deadline = time.monotonic() + self.rng.uniform(0.0, 1.0)
        while time.monotonic() < deadline:
            done, _ = os.waitpid(survivor, os.WNOHANG)
            if done:
                self.figures.survivor_stopped_alone += 1
                pids.remove(survivor)
                return t_kill
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(survivor, signal.SIGKILL)
        return t_kill

    def _check_errors(self, t_kill: float) -> None:
        errors = read_errors(self.errors)
        for error in errors[self._errors_seen :]:
            if PORT_CLASH in error["error"]:
                self.figures.port_clashes += 1  # another program took the rendezvous port: not the library's doing
            elif error["t"] >= t_kill - 0.001 and not error["error"].startswith("RESUME MISMATCH"):
                self.figures.survivor_errors += 1  # the surviving rank saw its peer die: expected
            else:
                self.violation(f"rank {error['rank']} failed before any kill:\n{error['error']}")
        self._errors_seen = len(errors)

    def _after_round(self, saved: bool, clean: bool = False) -> None:
        self._check(lambda: self._inspect(saved, clean))
        self.figures.saves_journalled = len(self.journal.entries())

    def _inspect(self, saved: bool, clean: bool) -> None:
        temporaries = self.scenario.temporaries(self.storage)
        uploads = self.storage.incomplete_uploads()
        new, earlier = uploads - self._uploads_seen, self._uploads_seen
        self._uploads_seen = uploads
        self.figures.uploads_aborted += len(earlier - uploads)
        if saved and earlier & uploads:
            self.violation(f"{len(earlier & uploads)} incomplete upload(s) a kill left survived the next save")
        left = len(new)
        if clean and left:
            self.violation(f"a run that finished cleanly left {left} incomplete multipart upload(s)")
        elif left > 0:
            self.figures.uploads_left_incomplete += left
        if temporaries or (left > 0 and not clean):
            self.figures.kills_mid_save += 1
        if saved:  # a save completed since: the temporaries the previous kill left must be gone
            for name in self._pending:
                if self.storage.exists(name):
                    self.violation(f"the temporary {name} of a killed save survived the next successful save")
                else:
                    self.figures.temporaries_cleaned += 1
            self._pending = []
        self._pending += [t for t in temporaries if t not in self._pending]
        self.scenario.verify(self)

    def clean_round(self, saves: int = 2) -> None:
        """Writers that finish on their own: what earlier runs left is gone and the newest step is on disk."""
        self._round = "clean run"
        before = self.floor
        pids, ready_r = self._spawn(max_saves=saves, point=None)
        try:
            statuses = _reap(pids, timeout=TIMEOUT_S)
        finally:
            os.close(ready_r)
        if any(status != 0 for status in statuses):
            errors = read_errors(self.errors)[self._errors_seen :]
            detail = errors[0]["error"].strip().splitlines()[-1] if errors else statuses
            self.violation(f"a clean run after the kill failed: {detail}")
        self._errors_seen = len(read_errors(self.errors))
        self.figures.clean_rounds += 1
        # What this run left (e.g. a previous checkpoint whose deletion was still under way when it exited) must
        # be gone after the next run; _after_round checks that, and run_* end with two clean runs for it.
        self._after_round(saved=True, clean=True)
        if self.floor < before + saves and not self.figures.violations:
            self.violation(f"a clean run of {saves} saves advanced from step {before} to {self.floor}")
        if hasattr(self.scenario, "verify_clean") and not self.figures.violations:
            self._check(lambda: self.scenario.verify_clean(self))  # type: ignore[attr-defined]

    def point_round(self, point: KillPoint) -> None:
        """Writers run until the armed one kills itself at the chosen point; then everything is checked."""
        self._round = "kill point"
        self.figures.kills += 1
        before = len(self.journal.entries())
        pids, ready_r = self._spawn(max_saves=point.call + 3, point=point)
        try:
            statuses = _reap([pids[point.rank]], timeout=TIMEOUT_S)
            t_kill = time.monotonic()
            if statuses != [-signal.SIGKILL]:
                self.violation(f"the kill point was never reached (rank {point.rank} ended with {statuses})")
            else:
                with open(os.path.join(self.storage.scratch, "killed-at")) as f:
                    t_kill = float(f.read())
            # The other ranks: a launcher would end them now; give them a moment to notice by themselves first.
            _reap([p for p in pids if p != pids[point.rank]], timeout=5.0)
        finally:
            os.close(ready_r)
        self.figures.kill_modes[f"rank{point.rank}-at-point"] = 1
        self._check_errors(t_kill)
        self._after_round(saved=len(self.journal.entries()) > before)


def _reap(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait for the processes (SIGKILL those still alive at the deadline); their exit codes, -signal if killed."""
    statuses = []
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                statuses.append(0)
                break
            if done:
                statuses.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.005)
    return statuses


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------- entry points
def run_random(scenario_name: str, root: str, kills: int, seed: int) -> Figures:
    """``kills`` random kills of one scenario, then two clean runs (the second removes what the first left)."""
    started = time.monotonic()
    campaign = Campaign(SCENARIOS[scenario_name](), os.path.join(root, scenario_name), random.Random(seed))
    for _ in range(kills):
        campaign.kill_round()
    campaign.clean_round()
    campaign.clean_round()
    campaign.figures.seconds = round(time.monotonic() - started, 1)
    return campaign.figures


def run_point(point: KillPoint, root: str, seed: int) -> Figures:
    """One kill at a chosen point, then two clean runs that must recover and leave nothing behind."""
    started = time.monotonic()
    scenario = SCENARIOS[point.scenario]()
    if isinstance(scenario, Manager):
        scenario.overwrite = point.overwrite
    folder = os.path.join(root, point.name.replace("/", "-"))
    campaign = Campaign(scenario, folder, random.Random(seed), point)
    campaign.point_round(point)
    campaign.clean_round()
    campaign.clean_round()
    campaign.figures.seconds = round(time.monotonic() - started, 1)
    return campaign.figures


def default_kills(remote: bool = False) -> int:
    """Random kills per scenario: the local S3 server is slow, so the full campaign gives its scenarios fewer."""
    full = os.environ.get("FABRIC_CKPT_CAMPAIGN") == "full"
    if remote:
        return 40 if full else 12
    return 100 if full else 12


def group(scenario: str) -> str:
    """``"s3"`` or ``"local"``: the groups ``--scenario`` and ``--points`` accept besides names."""
    return "s3" if SCENARIOS[scenario].remote else "local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all", "local", "s3", "none"])
    parser.add_argument("--kills", type=int, default=None, help="random kills per scenario")
    parser.add_argument(
        "--points",
        default="none",
        help="'all', 'none', 'local', 's3', or kill point names/scenarios, comma-separated",
    )
    parser.add_argument("--root", required=True, help="a scratch folder")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    names = [n for n in SCENARIOS if args.scenario in (n, "all", group(n))]
    wanted = set(args.points.split(","))
    points = [p for p in KILL_POINTS if wanted & {"all", p.name, p.scenario, group(p.scenario)}]
    print(f"crash campaign: seed {seed}, scenarios {names}, {len(points)} kill points", flush=True)
    results = []
    with contextlib.ExitStack() as stack:
        remote = any(SCENARIOS[n].remote for n in [*names, *(p.scenario for p in points)])
        if remote and not os.environ.get("AWS_ENDPOINT_URL"):  # the tests' fixture starts one and sets it
            from tests.s3 import s3_environment, s3_server

            stack.enter_context(s3_environment(stack.enter_context(s3_server())))
        # Seeds follow the order of SCENARIOS and KILL_POINTS, so one scenario alone repeats its choices.
        for name in names:
            kills = args.kills if args.kills is not None else default_kills(SCENARIOS[name].remote)
            figures = run_random(name, args.root, kills, seed + list(SCENARIOS).index(name))
            results.append(figures)
            print(_summary(figures), flush=True)
        for point in points:
            figures = run_point(point, args.root, seed + 1000 + KILL_POINTS.index(point))
            results.append(figures)
            print(_summary(figures), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": seed, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    failed = [v for r in results for v in r.violations]
    for violation in failed:
        print("VIOLATION", violation, file=sys.stderr)
    return 1 if failed else 0


def _summary(f: Figures) -> str:
    return (
        f"{f.scenario:28s} kills {f.kills:4d} (mid-save {f.kills_mid_save}, starting {f.kills_before_ready}) "
        f"saves {f.saves_journalled:4d} verified {f.checkpoints_verified:4d} partial-refused {f.partial_refused:3d} "
        f"cleaned {f.temporaries_cleaned:3d} incomplete-uploads {f.uploads_left_incomplete:3d} "
        f"(aborted {f.uploads_aborted:3d}) lost {f.lost} "
        f"violations {len(f.violations)} [{f.seconds:.0f} s]"
    )


def run_subprocess(args: list[str], timeout: float) -> dict[str, Any]:
    """Run the campaign in a fresh interpreter (the way the tests do) and return its JSON figures."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "figures.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "tests.crash_campaign", "--json", out, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if not os.path.exists(out):
            raise RuntimeError(f"the campaign crashed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
        with open(out) as f:
            figures = json.load(f)
    figures["stdout"] = result.stdout
    return figures


if __name__ == "__main__":
    sys.exit(main())
