"""fabric_ckpt inside real Lightning: ``FabricCkptIO`` with ``lightning.Fabric`` and the ``Trainer`` (one process)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fabric_ckpt
from fabric_ckpt import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from tests.conftest import assert_same_state, bitwise_equal, make_net, snapshot, trained
from tests.test_verify import data_offset, flip_byte

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning as L
    from lightning.fabric.plugins import TorchCheckpointIO

    from fabric_ckpt.lightning import FabricCkptIO


def lightning_fabric(*plugins) -> L.Fabric:
    return L.Fabric(accelerator="cpu", devices=1, plugins=list(plugins) or None)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(6, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def data_record(path) -> str:
    """The name of the first tensor record of a checkpoint archive (``data/0``)."""
    with zipfile.ZipFile(path) as archive:
        return next(info.filename.split("/", 1)[1] for info in archive.infolist() if "/data/" in info.filename)


def saved_with_plugin(tmp_path) -> tuple[str, dict, dict]:
    fabric = lightning_fabric(FabricCkptIO())
    model, optimizer = fabric.setup(*trained(seed=1))
    path = str(tmp_path / "lightning.ckpt")
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 7, "note": "epoch end"})
    return path, snapshot(model), snapshot(optimizer)


# ---------------------------------------------------------------------------------------------- lightning.Fabric
def test_fabric_round_trip_is_bitwise_and_returns_the_remainder(tmp_path):
    path, model_state, optimizer_state = saved_with_plugin(tmp_path)
    fabric = lightning_fabric(FabricCkptIO())
    target, target_optimizer = fabric.setup(*trained(seed=2))
    remainder = fabric.load(path, {"model": target, "optimizer": target_optimizer})
    assert remainder == {"step": 7, "note": "epoch end"}
    assert_same_state(snapshot(target), model_state)
    assert_same_state(snapshot(target_optimizer), optimizer_state)


def test_the_file_is_ours_verified_and_read_by_fabric_ckpt(tmp_path):
    path, model_state, optimizer_state = saved_with_plugin(tmp_path)
    report = fabric_ckpt.verify(path)
    assert report.ok and report.format == "fabric_ckpt" and report.unchecked == []
    model, optimizer = trained(seed=3)
    remainder = fabric_ckpt.Fabric(accelerator="cpu").load(path, {"model": model, "optimizer": optimizer})
    assert remainder == {"step": 7, "note": "epoch end"}
    assert_same_state(snapshot(model), model_state)
    assert_same_state(snapshot(optimizer), optimizer_state)


def test_a_flipped_byte_is_refused_where_lightnings_own_io_loads_it(tmp_path):
    path, model_state, _ = saved_with_plugin(tmp_path)
    flip_byte(path, data_offset(path, data_record(path)) + 1)

    silently_damaged = make_net(seed=4)
    lightning_fabric().load(path, {"model": silently_damaged}, strict=False)  # TorchCheckpointIO: no error
    assert not all(bitwise_equal(silently_damaged.state_dict()[k], v) for k, v in model_state.items())

    target = make_net(seed=4)
    before = snapshot(target)
    with pytest.raises(CheckpointCorruptedError, match=r"lightning\.ckpt"):
        lightning_fabric(FabricCkptIO()).load(path, {"model": target}, strict=False)
    assert_same_state(snapshot(target), before)  # nothing was restored
    with pytest.raises(CheckpointCorruptedError, match="data/0"):
        FabricCkptIO().load_checkpoint(path)


def test_a_save_that_fails_leaves_the_previous_checkpoint_intact(tmp_path):
    path, model_state, _ = saved_with_plugin(tmp_path)
    fabric = lightning_fabric(FabricCkptIO())
    with pytest.raises(Exception, match="pickle"):
        fabric.save(path, {"model": make_net(seed=5), "unpicklable": lambda: None})
    assert fabric_ckpt.verify(path).ok
    assert_same_state(dict(FabricCkptIO().load_checkpoint(path)["model"]), model_state)
    assert os.listdir(tmp_path) == ["lightning.ckpt"]  # no temporary left behind


def test_storage_options_are_refused_as_lightning_refuses_them(tmp_path):
    for io in (FabricCkptIO(), TorchCheckpointIO()):
        with pytest.raises(TypeError, match="storage_options"):
            io.save_checkpoint({"step": 1}, tmp_path / "c.ckpt", storage_options={"anon": True})
    assert not (tmp_path / "c.ckpt").exists()


def test_missing_file_raises_file_not_found_as_lightning_does(tmp_path):
    for io in (FabricCkptIO(), TorchCheckpointIO()):
        with pytest.raises(FileNotFoundError):
            io.load_checkpoint(tmp_path / "missing.ckpt")


def test_fsspec_urls_round_trip():
    io = FabricCkptIO()
    io.save_checkpoint({"weight": torch.arange(6.0), "step": 2}, "memory://runs/last.ckpt")
    loaded = io.load_checkpoint("memory://runs/last.ckpt")
    assert bitwise_equal(loaded["weight"], torch.arange(6.0)) and loaded["step"] == 2
    io.remove_checkpoint("memory://runs/last.ckpt")
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint("memory://runs/last.ckpt")


# ---------------------------------------------------------------------------------------------- load semantics
def test_loaded_tensors_own_their_memory(tmp_path):
    path = tmp_path / "c.ckpt"
    weight = torch.arange(1024, dtype=torch.float32)
    FabricCkptIO().save_checkpoint({"weight": weight, "alias": weight[10:20]}, path)
    loaded = FabricCkptIO().load_checkpoint(path)
    # Overwrite the file's bytes in place: a tensor that still viewed the memory-mapped file would change.
    offset = data_offset(path, data_record(path))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(4096))
    assert bitwise_equal(loaded["weight"], weight)
    assert loaded["alias"].untyped_storage().data_ptr() == loaded["weight"].untyped_storage().data_ptr()


def test_map_location_is_honoured_as_torch_load_honours_it(tmp_path):
    path = tmp_path / "c.ckpt"
    FabricCkptIO().save_checkpoint({"weight": torch.ones(3), "nested": [torch.zeros(2)]}, path)
    io = FabricCkptIO()
    assert io.load_checkpoint(path)["weight"].device.type == "cpu"
    assert io.load_checkpoint(path, map_location="meta")["weight"].is_meta
    assert io.load_checkpoint(path, map_location=torch.device("meta"))["nested"][0].is_meta
    assert io.load_checkpoint(path, map_location={"cpu": "meta"})["weight"].is_meta
    assert not io.load_checkpoint(path, map_location={"cuda:0": "meta"})["weight"].is_meta
    seen: list[str] = []

    def placement(storage, location):
        seen.append(location)
        return storage

    loaded = io.load_checkpoint(path, map_location=placement)
    assert seen == ["cpu", "cpu"]  # once per storage, with the location it was saved from
    assert bitwise_equal(loaded["weight"], torch.ones(3))
    reference = torch.load(path, map_location=placement, weights_only=True)
    assert bitwise_equal(reference["weight"], loaded["weight"])


def test_map_location_applies_to_formats_that_record_no_device(tmp_path):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file as save_safetensors

    weight = torch.arange(4.0)
    save_safetensors({"weight": weight}, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process is the point
        dcp.save({"model": {"weight": weight}}, checkpoint_id=tmp_path / "sharded", no_dist=True)
    for path, key in ((tmp_path / "model.safetensors", ()), (tmp_path / "sharded", ("model",))):
        seen: list[str] = []

        def placement(storage, location, seen=seen):
            seen.append(location)
            return storage

        loaded = FabricCkptIO().load_checkpoint(path, map_location=placement)
        for step in key:
            loaded = loaded[step]
        assert seen == ["cpu"] and bitwise_equal(loaded["weight"], weight)  # saved nowhere else: as from "cpu"
        moved = FabricCkptIO().load_checkpoint(path, map_location={"cpu": "meta"})
        for step in key:
            moved = moved[step]
        assert moved["weight"].is_meta and moved["weight"].shape == weight.shape


class Custom:
    def __init__(self, value: int) -> None:
        self.value = value


def test_weights_only_defaults_to_safe_like_lightnings_own_io(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    FabricCkptIO().save_checkpoint({"weight": torch.ones(2), "config": Custom(3)}, path)
    with pytest.raises(pickle_error()):  # Lightning's default (torch.load's) refuses it too
        TorchCheckpointIO().load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        FabricCkptIO().load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        FabricCkptIO().load_checkpoint(path, weights_only=True)
    assert FabricCkptIO().load_checkpoint(path, weights_only=False)["config"].value == 3
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's opt-out applies to None only
    assert FabricCkptIO().load_checkpoint(path)["config"].value == 3
    with pytest.raises(UnsafeCheckpointError):
        FabricCkptIO().load_checkpoint(path, weights_only=True)


def pickle_error() -> type[Exception]:
    import pickle

    return pickle.UnpicklingError


def test_a_file_that_holds_no_dict_is_refused_with_its_name(tmp_path):
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor\.pt.*Tensor"):
        FabricCkptIO().load_checkpoint(tmp_path / "tensor.pt")


# ---------------------------------------------------------------------------------------------- remove_checkpoint
def test_remove_checkpoint_removes_a_file_and_ignores_a_missing_one(tmp_path):
    io = FabricCkptIO()
    io.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    (tmp_path / "neighbour.txt").write_text("keep")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")  # already gone: nothing happens, as in Lightning
    assert sorted(os.listdir(tmp_path)) == ["neighbour.txt"]


def test_remove_checkpoint_refuses_an_unrelated_folder(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "results.csv").write_text("1,2,3")
    with pytest.raises(IsADirectoryError, match="not a checkpoint"):
        FabricCkptIO().remove_checkpoint(folder)
    assert (folder / "results.csv").read_text() == "1,2,3"


def test_remove_checkpoint_removes_a_sharded_checkpoint_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process is the point
        dcp.save({"model": make_net().state_dict()}, checkpoint_id=folder, no_dist=True)
    assert fabric_ckpt.verify(folder).ok
    FabricCkptIO().remove_checkpoint(folder)
    assert not folder.exists()


def test_remove_checkpoint_removes_a_link_not_its_target(tmp_path):
    FabricCkptIO().save_checkpoint({"step": 1}, tmp_path / "real.ckpt")
    os.symlink(tmp_path / "real.ckpt", tmp_path / "last.ckpt")
    folder = tmp_path / "outputs"
    folder.mkdir()
    os.symlink(folder, tmp_path / "outputs-link")
    FabricCkptIO().remove_checkpoint(tmp_path / "last.ckpt")
    FabricCkptIO().remove_checkpoint(tmp_path / "outputs-link")
    assert sorted(os.listdir(tmp_path)) == ["outputs", "real.ckpt"]


# ---------------------------------------------------------------------------------------------- the Trainer
class TinyModule(L.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return [optimizer], [scheduler]

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator))
        return DataLoader(data, batch_size=4)  # 4 steps an epoch


def trainer(root, max_steps: int, *plugins) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        plugins=list(plugins) or None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def fitted(root, max_steps: int, *plugins, ckpt_path=None) -> TinyModule:
    """A fit whose default ModelCheckpoint saves at every epoch's end, keeping the newest checkpoint only."""
    torch.manual_seed(0)
    module = TinyModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer(root, max_steps, *plugins).fit(module, ckpt_path=ckpt_path)
    return module


def test_trainer_checkpoints_are_ours_and_resume_as_lightnings_own(tmp_path):
    first = fitted(tmp_path / "first", 8, FabricCkptIO())
    folder = tmp_path / "first" / "checkpoints"
    # ModelCheckpoint kept the newest and removed epoch 0's through FabricCkptIO.remove_checkpoint.
    assert os.listdir(folder) == ["epoch=1-step=8.ckpt"]
    path = folder / "epoch=1-step=8.ckpt"
    assert fabric_ckpt.verify(path).ok
    checkpoint = FabricCkptIO().load_checkpoint(path)  # safe default: a Trainer checkpoint needs nothing else
    assert checkpoint["global_step"] == 8 and checkpoint["hyper_parameters"] == {"width": 8}
    assert_same_state(dict(checkpoint["state_dict"]), snapshot(first))
    assert_same_state(checkpoint["optimizer_states"][0], snapshot(first.trainer.optimizers[0]))

    # Resuming through FabricCkptIO continues exactly as Lightning's own CheckpointIO continues from the same file.
    ours = fitted(tmp_path / "ours", 12, FabricCkptIO(), ckpt_path=path)
    lightnings = fitted(tmp_path / "lightning", 12, ckpt_path=path)
    assert ours.trainer.global_step == lightnings.trainer.global_step == 12
    assert_same_state(snapshot(ours), snapshot(lightnings))
    assert_same_state(snapshot(ours.trainer.optimizers[0]), snapshot(lightnings.trainer.optimizers[0]))
    assert ours.trainer.lr_scheduler_configs[0].scheduler.state_dict() == (
        lightnings.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    )


def test_trainer_refuses_to_resume_from_a_damaged_checkpoint(tmp_path):
    fitted(tmp_path / "first", 4, FabricCkptIO())
    path = tmp_path / "first" / "checkpoints" / "epoch=0-step=4.ckpt"
    flip_byte(path, data_offset(path, data_record(path)) + 2)
    fitted(tmp_path / "lightning", 8, ckpt_path=path)  # Lightning's own CheckpointIO resumes from it silently
    with pytest.raises(CheckpointCorruptedError, match=r"step=4\.ckpt"):
        fitted(tmp_path / "ours", 8, FabricCkptIO(), ckpt_path=path)


def test_lightnings_background_saves_wrap_the_plugin(tmp_path):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    fitted(tmp_path, 4, AsyncCheckpointIO(FabricCkptIO()))
    path = tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"
    assert fabric_ckpt.verify(path).ok and os.listdir(path.parent) == [path.name]


# ---------------------------------------------------------------------------------------------- import
def test_importing_without_lightning_says_how_to_install_it():
    code = "import sys; sys.modules['lightning'] = None; import fabric_ckpt.lightning"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "pip install lightning" in result.stderr
