"""fabric_ckpt.verify: every damaged record or file is named with its entry; what cannot be checked is said."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

import fabric_ckpt
from fabric_ckpt import CheckpointError, VerifyReport, verify
from fabric_ckpt.formats import save_file
from tests.conftest import trained
from tests.sharded_files import live_generation


@pytest.fixture
def checkpoint(tmp_path, fabric):
    model, optimizer = trained()
    path = tmp_path / "c.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    return path


def record_of(path, entry: str) -> str:
    """The record (``data/<key>``) holding a checkpoint entry, from the file's own manifest."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("archive/.data/fabric_ckpt.json"))
    return next(record for record, name in manifest["tensors"].items() if name == entry)


def data_offset(path, record: str) -> int:
    with zipfile.ZipFile(path) as archive:  # torch.save's prefix is the file's stem, ours is "archive"
        info = next(i for i in archive.infolist() if i.filename.split("/", 1)[1] == record)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0xFF]))


def test_intact_file_reports_what_was_checked(checkpoint):
    report = verify(checkpoint)
    assert isinstance(report, VerifyReport) and fabric_ckpt.verify is verify
    assert report.ok and report.problems == [] and report.unchecked == []
    assert (report.format, report.layout, report.files) == ("fabric_ckpt", "file", 1)
    with zipfile.ZipFile(checkpoint) as archive:
        assert report.records == len(archive.infolist())
    assert report.bytes == os.path.getsize(checkpoint)


def test_every_damaged_record_is_named_with_its_entry(checkpoint):
    first, second = record_of(checkpoint, "model/fc1.weight"), record_of(checkpoint, "optimizer/state/4/exp_avg")
    flip_byte(checkpoint, data_offset(checkpoint, first) + 5)
    flip_byte(checkpoint, data_offset(checkpoint, second))
    report = verify(checkpoint)
    assert not report.ok
    assert len(report.problems) == 2
    assert report.problems[0].startswith(f"record '{first}' (entry 'model/fc1.weight'): bytes damaged (CRC-32 0x")
    assert report.problems[1].startswith(f"record '{second}' (entry 'optimizer/state/4/exp_avg'): bytes damaged")


def test_damaged_manifest_is_a_problem(checkpoint):
    flip_byte(checkpoint, data_offset(checkpoint, ".data/fabric_ckpt.json") + 3)
    report = verify(checkpoint)
    assert report.problems == ["record '.data/fabric_ckpt.json': the integrity manifest is damaged (CRC-32 mismatch)"]


def test_truncated_file_is_damaged_not_an_error(checkpoint):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    report = verify(checkpoint)
    assert not report.ok
    assert report.problems[0].startswith("the zip archive is truncated or damaged")


def test_plain_torch_save_is_checked_against_its_crcs(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(100.0)}, path)
    assert verify(path).ok and verify(path).format == "torch"
    flip_byte(path, data_offset(path, "data/0") + 1)
    assert verify(path).problems[0].startswith("record 'data/0': bytes damaged (CRC-32 0x")


def test_torch_save_without_crcs_says_what_was_not_checked(tmp_path):
    path = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(100.0)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    report = verify(path)
    assert report.ok
    assert report.unchecked == ["the file records no CRC-32s (torch.save without them): record bytes"]


def test_legacy_and_safetensors_files_are_checked_for_structure(tmp_path):
    from safetensors.torch import save_file as save_safetensors

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert verify(legacy).ok and verify(legacy).format == "torch-legacy"
    weights = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(4), "b": torch.zeros(2, 2)}, str(weights))
    report = verify(weights)
    assert (report.ok, report.format, report.records) == (True, "safetensors", 2)
    assert report.unchecked == ["safetensors files carry no checksums: tensor values"]
    weights.write_bytes(weights.read_bytes()[:-4])
    assert verify(weights).problems[-1].startswith("file 'w.safetensors': ")


def sharded_folder(tmp_path, checkpoint):
    folder = tmp_path / "sharded"
    fabric_ckpt.convert(checkpoint, f"{folder}/")
    return folder


def test_sharded_folder_names_the_damaged_file_and_entry(tmp_path, checkpoint):
    folder = sharded_folder(tmp_path, checkpoint)
    report = verify(folder)
    assert (report.ok, report.format, report.layout, report.files) == (True, "sharded", "folder", 2)
    manifest = json.loads((folder / "fabric_ckpt.json").read_bytes())["manifest"]
    fqn, offset, _length, _crc = next(i for i in manifest["files"]["__0_0.distcp"]["items"] if "fc2.weight" in i[0])
    flip_byte(Path(live_generation(folder)) / "__0_0.distcp", offset + 40)
    report = verify(folder)
    assert fqn == "model.fc2.weight"
    assert len(report.problems) == 1
    assert report.problems[0].startswith("file '__0_0.distcp' (entry 'model/fc2.weight'): bytes damaged (CRC-32 0x")


def test_sharded_folder_missing_file_and_damaged_manifest(tmp_path, checkpoint):
    folder = sharded_folder(tmp_path, checkpoint)
    (Path(live_generation(folder)) / "__0_0.distcp").unlink()
    assert verify(folder).problems == ["file '__0_0.distcp': missing"]
    manifest = folder / "fabric_ckpt.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"world_size":1', b'"world_size":2'))
    assert verify(folder).problems[0] == "file 'fabric_ckpt.json': the manifest is damaged (CRC-32 mismatch)"


def test_bare_dcp_folder_is_checked_for_structure(tmp_path):
    folder = tmp_path / "bare"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.randn(64, 64)}, "step": 4}, checkpoint_id=folder, no_dist=True)
    report = verify(folder)
    assert (report.ok, report.format) == (True, "dcp")
    assert report.unchecked == ["a bare DCP folder carries no checksums (no fabric_ckpt.json): tensor bytes"]
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert any(
        p.startswith("file '__0_0.distcp' (entry 'model/w'): ends past the end") for p in verify(folder).problems
    )


def test_remote_file_and_folder(checkpoint, tmp_path):
    fabric_ckpt.convert(checkpoint, "memory://remote/sharded/")
    assert verify("memory://remote/sharded").ok
    record = record_of(checkpoint, "model/fc1.weight")
    flip_byte(checkpoint, data_offset(checkpoint, record))
    with fsspec.open("memory://remote/c.ckpt", "wb") as f:
        f.write(checkpoint.read_bytes())
    report = verify("memory://remote/c.ckpt")
    assert report.path == "memory://remote/c.ckpt"
    assert report.problems == [p for p in report.problems if "(entry 'model/fc1.weight')" in p] != []


def test_compressed_files(tmp_path, fabric):
    model, optimizer = trained()
    path = tmp_path / "ep1.tar.gz"
    fabric.save(path, {"model": model, "optimizer": optimizer})
    report = verify(path)
    assert (report.ok, report.format) == (True, "fabric_ckpt (gz)")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # Damage shows as a broken gzip stream or, inside the stream, as failed record CRC-32s: either way not ok.
    assert not verify(path).ok


def test_hugging_face_index(tmp_path):
    from safetensors.torch import save_file as save_safetensors

    save_safetensors({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_safetensors({"b": torch.ones(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index = {"metadata": {"total_size": 20}, "weight_map": {**weight_map, "c": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    report = verify(tmp_path)
    assert (report.format, report.files, report.records) == ("hf-safetensors", 3, 2)
    assert report.problems == ["file 'model-00002-of-00002.safetensors' (entry 'c'): missing from the shard"]


def test_only_missing_paths_and_non_checkpoints_raise(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        verify(tmp_path / "nope.ckpt")
    assert missing.value.filename == str(tmp_path / "nope.ckpt")
    garbage = tmp_path / "notes.txt"
    garbage.write_text("hello, this is not a checkpoint")
    with pytest.raises(CheckpointError, match=f"'{garbage}' is not a checkpoint"):
        verify(garbage)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint"):
        verify(tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        verify(empty)
    save_file(tmp_path / "list.pt", [torch.ones(1)])
    assert verify(tmp_path / "list.pt").ok
