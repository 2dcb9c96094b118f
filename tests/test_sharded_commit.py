"""The one commit protocol of sharded folders: generations committed by a manifest, on every storage.

A save writes a new generation and commits by replacing the manifest; readers read the generation they resolved and
never a mix of two saves; what a commit replaced is removed later, and nothing in the folder that is not the
checkpoint's is ever touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fabric_ckpt import CheckpointCorruptedError, CheckpointError, Fabric
from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import StorageOptions, resolve
from fabric_ckpt.storage.temporaries import wait_for_deletions
from tests.reliability_figures import full_campaign, record
from tests.sharded_files import live_generation, shard_files, tree_bytes


def save_index(i: int) -> dict:
    """Save number ``i``: tensors whose lengths and values both depend on ``i``, so that bytes of one save read
    with the index of another come out wrong."""
    return {"i": i, "a": torch.full((1000 + 37 * i,), float(i)), "b": {"c": torch.full((3, 50 + i), float(-i))}}


def is_whole_save(loaded: dict) -> bool:
    expected = save_index(int(loaded["i"]))
    return (
        loaded["a"].shape == expected["a"].shape
        and torch.equal(loaded["a"], expected["a"])
        and torch.equal(loaded["b"]["c"], expected["b"]["c"])
    )


def write(path: Path, state: dict, retire_after: float = 120.0) -> None:
    location = resolve(path, StorageOptions(retire_after=retire_after))
    sharded.write_in_one_process(state, location)


WRITER = """
import sys, time
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import resolve
from tests.test_sharded_commit import save_index

location = resolve(sys.argv[1])
for i in range(1, int(sys.argv[2]) + 1):
    sharded.write_in_one_process(save_index(i), location)
    time.sleep(0.05)  # a training step between saves
"""


@pytest.mark.parametrize("retire_after", ["120", "0"], ids=["with-grace", "no-grace"])
def test_loads_while_another_process_saves_again_are_always_one_whole_save(tmp_path, retire_after):
    path = tmp_path / "sharded.ckpt"
    write(path, save_index(0))
    env = {**os.environ, "FABRIC_CKPT_RETIRE_AFTER": retire_after, "PYTHONPATH": os.getcwd()}
    saves = 200 if full_campaign() else 40
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(saves)], env=env)
    fabric = Fabric(accelerator="cpu")
    loads, seen, refused, mixed = 0, set(), [], []
    try:
        while writer.poll() is None or loads < 5:
            try:
                loaded = fabric.load(path)
            except CheckpointError as err:
                refused.append(str(err))  # a load outrun by several saves gives up; it never returns a mix
                continue
            loads += 1
            seen.add(int(loaded["i"]))
            if not is_whole_save(loaded):
                mixed.append(f"load {loads} mixed two saves (index {loaded['i']})")
    finally:
        writer.wait(timeout=300)
    name = f"sharded loads while another process re-saves ({retire_after} s grace)"
    record("concurrency", name, saves=saves, loads=loads, saves_seen=len(seen), refused=len(refused), wrong=len(mixed))
    assert not mixed, mixed[:3]
    assert writer.returncode == 0
    assert len(seen) >= 2, "the loads never overlapped a save"
    assert loads >= 5 and loads >= len(refused), refused[:3]
    assert all("was replaced by newer saves" in message and "sharded.ckpt" in message for message in refused), refused
    assert is_whole_save(fabric.load(path)) and fabric.load(path)["i"] == saves


def test_a_users_files_in_the_folder_survive_every_save_and_cleanup(tmp_path):
    path = tmp_path / "sharded.ckpt"
    write(path, save_index(0))
    (path / "notes.txt").write_text("my notes")
    (path / "logs").mkdir()
    (path / "logs" / "run.log").write_bytes(b"\x00\x01log")
    (path / ".hidden").write_text("mine")
    for i in range(1, 4):
        write(path, save_index(i), retire_after=0)
    assert (path / "notes.txt").read_text() == "my notes"
    assert (path / "logs" / "run.log").read_bytes() == b"\x00\x01log"
    assert (path / ".hidden").read_text() == "mine"
    generations = sorted(name for name in os.listdir(path) if name.startswith(".gen-"))
    # Each save removes what the one before it retired: at most the live generation and the one it replaced.
    assert 1 <= len(generations) <= 2 and Path(live_generation(path)).name in generations
    assert Fabric(accelerator="cpu").load(path)["i"] == 3


def test_a_folder_saved_again_and_again_holds_at_most_two_checkpoints(tmp_path):
    path = tmp_path / "sharded.ckpt"
    for i in range(6):
        write(path, save_index(i))  # the default grace period: nothing is removed by time in this test
        generations = [name for name in os.listdir(path) if name.startswith(".gen-")]
        assert len(generations) <= 2, generations
    manifest = json.loads((path / "fabric_ckpt.json").read_text())["manifest"]
    assert manifest["retired"] == [name for name in generations if name != manifest["generation"]]


def _forge(path: Path, **changes) -> None:
    body = json.loads((path / "fabric_ckpt.json").read_text())["manifest"]
    body.update(changes)
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"))
    (path / "fabric_ckpt.json").write_text(json.dumps({"manifest": body, "crc32": crc32(encoded.encode())}))


@pytest.mark.parametrize("retired", [["notes.txt"], ["../outside.txt"], [".gen-zz/../../x"], ["logs"]])
def test_a_forged_retired_list_never_removes_anything_else(tmp_path, retired):
    path = tmp_path / "sharded.ckpt"
    write(path, save_index(0))
    (path / "notes.txt").write_text("my notes")
    (path / "logs").mkdir()
    (tmp_path / "outside.txt").write_text("outside")
    _forge(path, retired=retired)
    with pytest.raises(CheckpointCorruptedError, match=r"sharded\.ckpt.*manifest is malformed"):
        Fabric(accelerator="cpu").load(path)
    write(path, save_index(1))  # a new save over the damaged manifest removes nothing it cannot prove is old
    assert (path / "notes.txt").read_text() == "my notes" and (path / "logs").is_dir()
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert Fabric(accelerator="cpu").load(path)["i"] == 1


def test_folders_with_files_beside_the_manifest_still_load_and_are_replaced_cleanly(tmp_path):
    """The layout earlier versions wrote on local disks: the shards next to a manifest without a generation."""
    path = tmp_path / "old.ckpt"
    write(path, save_index(5))
    generation = Path(live_generation(path))
    for file in generation.iterdir():
        os.replace(file, path / file.name)
    generation.rmdir()
    body = json.loads((path / "fabric_ckpt.json").read_text())["manifest"]
    del body["generation"], body["retired"]
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"))
    (path / "fabric_ckpt.json").write_text(json.dumps({"manifest": body, "crc32": crc32(encoded.encode())}))
    (path / "notes.txt").write_text("mine")
    assert is_whole_save(Fabric(accelerator="cpu").load(path))
    write(path, save_index(6), retire_after=0)
    write(path, save_index(7))  # starts by removing what the save before it retired: the old files
    wait_for_deletions()  # the replaced manifest's hidden link is removed in the background
    assert sorted(n for n in os.listdir(path) if not n.startswith(".gen-")) == ["fabric_ckpt.json", "notes.txt"]
    assert Fabric(accelerator="cpu").load(path)["i"] == 7


def test_a_file_in_the_way_of_a_sharded_folder_is_refused_and_kept(tmp_path):
    path = tmp_path / "sharded.ckpt"
    path.write_bytes(b"a file of mine")
    with pytest.raises(FileExistsError, match="a file is in the way") as info:
        write(path, save_index(0))
    assert info.value.filename == str(path)
    assert path.read_bytes() == b"a file of mine"
    assert sorted(os.listdir(tmp_path)) == ["sharded.ckpt"]


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path):
    path = tmp_path / "sharded.ckpt"
    write(path, save_index(0))
    before = tree_bytes(path)
    with pytest.raises(CheckpointError, match=r"sharded\.ckpt.*pickle"):
        write(path, {"i": 1, "bad": lambda: None})  # DCP fails while writing the new generation
    assert tree_bytes(path) == before
    assert shard_files(path) == [".metadata", "__0_0.distcp"]
    assert is_whole_save(Fabric(accelerator="cpu").load(path))


def test_writing_never_needs_an_atomic_folder_exchange():
    """The commit is one file replaced by a plain rename, which NFS, SMB and FUSE mounts make atomic too: no code
    path relies on ``renameat2(RENAME_EXCHANGE)``, which those filesystems lack."""
    sources = Path(sharded.__file__).parents[1].rglob("*.py")
    assert not [str(p) for p in sources if "renameat2" in p.read_text() or "RENAME_EXCHANGE" in p.read_text()]


SCRIPT_SAVE_AND_EXIT = textwrap.dedent("""
    import sys
    from fabric_ckpt.formats import sharded
    from fabric_ckpt.storage import resolve
    from tests.test_sharded_commit import save_index

    sharded.write_in_one_process(save_index(int(sys.argv[2])), resolve(sys.argv[1]))
""")


def test_a_process_that_ends_within_the_grace_period_leaves_the_cleanup_to_the_next_save(tmp_path):
    path = tmp_path / "sharded.ckpt"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for i in range(3):
        subprocess.run([sys.executable, "-c", SCRIPT_SAVE_AND_EXIT, str(path), str(i)], env=env, check=True)
        generations = [name for name in os.listdir(path) if name.startswith(".gen-")]
        assert len(generations) <= 2, generations
    assert Fabric(accelerator="cpu").load(path)["i"] == 2
