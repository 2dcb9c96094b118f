"""CheckpointManager: names, intervals, latest, resuming, fallback, retention, overwrite and shared timestamps."""

from __future__ import annotations

import json
import os
import random
import re
import warnings

import fsspec
import numpy
import pytest
import torch
from torch import nn

from fabric_ckpt import CheckpointError, CheckpointMismatchError
from fabric_ckpt.core.timestamp import Timestamp
from fabric_ckpt.formats import sharded
from fabric_ckpt.manager import FORMAT_VARIABLES, CheckpointManager
from fabric_ckpt.storage import resolve
from tests.conftest import assert_same_state, snapshot

BATCHES = 4
MEMORY = fsspec.filesystem("memory")


class DropNet(nn.Module):
    """Dropout makes every step depend on torch's RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def build(seed: int) -> dict:
    torch.manual_seed(seed)
    model = DropNet()
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=0.01)}


def seed_all(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def train(manager: CheckpointManager, state: dict, epochs: int, losses: list[float] | None = None) -> list[float]:
    """Train until ``manager.timestamp.epoch == epochs``; inputs draw from torch, Python and NumPy RNGs."""
    losses = [] if losses is None else losses
    while manager.timestamp.epoch < epochs:
        for _ in range(BATCHES):
            inputs = torch.rand(8, 4) + random.random() + float(numpy.random.rand())
            loss = state["model"](inputs).pow(2).mean()
            state["optimizer"].zero_grad()
            loss.backward()
            state["optimizer"].step()
            losses.append(loss.item())
            manager.on_batch_end(state, samples=8, tokens=32)
        manager.on_epoch_end(state)
    return losses


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path) -> str:
    return str(tmp_path / "ckpt") if request.param == "local" else "memory://runs/ckpt"


def listing(folder: str) -> list[str]:
    """Every file and folder under ``folder``, recursively, relative to it."""
    if folder.startswith("memory://"):
        base = "/" + folder[len("memory://") :] + "/"
        return sorted(path[len(base) :] for path in MEMORY.find(base, withdirs=True) if path.startswith(base))
    found = []
    for parent, folders, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, name), folder) for name in folders + files]
    return sorted(found)


def read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def epochs(manager: CheckpointManager, state: dict, count: int) -> list[str | None]:
    """End ``count`` epochs without training (one batch each); the saved paths."""
    saved = []
    for _ in range(count):
        manager.on_batch_end(state)
        saved.append(manager.on_epoch_end(state))
    return saved


# ---------------------------------------------------------------------------------------------- names
def test_every_format_variable(tmp_path, fabric, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    filename = "-".join(f"{{{name}}}" for name in FORMAT_VARIABLES)
    manager = CheckpointManager(
        fabric, tmp_path / "{run_name}", filename=filename, save_interval="3ba", run_name="exp", overwrite=True
    )
    for _ in range(2):
        manager.on_batch_end({}, samples=4, tokens=10)
    manager.on_epoch_end({})
    path = manager.on_batch_end({}, samples=5, tokens=20)
    # run_name, rank, local_rank, world_size, local_world_size, node_rank, epoch, batch, batch_in_epoch, sample,
    # sample_in_epoch, token, token_in_epoch, total_wct, epoch_wct, batch_wct (wall clock in whole seconds)
    clocks = [int(manager.timestamp.total_wct), int(manager.timestamp.epoch_wct), int(manager.timestamp.batch_wct)]
    assert path == str(tmp_path / "exp" / ("exp-0-0-1-1-0-1-3-1-13-5-40-20-" + "-".join(map(str, clocks))))
    assert os.path.isfile(path) and os.readlink(tmp_path / "exp" / "latest-rank0") == os.path.basename(path)


def test_format_specs_and_subfolders(tmp_path, fabric):
    manager = CheckpointManager(
        fabric, tmp_path, filename="{run_name}/ep{epoch:03d}.pt", latest_filename="{run_name}/latest", run_name="r"
    )
    path = epochs(manager, {"model": nn.Linear(1, 1)}, 1)[0]
    assert path == str(tmp_path / "r" / "ep001.pt")
    assert os.readlink(tmp_path / "r" / "latest") == "ep001.pt"


def test_run_name_from_env_or_generated(tmp_path, fabric, monkeypatch):
    monkeypatch.setenv("RUN_NAME", "from-env")
    assert CheckpointManager(fabric, tmp_path).run_name == "from-env"
    monkeypatch.delenv("RUN_NAME")
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", CheckpointManager(fabric, tmp_path).run_name)


def test_local_world_size_comes_from_the_environment(tmp_path, fabric, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    manager = CheckpointManager(fabric, tmp_path, filename="w{local_world_size}-{world_size}")
    assert manager.save({}) == str(tmp_path / "w8-1")


@pytest.mark.parametrize("option", ["folder", "filename", "latest_filename"])
def test_unknown_format_variables_are_rejected(tmp_path, fabric, option):
    kwargs = {"folder": str(tmp_path), option: str(tmp_path / "{step}") if option == "folder" else "x-{step}"}
    pattern = kwargs[option]
    message = f"{option}={pattern!r} uses the unknown format variable {{step}}; the variables are " + ", ".join(
        FORMAT_VARIABLES
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CheckpointManager(fabric, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"filename": "../escape-{epoch}"},
            "filename='../escape-{epoch}' gives '../escape-0', which is not a name inside the folder",
        ),
        ({"filename": "a/../../b"}, "filename='a/../../b' gives 'a/../../b', which is not a name inside the folder"),
        ({"filename": "/etc/ep{epoch}"}, "filename='/etc/ep{epoch}' gives '/etc/ep0', which is not a name inside"),
        ({"latest_filename": "../latest"}, "latest_filename='../latest' gives '../latest', which is not a name"),
        ({"filename": "x/"}, "filename='x/' gives 'x/', which is not a name inside the folder"),
        ({"run_name": ".."}, "run_name='..' must be a non-empty name without '/'"),
        ({"run_name": "a/../.."}, "run_name='a/../..' must be a non-empty name without '/'"),
        (
            {"latest_filename": "ep{epoch}-ba{batch}-rank{rank}"},
            "latest_filename='ep{epoch}-ba{batch}-rank{rank}' names",
        ),
        ({"filename": "ep{epoch:q}"}, "filename='ep{epoch:q}' cannot be formatted: Unknown format code 'q'"),
    ],
)
def test_names_outside_the_folder_are_refused(tmp_path, fabric, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        CheckpointManager(fabric, tmp_path / "inner", **kwargs)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- intervals
def saves_with(fabric, tmp_path, interval, batches: int = 8, per_epoch: int = 4) -> list[tuple[int, int]]:
    """(epoch, batch) of every save in ``batches`` batches of 4 samples and 10 tokens."""
    manager = CheckpointManager(fabric, tmp_path, filename="ep{epoch}-ba{batch}", save_interval=interval)
    saved = []
    for batch in range(1, batches + 1):
        if manager.on_batch_end({}, samples=4, tokens=10):
            saved.append((manager.timestamp.epoch, manager.timestamp.batch))
        if batch % per_epoch == 0 and manager.on_epoch_end({}):
            saved.append((manager.timestamp.epoch, manager.timestamp.batch))
    return saved


@pytest.mark.parametrize(
    "interval, expected",
    [
        (1, [(1, 4), (2, 8)]),
        (2, [(2, 8)]),
        ("1ep", [(1, 4), (2, 8)]),
        ("3ba", [(0, 3), (1, 6)]),
        ("10sp", [(0, 3), (1, 5), (1, 8)]),  # 4 samples a batch: passes 10 at 12, 20 at 20, 30 at 32
        ("25tok", [(0, 3), (1, 5), (1, 8)]),  # 10 tokens a batch: passes 25 at 30, 50 at 50, 75 at 80
    ],
)
def test_intervals(tmp_path, fabric, interval, expected):
    assert saves_with(fabric, tmp_path, interval) == expected
    assert len(os.listdir(tmp_path)) == len(expected) + 1  # and `latest`


def test_callable_interval_sees_every_event(tmp_path, fabric):
    events = []

    def interval(timestamp: Timestamp, event: str) -> bool:
        events.append((event, timestamp.epoch, timestamp.batch))
        return event == "batch_end" and timestamp.batch_in_epoch == 2

    manager = CheckpointManager(fabric, tmp_path, filename="ep{epoch}-ba{batch}", save_interval=interval)
    saved = [manager.on_batch_end({}), manager.on_batch_end({}), manager.on_epoch_end({}), manager.on_batch_end({})]
    assert events == [("batch_end", 0, 1), ("batch_end", 0, 2), ("epoch_end", 1, 2), ("batch_end", 1, 3)]
    assert saved == [None, str(tmp_path / "ep0-ba2"), None, None]


def test_save_now(tmp_path, fabric):
    manager = CheckpointManager(fabric, tmp_path, save_interval="100ep")
    assert epochs(manager, {}, 2) == [None, None]
    assert manager.save({}) == str(tmp_path / "ep2-ba2-rank0")


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "save_interval=0 must be positive"),
        (-2, "save_interval=-2 must be positive"),
        ("0ba", "save_interval='0ba' must be positive"),
        ("-5sp", "save_interval='-5sp' must be positive"),
        ("10", "save_interval='10' is not a duration: use a positive int (epochs) or a string such as"),
        ("1.5ep", "save_interval='1.5ep' is not a duration"),
        ("3min", "save_interval='3min' is not a duration"),
        (True, "save_interval=True is not a duration"),
        (2.0, "save_interval=2.0 is not a duration"),
    ],
)
def test_bad_intervals_are_rejected(tmp_path, fabric, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        CheckpointManager(fabric, tmp_path, save_interval=value)


@pytest.mark.parametrize("value", [-2, True, 1.5])  # 0: see test_two_tier.py
def test_bad_retention_is_rejected(tmp_path, fabric, value):
    message = f"num_checkpoints_to_keep={value!r} must be -1 (keep all) or a positive int"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CheckpointManager(fabric, tmp_path, num_checkpoints_to_keep=value)


# ---------------------------------------------------------------------------------------------- latest
def test_latest_is_a_relative_symlink_that_fabric_load_follows(tmp_path, fabric):
    state = build(0)
    manager = CheckpointManager(fabric, tmp_path / "ckpt")
    epochs(manager, state, 2)
    latest = tmp_path / "ckpt" / "latest-rank0"
    assert os.readlink(latest) == "ep2-ba2-rank0"  # relative: the folder can be moved or copied
    target = build(1)
    remainder = fabric.load(latest, target)
    assert_same_state(snapshot(target["model"]), snapshot(state["model"]))
    assert remainder["timestamp"]["epoch"] == 2 and set(remainder) == {"timestamp", "rng"}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["ep1-ba1-rank0", "ep2-ba2-rank0", "latest-rank0"]


def test_latest_in_a_subfolder_links_back(tmp_path, fabric):
    manager = CheckpointManager(fabric, tmp_path, latest_filename="latest/rank{rank}")
    epochs(manager, {"model": nn.Linear(1, 1)}, 1)
    assert os.readlink(tmp_path / "latest" / "rank0") == "../ep1-ba1-rank0"
    assert fabric.load(tmp_path / "latest" / "rank0")["timestamp"]["batch"] == 1


def test_latest_moves_only_after_a_complete_save(tmp_path, fabric):
    class Exploding:
        def state_dict(self):
            raise RuntimeError("boom")

        def load_state_dict(self, state):
            pass

    manager = CheckpointManager(fabric, tmp_path, save_interval="1ba")
    manager.on_batch_end({})
    with pytest.raises(RuntimeError, match="boom"):
        manager.on_batch_end({"bad": Exploding()})
    assert sorted(os.listdir(tmp_path)) == ["ep0-ba1-rank0", "latest-rank0"]  # no temporaries either
    assert os.readlink(tmp_path / "latest-rank0") == "ep0-ba1-rank0"


def test_latest_pointer_on_fsspec(fabric):
    state = build(0)
    manager = CheckpointManager(fabric, "memory://runs/ckpt")
    epochs(manager, state, 2)
    pointer = json.loads(MEMORY.cat("/runs/ckpt/latest-rank0"))
    assert pointer == {"format": "fabric_ckpt.latest/1", "checkpoint": "ep2-ba2-rank0"}
    assert listing("memory://runs/ckpt") == ["ep1-ba1-rank0", "ep2-ba2-rank0", "latest-rank0"]
    target = build(1)
    resumed = CheckpointManager(fabric, "memory://runs/ckpt")
    assert resumed.load_latest(target) == {}
    assert resumed.resumed_from == "memory://runs/ckpt/ep2-ba2-rank0"
    assert_same_state(snapshot(target["model"]), snapshot(state["model"]))


# ---------------------------------------------------------------------------------------------- resuming
def test_resumed_training_is_bitwise_identical(tmp_path, fabric, folder):
    seed_all(0)
    reference_state = build(0)
    reference = train(CheckpointManager(fabric, str(tmp_path / "reference")), reference_state, 3)

    seed_all(0)
    first_state = build(0)
    losses = train(CheckpointManager(fabric, folder), first_state, 2)
    del first_state  # the "crash"

    seed_all(1234)  # a new process: other RNG states, other initial weights
    state = build(77)
    manager = CheckpointManager(fabric, folder)
    assert manager.load_latest(state) == {}
    assert manager.timestamp.epoch == 2 and manager.timestamp.batch == 2 * BATCHES
    assert manager.resumed_from.endswith(f"ep2-ba{2 * BATCHES}-rank0")
    losses = train(manager, state, 3, losses)

    assert losses == reference
    assert_same_state(snapshot(state["model"]), snapshot(reference_state["model"]))
    assert_same_state(snapshot(state["optimizer"]), snapshot(reference_state["optimizer"]))


def test_without_the_rng_state_the_resumed_run_differs(tmp_path, fabric):
    """The control for the test above: ignoring 'rng' (allowed under strict) breaks exactness."""
    seed_all(0)
    reference = train(CheckpointManager(fabric, tmp_path / "reference"), build(0), 3)
    seed_all(0)
    losses = train(CheckpointManager(fabric, tmp_path / "run"), build(0), 2)
    seed_all(1234)
    state = build(77)
    manager = CheckpointManager(fabric, tmp_path / "run")
    assert manager.load_latest(state, strict=True, ignore_keys=["rng"]) == {}
    assert manager.timestamp.epoch == 2
    losses = train(manager, state, 3, losses)
    assert losses[: 2 * BATCHES] == reference[: 2 * BATCHES] and losses != reference


def test_fresh_start_returns_none_and_touches_nothing(fabric, folder):
    state = {**build(0), "step": 5}
    before = snapshot(state["model"]), snapshot(state["optimizer"])
    manager = CheckpointManager(fabric, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.load_latest(state) is None
    assert state["step"] == 5 and manager.timestamp == Timestamp() and manager.resumed_from is None
    assert_same_state(snapshot(state["model"]), before[0])
    assert_same_state(snapshot(state["optimizer"]), before[1])


def test_load_latest_returns_the_remainder(tmp_path, fabric):
    manager = CheckpointManager(fabric, tmp_path)
    epochs(manager, {**build(0), "step": 7, "notes": "kept"}, 1)
    state = {**build(1), "step": 0}
    assert CheckpointManager(fabric, tmp_path).load_latest(state) == {"notes": "kept"}
    assert state["step"] == 7


def test_a_state_that_does_not_fit_raises_instead_of_falling_back(tmp_path, fabric):
    epochs(CheckpointManager(fabric, tmp_path), build(0), 2)
    model = DropNet()
    model.fc1, model.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)
    manager = CheckpointManager(fabric, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to ep1, which would not fit either
        with pytest.raises(CheckpointMismatchError, match=r"shape mismatch for 'fc1\.weight'"):
            manager.load_latest({"model": model})
    assert manager.timestamp == Timestamp() and manager.resumed_from is None


def damage(folder: str, name: str, how: str) -> None:
    if folder.startswith("memory://"):
        path = f"{folder[len('memory://') :]}/{name}"
        MEMORY.rm(path) if how == "delete" else MEMORY.pipe(path, MEMORY.cat(path)[:200])
    elif how == "delete":
        os.unlink(os.path.join(folder, name))
    else:
        with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(200)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_broken_latest_target_falls_back_with_a_warning(fabric, folder, how):
    state = build(0)
    manager = CheckpointManager(fabric, folder)
    epochs(manager, state, 2)
    expected = snapshot(state["model"])  # the weights at epoch 2 are those of epoch 1: no training happened
    damage(folder, "ep2-ba2-rank0", how)
    resumed = CheckpointManager(fabric, folder)
    target = build(1)
    message = f"CheckpointManager resumed from {folder}/ep1-ba1-rank0 instead of `latest`: could not load "
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}.*ep2-ba2-rank0"):
        assert resumed.load_latest(target) == {}
    assert resumed.timestamp.epoch == 1 and resumed.resumed_from.endswith("ep1-ba1-rank0")
    assert_same_state(snapshot(target["model"]), expected)


def test_a_missing_latest_falls_back_to_the_newest_checkpoint(fabric, folder):
    manager = CheckpointManager(fabric, folder, filename="ep{epoch}")
    epochs(manager, {}, 10)
    damage(folder, "latest-rank0", "delete")
    resumed = CheckpointManager(fabric, folder, filename="ep{epoch}")
    message = (
        f"CheckpointManager resumed from {folder}/ep10 instead of `latest`: `latest` ({folder}/latest-rank0) does not"
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(message)} exist$"):
        resumed.load_latest({})
    assert resumed.timestamp.epoch == 10  # ep10 is newer than ep9 although it sorts before it as text


def test_a_garbage_latest_falls_back(fabric, folder):
    manager = CheckpointManager(fabric, folder)
    epochs(manager, {}, 1)
    damage(folder, "latest-rank0", "delete")
    if folder.startswith("memory://"):
        MEMORY.pipe("/runs/ckpt/latest-rank0", b'{"format": "other"}')
    else:
        with open(os.path.join(folder, "latest-rank0"), "w") as f:
            f.write("not a pointer")
    with pytest.warns(UserWarning, match="is neither a symlink nor a pointer written by CheckpointManager"):
        CheckpointManager(fabric, folder).load_latest({})


def test_when_nothing_loads_the_error_lists_every_attempt(tmp_path, fabric):
    epochs(CheckpointManager(fabric, tmp_path), {}, 2)
    for name in ("ep1-ba1-rank0", "ep2-ba2-rank0"):
        damage(str(tmp_path), name, "truncate")
    with pytest.raises(CheckpointError, match=r"^No checkpoint in .* could be loaded: .*ep2-ba2-rank0.*ep1-ba1-rank0"):
        CheckpointManager(fabric, tmp_path).load_latest({})


# ---------------------------------------------------------------------------------------------- retention
def test_keeps_the_newest_n_and_leaves_other_files_alone(fabric, folder):
    manager = CheckpointManager(fabric, folder, filename="ep{epoch}-rank{rank}", num_checkpoints_to_keep=3)
    others = ["notes.txt", "ep1-rank1", "ep1-rank0.bak", "old/ep1-rank0"]
    for name in others:
        if folder.startswith("memory://"):
            MEMORY.pipe(f"/runs/ckpt/{name}", b"mine")
        else:
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                f.write("mine")
    epochs(manager, {"model": nn.Linear(1, 1)}, 11)
    remaining = [name for name in listing(folder) if name not in others and name != "old"]
    assert remaining == ["ep10-rank0", "ep11-rank0", "ep9-rank0", "latest-rank0"]
    assert manager.checkpoints() == [f"{folder}/ep{epoch}-rank0" for epoch in (11, 10, 9)]


def test_sharded_checkpoint_folders_are_pruned_and_a_users_files_in_them_stay(fabric, folder):
    for epoch in (1, 2):  # as a sharded strategy writes them: one folder per checkpoint
        path = f"{folder}/ep{epoch}-ba{epoch}-rank0"
        sharded.write_in_one_process({"w": torch.full((4,), float(epoch))}, resolve(path))
    notes = f"{folder}/ep1-ba1-rank0/notes.txt"  # the user's own file, in the folder of the oldest checkpoint
    with fsspec.open(notes, "w") as f:
        f.write("mine")
    manager = CheckpointManager(fabric, folder, num_checkpoints_to_keep=2, timestamp=Timestamp(epoch=2, batch=2))
    manager.timestamp.advance_batch()
    manager.timestamp.advance_epoch()
    manager.on_epoch_end({})
    names = [name for name in listing(folder) if "/" not in name]
    assert names == ["ep1-ba1-rank0", "ep2-ba2-rank0", "ep3-ba3-rank0", "latest-rank0"]
    assert [n for n in listing(folder) if n.startswith("ep1-ba1-rank0/")] == ["ep1-ba1-rank0/notes.txt"]
    assert read_bytes(notes) == b"mine"
    assert manager.checkpoints()[-1].endswith("ep2-ba2-rank0")  # the folder left for the user is no checkpoint
    assert torch.equal(fabric.load(f"{folder}/ep2-ba2-rank0")["w"], torch.full((4,), 2.0))


def test_never_deletes_the_latest_target_nor_the_resumed_checkpoint(tmp_path, fabric):
    epochs(CheckpointManager(fabric, tmp_path, filename="ep{epoch}"), {}, 3)
    os.unlink(tmp_path / "latest-rank0")
    os.symlink("ep1", tmp_path / "latest-rank0")  # e.g. the user rolls back to epoch 1

    manager = CheckpointManager(fabric, tmp_path, filename="ep{epoch}", num_checkpoints_to_keep=1, overwrite=True)
    manager.load_latest({})
    assert manager.resumed_from == str(tmp_path / "ep1")
    epochs(manager, {}, 1)  # rewrites ep2; ep3 is furthest in training, so "newest"
    assert sorted(os.listdir(tmp_path)) == ["ep1", "ep2", "ep3", "latest-rank0"]  # ep2 is latest, ep1 resumed-from
    epochs(manager, {}, 1)  # rewrites ep3
    assert sorted(os.listdir(tmp_path)) == ["ep1", "ep3", "latest-rank0"]
    assert os.readlink(tmp_path / "latest-rank0") == "ep3"


def test_timestamp_variables_in_the_folder(tmp_path, fabric):
    manager = CheckpointManager(fabric, tmp_path / "ep{epoch}", filename="model.pt", num_checkpoints_to_keep=2)
    paths = epochs(manager, {"model": nn.Linear(1, 1)}, 3)
    assert paths == [str(tmp_path / f"ep{epoch}" / "model.pt") for epoch in (1, 2, 3)]
    assert not os.path.exists(paths[0]) and os.readlink(tmp_path / "ep3" / "latest-rank0") == "model.pt"
    assert manager.checkpoints() == paths[:0:-1]


# ---------------------------------------------------------------------------------------------- overwrite
def test_overwrite_false_refuses_an_existing_checkpoint(fabric, folder):
    manager = CheckpointManager(fabric, folder, save_interval="1ba")
    path = manager.on_batch_end(build(0))
    before = read_bytes(path)
    again = CheckpointManager(fabric, folder, save_interval="1ba")
    with pytest.raises(
        FileExistsError, match=re.escape(f"Checkpoint exists; pass overwrite=True to replace it: '{path}'")
    ):
        again.on_batch_end(build(1))
    assert read_bytes(path) == before
    assert CheckpointManager(fabric, folder, save_interval="1ba", overwrite=True).on_batch_end(build(1)) == path


# ---------------------------------------------------------------------------------------------- several managers
def test_two_managers_share_one_timestamp(tmp_path, fabric):
    seed_all(0)
    state = build(0)
    full = CheckpointManager(fabric, tmp_path / "full", save_interval="2ep", num_checkpoints_to_keep=1)
    weights = CheckpointManager(
        fabric, tmp_path / "weights", filename="ep{epoch}.pt", save_weights_only=True, timestamp=full.timestamp
    )
    for _ in range(4):
        for _ in range(BATCHES):
            full.on_batch_end(state, samples=8)  # the owner advances first
            weights.on_batch_end(state)
        full.on_epoch_end(state)
        weights.on_epoch_end(state)
    assert (full.timestamp.batch, full.timestamp.sample, full.timestamp.epoch) == (4 * BATCHES, 32 * BATCHES, 4)
    assert sorted(os.listdir(tmp_path / "full")) == ["ep4-ba16-rank0", "latest-rank0"]
    assert sorted(os.listdir(tmp_path / "weights")) == ["ep1.pt", "ep2.pt", "ep3.pt", "ep4.pt", "latest-rank0"]
    weights_only = torch.load(tmp_path / "weights" / "ep4.pt", weights_only=True)
    assert list(weights_only) == ["model"]
    assert list(torch.load(tmp_path / "full" / "ep4-ba16-rank0", weights_only=True)) == [
        "model",
        "optimizer",
        "timestamp",
        "rng",
    ]


def test_a_loop_owned_timestamp_and_misuse(tmp_path, fabric):
    timestamp = Timestamp()
    a = CheckpointManager(fabric, tmp_path / "a", save_interval="1ba", timestamp=timestamp)
    b = CheckpointManager(fabric, tmp_path / "b", save_interval="2ba", timestamp=timestamp)
    timestamp.advance_batch(samples=4)
    assert a.on_batch_end({}) and b.on_batch_end({}) is None
    with pytest.raises(RuntimeError, match=r"^the shared Timestamp was not advanced since this manager's last "):
        a.on_batch_end({})
    with pytest.raises(ValueError, match=r"^this manager shares a Timestamp it does not advance, so it cannot count"):
        b.on_batch_end({}, samples=4)
    timestamp.advance_batch(samples=4)
    assert a.on_batch_end({}) and b.on_batch_end({}) and timestamp.batch == 2 and timestamp.sample == 8


def test_weights_only_manager(tmp_path, fabric):
    state = build(0)
    manager = CheckpointManager(fabric, tmp_path, save_weights_only=True)
    epochs(manager, {**state, "step": 3}, 1)
    assert list(torch.load(tmp_path / "ep1-ba1-rank0", weights_only=True)) == ["model"]
    target = {**build(1), "step": 0}
    optimizer_before = snapshot(target["optimizer"])
    resumed = CheckpointManager(fabric, tmp_path, save_weights_only=True)
    assert resumed.load_latest(target) == {}
    assert_same_state(snapshot(target["model"]), snapshot(state["model"]))
    assert_same_state(snapshot(target["optimizer"]), optimizer_before)
    assert target["step"] == 0 and resumed.timestamp == Timestamp()
    with pytest.raises(ValueError, match=r"^save_weights_only=True, but the state has no torch.nn.Module entry"):
        manager.save({"step": 1})


def test_the_state_cannot_bring_its_own_timestamp_entry(tmp_path, fabric):
    manager = CheckpointManager(fabric, tmp_path)
    with pytest.raises(ValueError, match=r"^the state has its own 'timestamp' entry"):
        manager.save({"timestamp": 3})
    assert manager.save({"timestamp": manager.timestamp}) == str(tmp_path / "ep0-ba0-rank0")
