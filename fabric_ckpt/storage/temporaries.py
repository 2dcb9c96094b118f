"""Hidden temporaries of saves in progress: their names, sweeping what crashed saves left, deleting in background.

A temporary's name carries the writer's PID and the identity of its PID namespace on its host (boot id and namespace
inode, hashed). A later save in the same namespace tells a crashed writer's leftovers (PID gone) from a live
writer's work at once. A PID means nothing in another namespace (another pod on a shared volume, another host on
NFS), so there a temporary is judged abandoned only once nothing has written to it for
:data:`FOREIGN_TEMPORARY_AGE_S`: a live writer keeps its temporary fresh, and removing a live writer's temporary
would fail its save.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import shutil
import threading
import time
import uuid
from contextlib import suppress

__all__ = [
    "FOREIGN_TEMPORARY_AGE_S",
    "TEMP_MARKER",
    "delete_in_background",
    "is_temporary_name",
    "remove_tree_or_file",
    "sweep_temporaries",
    "temporary_name",
    "wait_for_deletions",
]

TEMP_MARKER = ".fabric-tmp-"
# A temporary of another host or PID namespace is removed once unchanged for this long (an hour: far longer than a
# live writer goes without writing to its temporary, or holds a link's temporary before renaming it).
FOREIGN_TEMPORARY_AGE_S = 3600.0


def _namespace_identity() -> str:
    """8 hex digits naming this host's boot and this process's PID namespace: where its PIDs mean something."""
    parts = []
    for source in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        with suppress(OSError):
            with open(source) as f:
                parts.append(f.read().strip())
            break
    with suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    if not parts:  # no /proc (e.g. macOS): the host's name stands for both
        parts.append(os.uname().nodename if hasattr(os, "uname") else "")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


_NAMESPACE = _namespace_identity()


# The longest file name local filesystems take (bytes), and what a temporary adds to the checkpoint's name: the
# leading dot, the marker, a PID of up to 10 digits, "@" and the namespace's 8 hex digits, a dash and 12 hex digits.
NAME_MAX = 255
_ADDED = 1 + len(TEMP_MARKER) + 10 + 1 + 8 + 1 + 12


def _temporary_stem(final_name: str) -> str:
    """``final_name``, or when a temporary of it would pass ``NAME_MAX``, its start and a hash of the whole name.

    The hash keeps two long names that share their start apart, so one's sweep never takes the other's temporary.
    """
    encoded = final_name.encode()
    if len(encoded) + _ADDED <= NAME_MAX:
        return final_name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    start = encoded[: NAME_MAX - _ADDED - len(digest) - 1].decode(errors="ignore")  # never half a character
    return f"{start}~{digest}"


def temporary_name(final_name: str) -> str:
    """A hidden name beside ``final_name`` that no other writer (process, thread, pod or host) picks, within
    ``NAME_MAX``.

    Example:
        >>> temporary_name("last.ckpt").startswith(".last.ckpt" + TEMP_MARKER)
        True
    """
    return f".{_temporary_stem(final_name)}{TEMP_MARKER}{os.getpid()}@{_NAMESPACE}-{uuid.uuid4().hex[:12]}"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`temporary_name`'s."""
    return name.startswith(".") and TEMP_MARKER in name


def _writer_is_dead(folder: str, name: str) -> bool:
    """Whether the writer that created this temporary is gone (names carry the writer's PID and namespace)."""
    tail = name.split(TEMP_MARKER, 1)[1]
    if tail.startswith("old-"):
        return True  # a retired previous checkpoint whose removal was interrupted
    writer, _, namespace = tail.split("-", 1)[0].partition("@")
    try:
        pid = int(writer)
    except ValueError:
        return False
    if namespace and namespace != _NAMESPACE:
        return _unchanged_for(os.path.join(folder, name), FOREIGN_TEMPORARY_AGE_S)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_temporaries(folder: str, final_name: str) -> list[str]:
    """Remove the temporaries crashed saves of ``final_name`` left in ``folder``; live writers' are left alone."""
    prefix = f".{_temporary_stem(final_name)}{TEMP_MARKER}"
    removed = []
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        if name.startswith(prefix) and _writer_is_dead(folder, name):
            path = os.path.join(folder, name)
            remove_tree_or_file(path)
            removed.append(path)
    return removed


def _unchanged_for(path: str, seconds: float) -> bool:
    """Whether nothing was written to ``path`` (or created in it, for a folder) for ``seconds``."""
    try:
        modified = os.lstat(path).st_mtime
    except FileNotFoundError:
        return False
    return time.time() - modified > seconds


def remove_tree_or_file(path: str) -> None:
    """Remove a file, symlink or folder tree; one that is already gone is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            os.unlink(path)


_deletions: queue.Queue[str] = queue.Queue()
_deleter_lock = threading.Lock()
_deleter: threading.Thread | None = None


def delete_in_background(path: str) -> None:
    """Remove a file or folder on a background thread (started on first use, never at import)."""
    global _deleter
    _deletions.put(path)
    with _deleter_lock:
        if _deleter is None or not _deleter.is_alive():
            if _deleter is None:
                atexit.register(_delete_pending)  # a script ending right after a save leaves nothing behind
            _deleter = threading.Thread(target=_delete_forever, name="fabric_ckpt-deleter", daemon=True)
            _deleter.start()


def _delete(path: str) -> None:
    with suppress(OSError):
        remove_tree_or_file(path)


def _delete_forever() -> None:
    while True:
        path = _deletions.get()
        try:
            _delete(path)
        finally:
            _deletions.task_done()


def _delete_pending() -> None:
    while True:
        try:
            path = _deletions.get_nowait()
        except queue.Empty:
            return
        try:
            _delete(path)
        finally:
            _deletions.task_done()


def wait_for_deletions() -> None:
    """Block until every removal handed to :func:`delete_in_background` so far is done.

    Example:
        >>> fabric.save("ckpt.pt", state)
        >>> wait_for_deletions()  # the replaced checkpoint's blocks are freed
    """
    _deletions.join()
