"""Exact resume of the data position: set-up loaders interrupted at random batches continue with the very next one.

Each run reads 3 epochs; an interrupted run saves after randomly chosen batches, then goes on with a fresh loader and
other global random state restored from the checkpoint. The batches consumed over the whole run (the items' indices
and the random draws made while reading them) must be the uninterrupted run's, one for one. The 2-rank runs use a
real gloo group, each rank reading its part through a ``DistributedSampler``.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from tests import loader_cases as cases
from tests.distributed import WorkerGroup
from tests.reliability_figures import full_campaign

CHAINS = 4 if full_campaign() else 1  # interrupted runs per loader kind, each with its own random batches
SEED = random.randrange(1 << 30)


def random_stops(rng: random.Random, per_epoch: int, count: int = 4) -> list[int]:
    """``count`` batch counts to stop after, one of them the last batch of an epoch."""
    total = per_epoch * cases.EPOCHS
    stops = set(rng.sample(range(1, total), count - 1)) | {per_epoch * rng.randint(1, cases.EPOCHS - 1)}
    return sorted(stops)


@pytest.mark.parametrize("kind", ["shuffle", "sequential", "generator", "workers", "stream", "batch-sampler"])
def test_a_loader_interrupted_at_random_batches_yields_the_uninterrupted_sequence(fabric, tmp_path, kind):
    uninterrupted = cases.run(fabric, kind, [], str(tmp_path))
    rng = random.Random(f"{SEED}-{kind}")
    for _ in range(CHAINS):
        stops = random_stops(rng, cases.batches_per_epoch(kind))
        interrupted = cases.run(fabric, kind, stops, str(tmp_path))
        assert interrupted == uninterrupted, f"stops {stops} (seed {SEED})"
    assert len(uninterrupted) == cases.EPOCHS * cases.batches_per_epoch(kind)


def test_state_saved_at_the_end_of_an_epoch_resumes_at_the_start_of_the_next(fabric, tmp_path):
    uninterrupted = cases.run(fabric, "shuffle", [], str(tmp_path))
    assert cases.run(fabric, "shuffle", [], str(tmp_path), epoch_end_stops=[1, 2]) == uninterrupted
    loader = fabric.setup_dataloaders(cases.make_loader("sequential"))
    for _ in loader:
        pass
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 0

    # Saved after the last batch while the loop still runs: that pass ends at once, the next one is the next epoch.
    iterator = iter(loader)
    last = [next(iterator) for _ in range(len(loader))][-1]
    position = loader.state_dict()
    assert (position["epoch"], position["batches"]) == (1, len(loader))
    resumed = fabric.setup_dataloaders(cases.make_loader("sequential"))
    resumed.load_state_dict(position)
    assert list(resumed) == []
    assert resumed.state_dict()["epoch"] == 2 and len(list(resumed)) == len(loader)
    assert last[0, 0].item() == 9.0


def test_the_rest_of_the_epoch_comes_from_the_loaders_own_state_not_the_global_rng(fabric, tmp_path):
    per_epoch = cases.batches_per_epoch("shuffle")
    stop = per_epoch + 2  # the third batch of the second epoch
    runs = cases.rest_of_epoch_from_own_state(fabric, "shuffle", stop, str(tmp_path))
    interrupted, uninterrupted = cases.indices(runs["interrupted"]), cases.indices(runs["uninterrupted"])
    assert interrupted == uninterrupted
    assert len(interrupted) == 2 * per_epoch


def test_a_set_up_stateful_dataloader_keeps_its_own_state_and_the_epoch(fabric, tmp_path):
    uninterrupted = cases.run(fabric, "stateful", [], str(tmp_path))
    stops = random_stops(random.Random(f"{SEED}-stateful"), cases.batches_per_epoch("stateful"))
    interrupted = cases.run(fabric, "stateful", stops, str(tmp_path))
    # torchdata's loader reads its items again as it resumes (other draws): its batches' indices are what it keeps.
    assert cases.indices(interrupted) == cases.indices(uninterrupted), f"stops {stops} (seed {SEED})"
    loader = fabric.setup_dataloaders(cases.make_loader("stateful"))
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 1) and state["loader"]["_num_yielded"] == 1


def test_a_raw_stateful_dataloader_in_the_state_works_unchanged(fabric, tmp_path):
    uninterrupted = cases.run(fabric, "stateful", [], str(tmp_path), set_up=False)
    stops = random_stops(random.Random(f"{SEED}-raw"), cases.batches_per_epoch("stateful"))
    interrupted = cases.run(fabric, "stateful", stops, str(tmp_path), set_up=False)
    assert cases.indices(interrupted) == cases.indices(uninterrupted), f"stops {stops} (seed {SEED})"


def test_a_loader_position_saved_before_positions_existed_still_loads(fabric):
    # Checkpoints of set-up StatefulDataLoaders used to hold the wrapped loader's own state dict as it is.
    torch.manual_seed(0)
    plain = StatefulDataLoader(cases.Noisy(8), batch_size=2, shuffle=True)
    iterator = iter(plain)
    next(iterator)
    old_state = plain.state_dict()
    expected = [batch[:, 0].tolist() for batch in iterator]
    torch.manual_seed(5)
    loader = fabric.setup_dataloaders(StatefulDataLoader(cases.Noisy(8), batch_size=2, shuffle=True))
    loader.load_state_dict(old_state)
    assert [batch[:, 0].tolist() for batch in loader] == expected


def test_a_bad_position_is_refused_before_anything_changes(fabric, tmp_path):
    loader = fabric.setup_dataloaders(DataLoader(cases.Noisy(10), batch_size=2))
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "loader": {"format": "fabric_ckpt.loader/1", "epoch": 1, "batches": 6}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"position \(epoch 1, after batch 6\) lies beyond this loader's 5 batches"):
        fabric.load(path, {"model": model, "loader": loader})
    assert all(torch.equal(changed[k], v) for k, v in model.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [batch[0, 0].item() for batch in loader] == [0.0, 2.0, 4.0, 6.0, 8.0]  # the loader is as it was

    with pytest.raises(ValueError, match=r"not a position saved by a loader from fabric.setup_dataloaders"):
        loader.load_state_dict({"_num_yielded": 3})
    with pytest.raises(ValueError, match=r"batches=-1; it must be an int >= 0"):
        loader.load_state_dict({"format": "fabric_ckpt.loader/1", "epoch": 0, "batches": -1})
    with pytest.raises(ValueError, match=r"holds 0 generator state\(s\) of its own, but this loader .* have 1"):
        with_generator = fabric.setup_dataloaders(
            DataLoader(cases.Noisy(10), batch_size=2, shuffle=True, generator=torch.Generator())
        )
        iterator = iter(loader)
        next(iterator)
        with_generator.load_state_dict(loader.state_dict())


def test_a_position_from_another_number_of_processes_warns_and_keeps_the_batch(fabric):
    loader = fabric.setup_dataloaders(DataLoader(cases.Noisy(10), batch_size=2))
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    state["pass_start"] = state["pass_start"] * 2
    resumed = fabric.setup_dataloaders(DataLoader(cases.Noisy(10), batch_size=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(state)
    assert any("saved by 2 process(es) and is resumed by 1" in str(w.message) for w in caught)
    assert [batch[0, 0].item() for batch in resumed] == [2.0, 4.0, 6.0, 8.0]


def test_a_loader_is_saved_as_plain_data_never_pickled(fabric, tmp_path):
    loader = fabric.setup_dataloaders(DataLoader(cases.Noisy(10), batch_size=2, shuffle=True))
    iterator = iter(loader)
    next(iterator)
    fabric.save(tmp_path / "ckpt.pt", {"loader": loader})
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    assert (saved["epoch"], saved["batches"]) == (0, 1) and len(saved["pass_start"]) == 1


# ---------------------------------------------------------------------------------------------------- 2 ranks
@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


@pytest.mark.parametrize("kind", ["shuffle", "stateful"])
def test_two_ranks_interrupted_at_random_batches_yield_the_uninterrupted_sequences(group, tmp_path, kind):
    per_epoch = cases.batches_per_epoch(kind, world_size=2)
    uninterrupted = group.run(cases.distributed_run, kind, [], str(tmp_path))
    rng = random.Random(f"{SEED}-ddp-{kind}")
    for chain in range(CHAINS):
        stops = random_stops(rng, per_epoch)
        (tmp_path / f"chain{chain}").mkdir()
        interrupted = group.run(cases.distributed_run, kind, stops, str(tmp_path / f"chain{chain}"), [2])
        for rank in range(2):
            expected, got = uninterrupted[rank], interrupted[rank]
            if kind == "stateful":  # torchdata's loader keeps the indices (see the single-process test)
                expected, got = cases.indices(expected), cases.indices(got)
            assert got == expected, f"rank {rank}, stops {stops} (seed {SEED})"
    # Each rank reads its own half of the epoch (23 items padded to 24 by the sampler) in its own order.
    halves = [[i for batch in cases.indices(uninterrupted[rank][:per_epoch]) for i in batch] for rank in range(2)]
    assert len(halves[0]) == len(halves[1]) == 12 and set(halves[0]) | set(halves[1]) == set(range(23))
