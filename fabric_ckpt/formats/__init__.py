"""How checkpoints are laid out in bytes: our torch-zip file, other tools' formats, sharded folders.

A format decides the bytes; :mod:`fabric_ckpt.storage` decides how they reach a place.
"""

from __future__ import annotations

from fabric_ckpt.formats.reading import open_checkpoint
from fabric_ckpt.formats.single_file import save_file

__all__ = ["open_checkpoint", "save_file"]
