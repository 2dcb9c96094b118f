"""Our files are plain torch files, and Lightning Fabric's checkpoints load in ours (and the reverse)."""

from __future__ import annotations

import warnings
import zipfile

import pytest
import torch

from fabric_ckpt.formats import save_file
from tests.conftest import assert_same_state, make_net, snapshot, trained

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning as L


@pytest.fixture
def lightning_fabric():
    return L.Fabric(accelerator="cpu", devices=1)


def test_torch_load_reads_our_files_with_mmap_and_weights_only(tmp_path, fabric):
    model, optimizer = trained()
    fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "step": 4})
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "c.ckpt", weights_only=True, mmap=mmap)
        assert_same_state(dict(loaded["model"]), snapshot(model))
        assert loaded["step"] == 4


def test_our_files_are_valid_zips_with_real_crcs(tmp_path, fabric):
    fabric.save(tmp_path / "c.ckpt", {"model": make_net(), "x": torch.randn(1000)})
    with zipfile.ZipFile(tmp_path / "c.ckpt") as archive:
        assert archive.testzip() is None  # every record's CRC-32 checks out
        assert all(info.CRC != 0 for info in archive.infolist() if info.file_size)


def test_zip64_archives_load_in_torch_and_in_ours(tmp_path, fabric):
    state = {"model": make_net().state_dict(), "step": 9}
    save_file(tmp_path / "z64.ckpt", state, force_zip64=True)
    with zipfile.ZipFile(tmp_path / "z64.ckpt") as archive:
        assert archive.testzip() is None
    assert_same_state(dict(torch.load(tmp_path / "z64.ckpt", weights_only=True)["model"]), dict(state["model"]))
    assert_same_state(dict(fabric.load(tmp_path / "z64.ckpt")["model"]), dict(state["model"]))


def test_lightning_fabric_checkpoint_loads_in_ours(tmp_path, fabric, lightning_fabric):
    model, optimizer = trained(seed=1)
    lightning_model, lightning_optimizer = lightning_fabric.setup(model, optimizer)
    lightning_fabric.save(
        tmp_path / "lightning.ckpt",
        {"model": lightning_model, "optimizer": lightning_optimizer, "iteration": 12},
    )
    target, target_optimizer = trained(seed=2)
    state = {"model": target, "optimizer": target_optimizer, "iteration": 0}
    remainder = fabric.load(tmp_path / "lightning.ckpt", state)
    assert remainder == {}
    assert state["iteration"] == 12
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))


def test_our_checkpoint_loads_in_lightning_fabric(tmp_path, fabric, lightning_fabric):
    model, optimizer = trained(seed=1)
    fabric.save(tmp_path / "ours.ckpt", {"model": model, "optimizer": optimizer, "iteration": 12, "extra": "x"})
    target, target_optimizer = trained(seed=2)
    target, target_optimizer = lightning_fabric.setup(target, target_optimizer)
    state = {"model": target, "optimizer": target_optimizer, "iteration": 0}
    remainder = lightning_fabric.load(tmp_path / "ours.ckpt", state)
    assert remainder == {"extra": "x"} and state["iteration"] == 12
    assert_same_state(snapshot(target.module), snapshot(model))
    assert_same_state(snapshot(target_optimizer.optimizer), snapshot(optimizer))


def test_lightning_load_raw_reads_our_weights_file(tmp_path, fabric, lightning_fabric):
    source = make_net(3)
    save_file(tmp_path / "weights.pt", source.state_dict())
    target = make_net(4)
    lightning_fabric.load_raw(tmp_path / "weights.pt", target)
    assert_same_state(snapshot(target), snapshot(source))


def test_torch_files_without_crcs_still_load(tmp_path, fabric):
    from torch.utils.serialization import config

    source = make_net(5)
    config.save.compute_crc32 = False
    try:
        torch.save({"model": source.state_dict()}, tmp_path / "nocrc.pt")
    finally:
        config.save.compute_crc32 = True
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as archive:
        assert all(info.CRC == 0 for info in archive.infolist())
    target = make_net(6)
    fabric.load(tmp_path / "nocrc.pt", {"model": target})
    assert_same_state(snapshot(target), snapshot(source))
