"""Where the files of a sharded checkpoint folder are, for tests that look at or damage them directly.

A folder holds ``fabric_ckpt.json`` (the manifest) and the generation it names (``.gen-<id>/``, holding DCP's
``.metadata`` and the ranks' ``.distcp`` files). These helpers read the manifest themselves, not through the library.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def live_generation(path: str | os.PathLike[str]) -> str:
    """The folder holding the shard files of the sharded checkpoint at ``path`` (its live generation)."""
    manifest = Path(path) / "fabric_ckpt.json"
    if not manifest.is_file():
        return os.fspath(path)  # a bare DCP folder: the files are in it
    generation = json.loads(manifest.read_text())["manifest"].get("generation")
    return os.fspath(Path(path) / generation) if generation else os.fspath(path)


def shard_files(path: str | os.PathLike[str]) -> list[str]:
    """The names of the files in the live generation (``.metadata`` and the ``.distcp`` files), sorted."""
    return sorted(os.listdir(live_generation(path)))


def to_bare_dcp(path: str | os.PathLike[str]) -> None:
    """Make the sharded checkpoint at ``path`` a bare DCP folder: the live generation's files, no manifest."""
    folder = Path(path)
    generation = Path(live_generation(folder))
    if generation != folder:
        for file in generation.iterdir():
            os.replace(file, folder / file.name)
        shutil.rmtree(generation)
    (folder / "fabric_ckpt.json").unlink()
    for stray in folder.glob(".gen-*"):
        shutil.rmtree(stray)


def tree_bytes(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes): to compare a folder before and after."""
    root = Path(path)
    return {os.fspath(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
