"""Other tools' checkpoints load directly: Lightning Trainer and Fabric, Composer, bare DCP, safetensors, HF shards.

Lightning checkpoints are made by Lightning itself. Composer (pinned to torch<2.7.1, not installable beside torch 2.13)
checkpoints are built exactly as its ``State.state_dict()`` and ``save_checkpoint`` lay them out.
"""

from __future__ import annotations

import datetime
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import fabric_ckpt
from fabric_ckpt import CheckpointError, RNGState, Timestamp, UnsafeCheckpointError
from fabric_ckpt.formats.interop import COMPOSER, LIGHTNING_TRAINER, adapt, detect
from tests.conftest import assert_same_state, bitwise_equal, make_net, snapshot, trained

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning as L


@dataclass
class RunConfig:
    """A hyper-parameter object: Lightning pickles it, so only weights_only=False can rebuild it."""

    name: str = "tiny"


class TinyModule(L.LightningModule):
    def __init__(self, width: int = 8, config: RunConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))

    def training_step(self, batch, index):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def fit_and_save(path, config: RunConfig | None = None) -> TinyModule:
    torch.manual_seed(0)
    module = TinyModule(config=config)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    trainer.save_checkpoint(path)
    return module


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer") / "last.ckpt"
    return path, fit_and_save(path)


def fresh_targets(seed: int = 5):
    torch.manual_seed(seed)
    module = TinyModule()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.01)
    return module, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


# ---------------------------------------------------------------------------------------------- Lightning Trainer
def test_trainer_checkpoint_restores_module_optimizer_and_scheduler(fabric, trainer_checkpoint):
    path, trained_module = trainer_checkpoint
    raw = torch.load(path, weights_only=True)
    assert detect(raw) == LIGHTNING_TRAINER
    module, optimizer, scheduler = fresh_targets()
    remainder = fabric.load(path, {"net": module, "opt": optimizer, "sched": scheduler, "global_step": 0})
    assert_same_state(snapshot(module), snapshot(trained_module))
    assert_same_state(snapshot(optimizer), snapshot(_optimizer_from(raw["optimizer_states"][0], module)))
    assert scheduler.state_dict() == raw["lr_schedulers"][0]
    assert remainder["epoch"] == raw["epoch"] and "hyper_parameters" in remainder and "loops" in remainder
    assert not {"state_dict", "optimizer_states", "lr_schedulers", "global_step"} & set(remainder)


def _optimizer_from(state: dict, module: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.01)
    optimizer.load_state_dict(state)
    return optimizer


def test_trainer_checkpoint_load_raw_and_weights_only_load(fabric, trainer_checkpoint):
    path, trained_module = trainer_checkpoint
    module, optimizer, _ = fresh_targets()
    fabric.load_raw(path, module)
    assert_same_state(snapshot(module), snapshot(trained_module))
    fabric.load_raw(path, optimizer)
    assert optimizer.state_dict()["state"][0]["step"] == 2
    other, _, _ = fresh_targets(seed=9)
    fabric.load(path, {"model": other, "optimizer": torch.optim.SGD(other.parameters())}, load_weights_only=True)
    assert_same_state(snapshot(other), snapshot(trained_module))


def test_trainer_hyper_parameter_objects_need_weights_only_false(fabric, tmp_path):
    path = tmp_path / "with-config.ckpt"
    trained_module = fit_and_save(path, config=RunConfig("custom"))
    module, _, _ = fresh_targets()
    with pytest.raises(UnsafeCheckpointError) as refused:
        fabric.load(path, {"model": module})
    message = str(refused.value)
    assert str(path) in message and "RunConfig" in message and "pass weights_only=False" in message
    remainder = fabric.load(path, {"model": module}, weights_only=False)
    assert remainder["hyper_parameters"]["config"] == RunConfig("custom")
    assert_same_state(snapshot(module), snapshot(trained_module))


def test_trainer_checkpoint_with_two_modules_requested_is_ambiguous(fabric, trainer_checkpoint):
    path, _ = trainer_checkpoint
    first, _, _ = fresh_targets()
    second, _, _ = fresh_targets()
    with pytest.raises(KeyError, match="'first'"):
        fabric.load(path, {"first": first, "second": second})


def test_trainer_checkpoint_converts_to_our_layout(fabric, trainer_checkpoint, tmp_path):
    path, trained_module = trainer_checkpoint
    result = fabric_ckpt.convert(path, tmp_path / "ours.ckpt")
    assert result.format == "torch"
    converted = torch.load(tmp_path / "ours.ckpt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "global_step"} <= set(converted)
    module, optimizer, _ = fresh_targets()
    fabric.load(tmp_path / "ours.ckpt", {"model": module, "optimizer": optimizer})
    assert_same_state(snapshot(module), snapshot(trained_module))
    fabric_ckpt.convert(path, tmp_path / "model.safetensors")
    weights = load_safetensors(str(tmp_path / "model.safetensors"))
    assert_same_state(weights, snapshot(trained_module))
    assert "lightning-trainer" in " ".join(fabric_ckpt.describe(path).notes)


# ---------------------------------------------------------------------------------------------- Lightning Fabric
def test_lightning_fabric_checkpoint_converts_and_verifies(tmp_path):
    lightning = L.Fabric(accelerator="cpu", devices=1)
    model, optimizer = trained(seed=1)
    lightning.save(tmp_path / "lf.ckpt", {"model": model, "optimizer": optimizer, "iteration": 3})
    report = fabric_ckpt.verify(tmp_path / "lf.ckpt")
    assert (report.ok, report.format, report.unchecked) == (True, "torch", [])
    fabric_ckpt.convert(tmp_path / "lf.ckpt", tmp_path / "lf.safetensors")
    assert_same_state(load_safetensors(str(tmp_path / "lf.safetensors")), snapshot(model))
    fabric_ckpt.convert(tmp_path / "lf.ckpt", f"{tmp_path}/lf-sharded/")
    assert fabric_ckpt.verify(tmp_path / "lf-sharded").format == "sharded"
    assert fabric_ckpt.diff(tmp_path / "lf.ckpt", tmp_path / "lf-sharded").equal


# ---------------------------------------------------------------------------------------------- Composer
class ComposerClassifierLike(nn.Module):
    """ComposerClassifier keeps the network at ``.module``: every key of its state starts with ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def composer_checkpoint(path, *, weights_only: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """A Composer checkpoint: ``{"state": State.state_dict(), "rng": get_rng_state()}``, saved with torch.save."""
    model, optimizer = trained(seed=1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    optimizer.step()  # one more step, so the scheduler steps after the optimizer (as in training)
    scheduler.step()
    wrapper = ComposerClassifierLike(model)
    metadata = {"torch_version": torch.__version__, "device": "cpu", "precision": "fp32", "world_size": 1}
    if weights_only:
        checkpoint: dict = {"state": {"model": get_model_state_dict(wrapper), "integrations": {}, "metadata": metadata}}
        torch.save(checkpoint, path)
        return model, optimizer, checkpoint
    clocks = {"total_wct": 12.5, "iteration_wct": 12.5, "epoch_wct": 1.5, "batch_wct": 0.25}
    counters = {"iteration": 0, "epoch": 2, "batch": 6, "sample": 36, "token": 0, "epoch_in_iteration": 2}
    counters.update({"token_in_iteration": 0, "batch_in_epoch": 0, "sample_in_epoch": 0, "token_in_epoch": 0})
    state = {
        "model": get_model_state_dict(wrapper),
        "optimizers": {type(optimizer).__qualname__: get_optimizer_state_dict(wrapper, optimizer)},
        "schedulers": {type(scheduler).__qualname__: scheduler.state_dict()},
        "algorithms": [],
        "callbacks": {},
        "scaler": {},
        "timestamp": {
            "Timestamp": {**counters, **{k: datetime.timedelta(seconds=v) for k, v in clocks.items()}},
        },
        "rank_zero_seed": 42,
        "run_name": "tiny-run",
        "dataset_state": {"train": None},
        "integrations": {},
        "metadata": metadata,
    }
    rng = [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}]
    checkpoint = {"state": state, "rng": rng}
    torch.save(checkpoint, path)
    return model, optimizer, checkpoint


def test_composer_checkpoint_needs_weights_only_false(fabric, tmp_path):
    composer_checkpoint(tmp_path / "ep2.pt")
    with pytest.raises(UnsafeCheckpointError, match="pass weights_only=False"):
        fabric.load(tmp_path / "ep2.pt", {"model": make_net()})


def test_composer_checkpoint_restores_everything(fabric, tmp_path):
    model, optimizer, saved = composer_checkpoint(tmp_path / "ep2.pt")
    assert detect(saved) == COMPOSER
    target = make_net(seed=7)
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(target_optimizer, step_size=1)
    timestamp, rng = Timestamp(), RNGState()
    state = {"model": target, "optimizer": target_optimizer, "scheduler": scheduler, "timestamp": timestamp, "rng": rng}
    random.random()  # the generators move on after the save; the load must put them back
    remainder = fabric.load(tmp_path / "ep2.pt", state, weights_only=False)
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))
    assert scheduler.last_epoch == 1
    assert (timestamp.epoch, timestamp.batch, timestamp.sample, timestamp.total_wct) == (2, 6, 36, 12.5)
    drawn = (random.random(), float(np.random.rand()), torch.rand(3))
    random.setstate(saved["rng"][0]["python"])
    np.random.set_state(saved["rng"][0]["numpy"])
    torch.random.set_rng_state(saved["rng"][0]["torch"])
    assert drawn[:2] == (random.random(), float(np.random.rand())) and torch.equal(drawn[2], torch.rand(3))
    assert remainder["rank_zero_seed"] == 42 and remainder["run_name"] == "tiny-run"


def test_composer_weights_only_checkpoint(fabric, tmp_path):
    model, _, _ = composer_checkpoint(tmp_path / "weights.pt", weights_only=True)
    target = make_net(seed=8)
    # Composer's metadata holds torch.__version__ (a TorchVersion, a str subclass): allowed under the safe default.
    remainder = fabric.load(tmp_path / "weights.pt", {"model": target})
    assert_same_state(snapshot(target), snapshot(model))
    assert set(remainder) == {"integrations", "metadata"}
    other = make_net(seed=9)
    fabric.load_raw(tmp_path / "weights.pt", other)
    assert_same_state(snapshot(other), snapshot(model))


def test_composer_checkpoint_converts_to_a_resumable_file(fabric, tmp_path):
    model, optimizer, _ = composer_checkpoint(tmp_path / "ep2.pt")
    fabric_ckpt.convert(tmp_path / "ep2.pt", tmp_path / "ours.ckpt", weights_only=False)
    target = make_net(seed=7)
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    timestamp = Timestamp()
    state = {"model": target, "optimizer": target_optimizer, "timestamp": timestamp, "rng": RNGState()}
    fabric.load(tmp_path / "ours.ckpt", state)  # our layout now loads with weights_only=True
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))
    assert timestamp.batch == 6


# ---------------------------------------------------------------------------------------------- DCP, safetensors
def test_bare_dcp_folder_with_an_index_keyed_optimizer(fabric, tmp_path):
    model, optimizer = trained(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 5}
        dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    target = make_net(seed=3)
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    remainder = fabric.load(tmp_path, {"model": target, "optimizer": target_optimizer})
    assert remainder == {"step": 5}
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))


def test_safetensors_file_loads_into_the_single_module(fabric, tmp_path):
    model = make_net(seed=4)
    save_safetensors(model.state_dict(), str(tmp_path / "model.safetensors"))
    target = make_net(seed=5)
    assert fabric.load(tmp_path / "model.safetensors", {"model": target, "step": 0}, strict=False) == {}
    assert_same_state(snapshot(target), snapshot(model))


def test_adapt_leaves_checkpoints_that_have_the_requested_keys_alone():
    checkpoint = {"state_dict": {"w": torch.ones(1)}, "global_step": 3}
    assert adapt(checkpoint, {"state_dict": nn.Linear(1, 1), "global_step": 0}) is checkpoint
    assert adapt({"w": torch.ones(1)}, {"w": 0, "model": nn.Linear(1, 1)}) == {"w": torch.ones(1)}


# ---------------------------------------------------------------------------------------------- Hugging Face
def hugging_face_folder(folder, model: nn.Module) -> None:
    """``save_pretrained``'s layout: shards plus ``model.safetensors.index.json``."""
    state = model.state_dict()
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, names in shards.items():
        save_safetensors({key: state[key].contiguous() for key in names}, str(folder / name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map = {key: name for name, names in shards.items() for key in names}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_hugging_face_sharded_safetensors(fabric, tmp_path):
    model = make_net(seed=6)
    hugging_face_folder(tmp_path / "hf", model)
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors.index.json"):
        target = make_net(seed=7)
        fabric.load_raw(path, target)
        assert_same_state(snapshot(target), snapshot(model))
    target = make_net(seed=8)
    assert fabric.load(tmp_path / "hf", {"model": target}) == {}
    assert_same_state(snapshot(target), snapshot(model))
    fabric_ckpt.convert(tmp_path / "hf", tmp_path / "one.safetensors")
    assert_same_state(load_safetensors(str(tmp_path / "one.safetensors")), snapshot(model))
    assert fabric_ckpt.describe(tmp_path / "hf").format == "hf-safetensors"


def test_remote_hugging_face_index(fabric, tmp_path):
    model = make_net(seed=6)
    hugging_face_folder(tmp_path / "hf", model)
    fs = fsspec.filesystem("memory")
    for file in (tmp_path / "hf").iterdir():
        fs.pipe(f"/hub/{file.name}", file.read_bytes())
    target = make_net(seed=7)
    fabric.load_raw("memory://hub/model.safetensors.index.json", target)
    assert_same_state(snapshot(target), snapshot(model))
    assert fabric_ckpt.verify("memory://hub").ok


def test_hugging_face_index_errors_name_the_file(fabric, tmp_path):
    hugging_face_folder(tmp_path / "hf", make_net())
    index = tmp_path / "hf" / "model.safetensors.index.json"
    shutil.move(tmp_path / "hf" / "model-00002-of-00002.safetensors", tmp_path / "elsewhere.safetensors")
    with pytest.raises(
        CheckpointError, match=re.escape("names the shard 'model-00002-of-00002.safetensors', which does not")
    ):
        fabric.load_raw(index, make_net())
    body = json.loads(index.read_text())
    body["weight_map"]["fc1.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(body))
    with pytest.raises(
        CheckpointError, match=re.escape("maps 'fc1.weight' to '../elsewhere.safetensors', which is not")
    ):
        fabric.load_raw(index, make_net())
    index.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(CheckpointError, match="without the 'weight_map' of a Hugging Face index"):
        fabric.load_raw(index, make_net())


def test_converted_weights_are_bitwise_equal_across_dtypes(tmp_path):
    state = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "view": torch.arange(10.0)[2:8:2],
    }
    fabric_ckpt.formats.save_file(tmp_path / "mixed.pt", state)
    fabric_ckpt.convert(tmp_path / "mixed.pt", tmp_path / "mixed.safetensors")
    loaded = load_safetensors(str(tmp_path / "mixed.safetensors"))
    assert loaded.keys() == state.keys()
    assert all(bitwise_equal(loaded[key], state[key]) for key in state)
