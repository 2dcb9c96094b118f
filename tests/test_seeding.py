"""seed_everything: Lightning's rules (return value, environment variables, bounds) and the very same random numbers."""

from __future__ import annotations

import logging
import os
import random
from functools import partial

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fabric_ckpt import Fabric, seed_everything
from fabric_ckpt.training.seeding import reset_seed, worker_init_function

lightning_seed = pytest.importorskip("lightning.fabric.utilities.seed")


@pytest.fixture(autouse=True)
def _no_seed_in_the_environment():
    # Each test starts without a seed in the environment (tests/conftest.py restores it afterwards).
    os.environ.pop("PL_GLOBAL_SEED", None)
    os.environ.pop("PL_SEED_WORKERS", None)


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(numpy.random.rand()), torch.rand(3).tolist()


def test_returns_the_seed_and_sets_lightnings_environment_variables():
    assert seed_everything(1234) == 1234
    assert os.environ["PL_GLOBAL_SEED"] == "1234" and os.environ["PL_SEED_WORKERS"] == "0"
    assert seed_everything(5, workers=True) == 5
    assert os.environ["PL_SEED_WORKERS"] == "1"


def test_seeds_python_numpy_and_torch_exactly_as_lightning_does():
    seed_everything(2024)
    ours = draws()
    lightning_seed.seed_everything(2024, verbose=False)
    assert draws() == ours
    seed_everything(2024)
    assert draws() == ours


def test_without_a_seed_the_environment_decides_or_zero_with_a_warning(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "77")
    assert seed_everything() == 77
    monkeypatch.delenv("PL_GLOBAL_SEED")
    with pytest.warns(UserWarning, match="seed set to 0"):
        assert seed_everything() == 0
    assert seed_everything(verbose=False) == 0  # the warning is part of the verbose output


def test_a_bad_environment_seed_is_named(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "not-a-number")
    with pytest.raises(ValueError, match=r"\$PL_GLOBAL_SEED='not-a-number' is not an integer seed"):
        seed_everything()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_out_of_range_seeds_are_refused_with_the_bounds(seed):
    with pytest.raises(ValueError, match=rf"seed={seed} is out of range: seeds go from 0 to 4294967295"):
        seed_everything(seed)
    assert "PL_GLOBAL_SEED" not in os.environ  # nothing was seeded


def test_the_bounds_themselves_and_int_like_values_are_accepted():
    assert seed_everything(0) == 0 and seed_everything(2**32 - 1) == 2**32 - 1
    assert seed_everything("42") == 42 and seed_everything(7.9) == 7  # int(), as Lightning


def test_verbose_logs_the_seed_with_the_rank_a_launcher_set(caplog, monkeypatch):
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)
    with caplog.at_level(logging.INFO, logger="fabric_ckpt.training.seeding"):
        seed_everything(3)
        seed_everything(4, verbose=False)
        monkeypatch.setenv("RANK", "1")
        seed_everything(5)
    assert [record.getMessage() for record in caplog.records] == ["Seed set to 3", "[rank: 1] Seed set to 5"]


def test_reset_seed_starts_the_generators_over():
    seed_everything(11, workers=True)
    first = draws()
    reset_seed()
    assert draws() == first and os.environ["PL_SEED_WORKERS"] == "1"


def test_fabric_seed_everything_delegates_and_seeds_workers_by_default():
    assert Fabric.seed_everything(9) == 9
    assert os.environ["PL_SEED_WORKERS"] == "1"  # Lightning's Fabric.seed_everything defaults to workers=True
    first = draws()
    assert Fabric.seed_everything(9, workers=False) == 9
    assert draws() == first and os.environ["PL_SEED_WORKERS"] == "0"


def test_a_worker_is_seeded_as_lightnings_worker_init_function_seeds_it():
    torch.manual_seed(1000 + 2)  # what DataLoader gives worker 2 of a loader whose base seed is 1000
    worker_init_function(2, rank=3)
    ours = draws()
    torch.manual_seed(1000 + 2)
    lightning_seed.pl_worker_init_function(2, rank=3)
    assert draws() == ours
    torch.manual_seed(1000 + 2)
    worker_init_function(2, rank=4)
    assert draws() != ours  # another rank draws other numbers


class RandomDataset(Dataset):
    """Each item draws from all three generators inside the worker."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([random.random(), float(numpy.random.rand()), torch.rand(1).item()], dtype=torch.float64)


def worker_batches(fabric, seed: int) -> list[torch.Tensor]:
    fabric.seed_everything(seed)
    loader = fabric.setup_dataloaders(DataLoader(RandomDataset(), batch_size=2, num_workers=2))
    return list(loader)


def test_setup_dataloaders_seeds_workers_as_lightning_does():
    from lightning.fabric import Fabric as LightningFabric

    ours = worker_batches(Fabric(accelerator="cpu"), 5)
    theirs = worker_batches(LightningFabric(accelerator="cpu", devices=1), 5)
    assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_loaders_own_worker_init_fn_is_kept(fabric):
    def own(worker_id: int) -> None:
        pass

    fabric.seed_everything(1)
    kept = fabric.setup_dataloaders(DataLoader(RandomDataset(), num_workers=1, worker_init_fn=own))
    assert kept.worker_init_fn is own
    added = fabric.setup_dataloaders(DataLoader(RandomDataset(), num_workers=1))
    assert isinstance(added.worker_init_fn, partial) and added.worker_init_fn.func is worker_init_function
    fabric.seed_everything(1, workers=False)
    assert fabric.setup_dataloaders(DataLoader(RandomDataset(), num_workers=1)).worker_init_fn is None
