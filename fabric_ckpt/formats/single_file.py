"""Writing a single-file checkpoint: our torch-zip archive, optionally compressed, committed atomically."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabric_ckpt.formats.compression import compression_for, write_compressed
from fabric_ckpt.formats.torch_format import ArchiveSummary, write_torch_archive
from fabric_ckpt.storage.atomic import atomic_write
from fabric_ckpt.storage.paths import PathLike, resolve
from fabric_ckpt.storage.retry import with_retries

__all__ = ["save_file"]


def save_file(
    path: PathLike,
    obj: Any,
    *,
    force_zip64: bool = False,
    on_storage_written: Callable[[int], object] | None = None,
) -> ArchiveSummary:
    """Write ``obj`` atomically to ``path`` as a ``torch.load``-able single-file checkpoint.

    A compressed name (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.tar.lzma``, ``.zst``) compresses it.

    Example:
        >>> save_file("memory://ckpt/model.pt", {"model": model.state_dict()})
    """
    location = resolve(path)
    compression = compression_for(location.name)

    def write() -> ArchiveSummary:
        with atomic_write(location) as sink:
            if compression is None:
                return write_torch_archive(sink, obj, force_zip64=force_zip64, on_storage_written=on_storage_written)
            summaries: list[ArchiveSummary] = []
            write_compressed(
                sink,
                compression,
                lambda out: summaries.append(write_torch_archive(out, obj, on_storage_written=on_storage_written)),
            )
            return summaries[0]

    if location.is_local:
        return write()
    return with_retries(write, f"Saving '{location.original}'")
