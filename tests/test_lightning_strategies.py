"""Lightning's sharded strategies with our commits: real ``lightning.Fabric``/``Trainer`` runs on two gloo processes.

Lightning's FSDP strategies write their checkpoints past ``CheckpointIO``; the subclasses in ``fabric_ckpt.lightning``
commit them with our manifest and verify them before loading. ``ModelParallelStrategy`` (FSDP2) runs on CPU; the
FSDP1 ``FSDPStrategy`` needs CUDA (torch's FSDP1 refuses CPU-only machines), so its check runs only where there is one.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fabric_ckpt
from fabric_ckpt import CheckpointCorruptedError
from tests.conftest import assert_same_state
from tests.distributed import WorkerGroup
from tests.sharded_files import live_generation
from tests.test_verify import data_offset, flip_byte

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy

    from fabric_ckpt.lightning import (
        FabricCkptFSDPStrategy,
        FabricCkptIO,
        FabricCkptModelParallelStrategy,
        FabricCkptTrainerModelParallelStrategy,
    )


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


# ---------------------------------------------------------------------------------------------- helpers (on ranks)
def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def new_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sharded_fabric(
    strategy_cls=FabricCkptModelParallelStrategy, **kwargs
) -> tuple[L.Fabric, nn.Module, torch.optim.Optimizer]:
    strategy = strategy_cls(shard, data_parallel_size=2, tensor_parallel_size=1, **kwargs)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = fabric.setup_module(new_model())
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=0.01))
    return fabric, model, optimizer


def train(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(100 + fabric.global_rank)
    for _ in range(steps):
        loss = model(torch.randn(4, 8, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's shards of the weights and of the optimizer state, copied."""

    def local(value):
        value = value.to_local() if hasattr(value, "to_local") else value
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    weights = {name: local(value) for name, value in model.state_dict().items()}
    moments = {
        f"{index}.{name}": local(value)
        for index, state in enumerate(optimizer.state.values())
        for name, value in state.items()
    }
    return {**weights, **moments}


def flip_a_tensor_byte(folder: str, file_name: str) -> None:
    """Flip a value byte of the largest weight chunk of ``file_name`` (found through the folder's manifest).

    DCP stores each chunk as a small ``torch.save`` archive: the byte is inside its tensor data, so a reader that
    checks nothing gets a wrong number rather than an error.
    """
    with open(os.path.join(folder, "fabric_ckpt.json")) as f:
        record = json.load(f)["manifest"]["files"][file_name]
    _, start, length, _ = max((item for item in record["items"] if item[0].startswith("model.")), key=lambda i: i[2])
    with open(os.path.join(live_generation(folder), file_name), "r+b") as f:
        f.seek(start)
        chunk = f.read(length)
        with zipfile.ZipFile(io.BytesIO(chunk)) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        name_length, extra_length = struct.unpack("<HH", chunk[info.header_offset + 26 : info.header_offset + 30])
        offset = start + info.header_offset + 30 + name_length + extra_length + 1
        f.seek(offset)
        f.write(bytes([chunk[offset - start] ^ 0xFF]))


# ---------------------------------------------------------------------------------------------- cases (run on ranks)
def sharded_round_trip(path: str) -> dict:
    fabric, model, optimizer = sharded_fabric()
    train(fabric, model, optimizer, 2)
    saved = local_state(model, optimizer)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    train(fabric, model, optimizer, 1)  # move away from the saved state
    remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
    restored = local_state(model, optimizer)
    listing = {"folder": sorted(os.listdir(path)), "generation": sorted(os.listdir(live_generation(path)))}
    return {"saved": saved, "restored": restored, "remainder": remainder, "files": listing}


def damaged_shard_is_refused(path: str) -> dict:
    fabric, model, optimizer = sharded_fabric()
    train(fabric, model, optimizer, 2)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    train(fabric, model, optimizer, 1)
    before = local_state(model, optimizer)
    fabric.barrier()
    if fabric.global_rank == 0:
        flip_a_tensor_byte(path, "__1_0.distcp")
    fabric.barrier()
    try:
        fabric.load(path, {"model": model, "optimizer": optimizer})
        refusal = None
    except CheckpointCorruptedError as err:
        refusal = str(err)
    untouched = local_state(model, optimizer)
    # Lightning's own strategy reads the same folder without a word (DCP checks no checksums).
    plain, plain_model, plain_optimizer = sharded_fabric(ModelParallelStrategy)
    remainder = plain.load(live_generation(path), {"model": plain_model, "optimizer": plain_optimizer})
    return {"refusal": refusal, "before": before, "untouched": untouched, "plain_remainder": remainder}


def full_round_trip(path: str) -> dict:
    fabric, model, optimizer = sharded_fabric(save_distributed_checkpoint=False)
    train(fabric, model, optimizer, 2)
    saved = local_state(model, optimizer)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 5})
    report = fabric_ckpt.verify(path)
    assert report.ok and (report.format, report.layout) == ("fabric_ckpt", "file")
    assert sorted(FabricCkptIO().load_checkpoint(path)) == ["model", "optimizer", "step"]
    train(fabric, model, optimizer, 1)
    remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
    restored = local_state(model, optimizer)
    fabric.barrier()
    if fabric.global_rank == 0:
        flip_byte(path, data_offset(path, "data/0") + 1)
    fabric.barrier()
    try:
        fabric.load(path, {"model": model, "optimizer": optimizer})
        refusal = None
    except CheckpointCorruptedError as err:
        refusal = str(err)
    return {"saved": saved, "restored": restored, "remainder": remainder, "refusal": refusal}


def failed_save_keeps_the_previous(path: str) -> dict:
    fabric, model, optimizer = sharded_fabric()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    try:
        fabric.save(path, {"model": model, "optimizer": optimizer, "callback": lambda: None})  # meta.pt fails
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
    return {"error": error, "remainder": remainder, "siblings": sorted(os.listdir(os.path.dirname(path)))}


def full_weights(path: str) -> dict:
    """Save a sharded checkpoint and return the full weights (for a single-process reader to compare with)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    fabric, model, optimizer = sharded_fabric()
    train(fabric, model, optimizer, 2)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: value.clone() for name, value in full.items()}


class ShardedModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = new_model()

    def configure_model(self) -> None:
        shard(self.net, self.device_mesh)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator))
        return DataLoader(data, batch_size=4)  # 2 steps an epoch on each of 2 ranks


def trainer_fit(
    root: str, max_steps: int, strategy_cls, ckpt_path: str | None = None, distributed: bool = True
) -> dict:
    module = ShardedModule()
    strategy = strategy_cls(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, ckpt_path=ckpt_path)
    return {
        "io": type(trainer.strategy.checkpoint_io).__name__,
        "weights": local_state(module.net, trainer.optimizers[0]),
        "step": trainer.global_step,
        "checkpoints": sorted(os.listdir(os.path.join(root, "checkpoints"))),
    }


# ---------------------------------------------------------------------------------------------- tests
def test_sharded_save_is_committed_with_our_manifest_and_round_trips(group, tmp_path):
    path = str(tmp_path / "sharded")
    results = group.run(sharded_round_trip, path)
    for result in results:
        assert result["remainder"] == {"step": 3}
        assert_same_state(result["restored"], result["saved"])
    # Lightning's layout in a generation of our sharded folder, committed by our manifest.
    assert results[0]["files"]["generation"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    folder = results[0]["files"]["folder"]
    assert len(folder) == 2 and folder[0].startswith(".gen-") and folder[1] == "fabric_ckpt.json"
    report = fabric_ckpt.verify(path)
    assert report.ok and report.format == "sharded" and report.files == 4  # meta.pt is checksummed too
    assert sorted(os.listdir(tmp_path)) == ["sharded"]  # nothing written beside it


def test_a_damaged_shard_is_refused_on_every_rank_where_lightning_loads_it(group, tmp_path):
    results = group.run(damaged_shard_is_refused, str(tmp_path / "sharded"))
    for result in results:
        assert result["refusal"] is not None and "__1_0.distcp" in result["refusal"]
        assert_same_state(result["untouched"], result["before"])  # nothing was restored
        assert result["plain_remainder"] == {"step": 3}


def test_full_save_is_our_single_file_round_trips_and_is_verified_on_load(group, tmp_path):
    path = str(tmp_path / "full.ckpt")
    results = group.run(full_round_trip, path)
    for result in results:
        assert result["remainder"] == {"step": 5}
        assert_same_state(result["restored"], result["saved"])
        assert result["refusal"] is not None and "full.ckpt" in result["refusal"]  # after the flipped byte
    with pytest.raises(CheckpointCorruptedError):
        FabricCkptIO().load_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["full.ckpt"]


def test_a_failed_save_keeps_the_previous_checkpoint(group, tmp_path):
    path = str(tmp_path / "sharded")
    results = group.run(failed_save_keeps_the_previous, path)
    for result in results:
        assert result["error"] is not None and "pickle" in result["error"].lower()
        assert result["remainder"] == {"step": 1}
        assert result["siblings"] == ["sharded"]  # nothing written beside it
    assert fabric_ckpt.verify(path).ok


def test_fabric_ckpt_reads_the_weights_of_a_lightning_sharded_checkpoint(group, tmp_path):
    path = str(tmp_path / "sharded")
    full = group.run(full_weights, path)[0]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    remainder = fabric_ckpt.Fabric(accelerator="cpu").load(path, {"model": model}, strict=False)
    assert "optimizer" in remainder
    assert_same_state({name: value.clone() for name, value in model.state_dict().items()}, full)


def test_trainer_sharded_checkpoints_are_ours_and_resume_as_lightnings_own(group, tmp_path):
    first = group.run(trainer_fit, str(tmp_path / "first"), 4, FabricCkptTrainerModelParallelStrategy)
    assert first[0]["io"] == "FabricCkptIO"  # the strategy's default, for full saves and removals
    assert first[0]["checkpoints"] == ["epoch=1-step=4.ckpt"]  # epoch 0's removed through FabricCkptIO
    path = str(tmp_path / "first" / "checkpoints" / "epoch=1-step=4.ckpt")
    assert os.path.isdir(path) and fabric_ckpt.verify(path).ok
    ours = group.run(trainer_fit, str(tmp_path / "ours"), 6, FabricCkptTrainerModelParallelStrategy, path)
    from lightning.pytorch.strategies import ModelParallelStrategy as TrainerModelParallelStrategy

    # Lightning alone reads the generation the manifest names (our folder's layout wraps Lightning's).
    generation = live_generation(path)
    lightnings = group.run(trainer_fit, str(tmp_path / "lightning"), 6, TrainerModelParallelStrategy, generation)
    for mine, theirs in zip(ours, lightnings, strict=True):
        assert mine["step"] == theirs["step"] == 6
        assert_same_state(mine["weights"], theirs["weights"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's FSDP1 needs CUDA")
def test_fsdp1_sharded_checkpoint_is_committed_and_verified(tmp_path):
    fabric = L.Fabric(accelerator="cuda", devices=1, strategy=FabricCkptFSDPStrategy())
    fabric.launch()
    try:
        model = fabric.setup_module(new_model())
        optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=0.01))
        loss = model(torch.randn(4, 8, device=fabric.device)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        path = tmp_path / "sharded"
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
        assert fabric_ckpt.verify(path).ok and (path / "fabric_ckpt.json").is_file()
        assert fabric.load(path, {"model": model, "optimizer": optimizer}) == {"step": 2}
    finally:
        if torch.distributed.is_initialized():  # the process group Lightning started in this test process
            torch.distributed.destroy_process_group()


def test_trainer_full_checkpoints_go_through_fabric_ckpt_io(group, tmp_path):
    root = str(tmp_path / "first")
    first = group.run(trainer_fit, root, 4, FabricCkptTrainerModelParallelStrategy, None, False)
    assert first[0]["checkpoints"] == ["epoch=1-step=4.ckpt"]
    path = os.path.join(root, "checkpoints", "epoch=1-step=4.ckpt")
    report = fabric_ckpt.verify(path)
    assert report.ok and (report.format, report.layout) == ("fabric_ckpt", "file")
    assert sorted(os.listdir(os.path.join(root, "checkpoints"))) == ["epoch=1-step=4.ckpt"]  # no temporary left
    resumed = group.run(trainer_fit, str(tmp_path / "ours"), 6, FabricCkptTrainerModelParallelStrategy, path, False)
    assert [result["step"] for result in resumed] == [6, 6]
