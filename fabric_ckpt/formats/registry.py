"""The one registry of checkpoint formats: every reader asks it what is at a path, and reads through what it finds.

``fabric.load`` and ``load_raw`` (:func:`open_source`), ``describe``, ``verify``, ``diff``, ``convert`` and
``consolidate`` all start here, so a format registered once works in every one of them, and no two of them can read
different bytes for the same entry. Formats are tried in order; those registered by users come first.

Example:
    >>> register_format(MyFormat())  # fabric.load, describe, verify, diff and convert now read it
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from fabric_ckpt.errors import CheckpointError, folder_not_a_checkpoint
from fabric_ckpt.formats.base import Format, Loaded, MapLocation, Probe, ReadOptions
from fabric_ckpt.formats.compression import CompressedFormat
from fabric_ckpt.formats.hf_index import HFIndexFormat
from fabric_ckpt.formats.reading import existing_location
from fabric_ckpt.formats.reports import Description, VerifyReport
from fabric_ckpt.formats.safetensors import SafetensorsFormat
from fabric_ckpt.formats.sharded_formats import DcpFormat, LightningShardedFormat, ShardedFormat
from fabric_ckpt.formats.torch_file import LegacyPickleFormat, TorchZipFormat
from fabric_ckpt.storage import Location, PathLike, resolve
from fabric_ckpt.storage.pointers import follow_pointer

__all__ = [
    "FormatRegistry",
    "describe_checkpoint",
    "detect_format",
    "format_named",
    "open_checkpoint",
    "open_lazily",
    "open_source",
    "register_format",
    "registered_formats",
    "unregister_format",
    "verify_checkpoint",
]

# Bytes of a file's head that sniffing sees: enough for every magic number (a tar header's is at 257).
HEAD_BYTES = 512


class FormatRegistry:
    """An ordered list of formats; :meth:`detect` returns the first whose ``sniff`` accepts a path's probe.

    Example:
        >>> fmt, probe = FormatRegistry.default().detect(resolve("last.ckpt"))
        >>> fmt.name
        'torch-zip'
    """

    _default: FormatRegistry | None = None

    def __init__(self, formats: list[Format] | None = None) -> None:
        self._formats: list[Format] = list(formats or [])

    @classmethod
    def default(cls) -> FormatRegistry:
        """The registry every reader of the package uses, with the built-in formats."""
        if cls._default is None:
            registry = cls()
            for fmt in (
                ShardedFormat(),  # our manifest wins over whatever else the folder holds
                LightningShardedFormat(),
                DcpFormat(),
                HFIndexFormat(),
                TorchZipFormat(),
                LegacyPickleFormat(),
                SafetensorsFormat(),
                CompressedFormat(registry),
            ):
                registry.register(fmt, first=False)
            cls._default = registry
        return cls._default

    @property
    def formats(self) -> list[Format]:
        """The formats in the order they are tried."""
        return list(self._formats)

    def register(self, fmt: Format, *, first: bool = True) -> Format:
        """Add ``fmt``, tried before the others (``first``) or after them; one of the same name is replaced.

        Example:
            >>> registry.register(MyFormat())
        """
        self.unregister(fmt.name)
        if first:
            self._formats.insert(0, fmt)
        else:
            self._formats.append(fmt)
        return fmt

    def unregister(self, name: str) -> None:
        """Remove the format called ``name`` (nothing happens if there is none).

        Example:
            >>> registry.unregister("my-format")
        """
        self._formats = [fmt for fmt in self._formats if fmt.name != name]

    def named(self, name: str) -> Format:
        """The registered format called ``name``.

        Raises:
            KeyError: no format has that name.

        Example:
            >>> registry.named("safetensors").writes
            True
        """
        for fmt in self._formats:
            if fmt.name == name:
                return fmt
        raise KeyError(f"no checkpoint format is named {name!r}; known: {[fmt.name for fmt in self._formats]}")

    def probe(self, location: Location) -> Probe:
        """What sniffing sees of ``location``: a folder's names, or a regular file's first bytes and size.

        Raises:
            FileNotFoundError: nothing is there (or a symlink to nothing).
            CheckpointError: an empty file, or something that is neither a regular file nor a folder (a FIFO, a
                device, a socket: refused without opening it, so nothing blocks).

        Example:
            >>> registry.probe(resolve("last.ckpt")).head[:4]
            b'PK\\x03\\x04'
        """
        if location.isdir():
            return Probe(location, folder=True, names=frozenset(location.listdir()))
        if not location.isfile():
            if not location.exists() or location.storage.readlink(location.path) is not None:
                raise FileNotFoundError(errno.ENOENT, "Checkpoint not found", location.original)
            raise CheckpointError(
                f"'{location.original}' is not a checkpoint: it is neither a regular file nor a folder "
                "(a FIFO, a device or a socket)"
            )
        size = location.size()
        if size == 0:
            raise CheckpointError(f"Checkpoint '{location.original}' is empty (0 bytes)")
        head = location.head(min(HEAD_BYTES, size))
        return Probe(location, folder=False, head=head, size=size)

    def detect(self, location: Location) -> tuple[Format, Probe]:
        """The format of the checkpoint at ``location`` and what sniffing saw.

        Raises:
            FileNotFoundError: nothing is at ``location``.
            CheckpointError: it is not a checkpoint in any registered format (the message names the path).

        Example:
            >>> registry.detect(resolve("model.safetensors"))[0].name
            'safetensors'
        """
        probe = self.probe(location)
        for fmt in self._formats:
            if fmt.sniff(probe):
                return fmt, probe
        if probe.folder:
            raise folder_not_a_checkpoint(location.original)
        names = ", ".join(fmt.name for fmt in self._formats)
        raise CheckpointError(
            f"'{location.original}' is not a checkpoint: its first bytes {probe.head[:8]!r} match no known format "
            f"({names})"
        )


def _failure(fmt: Format, location: Location, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint '{location.original}' could not be read as {fmt.name}: {type(err).__name__}: {err}"
    )


@contextmanager
def _reading(fmt: Format, location: Location, opened: AbstractContextManager[Loaded]) -> Iterator[Loaded]:
    """Enter a format's context; a failure that is not one of our documented errors becomes a ``CheckpointError``
    naming the path (a format of one's own may raise anything). Errors of the caller's block pass as they are."""
    try:
        loaded = opened.__enter__()
    except (CheckpointError, OSError):
        raise
    except Exception as err:
        raise _failure(fmt, location, err) from err
    try:
        yield loaded
    except BaseException:
        if not opened.__exit__(*sys.exc_info()):
            raise
    else:
        opened.__exit__(None, None, None)


def _located(path: PathLike | Location, progress: bool | None = None) -> Location:
    location = follow_pointer(existing_location(path))  # a manager's `latest` pointer object (object stores)
    if progress is not None:
        location = resolve(location, location.storage.options.replace(progress=progress))
    return location


def register_format(fmt: Format, *, first: bool = True) -> Format:
    """Register ``fmt`` with every reader of fabric_ckpt: ``fabric.load``, ``describe``, ``verify``, ``diff``,
    ``convert`` and ``consolidate`` (and ``convert --format <name>`` if it writes).

    Example:
        >>> register_format(MyFormat())
    """
    return FormatRegistry.default().register(fmt, first=first)


def unregister_format(name: str) -> None:
    """Remove a registered format by name.

    Example:
        >>> unregister_format("my-format")
    """
    FormatRegistry.default().unregister(name)


def registered_formats() -> list[Format]:
    """The registered formats, in the order they are tried.

    Example:
        >>> [fmt.name for fmt in registered_formats()][-1]
        'compressed'
    """
    return FormatRegistry.default().formats


def format_named(name: str) -> Format:
    """The registered format called ``name`` (``KeyError`` if none).

    Example:
        >>> format_named("safetensors").writes
        True
    """
    return FormatRegistry.default().named(name)


def detect_format(path: PathLike | Location) -> Format:
    """The format of the checkpoint at ``path`` (by content, never by name).

    Example:
        >>> detect_format("checkpoints/step-1000").name
        'sharded'
    """
    return FormatRegistry.default().detect(existing_location(path))[0]


@contextmanager
def open_source(
    path: PathLike | Location,
    *,
    weights_only: bool = True,
    verify: bool = True,
    progress: bool | None = None,
    map_location: MapLocation = "cpu",
) -> Iterator[Loaded]:
    """Yield the checkpoint at ``path`` as a :class:`~fabric_ckpt.formats.base.Loaded`: the object (tensors may be
    views of a memory map until the block exits), its format, and whether it is one of ours.

    Example:
        >>> with open_source("last.ckpt") as loaded:
        ...     loaded.native
        True
    """
    location = _located(path, progress)
    # Every format reads a single file whole to load it: downloaded once, before sniffing, where it is remote.
    with location.storage.read_whole(location.path):
        fmt, _ = FormatRegistry.default().detect(location)
        options = ReadOptions(weights_only=weights_only, verify=verify, map_location=map_location, progress=progress)
        with _reading(fmt, location, fmt.load(location, options)) as loaded:
            yield loaded


@contextmanager
def open_checkpoint(
    path: PathLike | Location,
    *,
    weights_only: bool = True,
    verify: bool = True,
    progress: bool | None = None,
    map_location: MapLocation = "cpu",
) -> Iterator[Any]:
    """Yield the object stored at ``path``; tensors may be views of a memory map.

    ``progress`` forces the download's progress bar on or off (default: the location's storage options).
    A sharded checkpoint folder is verified and consolidated in memory (full tensors). Copy what must outlive the
    ``with`` block (see :func:`fabric_ckpt.core.state.materialize`). ``map_location`` places tensors as ``torch.load``
    does; formats that record no device (safetensors, sharded folders) count as saved on ``"cpu"``.

    Example:
        >>> with open_checkpoint("model.ckpt") as checkpoint:
        ...     model.load_state_dict(checkpoint["model"])
    """
    with open_source(
        path, weights_only=weights_only, verify=verify, progress=progress, map_location=map_location
    ) as loaded:
        yield loaded.value


@contextmanager
def open_lazily(
    path: PathLike | Location, *, weights_only: bool = True, verify: bool = True, progress: bool | None = None
) -> Iterator[Loaded]:
    """Yield the checkpoint at ``path`` for streaming: tensors may be
    :class:`~fabric_ckpt.formats.torch_format.LazyTensor` placeholders, read one at a time (``.load()``).

    Example:
        >>> with open_lazily("checkpoints/step-1000") as loaded:
        ...     weight = loaded.value["model"]["fc1.weight"].load()
    """
    location = _located(path, progress)
    fmt, _ = FormatRegistry.default().detect(location)
    options = ReadOptions(weights_only=weights_only, verify=verify, progress=progress)
    with _reading(fmt, location, fmt.open_lazily(location, options)) as loaded:
        yield loaded


def describe_checkpoint(path: PathLike | Location, *, weights_only: bool = True) -> Description:
    """The :class:`~fabric_ckpt.formats.reports.Description` of the checkpoint at ``path``, by its format.

    Example:
        >>> print(describe_checkpoint("last.ckpt").render())
    """
    location = _located(path)
    fmt, _ = FormatRegistry.default().detect(location)
    try:
        return fmt.describe(location, ReadOptions(weights_only=weights_only))
    except (CheckpointError, OSError):
        raise
    except Exception as err:
        raise _failure(fmt, location, err) from err


def verify_checkpoint(path: PathLike | Location, *, progress: bool | None = None) -> VerifyReport:
    """The :class:`~fabric_ckpt.formats.reports.VerifyReport` of the checkpoint at ``path``, by its format.

    Example:
        >>> verify_checkpoint("last.ckpt").ok
        True
    """
    location = _located(path, progress)
    fmt, _ = FormatRegistry.default().detect(location)
    try:
        return fmt.verify(location, ReadOptions(progress=progress))
    except (CheckpointError, OSError):
        raise
    except Exception as err:
        raise _failure(fmt, location, err) from err
