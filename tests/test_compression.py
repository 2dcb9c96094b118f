"""Compressed checkpoints: the name chooses on save, the content decides on load, and tarballs are read safely."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile

import pytest
import torch

from fabric_ckpt import CheckpointError, CheckpointManager
from tests.conftest import assert_same_state, make_net, snapshot, trained

NAMES = ["c.tar.gz", "c.tgz", "c.tar.bz2", "c.tar.bzip", "c.tar.xz", "c.tar.lzma", "c.tar", "c.zst"]
MAGIC = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zst": b"\x28\xb5\x2f\xfd"}


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_and_format_by_name(tmp_path, fabric, name):
    model, optimizer = trained(seed=1)
    path = tmp_path / name
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 4})
    kind = next(
        (
            k
            for k, suffix in [("gz", "gz"), ("bz2", "bz"), ("xz", "xz"), ("xz", "lzma"), ("zst", "zst")]
            if name.endswith(suffix) or suffix in name
        ),
        None,
    )
    if name.endswith(".tgz"):
        kind = "gz"
    head = path.read_bytes()[:8]
    if kind is not None:
        assert head.startswith(MAGIC[kind])
    target, target_optimizer = trained(seed=2)
    assert fabric.load(path, {"model": target, "optimizer": target_optimizer}) == {"step": 4}
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_tarballs_hold_a_torch_loadable_member(tmp_path, fabric):
    fabric.save(tmp_path / "c.tar.gz", {"w": torch.arange(10.0)})
    with tarfile.open(tmp_path / "c.tar.gz") as archive:
        assert archive.getnames() == ["checkpoint.pt"]
        member = archive.extractfile("checkpoint.pt").read()
    assert torch.equal(torch.load(io.BytesIO(member), weights_only=True)["w"], torch.arange(10.0))


def test_format_is_detected_by_content_not_name(tmp_path, fabric):
    fabric.save(tmp_path / "c.tar.gz", {"step": 1})
    shutil.copy(tmp_path / "c.tar.gz", tmp_path / "misleading.ckpt")
    assert fabric.load(tmp_path / "misleading.ckpt") == {"step": 1}
    fabric.save(tmp_path / "plain.ckpt", {"step": 2})
    with open(tmp_path / "plain.ckpt", "rb") as source, gzip.open(tmp_path / "gzipped.bin", "wb") as out:
        shutil.copyfileobj(source, out)  # `gzip model.pt`: a compressed file without a tarball
    assert fabric.load(tmp_path / "gzipped.bin") == {"step": 2}


def test_unsafe_tar_members_are_refused(tmp_path, fabric):
    for member in ["/etc/evil.pt", "../escape.pt", "a/../../escape.pt"]:
        path = tmp_path / "evil.tar.gz"
        with tarfile.open(path, "w:gz") as archive:
            data = b"x" * 10
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        with pytest.raises(CheckpointError, match=r"has an unsafe path"):
            fabric.load(path)
    assert not (tmp_path.parent / "escape.pt").exists()


def test_tarball_with_several_files_is_named(tmp_path, fabric):
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as archive:
        for name in ["a.pt", "b.pt"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(CheckpointError, match=r"tarball of 2 files \['a.pt', 'b.pt'\], not one"):
        fabric.load(path)


def test_damaged_compressed_file(tmp_path, fabric):
    fabric.save(tmp_path / "c.tar.xz", {"w": torch.randn(1000)})
    data = bytearray((tmp_path / "c.tar.xz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c.tar.xz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.tar\.xz"):
        fabric.load(tmp_path / "c.tar.xz")


def test_manager_filenames_choose_compression_too(tmp_path, fabric):
    model = make_net(3)
    manager = CheckpointManager(fabric, tmp_path, filename="ep{epoch}.tar.gz", latest_filename="latest", run_name="r")
    manager.on_epoch_end({"model": model})
    assert (tmp_path / "ep1.tar.gz").read_bytes()[:2] == MAGIC["gz"]
    target = make_net(4)
    manager2 = CheckpointManager(fabric, tmp_path, filename="ep{epoch}.tar.gz", latest_filename="latest", run_name="r")
    manager2.load_latest({"model": target})
    assert_same_state(snapshot(target), snapshot(model))


@pytest.mark.parametrize("name", ["c.tar.gz", "c.tar.bz2", "c.tar.xz", "c.zst"])
def test_any_damage_to_a_compressed_file_is_a_checkpoint_error(tmp_path, fabric, name):
    fabric.save(tmp_path / name, {"w": torch.randn(100_000)})
    data = bytearray((tmp_path / name).read_bytes())
    for offset in (len(data) // 3, len(data) // 2, len(data) - 8):
        damaged = bytearray(data)
        damaged[offset] ^= 0x55
        (tmp_path / "damaged").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="damaged"):
            fabric.load(tmp_path / "damaged")


def test_a_gzip_trailer_mismatch_is_caught_even_when_the_inner_file_has_no_crc(tmp_path, fabric):
    """A tarball of a torch.save file without CRCs: only gzip's own check can notice the damage."""
    from torch.utils.serialization import config

    config.save.compute_crc32 = False
    try:
        torch.save({"w": torch.arange(1000.0)}, tmp_path / "inner.pt")
    finally:
        config.save.compute_crc32 = True
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "inner.pt", arcname="checkpoint.pt")
    data = bytearray((tmp_path / "c.tar.gz").read_bytes())
    data[-6] ^= 0xFF  # the stored CRC-32 of the uncompressed data, in the gzip trailer
    (tmp_path / "c.tar.gz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged compressed archive"):
        fabric.load(tmp_path / "c.tar.gz")
