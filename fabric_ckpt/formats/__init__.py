"""How checkpoints are laid out in bytes: our torch-zip file, other tools' formats, sharded folders.

A format decides the bytes; :mod:`fabric_ckpt.storage` decides how they reach a place. Every format is registered in
:mod:`fabric_ckpt.formats.registry`, which every reader asks.
"""

from __future__ import annotations

from fabric_ckpt.formats.base import Format, Loaded, Probe, ReadOptions
from fabric_ckpt.formats.registry import (
    detect_format,
    open_checkpoint,
    open_lazily,
    open_source,
    register_format,
    unregister_format,
)
from fabric_ckpt.formats.single_file import save_file

__all__ = [
    "Format",
    "Loaded",
    "Probe",
    "ReadOptions",
    "detect_format",
    "open_checkpoint",
    "open_lazily",
    "open_source",
    "register_format",
    "save_file",
    "unregister_format",
]
