"""Paths: local str/PathLike, file:// URLs and any fsspec URL (memory:// here; s3:// in the object-store tests)."""

from __future__ import annotations

import os
from collections import Counter

import fsspec
import pytest
import torch

import fabric_ckpt
from fabric_ckpt import CheckpointError
from fabric_ckpt.storage.temporaries import (
    TEMP_MARKER,
    is_temporary_name,
    sweep_temporaries,
    temporary_name,
    wait_for_deletions,
)
from tests.conftest import assert_same_state, make_net, snapshot, trained
from tests.reliability_figures import record

COUNTS: Counter[str] = Counter()  # the issue-16 cases tried, for `make reliability` (docs/reliability.md)


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("smaller", kind, inputs=count)


def test_memory_url_round_trip_with_parent_folders(fabric):
    model, optimizer = trained(seed=1)
    fabric.save("memory://runs/exp/deep/c.ckpt", {"model": model, "optimizer": optimizer, "step": 3})
    fs = fsspec.filesystem("memory")
    assert fs.ls("/runs/exp/deep", detail=False) == ["/runs/exp/deep/c.ckpt"]  # nothing beside it
    target, target_optimizer = trained(seed=2)
    state = {"model": target, "optimizer": target_optimizer, "step": 0}
    assert fabric.load("memory://runs/exp/deep/c.ckpt", state) == {}
    assert state["step"] == 3
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))


def test_memory_url_overwrite_and_torch_load_of_the_bytes(fabric):
    fabric.save("memory://c.ckpt", {"step": 1})
    fabric.save("memory://c.ckpt", {"step": 2, "w": torch.ones(3)})
    with fsspec.open("memory://c.ckpt", "rb") as f:
        assert torch.load(f, weights_only=True)["step"] == 2
    assert fsspec.filesystem("memory").ls("/", detail=False) == ["/c.ckpt"]


def test_memory_url_load_raw(fabric):
    source = make_net(1)
    with fsspec.open("memory://weights/model.pt", "wb") as f:
        torch.save(source.state_dict(), f)
    target = make_net(2)
    fabric.load_raw("memory://weights/model.pt", target)
    assert_same_state(snapshot(target), snapshot(source))


def test_missing_remote_file_names_the_url(fabric):
    with pytest.raises(FileNotFoundError, match=r"memory://nowhere/c\.ckpt"):
        fabric.load("memory://nowhere/c.ckpt")


def test_remote_folder_is_not_a_file(fabric):
    fabric.save("memory://folder/inner/c.ckpt", {"a": 1})
    with pytest.raises(CheckpointError, match=r"memory://folder/inner' is a folder"):
        fabric.load("memory://folder/inner")


def test_remote_corruption_is_detected(fabric):
    fabric.save("memory://c.ckpt", {"w": torch.arange(1000.0)})
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat_file("/c.ckpt"))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file("/c.ckpt", bytes(data))
    with pytest.raises(CheckpointError, match=r"memory://c.ckpt"):
        fabric.load("memory://c.ckpt")


def test_file_url_and_pathlike_name_the_same_file(tmp_path, fabric):
    fabric.save(f"file://{tmp_path}/c.ckpt", {"step": 5})
    assert fabric.load(tmp_path / "c.ckpt") == {"step": 5}
    assert fabric.load(str(tmp_path / "c.ckpt")) == {"step": 5}


def test_relative_paths_and_home(tmp_path, fabric, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fabric.save("rel/c.ckpt", {"step": 6})
    assert (tmp_path / "rel" / "c.ckpt").is_file()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fabric.load("~/rel/c.ckpt") == {"step": 6}


def test_bad_path_types(fabric):
    with pytest.raises(TypeError, match=r"str or os\.PathLike, got int"):
        fabric.save(3, {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path is empty"):
        fabric.save("", {"a": 1})


# ---------------------------------------------------------------------------------------------- checkpoint names
NAME_MAX = 255


@pytest.mark.parametrize("url", [False, True], ids=["local", "memory"])
def test_a_name_ending_in_json_saves_and_loads_everywhere(tmp_path, fabric, url):
    path = "memory://names/last.json" if url else str(tmp_path / "last.json")
    model, optimizer = trained(seed=1)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    target, target_optimizer = trained(seed=2)
    assert fabric.load(path, {"model": target, "optimizer": target_optimizer}) == {"step": 3}
    assert_same_state(snapshot(target), snapshot(model))
    assert fabric_ckpt.verify(path).ok
    assert fabric_ckpt.describe(path).format == "fabric_ckpt"
    assert fabric_ckpt.diff(path, path).equal
    COUNTS["checkpoint names"] += 1


@pytest.mark.parametrize("save", ["save", "save_async"])
@pytest.mark.parametrize("length", [NAME_MAX - 33, NAME_MAX - 5, NAME_MAX])
def test_a_long_valid_name_saves_and_loads(tmp_path, fabric, save, length):
    name = ("é" + "c" * NAME_MAX)[: length - 1]  # one two-byte character: the limit counts bytes
    assert len(name.encode()) == length
    handle = getattr(fabric, save)(tmp_path / name, {"w": torch.arange(4), "step": 1})
    if handle is not None:
        handle.wait()
    fabric.save(tmp_path / name, {"w": torch.arange(4), "step": 2})  # replacing it
    assert fabric.load(tmp_path / name)["step"] == 2
    wait_for_deletions()  # a large replaced file is freed in the background, under a temporary name
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    COUNTS["checkpoint names"] += 1


def test_long_names_that_share_a_beginning_keep_their_temporaries_apart(tmp_path):
    first, second = "a" * 250 + "1.ckpt", "a" * 250 + "2.ckpt"
    names = {temporary_name(first), temporary_name(second)}
    assert all(len(n.encode()) <= NAME_MAX and is_temporary_name(n) for n in names)
    for name in names:
        (tmp_path / name).write_bytes(b"left by a crashed save")
    dead = [n.replace(f"{TEMP_MARKER}{os.getpid()}@", f"{TEMP_MARKER}999999999@") for n in names]
    for live, crashed in zip(sorted(names), sorted(dead), strict=True):
        (tmp_path / live).rename(tmp_path / crashed)
    assert len(sweep_temporaries(str(tmp_path), first)) == 1  # only the first name's leftover
    assert len(list(tmp_path.iterdir())) == 1
