"""Composer-style checkpoint management: when to save, what to call it, ``latest``, resuming and retention.

A :class:`CheckpointManager` sits on top of ``fabric.save``/``fabric.load``: the training loop tells it when a batch or
an epoch ended, and it saves on its interval under a name built from format variables, points ``latest`` at the new
checkpoint, and prunes old ones. ``load_latest`` resumes a run where it stopped. See docs/checkpoint-management.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from torch import nn

from fabric_ckpt.async_save import SaveHandle
from fabric_ckpt.core.naming import FORMAT_VARIABLES, NamePattern, split_folder
from fabric_ckpt.core.rng import RNGState, check_rng_state
from fabric_ckpt.core.state import IgnoreKeys, apply_ignore_keys
from fabric_ckpt.core.timestamp import TIMESTAMP_FIELDS, Time, Timestamp, TimeUnit, check_timestamp_state, parse_time
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError
from fabric_ckpt.fabric import Fabric
from fabric_ckpt.storage import resolve
from fabric_ckpt.tiers import LOCAL, CheckpointFolder, LocalTier, RemoteTier, Upload, check_keep, remote_tier
from fabric_ckpt.training.preemption import DEFAULT_SIGNAL_TIMEOUT, SignalWatch, check_signals

__all__ = ["EVENTS", "FORMAT_VARIABLES", "CheckpointManager", "SaveInterval"]

SaveInterval = int | str | Time | Callable[[Timestamp, str], bool]
EVENTS = ("batch_end", "epoch_end")

_KEEP_NONE = "delete the local copy once its upload is confirmed"

log = logging.getLogger(__name__)


class CheckpointManager:
    """Saves checkpoints on an interval, keeps ``latest`` pointing at the newest, resumes, and prunes old ones.

    Args:
        fabric: the :class:`~fabric_ckpt.Fabric` that saves and loads.
        folder: where checkpoints go: a local path or fsspec URL; may use the format variables.
        filename: each checkpoint's name inside ``folder``; ``/`` makes subfolders.
        latest_filename: the name of the ``latest`` symlink (local) or pointer object (other filesystems).
        save_interval: an int (epochs), a time string (``"2ep"``, ``"500ba"``, ``"2000sp"``, ``"1000000tok"``), or
            a callable ``(timestamp, event) -> bool`` with ``event`` in :data:`EVENTS`.
        num_checkpoints_to_keep: keep the newest N checkpoints in ``folder``; ``-1`` keeps all; ``0`` (only with
            ``remote_folder``) deletes each local copy once its upload is confirmed.
        overwrite: replace an existing checkpoint of the same name instead of raising ``FileExistsError``. A run
            resumed by :meth:`load_latest` may always replace checkpoints after the one it resumed from: an
            interrupted earlier attempt of the same run wrote them.
        save_weights_only: save only the ``nn.Module`` entries of the state (no optimizer, timestamp or RNG).
        timestamp: a :class:`Timestamp` to share with other managers. A manager advances only the Timestamp it
            created itself; a shared one is advanced by its owner (see :meth:`on_batch_end`).
        run_name: ``{run_name}``; defaults to ``$RUN_NAME``, else a time-based name agreed by all ranks.
        async_save: write checkpoints in the background (``fabric.save_async``); ``latest`` and pruning follow each
            checkpoint once it is complete, and the next save (or ``load_latest``) waits for the previous one.
            ``"lazy"`` takes lazy snapshots (``fabric.save_async(..., snapshot="lazy")``); ``True`` (or ``"eager"``)
            eager ones.
        save_on_signal: signals (e.g. ``(signal.SIGTERM,)``) that mean "save now and stop": at the next hook every
            rank saves synchronously at the same step and :attr:`should_stop` becomes ``True``. The default ``()``
            changes no signal handler. See docs/preemption.md.
        signal_timeout: once signalled, how many seconds a rank waits for the others to reach the same hook; a rank
            that does not (dead or stuck) makes the process exit with a message instead of hanging.
        remote_folder: a second, durable tier (e.g. ``s3://bucket/run``; may use the format variables): each
            checkpoint is committed in ``folder`` first, then uploaded in the background, and ``latest`` of each
            tier moves once that tier's copy is complete. ``load_latest`` resumes from the newer tier. See
            docs/two-tier.md.
        remote_filename: the remote copies' names inside ``remote_folder`` (default: ``filename``).
        remote_num_checkpoints_to_keep: keep the newest N checkpoints in ``remote_folder``; ``-1`` (the default)
            keeps all.

    The format variables are :data:`FORMAT_VARIABLES`: the topology and the Timestamp's fields (``*_wct`` in whole
    seconds).

    Example:
        >>> manager = CheckpointManager(fabric, "checkpoints", save_interval="1ep", num_checkpoints_to_keep=3)
        >>> state = {"model": model, "optimizer": optimizer}
        >>> manager.load_latest(state)  # None on a fresh start
        >>> for epoch in range(epochs):
        ...     for batch in loader:
        ...         train_step(batch)
        ...         manager.on_batch_end(state, samples=len(batch))
        ...     manager.on_epoch_end(state)
    """

    def __init__(
        self,
        fabric: Fabric,
        folder: str | os.PathLike[str],
        filename: str = "ep{epoch}-ba{batch}-rank{rank}",
        latest_filename: str = "latest-rank{rank}",
        save_interval: SaveInterval = "1ep",
        num_checkpoints_to_keep: int = -1,
        overwrite: bool = False,
        save_weights_only: bool = False,
        timestamp: Timestamp | None = None,
        run_name: str | None = None,
        async_save: bool | str = False,
        save_on_signal: Iterable[int | str] = (),
        signal_timeout: float = DEFAULT_SIGNAL_TIMEOUT,
        remote_folder: str | os.PathLike[str] | None = None,
        remote_filename: str | None = None,
        remote_num_checkpoints_to_keep: int = -1,
    ) -> None:
        if timestamp is not None and not isinstance(timestamp, Timestamp):
            raise TypeError(f"timestamp must be a Timestamp or None, got {type(timestamp).__name__}")
        self.fabric = fabric
        self.save_interval = save_interval
        self._due = _schedule(save_interval)
        self.num_checkpoints_to_keep = _check_keep(num_checkpoints_to_keep, remote=remote_folder is not None)
        self.overwrite = overwrite
        self.save_weights_only = save_weights_only
        if async_save not in (False, True, "eager", "lazy"):
            raise ValueError(f"async_save={async_save!r}: use False, True ('eager' snapshots) or 'lazy'")
        self.async_save = async_save
        self.last_save: SaveHandle | None = None
        self._owns_timestamp = timestamp is None
        self.timestamp = Timestamp() if timestamp is None else timestamp
        self.run_name = _check_run_name(run_name if run_name is not None else self._default_run_name())
        self.resumed_from: str | None = None
        self._resumed_name: str | None = None
        self._pruned_before_first_save = False
        self._seen = (self.timestamp.epoch, self.timestamp.batch)
        self._run_values = self._topology()

        root, rest = split_folder(NamePattern(os.fspath(folder), "folder"))
        self.folder = root.format(self._run_values) or "."
        self._root = resolve(self.folder, fabric.storage_options, absolute=True)
        self._checkpoint = NamePattern(posixpath.join(rest, NamePattern(filename, "filename").text), "filename")
        self._latest = NamePattern(
            posixpath.join(rest, NamePattern(latest_filename, "latest_filename").text), "latest_filename"
        )
        self._per_rank = "rank" in self._checkpoint.fields
        self._folder = CheckpointFolder(self._root, self._checkpoint, self._run_values)
        # Fail now on "../x" or a bad format spec, not at the first save hours into training.
        if self._name(self._checkpoint) == self._name(self._latest):
            raise ValueError(f"latest_filename={latest_filename!r} names the checkpoints themselves ({filename!r})")
        self._last_saved: str | None = None
        self._stopped = False
        self._local_lock = threading.RLock()  # `latest` and deletions in `folder`: saves and uploads both change them
        self._remote: RemoteTier | None = remote_tier(
            remote_folder,
            remote_filename,
            remote_num_checkpoints_to_keep,
            filename=filename,
            latest_filename=latest_filename,
            local=LocalTier(self._folder, self._latest, self.num_checkpoints_to_keep, self._local_lock),
            values=self._values(),
            options=fabric.storage_options,
            before_exit=self._finish_save,
        )
        signals = check_signals(save_on_signal)
        if not isinstance(signal_timeout, (int, float)) or isinstance(signal_timeout, bool) or signal_timeout <= 0:
            raise ValueError(f"signal_timeout={signal_timeout!r} must be a positive number of seconds")
        # Last: nothing after it may fail and leave the handlers installed.
        self._watch = SignalWatch(signals, float(signal_timeout)) if signals else None

    # ------------------------------------------------------------------ the loop's hooks
    def on_batch_end(self, state: Mapping[str, Any], samples: int = 0, tokens: int = 0) -> str | None:
        """Call after each batch: advances the Timestamp (if this manager owns it), saves if due.

        Returns the path saved to, or ``None``. Sharing one Timestamp: the manager that created it (or your loop,
        via ``timestamp.advance_batch``) advances it and must be called first; managers given ``timestamp=`` only
        read it, and raise ``RuntimeError`` if it was not advanced since their last call.

        Example:
            >>> manager.on_batch_end(state, samples=inputs.shape[0])
        """
        if self._owns_timestamp:
            self.timestamp.advance_batch(samples, tokens)
        else:
            self._check_advanced("batch", samples, tokens)
        return self._save_if_due(state, "batch_end")

    def on_epoch_end(self, state: Mapping[str, Any]) -> str | None:
        """Call after each epoch: advances the Timestamp's epoch (if this manager owns it), saves if due.

        Example:
            >>> manager.on_epoch_end(state)
        """
        if self._owns_timestamp:
            self.timestamp.advance_epoch()
        else:
            self._check_advanced("epoch")
        return self._save_if_due(state, "epoch_end")

    def _check_advanced(self, unit: str, samples: int = 0, tokens: int = 0) -> None:
        if samples or tokens:
            raise ValueError(
                "this manager shares a Timestamp it does not advance, so it cannot count samples or tokens; "
                "pass them to timestamp.advance_batch() or to the manager that created the Timestamp"
            )
        index = 0 if unit == "epoch" else 1
        if (self.timestamp.epoch, self.timestamp.batch)[index] == self._seen[index]:
            raise RuntimeError(
                f"the shared Timestamp was not advanced since this manager's last on_{unit}_end; a manager given "
                f"timestamp= never advances it: call timestamp.advance_{unit}() or the owning manager's hook first"
            )

    def _save_if_due(self, state: Mapping[str, Any], event: str) -> str | None:
        self._seen = (self.timestamp.epoch, self.timestamp.batch)
        if self._stopped:
            return None
        if self._watch is not None and self._watch.agreed(distributed=self.fabric.world_size > 1):
            return self._save_and_stop(state)
        return self.save(state) if self._due(self.timestamp, event) else None

    # ------------------------------------------------------------------ stopping on a signal
    @property
    def should_stop(self) -> bool:
        """``True`` once a ``save_on_signal`` signal reached some rank and the checkpoint of this step is committed:
        the same on every rank, after the same hook. Check it after ``on_batch_end`` and ``on_epoch_end``.

        Example:
            >>> manager.on_batch_end(state)
            >>> if manager.should_stop:
            ...     break
        """
        return self._stopped

    def _save_and_stop(self, state: Mapping[str, Any]) -> str:
        assert self._watch is not None
        name = self._name(self._checkpoint)
        try:
            self.fabric.wait_for_saves()  # the save in flight first: it decides what `latest` is
            already_saved = name == self._last_saved  # e.g. by manager.save() at this very step
        except CheckpointError as err:  # an earlier checkpoint failed; this step's must still be written
            warnings.warn(f"CheckpointManager: {err}; saving this step's checkpoint anyway", stacklevel=3)
            already_saved = False
        path = self._url(name) if already_saved else self._save(state, asynchronous=False)
        self._stopped = True
        self._watch.restore()
        what = self._watch.received.name if self._watch.received is not None else "a signal to another rank"
        self.fabric.print(
            f"[fabric_ckpt] {what}: saved {path} (epoch {self.timestamp.epoch}, batch {self.timestamp.batch}); stopping"
        )
        return path

    def close(self) -> None:
        """Put back the signal handlers that ``save_on_signal`` replaced, e.g. once training ended without a signal.

        Example:
            >>> manager.close()
        """
        if self._watch is not None:
            self._watch.restore()

    # ------------------------------------------------------------------ saving
    def save(self, state: Mapping[str, Any]) -> str:
        """Save a checkpoint now; then point ``latest`` at it and prune. Returns its path.

        Raises:
            FileExistsError: the checkpoint exists and ``overwrite=False`` (nothing is written).

        Example:
            >>> path = manager.save({"model": model, "optimizer": optimizer})
        """
        return self._save(state, asynchronous=bool(self.async_save))

    def _save(self, state: Mapping[str, Any], *, asynchronous: bool) -> str:
        name = self._name(self._checkpoint)
        path = self._url(name)
        payload = self._payload(state)
        self._check_overwrite(name, path)
        manages = self.fabric.is_global_zero or self._per_rank
        if manages and not self._pruned_before_first_save:
            # Each earlier run killed between a commit and its pruning left one checkpoint too many; were this run
            # killed the same way, the excess would grow. Pruning once before the first commit bounds it.
            self._pruned_before_first_save = True
            self._prune(name)
        replace = self.overwrite or self._ahead_of_resume(name)
        upload = self._remote.next_upload(name, self._values(), replace=replace) if manages and self._remote else None
        if asynchronous:
            snapshot = "lazy" if self.async_save == "lazy" else "eager"
            handle = self.fabric.save_async(path, payload, snapshot=snapshot)
            if manages:  # moved on the background thread once the checkpoint is complete
                handle.add_done_callback(lambda _: self._after_commit(name, upload))
            self.last_save, self._last_saved = handle, name
            return path
        self.fabric.save(path, payload)
        self._last_saved = name
        if manages:
            self._after_commit(name, upload)
        self.fabric.barrier("CheckpointManager.save")
        return path

    def _after_commit(self, name: str, upload: Upload | None = None) -> None:
        # Only after the checkpoint is complete; per-rank names are managed by each rank that wrote its file.
        with self._local_lock:
            if self._exists(name):
                self._point_latest(name)
                self._prune(name)
                if self._remote is not None and upload is not None:
                    self._remote.submit(upload)

    def _payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if self.save_weights_only:
            modules = {key: value for key, value in state.items() if isinstance(value, nn.Module)}
            if not modules:
                raise ValueError("save_weights_only=True, but the state has no torch.nn.Module entry to save")
            return modules
        if "timestamp" in state and state["timestamp"] is not self.timestamp:
            raise ValueError("the state has its own 'timestamp' entry; the manager saves its Timestamp there")
        if "rng" in state and not isinstance(state["rng"], RNGState):
            raise ValueError("the state has its own 'rng' entry; the manager saves an RNGState there")
        return {**state, "timestamp": self.timestamp, "rng": state.get("rng", RNGState())}

    def _check_overwrite(self, name: str, path: str) -> None:
        if self.overwrite:
            return
        # Rank 0 decides for everyone, so that all ranks raise together instead of some waiting in fabric.save; and
        # every rank takes part, since only rank 0 can tell whether its name lies ahead of its resumed one.
        clashes = self.fabric.is_global_zero and not self._ahead_of_resume(name) and self._exists(name)
        clash = self.fabric.broadcast(path if clashes else None)
        if clash is not None:
            raise FileExistsError(errno.EEXIST, "Checkpoint exists; pass overwrite=True to replace it", clash)

    def _point_latest(self, name: str) -> None:
        self._folder.point_latest(self._name(self._latest), name)

    def _prune(self, saved: str) -> None:
        if self.num_checkpoints_to_keep == 0:  # local copies go once uploaded (tiers.remote)
            return
        pending = self._remote.pending() if self._remote is not None else set()  # not uploaded yet
        protected = {saved, self._resumed_name, *pending}
        self._folder.prune(self.num_checkpoints_to_keep, self._name(self._latest), protected)

    # ------------------------------------------------------------------ resuming
    def load_latest(
        self,
        state: MutableMapping[str, Any],
        *,
        strict: bool = True,
        ignore_keys: IgnoreKeys = None,
        load_weights_only: bool = False,
        progress_bar: bool | None = None,
    ) -> dict[str, Any] | None:
        """Resume from ``latest``: restore ``state`` in place, and the Timestamp and RNG; return the remainder.

        If ``latest`` is missing or does not load, the newest checkpoint in the folder that loads is used and a
        warning says so. With no checkpoint at all, returns ``None`` and leaves ``state`` untouched. ``ignore_keys``
        and ``load_weights_only`` are ``fabric.load``'s (``ignore_keys=["rng"]`` keeps the current RNG state);
        a weights-only manager restores only modules. ``progress_bar`` shows or hides the download's progress bar
        for this call (``fabric.load``'s). In a multi-process run, global rank 0 picks the checkpoint
        and every rank loads that one.

        Raises:
            CheckpointError: checkpoints exist but none of them loads.

        Example:
            >>> remainder = manager.load_latest({"model": model, "optimizer": optimizer})
            >>> fresh_start = remainder is None
        """
        self.fabric.wait_for_saves()  # an asynchronous save in flight decides what `latest` is
        no_plan: tuple[list[tuple[str, str]], str | None] = ([], None)
        plan = self.fabric.strategy.agree(  # every rank raises if rank 0 cannot list a tier (e.g. the bucket)
            lambda: self._resume_plan() if self.fabric.is_global_zero else no_plan, "Finding the latest checkpoint"
        )
        candidates, latest_problem = self.fabric.broadcast(plan)
        weights_mode = load_weights_only or self.save_weights_only
        skipped: list[str] = []
        for tier, name in candidates:
            path = self._url(name) if self._remote is None or tier == LOCAL else self._remote.url(name)
            try:
                remainder = self.fabric.load(
                    path,
                    state,
                    strict=strict,
                    ignore_keys=ignore_keys if weights_mode else _checking_extras(ignore_keys),
                    load_weights_only=weights_mode,
                    progress_bar=progress_bar,
                )
            except CheckpointMismatchError as err:
                # the checkpoint is fine; the state does not fit it, and would not fit an older one either
                raise CheckpointMismatchError(f"Resuming from '{path}' failed: {err}") from err
            except (OSError, CheckpointError) as err:
                skipped.append(f"{path} ({err})")
                continue
            self._resumed(tier, name, remainder, restore_extras=not weights_mode)
            if (latest_problem or skipped) and self.fabric.is_global_zero:
                why = f"`latest` {latest_problem}" if latest_problem else f"could not load {'; '.join(skipped)}"
                warnings.warn(f"CheckpointManager resumed from {path} instead of `latest`: {why}", stacklevel=2)
            return remainder
        if skipped:
            raise CheckpointError(f"No checkpoint in '{self.folder}' could be loaded: {'; '.join(skipped)}")
        return None

    def _resume_plan(self) -> tuple[list[tuple[str, str]], str | None]:
        """``(tier, name)`` of the checkpoints to try, and what is wrong with ``latest`` where it has no target."""
        names, problem = self._local_resume_plan()
        if self._remote is None:
            return [(LOCAL, name) for name in names], problem
        return self._remote.resume_plan(names, problem, self._values())

    def _local_resume_plan(self) -> tuple[list[str], str | None]:
        """The names to try, ``latest``'s target first, and what is wrong with ``latest`` if it has no target."""
        target, problem = self._latest_target()
        others = self._names()
        if target is None:
            return others, (f"({self._url(self._name(self._latest))}) {problem}" if others else None)
        return [target, *(name for name in others if name != target)], None

    def _ahead_of_resume(self, name: str) -> bool:
        """Whether ``name`` lies after the checkpoint this run resumed from: an interrupted earlier attempt of this
        same run wrote it (e.g. killed before ``latest`` moved), so this run may write it again."""
        return self._resumed_name is not None and self._newer(name, self._resumed_name)

    def _newer(self, name: str, than: str) -> bool:
        """Whether checkpoint ``name`` is further in training than ``than`` (by their names' timestamp fields)."""
        mine, theirs = self._checkpoint.parse(name, self._run_values), self._checkpoint.parse(than, self._run_values)
        if mine is None or theirs is None:
            return False
        key = tuple(mine.get(field, -1) for field in TIMESTAMP_FIELDS)
        return key > tuple(theirs.get(field, -1) for field in TIMESTAMP_FIELDS)

    def _resumed(self, tier: str, name: str, remainder: dict[str, Any], *, restore_extras: bool) -> None:
        progress_restored = restore_extras and "timestamp" in remainder
        if progress_restored:
            self.timestamp.load_state_dict(remainder.pop("timestamp"))
        if restore_extras and "rng" in remainder:
            RNGState().load_state_dict(remainder.pop("rng"))  # last, so nothing after it draws from the generators
        if self._remote is None or tier == LOCAL:
            self.resumed_from, self._resumed_name = self._url(name), name
        else:  # the local name this checkpoint has (it is a save of this run): later names may be written again
            self.resumed_from = self._remote.url(name)
            self._resumed_name = self._name(self._checkpoint) if progress_restored else None
        self._seen = (self.timestamp.epoch, self.timestamp.batch)
        if self._remote is not None:
            values = self._values() if progress_restored else None
            self._remote.resumed(tier, name, values, owns_local=self.fabric.is_global_zero or self._per_rank)
        if self.fabric.is_global_zero:
            log.info("CheckpointManager resumed from %s", self.resumed_from)

    def _latest_target(self) -> tuple[str | None, str]:
        """The name ``latest`` points at (relative to the folder), or ``None`` and why."""
        return self._folder.latest_target(self._name(self._latest))

    # ------------------------------------------------------------------ the folder
    def checkpoints(self) -> list[str]:
        """Paths of the checkpoints in the folder that this manager's ``filename`` could have written, newest first.

        Newest means furthest in training: compared by the timestamp variables in the name (``epoch``, ``batch``,
        ``sample``, ``token``, ...). Other files, temporary files and ``latest`` are not listed. Local paths are
        absolute; other filesystems give URLs.

        Example:
            >>> CheckpointManager(fabric, "checkpoints", run_name="a").checkpoints()  # run in /runs
            ['/runs/checkpoints/ep2-ba20-rank0', '/runs/checkpoints/ep1-ba10-rank0']
        """
        return [self._url(name) for name in self._names()]

    def _names(self) -> list[str]:
        return self._folder.names(self._name(self._latest))

    def _values(self) -> dict[str, Any]:
        return {**self._run_values, **{field: int(getattr(self.timestamp, field)) for field in TIMESTAMP_FIELDS}}

    def _name(self, pattern: NamePattern) -> str:
        return self._folder.format(pattern, self._values())

    def _url(self, name: str) -> str:
        return self._folder.url(name)

    def _exists(self, name: str) -> bool:
        return self._root.child(name).exists()

    # ------------------------------------------------------------------ the remote tier (docs/two-tier.md)
    def wait(self, timeout: float | None = None) -> None:
        """Block until every in-flight save and upload of this manager has finished; raise what failed.

        Failed uploads are retried once more first; those that still fail raise :class:`CheckpointError` naming each
        (their local copies stay). Call it on every rank, e.g. before the job ends.

        Raises:
            TimeoutError: uploads are still running after ``timeout`` seconds.

        Example:
            >>> manager.wait()  # the last checkpoint is in remote_folder too, and `latest` there names it
        """
        self.fabric.wait_for_saves()
        remote = self._remote
        if remote is not None:
            self.fabric.strategy.agree(lambda: remote.wait(timeout), "Waiting for the uploads of CheckpointManager")

    def _finish_save(self, seconds: float) -> None:
        """At exit: let an asynchronous save still being written finish, so that its upload is queued."""
        if self.last_save is not None:
            with contextlib.suppress(BaseException):  # its error is reported by the asynchronous saver's exit hook
                self.last_save.wait(seconds)

    # ------------------------------------------------------------------ construction helpers
    def _default_run_name(self) -> str:
        from_env = os.environ.get("RUN_NAME")
        if from_env:
            return from_env
        # Each rank would generate its own name; rank 0's is the one.
        return str(self.fabric.broadcast(f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"))

    def _topology(self) -> dict[str, Any]:
        world_size = self.fabric.world_size
        num_nodes = max(1, self.fabric.num_nodes)
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size // num_nodes))
        return {
            "run_name": self.run_name,
            "rank": self.fabric.global_rank,
            "local_rank": self.fabric.local_rank,
            "world_size": world_size,
            "local_world_size": local_world_size,
            "node_rank": self.fabric.node_rank,
        }


def _schedule(save_interval: SaveInterval) -> Callable[[Timestamp, str], bool]:
    if callable(save_interval):
        return save_interval
    interval = parse_time(save_interval, name="save_interval")
    event = "epoch_end" if interval.unit is TimeUnit.EPOCH else "batch_end"

    def due(timestamp: Timestamp, current: str) -> bool:
        return current == event and timestamp.crossed(interval)

    return due


def _check_keep(value: int, *, remote: bool) -> int:
    if value == 0 and type(value) is int and not remote:
        raise ValueError(f"num_checkpoints_to_keep=0 ({_KEEP_NONE}) is valid only with a remote_folder")
    return check_keep(value, "num_checkpoints_to_keep", zero=_KEEP_NONE if remote else None)


def _check_run_name(name: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"run_name={name!r} must be a non-empty name without '/' or '\\\\' (and not '.' or '..')")
    return name


def _checking_extras(ignore_keys: IgnoreKeys) -> Callable[[dict[str, Any]], None]:
    """``ignore_keys`` as a callable that also validates the manager's entries before anything is restored."""

    def edit(checkpoint: dict[str, Any]) -> None:
        apply_ignore_keys(checkpoint, ignore_keys)
        try:
            if "timestamp" in checkpoint:
                check_timestamp_state(checkpoint["timestamp"])
            if "rng" in checkpoint:
                check_rng_state(checkpoint["rng"])
        except ValueError as err:
            raise CheckpointError(f"the checkpoint's manager entries are malformed: {err}") from None

    return edit
