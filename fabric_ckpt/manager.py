"""Composer-style checkpoint management: when to save, what to call it, ``latest``, resuming and retention.

A :class:`CheckpointManager` sits on top of ``fabric.save``/``fabric.load``: the training loop tells it when a batch or
an epoch ended, and it saves on its interval under a name built from format variables, points ``latest`` at the new
checkpoint, and prunes old ones. ``load_latest`` resumes a run where it stopped. See docs/checkpoint-management.md.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from torch import nn

from fabric_ckpt.async_save import SaveHandle
from fabric_ckpt.core.naming import FORMAT_VARIABLES, NamePattern, escapes_folder, split_folder
from fabric_ckpt.core.rng import RNGState, check_rng_state
from fabric_ckpt.core.state import IgnoreKeys, apply_ignore_keys
from fabric_ckpt.core.timestamp import TIMESTAMP_FIELDS, Time, Timestamp, TimeUnit, check_timestamp_state, parse_time
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError
from fabric_ckpt.fabric import Fabric
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import resolve
from fabric_ckpt.storage.temporaries import is_temporary_name

__all__ = ["EVENTS", "FORMAT_VARIABLES", "CheckpointManager", "SaveInterval"]

SaveInterval = int | str | Time | Callable[[Timestamp, str], bool]
EVENTS = ("batch_end", "epoch_end")

_POINTER_FORMAT = "fabric_ckpt.latest/1"
_MAX_POINTER_BYTES = 1 << 16


class CheckpointManager:
    """Saves checkpoints on an interval, keeps ``latest`` pointing at the newest, resumes, and prunes old ones.

    Args:
        fabric: the :class:`~fabric_ckpt.Fabric` that saves and loads.
        folder: where checkpoints go: a local path or fsspec URL; may use the format variables.
        filename: each checkpoint's name inside ``folder``; ``/`` makes subfolders.
        latest_filename: the name of the ``latest`` symlink (local) or pointer object (other filesystems).
        save_interval: an int (epochs), a time string (``"2ep"``, ``"500ba"``, ``"2000sp"``, ``"1000000tok"``), or
            a callable ``(timestamp, event) -> bool`` with ``event`` in :data:`EVENTS`.
        num_checkpoints_to_keep: keep the newest N checkpoints in ``folder``; ``-1`` keeps all.
        overwrite: replace an existing checkpoint of the same name instead of raising ``FileExistsError``. A run
            resumed by :meth:`load_latest` may always replace checkpoints after the one it resumed from: an
            interrupted earlier attempt of the same run wrote them.
        save_weights_only: save only the ``nn.Module`` entries of the state (no optimizer, timestamp or RNG).
        timestamp: a :class:`Timestamp` to share with other managers. A manager advances only the Timestamp it
            created itself; a shared one is advanced by its owner (see :meth:`on_batch_end`).
        run_name: ``{run_name}``; defaults to ``$RUN_NAME``, else a time-based name agreed by all ranks.
        async_save: write checkpoints in the background (``fabric.save_async``); ``latest`` and pruning follow each
            checkpoint once it is complete, and the next save (or ``load_latest``) waits for the previous one.

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
        async_save: bool = False,
    ) -> None:
        if timestamp is not None and not isinstance(timestamp, Timestamp):
            raise TypeError(f"timestamp must be a Timestamp or None, got {type(timestamp).__name__}")
        self.fabric = fabric
        self.save_interval = save_interval
        self._due = _schedule(save_interval)
        self.num_checkpoints_to_keep = _check_keep(num_checkpoints_to_keep)
        self.overwrite = overwrite
        self.save_weights_only = save_weights_only
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
        # Fail now on "../x" or a bad format spec, not at the first save hours into training.
        if self._name(self._checkpoint) == self._name(self._latest):
            raise ValueError(f"latest_filename={latest_filename!r} names the checkpoints themselves ({filename!r})")

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
        return self.save(state) if self._due(self.timestamp, event) else None

    # ------------------------------------------------------------------ saving
    def save(self, state: Mapping[str, Any]) -> str:
        """Save a checkpoint now; then point ``latest`` at it and prune. Returns its path.

        Raises:
            FileExistsError: the checkpoint exists and ``overwrite=False`` (nothing is written).

        Example:
            >>> path = manager.save({"model": model, "optimizer": optimizer})
        """
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
        if self.async_save:
            handle = self.fabric.save_async(path, payload)
            if manages:  # moved on the background thread once the checkpoint is complete
                handle.add_done_callback(lambda _: self._after_commit(name))
            self.last_save = handle
            return path
        self.fabric.save(path, payload)
        if manages:
            self._after_commit(name)
        self.fabric.barrier("CheckpointManager.save")
        return path

    def _after_commit(self, name: str) -> None:
        # Only after the checkpoint is complete; per-rank names are managed by each rank that wrote its file.
        if self._exists(name):
            self._point_latest(name)
            self._prune(name)

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
        if self.overwrite or self._ahead_of_resume(name):
            return
        # Rank 0 decides for everyone, so that all ranks raise together instead of some waiting in fabric.save.
        clash = self.fabric.broadcast(path if self.fabric.is_global_zero and self._exists(name) else None)
        if clash is not None:
            raise FileExistsError(errno.EEXIST, "Checkpoint exists; pass overwrite=True to replace it", clash)

    def _point_latest(self, name: str) -> None:
        latest = self._name(self._latest)
        target = posixpath.relpath(name, posixpath.dirname(latest) or ".")
        location = self._root.child(latest)
        if location.storage.symlink(target, location.path):
            return
        with location.atomic_write() as sink:
            sink.write(json.dumps({"format": _POINTER_FORMAT, "checkpoint": target}).encode())

    def _prune(self, saved: str) -> None:
        if self.num_checkpoints_to_keep == -1:
            return
        try:
            protected = {saved, self._latest_target()[0], self._resumed_name}
            older = self._names()[self.num_checkpoints_to_keep :]
        except Exception as err:  # the new checkpoint and `latest` are complete: retention can wait for the next save
            warnings.warn(f"CheckpointManager could not list {self.folder} to prune it: {err}", stacklevel=3)
            return
        for name in older:
            if name not in protected:
                self._delete(name)

    def _delete(self, name: str) -> None:
        path = self._url(name)
        location = self._root.child(name)
        try:
            if location.isdir():
                sharded.remove_checkpoint(location)  # a user's own files in a checkpoint folder stay
            else:
                location.remove()
        except Exception as err:  # object-store clients raise their own connection errors, not only OSError
            # The new checkpoint is safe; a leftover old one must not stop training.
            warnings.warn(f"CheckpointManager could not delete the old checkpoint {path}: {err}", stacklevel=2)

    # ------------------------------------------------------------------ resuming
    def load_latest(
        self,
        state: MutableMapping[str, Any],
        *,
        strict: bool = True,
        ignore_keys: IgnoreKeys = None,
        load_weights_only: bool = False,
    ) -> dict[str, Any] | None:
        """Resume from ``latest``: restore ``state`` in place, and the Timestamp and RNG; return the remainder.

        If ``latest`` is missing or does not load, the newest checkpoint in the folder that loads is used and a
        warning says so. With no checkpoint at all, returns ``None`` and leaves ``state`` untouched. ``ignore_keys``
        and ``load_weights_only`` are ``fabric.load``'s (``ignore_keys=["rng"]`` keeps the current RNG state);
        a weights-only manager restores only modules. In a multi-process run, global rank 0 picks the checkpoint
        and every rank loads that one.

        Raises:
            CheckpointError: checkpoints exist but none of them loads.

        Example:
            >>> remainder = manager.load_latest({"model": model, "optimizer": optimizer})
            >>> fresh_start = remainder is None
        """
        self.fabric.wait_for_saves()  # an asynchronous save in flight decides what `latest` is
        no_plan: tuple[list[str], str | None] = ([], None)
        candidates, latest_problem = self.fabric.broadcast(
            self._resume_plan() if self.fabric.is_global_zero else no_plan
        )
        weights_mode = load_weights_only or self.save_weights_only
        skipped: list[str] = []
        for name in candidates:
            path = self._url(name)
            try:
                remainder = self.fabric.load(
                    path,
                    state,
                    strict=strict,
                    ignore_keys=ignore_keys if weights_mode else _checking_extras(ignore_keys),
                    load_weights_only=weights_mode,
                )
            except CheckpointMismatchError:
                raise  # the checkpoint is fine; the state does not fit it, and would not fit an older one either
            except (OSError, CheckpointError) as err:
                skipped.append(f"{path} ({err})")
                continue
            self._resumed(name, remainder, restore_extras=not weights_mode)
            if (latest_problem or skipped) and self.fabric.is_global_zero:
                why = f"`latest` {latest_problem}" if latest_problem else f"could not load {'; '.join(skipped)}"
                warnings.warn(f"CheckpointManager resumed from {path} instead of `latest`: {why}", stacklevel=2)
            return remainder
        if skipped:
            raise CheckpointError(f"No checkpoint in '{self.folder}' could be loaded: {'; '.join(skipped)}")
        return None

    def _resume_plan(self) -> tuple[list[str], str | None]:
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

    def _resumed(self, name: str, remainder: dict[str, Any], *, restore_extras: bool) -> None:
        if restore_extras and "timestamp" in remainder:
            self.timestamp.load_state_dict(remainder.pop("timestamp"))
        if restore_extras and "rng" in remainder:
            RNGState().load_state_dict(remainder.pop("rng"))  # last, so nothing after it draws from the generators
        self.resumed_from, self._resumed_name = self._url(name), name
        self._seen = (self.timestamp.epoch, self.timestamp.batch)

    def _latest_target(self) -> tuple[str | None, str]:
        """The name ``latest`` points at (relative to the folder), or ``None`` and why."""
        latest = self._name(self._latest)
        location = self._root.child(latest)
        link = location.storage.readlink(location.path)
        if link is not None:
            if os.path.isabs(link):
                target = os.path.relpath(os.path.normpath(link), self._root.path).replace(os.sep, "/")
            else:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(latest), link.replace(os.sep, "/")))
            if escapes_folder(target):
                return None, f"is a symlink to {link!r}, outside the folder"
            return target, ""
        if not self._exists(latest):
            return None, "does not exist"
        try:
            with self._open(latest) as source:
                pointer = json.loads(source.read(_MAX_POINTER_BYTES))
        except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
            pointer = None
        if not isinstance(pointer, dict) or pointer.get("format") != _POINTER_FORMAT:
            return None, "is neither a symlink nor a pointer written by CheckpointManager"
        target = posixpath.normpath(posixpath.join(posixpath.dirname(latest), str(pointer.get("checkpoint"))))
        if escapes_folder(target):
            return None, f"points outside the folder ({pointer.get('checkpoint')!r})"
        return target, ""

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
        latest = self._name(self._latest)
        found = []
        for name in self._walk(self._checkpoint.text.count("/") + 1):
            if name == latest or any(is_temporary_name(part) for part in name.split("/")):
                continue
            values = self._checkpoint.parse(name, self._run_values)
            if values is not None and self._is_checkpoint(name):
                # TIMESTAMP_FIELDS starts with epoch and batch: comparing in its order finds the furthest in training.
                found.append((tuple(values.get(field, -1) for field in TIMESTAMP_FIELDS), name))
        return [name for _, name in sorted(found, reverse=True)]

    def _is_checkpoint(self, name: str) -> bool:
        """A file, or a folder holding a sharded checkpoint (not one whose checkpoint was pruned, left for the
        user's own files in it)."""
        location = self._root.child(name)
        return not location.isdir() or sharded.is_sharded(location)

    def _walk(self, depth: int) -> Iterator[str]:
        return self._root.storage.walk(self._root.path, depth)

    def _name(self, pattern: NamePattern) -> str:
        values = {**self._run_values, **{field: int(getattr(self.timestamp, field)) for field in TIMESTAMP_FIELDS}}
        name = pattern.format(values)
        if escapes_folder(name):
            raise ValueError(
                f"{pattern.option}={pattern.text!r} gives {name!r}, which is not a name inside the folder "
                f"{self.folder!r}: names must be relative and must not contain '..'"
            )
        return name

    def _url(self, name: str) -> str:
        return self._root.child(name).original

    def _open(self, name: str) -> Any:
        return self._root.child(name).open()

    def _exists(self, name: str) -> bool:
        return self._root.child(name).exists()

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


def _check_keep(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
        raise ValueError(f"num_checkpoints_to_keep={value!r} must be -1 (keep all) or a positive int")
    return value


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
