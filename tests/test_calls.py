"""The calls real Lightning Fabric programs make, in one process: loggers, init_module/init_tensor, rank_zero_first,
collectives on Python numbers, and Lightning's own utilities that take a Fabric."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy
import pytest
import torch
from torch import nn

from fabric_ckpt import Fabric, SingleDeviceStrategy
from tests.conftest import Net

lightning = pytest.importorskip("lightning")
from lightning.fabric import Fabric as LightningFabric  # noqa: E402
from lightning.fabric.loggers import CSVLogger  # noqa: E402


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.calls.append((metrics, step))


# ---------------------------------------------------------------------------------------------------- loggers
def test_logger_and_loggers_are_what_fabric_was_given():
    first, second = Recorder(), Recorder()
    fabric = Fabric(accelerator="cpu", loggers=[first, second])
    assert fabric.loggers == [first, second] and fabric.logger is first
    assert Fabric(accelerator="cpu", loggers=first).loggers == [first]
    with pytest.raises(IndexError, match=r"no logger; pass one with Fabric\(loggers=...\)"):
        _ = Fabric(accelerator="cpu").logger


def test_log_dict_sends_numbers_also_from_nested_tensors():
    recorder = Recorder()
    fabric = Fabric(accelerator="cpu", loggers=recorder)
    fabric.log_dict({"loss": torch.tensor(0.5), "parts": {"a": torch.tensor([2])}, "lr": 0.1}, step=4)
    assert recorder.calls == [({"loss": 0.5, "parts": {"a": 2}, "lr": 0.1}, 4)]
    with pytest.raises(ValueError, match=r"metric 'per_class' is a tensor of shape \(3,\)"):
        fabric.log("per_class", torch.ones(3))
    assert len(recorder.calls) == 1


def test_lightnings_csv_logger_writes_what_fabric_logs(tmp_path):
    fabric = Fabric(accelerator="cpu", loggers=CSVLogger(tmp_path, name="run", version=0))
    fabric.log("loss", torch.tensor(0.75), step=0)
    fabric.log_dict({"loss": torch.tensor(0.5), "acc": 0.25}, step=1)
    fabric.logger.finalize("success")  # as under Lightning, the program finalises its logger
    with open(Path(fabric.logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows == [
        {"loss": "0.75", "step": "0", "acc": ""},
        {"loss": "0.5", "step": "1", "acc": "0.25"},
    ]


def test_hyperparameters_go_through_fabric_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger as TrainerCSVLogger

    fabric = Fabric(accelerator="cpu", loggers=TrainerCSVLogger(tmp_path, name="run", version=0))
    fabric.logger.log_hyperparams({"lr": 0.01, "layers": 4})
    fabric.logger.save()
    assert (Path(fabric.logger.log_dir) / "hparams.yaml").read_text().splitlines() == ["layers: 4", "lr: 0.01"]


def test_lightnings_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.fabric.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fabric = Fabric(accelerator="cpu", loggers=TensorBoardLogger(tmp_path, name="run", version=0))
    fabric.logger.log_hyperparams({"lr": 0.01})
    fabric.log_dict({"loss": torch.tensor(0.5)}, step=3)
    fabric.logger.finalize("success")
    events = EventAccumulator(fabric.logger.log_dir)
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [(3, 0.5)]


# ---------------------------------------------------------------------------------------------------- init
def test_init_module_with_empty_init_allocates_on_the_device_without_initialising():
    fabric = Fabric(accelerator="cpu")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with fabric.init_module(empty_init=True):
        model = Net()
    assert torch.equal(torch.get_rng_state(), before)  # no initialiser drew a random number
    assert all(p.device == fabric.device and not p.is_meta for p in model.parameters())
    assert model.scale.item() == 2.0  # tensors built from data are still made as written


@pytest.mark.parametrize("empty_init", [None, False])
def test_init_module_otherwise_initialises_as_usual(empty_init):
    fabric = Fabric(accelerator="cpu")
    torch.manual_seed(0)
    with fabric.init_module(empty_init=empty_init):
        created = Net()
    torch.manual_seed(0)
    expected = Net()
    pairs = zip(created.state_dict().values(), expected.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_init_tensor_and_init_module_use_the_strategys_device():
    fabric = Fabric(strategy=SingleDeviceStrategy("meta"))  # a device no tensor lands on by accident
    with fabric.init_tensor():
        mask = torch.ones(4, 4)
    with fabric.init_module():
        layer = nn.Linear(2, 2)
    assert mask.is_meta and layer.weight.is_meta
    assert not torch.ones(1).is_meta  # the default device is back after the block


def test_rank_zero_first_runs_the_block_in_one_process(fabric):
    ran = []
    for local in (False, True):
        with fabric.rank_zero_first(local=local):
            ran.append(local)
    assert ran == [False, True]


# ---------------------------------------------------------------------------------------------------- collectives
COLLECTION = {"count": 3, "loss": 0.5, "done": True, "array": numpy.arange(3), "nested": [1, (2.5, "tag")]}


def described(data):
    if isinstance(data, torch.Tensor):
        return (data.dtype, data.tolist())
    if isinstance(data, dict):
        return {key: described(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(described(value) for value in data)
    return data


@pytest.mark.parametrize("call", ["all_gather", "all_reduce"])
def test_single_process_collectives_make_tensors_as_lightning_does(fabric, call):
    ours = getattr(fabric, call)(COLLECTION)
    theirs = getattr(LightningFabric(accelerator="cpu", devices=1), call)(COLLECTION)
    assert described(ours) == described(theirs)
    assert described(ours)["count"] == (torch.int32, 3) and described(ours)["done"] == (torch.uint8, 1)
    assert described(ours)["nested"][1] == ((torch.float32, 2.5), "tag")


def test_broadcast_in_one_process_returns_the_object(fabric):
    assert fabric.broadcast(COLLECTION) is COLLECTION


# ---------------------------------------------------------------------------------------------- Lightning's utilities
def test_lightnings_throughput_with_fabric_log_dict():
    """The way the migration guide gives for ThroughputMonitor: Lightning's Throughput plus fabric.log_dict."""
    from lightning.fabric.utilities.throughput import Throughput

    recorder = Recorder()
    fabric = Fabric(accelerator="cpu", loggers=recorder)
    throughput = Throughput(world_size=fabric.world_size, window_size=2)
    for step in (1, 2):
        throughput.update(time=float(step), batches=step, samples=4 * step)
    fabric.log_dict(throughput.compute(), step=2)
    expected = {"time": 2.0, "batches": 2, "samples": 8, "device/batches_per_sec": 1.0, "device/samples_per_sec": 4.0}
    assert recorder.calls == [(expected, 2)]


class Steps(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()


def test_is_overridden_and_unwrap_objects_see_the_users_module(fabric):
    from lightning.fabric.wrappers import _unwrap_objects
    from lightning.pytorch.utilities.model_helpers import is_overridden

    model = fabric.setup(Steps())
    for candidate in (model, _unwrap_objects(model)):
        assert is_overridden("training_step", candidate, lightning.LightningModule)
        assert not is_overridden("validation_step", candidate, lightning.LightningModule)
