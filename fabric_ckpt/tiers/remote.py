"""The remote tier of a two-tier :class:`~fabric_ckpt.CheckpointManager`: uploads, its ``latest``, its retention.

Each checkpoint is committed in the local folder first; then an :class:`Upload` copies it to the remote folder in the
background with the remote storage's commit (:mod:`fabric_ckpt.tiers.transfer`). Only once the copy is complete does
the remote ``latest`` move to it (never back to an older one); then the remote folder is pruned to
``remote_num_checkpoints_to_keep`` (and once before a run's first upload, finishing what a killed run left), and
where the local tier keeps none (``num_checkpoints_to_keep=0``) the local copy is deleted. Resuming takes the newest
checkpoint of either tier.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fabric_ckpt.core.naming import NamePattern, split_folder
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.storage import StorageOptions, resolve
from fabric_ckpt.tiers.folder import CheckpointFolder, Key, timestamp_key
from fabric_ckpt.tiers.transfer import copy_checkpoint, is_committed
from fabric_ckpt.tiers.uploads import Upload, UploadQueue

__all__ = ["LOCAL", "REMOTE", "LocalTier", "RemoteTier", "check_keep", "remote_tier"]

log = logging.getLogger(__name__)

LOCAL, REMOTE = "local", "remote"
# A checkpoint to try when resuming: (LOCAL or REMOTE, its name in that tier's folder).
Candidate = tuple[str, str]


def check_keep(value: int, option: str, *, zero: str | None = None) -> int:
    """``value`` if it is -1 or a positive int (or 0, where ``zero`` says what 0 means); else ``ValueError``."""
    number = isinstance(value, int) and not isinstance(value, bool)
    if not number or not (value == -1 or value >= 1 or (zero is not None and value == 0)):
        meaning = f", 0 ({zero})" if zero else ""
        raise ValueError(f"{option}={value!r} must be -1 (keep all){meaning} or a positive int")
    return value


@dataclass(frozen=True)
class LocalTier:
    """The manager's own folder, as the remote tier sees it: ``lock`` guards its ``latest`` and its deletions."""

    folder: CheckpointFolder
    latest: NamePattern
    keep: int
    lock: threading.RLock


def remote_tier(
    remote_folder: str | os.PathLike[str] | None,
    remote_filename: str | None,
    keep: int,
    *,
    filename: str,
    latest_filename: str,
    local: LocalTier,
    values: Mapping[str, Any],
    options: StorageOptions,
    before_exit: Callable[[float], None],
) -> RemoteTier | None:
    """The remote tier of a manager's options (``None`` without ``remote_folder``); bad options are a
    ``ValueError`` naming the option."""
    if remote_folder is None:
        for option, value in (("remote_filename", remote_filename), ("remote_num_checkpoints_to_keep", keep)):
            if value not in (None, -1):
                raise ValueError(f"{option}={value!r} needs a remote_folder (the tier it applies to)")
        return None
    keep = check_keep(keep, "remote_num_checkpoints_to_keep")
    run_values = local.folder.run_values
    root, rest = split_folder(NamePattern(os.fspath(remote_folder), "remote_folder"))
    location = resolve(root.format(run_values) or ".", options, absolute=True)
    if location.url.rstrip("/") == local.folder.root.url.rstrip("/"):
        raise ValueError(
            f"remote_folder={os.fspath(remote_folder)!r} is the local folder itself; name another place (a bucket, "
            "another filesystem) for the durable copies"
        )
    name = remote_filename if remote_filename is not None else filename
    checkpoint = NamePattern(posixpath.join(rest, NamePattern(name, "remote_filename").text), "remote_filename")
    latest = NamePattern(posixpath.join(rest, NamePattern(latest_filename, "latest_filename").text), "latest_filename")
    folder = CheckpointFolder(location, checkpoint, run_values)
    if folder.format(checkpoint, values) == folder.format(latest, values):  # also fails on names leaving the folder
        raise ValueError(f"latest_filename={latest_filename!r} names the remote checkpoints themselves ({name!r})")
    return RemoteTier(folder, latest, keep, local, before_exit)


class RemoteTier:
    """Where a two-tier manager keeps its durable copies, and the queue that brings them there.

    ``before_exit(seconds)`` runs at interpreter exit before the pending uploads are waited for (the manager lets
    an asynchronous save finish there, so that its upload is queued).
    """

    def __init__(
        self,
        folder: CheckpointFolder,
        latest: NamePattern,
        keep: int,
        local: LocalTier,
        before_exit: Callable[[float], None],
    ) -> None:
        self.folder = folder
        self.latest = latest
        self.keep = keep
        self.local = local
        self._newest: Key | None = None  # the newest checkpoint this process moved `latest` to
        self._latest_lock = threading.Lock()
        self.resumed_name: str | None = None  # the remote copy of the checkpoint this run resumed from: kept
        self.local_resumed_name: str | None = None  # and its local name, which local retention keeps too
        self._found_latest: Key | None = None  # what the remote `latest` named when the run resumed
        self._pruned_before_first_upload = False
        self.queue = UploadQueue(self._upload, folder.root.original, before_exit)

    def url(self, name: str) -> str:
        return self.folder.url(name)

    # ------------------------------------------------------------------ saving
    def next_upload(self, name: str, values: Mapping[str, Any], *, replace: bool) -> Upload:
        """The upload of the checkpoint about to be saved as ``name``; first, the uploads that failed since the
        previous save are reported (a warning each) and queued again."""
        for failed in self.queue.retry_failed():
            warnings.warn(
                f"CheckpointManager: uploading {failed.local_url} to {failed.remote_url} failed: {failed.error}; "
                "the checkpoint stays in the local folder and its upload is being retried",
                stacklevel=3,
            )
        return self._prepare(name, values, replace=replace)

    def _prepare(self, name: str, values: Mapping[str, Any], *, replace: bool) -> Upload:
        remote_name = self.folder.format(self.folder.checkpoint, values)
        return Upload(
            name=name,
            local_latest=self.local.folder.format(self.local.latest, values),
            remote_name=remote_name,
            remote_latest=self.folder.format(self.latest, values),
            key=timestamp_key(values, self.folder.checkpoint.fields),
            replace=replace,
            local_url=self.local.folder.url(name),
            remote_url=self.folder.url(remote_name),
        )

    def submit(self, upload: Upload) -> None:
        self.queue.submit(upload)

    def pending(self) -> set[str]:
        """Local names whose upload is not confirmed yet (local retention keeps them)."""
        return self.queue.pending()

    def wait(self, timeout: float | None = None) -> None:
        """Retry failed uploads once more, wait for all; raise :class:`CheckpointError` naming those that failed."""
        self.queue.retry_failed()
        failed = self.queue.wait(timeout)
        if failed:
            details = "; ".join(f"{upload.local_url} -> {upload.remote_url}: {upload.error}" for upload in failed)
            raise CheckpointError(
                f"{len(failed)} checkpoint upload(s) failed (the checkpoints stay in the local folder, and the "
                f"manager retries them at its next save or wait()): {details}"
            ) from failed[-1].error

    def _upload(self, upload: Upload) -> None:
        """On the upload thread: copy, move the remote ``latest`` forward, prune both tiers."""
        target = self.folder.root.child(upload.remote_name)
        if not upload.replace and is_committed(target):
            message = "Checkpoint exists on the remote tier; pass overwrite=True to replace it"
            raise FileExistsError(errno.EEXIST, message, upload.remote_url)
        upload.replace = True  # from here on, what is at the target is this upload's own (a retry replaces it)
        if not self._pruned_before_first_upload:
            # An earlier run killed between an upload and its pruning left one checkpoint too many; each further run
            # killed that way would add one more. Pruning once before this run's first copy bounds the bucket.
            self._pruned_before_first_upload = True
            self.folder.prune(self.keep, upload.remote_latest, {upload.remote_name, self.resumed_name})
        copy_checkpoint(self.local.folder.root.child(upload.name), target)
        with self._latest_lock:
            if self._newest is None or upload.key >= self._newest:
                self.folder.point_latest(upload.remote_latest, upload.remote_name)
                self._newest = upload.key
        log.info("CheckpointManager uploaded %s to %s", upload.local_url, upload.remote_url)
        self.folder.prune(self.keep, upload.remote_latest, {upload.remote_name, self.resumed_name})
        self._prune_local(upload)

    def _prune_local(self, upload: Upload) -> None:
        """Local retention, now that this checkpoint is no longer waiting for its upload (retention at the save kept
        it). Keeping no local copies, it goes now, with older local checkpoints that wait for no upload (a stopped
        run's, superseded by this one) and ``latest`` if it named one of them."""
        local = self.local
        if local.keep == -1:
            return
        with local.lock:
            waiting = self.queue.waiting()
            if local.keep > 0:
                local.folder.prune(local.keep, upload.local_latest, {self.local_resumed_name, *waiting})
                return
            names = local.folder.names(upload.local_latest)
            if upload.name not in names:
                return
            target = local.folder.latest_target(upload.local_latest)[0]
            for name in names[names.index(upload.name) :]:
                if name in waiting:
                    continue
                local.folder.delete(name)
                if name == target:
                    local.folder.root.child(upload.local_latest).remove()

    # ------------------------------------------------------------------ resuming
    def resume_plan(
        self, local: list[str], local_problem: str | None, values: Mapping[str, Any]
    ) -> tuple[list[Candidate], str | None]:
        """The checkpoints of both tiers to try, in order: the newer of the two tiers' ``latest`` first (the local
        one when they are as far), then the other, then the rest of both, newest first.

        ``local`` is the local tier's own order (its ``latest``'s target first); tiers are compared by the
        timestamp variables both tiers' names carry.
        """
        latest = self.folder.format(self.latest, values)
        target, problem = self.folder.latest_target(latest)
        others = self.folder.names(latest)
        remote = [target, *(name for name in others if name != target)] if target is not None else others
        remote_problem = f"({self.folder.url(latest)}) {problem}" if target is None and others else None
        self._found_latest = self.folder.key(target) if target is not None else None
        shared = set(self.local.folder.checkpoint.fields) & set(self.folder.checkpoint.fields)

        def order(candidate: Candidate) -> tuple[Key, bool]:
            tier, name = candidate
            key = (self.local.folder if tier == LOCAL else self.folder).key(name, shared)
            return (key if key is not None else (), tier == LOCAL)  # as far: the local copy first (no download)

        heads = ([(LOCAL, local[0])] if local else []) + ([(REMOTE, remote[0])] if remote else [])
        rest = [(LOCAL, name) for name in local[1:]] + [(REMOTE, name) for name in remote[1:]]
        problems = [text for text in (local_problem, remote_problem) if text]
        plan = sorted(heads, key=order, reverse=True) + sorted(rest, key=order, reverse=True)
        return plan, "; ".join(problems) or None

    def resumed(self, tier: str, name: str, values: Mapping[str, Any] | None, *, owns_local: bool) -> None:
        """The run resumed from ``name`` on ``tier`` (``values``: its timestamp, if restored). Its remote copy is
        never pruned by this run; a local checkpoint the remote ``latest`` is older than (its run was stopped
        before the upload finished) is uploaded first, by the rank that ``owns_local`` copy."""
        if values is None:
            self.resumed_name, self.local_resumed_name = (name, None) if tier == REMOTE else (None, name)
            return
        local_name = name if tier == LOCAL else self.local.folder.format(self.local.folder.checkpoint, values)
        upload = self._prepare(local_name, values, replace=True)
        self.resumed_name, self.local_resumed_name = upload.remote_name, upload.name
        if tier == REMOTE:
            return
        owned = owns_local and is_committed(self.local.folder.root.child(upload.name))
        if owned and (self._found_latest is None or upload.key > self._found_latest):
            self.submit(upload)
