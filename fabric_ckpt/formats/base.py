"""The format seam: what every checkpoint format can do, so that every reader goes through one place.

A :class:`Format` recognises its checkpoints (:meth:`~Format.sniff`: files by their first bytes and size, never by
name; folders by what they hold), loads them (:meth:`~Format.load`), opens them lazily for the tools that stream
(:meth:`~Format.open_lazily`), describes them for ``inspect`` (:meth:`~Format.describe`), checks them for ``verify``
(:meth:`~Format.verify`) and, where that makes sense, writes them (:meth:`~Format.write`). Formats are registered
once in :mod:`fabric_ckpt.formats.registry`; ``fabric.load``, ``load_raw``, ``describe``, ``verify``, ``diff``,
``convert`` and ``consolidate`` all ask the registry, so no two of them read different bytes for the same entry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import torch

from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats.reports import Description, VerifyReport, as_infos
from fabric_ckpt.storage import Location

__all__ = ["Format", "FormatFinder", "Loaded", "MapLocation", "Probe", "ReadOptions"]

# Where loaded tensors go, as ``torch.load``'s ``map_location`` says it: a device, a ``{saved: target}`` dict of
# location strings, or a callable ``(storage, saved_location) -> storage``.
MapLocation = str | torch.device | dict[str, str] | Callable[[Any, str], Any]


@dataclass(frozen=True)
class ReadOptions:
    """How a checkpoint is read: unpickling safety, checksum checks, device placement, progress bars.

    Example:
        >>> ReadOptions(weights_only=True, verify=True).replace(map_location="cuda:0").map_location
        'cuda:0'
    """

    weights_only: bool = True
    verify: bool = True
    map_location: MapLocation = "cpu"
    progress: bool | None = None

    def replace(self, **changes: Any) -> ReadOptions:
        """A copy with ``changes`` applied.

        Example:
            >>> ReadOptions().replace(verify=False).verify
            False
        """
        return replace(self, **changes)


@dataclass(frozen=True)
class Probe:
    """What sniffing may look at: a file's first bytes and size, or a folder's entry names (never a file's name).

    Example:
        >>> probe.head[:4], probe.size
        (b'PK\\x03\\x04', 1536)
    """

    location: Location
    folder: bool
    head: bytes = b""
    size: int = 0
    names: frozenset[str] = frozenset()


@dataclass
class Loaded:
    """A loaded checkpoint: the object, the format that read it, and whether the file is one of ours.

    ``native`` files carry our marker (the archive comment, or our sharded manifest): their entries are never taken
    for another tool's layout (a Lightning Trainer or Composer checkpoint), whatever their names.

    Example:
        >>> with open_source("last.ckpt") as loaded:
        ...     loaded.format, loaded.native
        ('fabric_ckpt', True)
    """

    value: Any
    format: str
    native: bool = False


class FormatFinder(Protocol):
    """Finds the format of a checkpoint; formats that wrap others (compressed files) use it for what is inside."""

    def detect(self, location: Location) -> tuple[Format, Probe]: ...


class Format(ABC):
    """One checkpoint format. Subclass it, then register an instance with
    :func:`fabric_ckpt.formats.registry.register_format`.

    Only :meth:`sniff` and :meth:`load` are required: :meth:`open_lazily` defaults to :meth:`load`, and
    :meth:`describe` and :meth:`verify` to loading the checkpoint (a format without checksums is checked by being
    read). Override them where the format can do better (describe from a header alone, check CRC-32s).

    Example:
        >>> class JsonWeights(Format):
        ...     name = "json-weights"
        ...     def sniff(self, probe): return probe.head.startswith(b'{"json-weights"')
        ...     @contextmanager
        ...     def load(self, location, options): yield Loaded(read_json_weights(location), self.name)
    """

    name: ClassVar[str]
    # Whether :meth:`write` is implemented (``fabric-ckpt convert --format <name>`` then writes this format).
    writes: ClassVar[bool] = False

    @abstractmethod
    def sniff(self, probe: Probe) -> bool:
        """Whether the checkpoint ``probe`` shows is in this format (first bytes and size, or a folder's names).

        Example:
            >>> TorchZipFormat().sniff(Probe(location, folder=False, head=b"PK\\x03\\x04...", size=1536))
            True
        """

    @abstractmethod
    def load(self, location: Location, options: ReadOptions) -> AbstractContextManager[Loaded]:
        """Yield the checkpoint at ``location``; its tensors may be views of a memory map until the block exits.

        Damage raises :class:`~fabric_ckpt.CheckpointCorruptedError` (``options.verify``), anything unreadable
        :class:`~fabric_ckpt.CheckpointError`, both naming the path.

        Example:
            >>> with fmt.load(location, ReadOptions()) as loaded:
            ...     model.load_state_dict(loaded.value["model"])
        """

    def open_lazily(self, location: Location, options: ReadOptions) -> AbstractContextManager[Loaded]:
        """Like :meth:`load`, for tools that stream: tensors may be
        :class:`~fabric_ckpt.formats.torch_format.LazyTensor` placeholders, read one at a time.

        Example:
            >>> with fmt.open_lazily(location, ReadOptions()) as loaded:
            ...     weight = loaded.value["model"]["fc.weight"].load()
        """
        return self.load(location, options)

    def describe(self, location: Location, options: ReadOptions) -> Description:
        """The checkpoint's entries with shapes and dtypes (by default: by loading it).

        Example:
            >>> print(fmt.describe(location, ReadOptions()).render())
        """
        with self.open_lazily(location, options) as loaded:
            tree = as_infos(loaded.value)
            fmt = loaded.format
        return Description(location.original, fmt, tree, _size(location), ["described by loading the whole file"])

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        """Every problem of the checkpoint, and what could not be checked (by default: it must load).

        Example:
            >>> fmt.verify(location, ReadOptions()).ok
            True
        """
        report = VerifyReport(location.original, self.name, "folder" if location.isdir() else "file", files=1)
        report.bytes = _size(location) or 0
        try:
            with self.load(location, options.replace(verify=True, weights_only=True)):
                pass
        except UnsafeCheckpointError:
            report.unchecked.append("the file needs weights_only=False to be read: its contents")
        except CheckpointCorruptedError as err:
            report.problems.append(str(err))
        except (CheckpointError, ValueError, TypeError, KeyError, IndexError, EOFError) as err:
            report.problems.append(f"the checkpoint could not be read (truncated or damaged): {err}")
        else:
            report.unchecked.append("this format carries no checksums: it was checked by loading it")
        return report

    def write(
        self, location: Location, checkpoint: Any, *, on_storage_written: Callable[[int], object] | None = None
    ) -> None:
        """Write ``checkpoint`` (tensors may be lazy) to ``location`` in this format, atomically where it can.

        Example:
            >>> SafetensorsFormat().write(resolve("model.safetensors"), model.state_dict())
        """
        raise NotImplementedError(f"the {self.name} format is read-only")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _size(location: Location) -> int | None:
    return location.size() if location.isfile() else None
