"""Other tools' layouts in both directions (issue 17): Lightning's sharded folders load completely (``meta.pt``
included) and a folder of ours converts into one that Lightning's own ModelParallelStrategy loads; a checkpoint of
ours converts into Composer's layout, which ``torch.load(p)["state"]["model"]`` and Composer's RNG calls read.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fabric_ckpt
from fabric_ckpt import Fabric, FSDPStrategy, RNGState, Timestamp
from fabric_ckpt.tools.cli import main as cli
from tests.conftest import assert_same_state, bitwise_equal, make_net, snapshot, trained
from tests.distributed import WorkerGroup

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from lightning.fabric.strategies import ModelParallelStrategy

    from tests.test_lightning_strategies import new_model, sharded_fabric, train

HPARAMS = {"lr": 0.01, "name": "run", "layers": [8, 16, 4]}


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


# ---------------------------------------------------------------------------------------------- cases (run on ranks)
def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full weights and the full FQN-keyed optimizer state (gathered to rank 0; other ranks get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    model = getattr(model, "module", model)  # Lightning's and our wrappers: names as the user's module has them
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    weights = {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    moments = {
        f"{fqn}.{name}": value.clone()
        for fqn, state in optimizer_state.get("state", {}).items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    return {"weights": weights, "moments": moments}


def lightning_saves(path: str) -> dict:
    """Lightning's own ModelParallelStrategy writes its sharded layout: DCP files and meta.pt."""
    fabric, model, optimizer = sharded_fabric(ModelParallelStrategy)
    train(fabric, model, optimizer, 2)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3, "hparams": HPARAMS})
    return full_state(model, optimizer)


def lightning_loads(path: str) -> dict:
    """Lightning's own ModelParallelStrategy loads a folder (ours, converted)."""
    fabric, model, optimizer = sharded_fabric(ModelParallelStrategy)
    remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
    return {**full_state(model, optimizer), "remainder": remainder}


def our_fsdp_saves(path: str) -> dict:
    fabric = Fabric(strategy=FSDPStrategy(accelerator="cpu", auto_wrap_policy={nn.Linear}))
    fabric.launch()
    module = new_model()
    model, optimizer = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=0.01))
    generator = torch.Generator().manual_seed(7 + fabric.global_rank)
    for _ in range(2):
        loss = model(torch.randn(4, 8, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3, "hparams": HPARAMS})
    return full_state(model, optimizer)


def our_fsdp_loads(path: str) -> dict:
    fabric = Fabric(strategy=FSDPStrategy(accelerator="cpu", auto_wrap_policy={nn.Linear}))
    fabric.launch()
    module = new_model()
    model, optimizer = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=0.01))
    remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
    return {**full_state(model, optimizer), "remainder": remainder}


# ---------------------------------------------------------------------------------------------- Lightning
def moments_by_fqn(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        f"{names[id(param)]}.{name}": value
        for param, state in optimizer.state.items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def test_a_lightning_sharded_folder_loads_completely_meta_pt_included(group, tmp_path):
    path = str(tmp_path / "lightning")
    saved = group.run(lightning_saves, path)[0]
    assert sorted(p.name for p in (tmp_path / "lightning").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    model = new_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    remainder = Fabric(accelerator="cpu").load(path, {"model": model, "optimizer": optimizer})
    assert remainder == {"step": 3, "hparams": HPARAMS}  # meta.pt's entries, not only the tensors
    assert_same_state(snapshot(model), saved["weights"])
    assert_same_state(moments_by_fqn(model, optimizer), saved["moments"])
    everything = Fabric(accelerator="cpu").load(path)
    assert (everything["step"], everything["hparams"]) == (3, HPARAMS)
    description = fabric_ckpt.describe(path)
    assert description.format == "lightning-sharded" and description.entries()["hparams/name"] == "run"
    assert fabric_ckpt.verify(path).ok
    results = group.run(our_fsdp_loads, path)  # and on our FSDP ranks
    assert [result["remainder"] for result in results] == [{"step": 3, "hparams": HPARAMS}] * 2
    assert_same_state(results[0]["weights"], saved["weights"])
    assert_same_state(results[0]["moments"], saved["moments"])


def test_lightning_loads_a_folder_of_ours_converted_to_its_layout(group, tmp_path, capsys):
    ours = str(tmp_path / "ours")
    saved = group.run(our_fsdp_saves, ours)[0]
    assert cli(["convert", ours, f"{tmp_path}/for-lightning/", "--to", "lightning"]) == 0
    assert "wrote" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "for-lightning").iterdir())
    assert names == [".metadata", "__0_0.distcp", "meta.pt"]  # Lightning's layout: no manifest, no generation
    assert torch.load(tmp_path / "for-lightning" / "meta.pt", weights_only=True) == {"step": 3, "hparams": HPARAMS}
    results = group.run(lightning_loads, str(tmp_path / "for-lightning"))
    assert [result["remainder"] for result in results] == [{"step": 3, "hparams": HPARAMS}] * 2
    assert_same_state(results[0]["weights"], saved["weights"])
    assert_same_state(results[0]["moments"], saved["moments"])
    assert fabric_ckpt.diff(ours, tmp_path / "for-lightning").equal  # and we read it back as it was


def test_converting_to_lightnings_layout_refuses_what_lightning_could_not_load(tmp_path):
    model, optimizer = trained(seed=1)
    Fabric(accelerator="cpu").save(tmp_path / "single.ckpt", {"model": model, "optimizer": optimizer})
    with pytest.raises(ValueError, match="keyed by parameter index"):
        fabric_ckpt.convert(tmp_path / "single.ckpt", f"{tmp_path}/out/", to="lightning")
    assert not (tmp_path / "out").exists()
    Fabric(accelerator="cpu").save(tmp_path / "weights.ckpt", {"model": model, "step": 1})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):  # Lightning's layout has no manifest to commit a replacement by
        fabric_ckpt.convert(tmp_path / "weights.ckpt", f"{tmp_path}/taken/", to="lightning")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    fabric_ckpt.convert(tmp_path / "weights.ckpt", f"{tmp_path}/fresh/", to="lightning")
    assert Fabric(accelerator="cpu").load(tmp_path / "fresh")["step"] == 1


# ---------------------------------------------------------------------------------------------- Composer
def test_our_checkpoint_converts_to_composers_layout(tmp_path):
    model, optimizer = trained(seed=2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    scheduler.step()
    timestamp = Timestamp(epoch=2, batch=10, batch_in_epoch=4, sample=40, sample_in_epoch=16)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "timestamp": timestamp,
        "rng": RNGState(),
        "run_name": "r1",
    }
    Fabric(accelerator="cpu").save(tmp_path / "ours.ckpt", state)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    assert cli(["convert", "-q", str(tmp_path / "ours.ckpt"), str(tmp_path / "composer.pt"), "--to", "composer"]) == 0

    composer = torch.load(tmp_path / "composer.pt")  # torch's default, weights_only=True, as users' scripts load it
    assert set(composer) == {"state", "rng"}
    assert_same_state(composer["state"]["model"], snapshot(model))
    assert composer["state"]["optimizers"]["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert composer["state"]["schedulers"]["scheduler"] == scheduler.state_dict()
    assert composer["state"]["timestamp"]["batch"] == 10 and "total_wct" not in composer["state"]["timestamp"]
    assert composer["state"]["run_name"] == "r1"
    rank = composer["rng"][0]  # what Composer's reproducibility.load_rng_state hands to each generator
    random.setstate(rank["python"])
    np.random.set_state(rank["numpy"])
    torch.set_rng_state(rank["torch"])
    assert (random.random(), np.random.rand()) == draws[:2] and bitwise_equal(torch.rand(1), draws[2])

    target, target_optimizer = trained(seed=9)
    restored = Timestamp()
    Fabric(accelerator="cpu").load(  # and back: Composer's layout is read as such
        tmp_path / "composer.pt", {"model": target, "optimizer": target_optimizer, "timestamp": restored}, strict=False
    )
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))
    assert (restored.epoch, restored.batch, restored.sample) == (2, 10, 40)


def test_composers_layout_is_a_single_file(tmp_path):
    Fabric(accelerator="cpu").save(tmp_path / "ours.ckpt", {"model": make_net(0)})
    for output in ("w.safetensors", "folder/"):
        with pytest.raises(ValueError, match="Composer's layout is a single file"):
            fabric_ckpt.convert(tmp_path / "ours.ckpt", f"{tmp_path}/{output}", to="composer")
