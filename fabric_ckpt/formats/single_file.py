"""Writing a single-file checkpoint: our torch-zip archive, optionally compressed, committed atomically."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabric_ckpt.formats.compression import compression_for, write_compressed
from fabric_ckpt.formats.torch_format import FABRIC_ENTRIES, ArchiveSummary, write_torch_archive
from fabric_ckpt.storage import Location, PathLike, resolve

__all__ = ["save_file"]


def save_file(
    path: PathLike | Location,
    obj: Any,
    *,
    force_zip64: bool = False,
    on_storage_written: Callable[[int], object] | None = None,
    entries: str = FABRIC_ENTRIES,
    before_storage: Callable[[Any], object] | None = None,
) -> ArchiveSummary:
    """Write ``obj`` atomically to ``path`` as a ``torch.load``-able single-file checkpoint.

    A compressed name (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.tar.lzma``, ``.zst``) compresses it.
    ``entries`` records another tool's layout (``"composer"``) when ``obj`` is in one.
    ``before_storage(storage)`` runs before each tensor storage is written (see ``write_torch_archive``).

    Example:
        >>> save_file("memory://ckpt/model.pt", {"model": model.state_dict()})
    """
    location = path if isinstance(path, Location) else resolve(path)
    compression = compression_for(location.name)

    def write() -> ArchiveSummary:
        with location.atomic_write() as sink:
            if compression is None:
                return write_torch_archive(
                    sink,
                    obj,
                    force_zip64=force_zip64,
                    on_storage_written=on_storage_written,
                    entries=entries,
                    before_storage=before_storage,
                )
            summaries: list[ArchiveSummary] = []
            write_compressed(
                sink,
                compression,
                lambda out: summaries.append(
                    write_torch_archive(
                        out, obj, on_storage_written=on_storage_written, entries=entries, before_storage=before_storage
                    )
                ),
            )
            return summaries[0]

    return location.storage.retrying(write, f"Saving '{location.original}'")
