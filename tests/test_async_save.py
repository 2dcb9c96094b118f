"""fabric.save_async: the caller waits for a snapshot only, the file is written in the background."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
import torch
from torch import nn

from fabric_ckpt import CheckpointError, CheckpointManager, Fabric, SaveHandle
from tests.conftest import assert_same_state, make_net, snapshot, trained
from tests.reliability_figures import record

COUNTS: Counter[str] = Counter()  # the issue-16 cases tried, for `make reliability` (docs/reliability.md)


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("smaller", kind, inputs=count)


def test_the_snapshot_is_what_gets_written_while_training_goes_on(tmp_path, fabric):
    model, optimizer = trained(seed=1)
    expected_model, expected_optimizer = snapshot(model), snapshot(optimizer)
    handle = fabric.save_async(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "step": 7})
    assert isinstance(handle, SaveHandle)
    with torch.no_grad():  # training continues and changes everything right away
        for parameter in model.parameters():
            parameter.add_(1.0)
    handle.wait()
    assert handle.done() and handle.exception() is None
    target, target_optimizer = trained(seed=2)
    assert fabric.load(tmp_path / "c.ckpt", {"model": target, "optimizer": target_optimizer}) == {"step": 7}
    assert_same_state(snapshot(target), expected_model)
    assert_same_state(snapshot(target_optimizer), expected_optimizer)


def test_staging_memory_is_reused_across_saves(tmp_path, fabric):
    model, optimizer = trained(seed=1)
    state = {"model": model, "optimizer": optimizer}
    fabric.save_async(tmp_path / "a.ckpt", state).wait()
    stager = fabric._background.stager
    held, addresses = stager.staged_bytes, [s.data_ptr() for s in stager._pool]
    for name in ("b.ckpt", "c.ckpt", "d.ckpt"):
        fabric.save_async(tmp_path / name, state)
    fabric.wait_for_saves()
    assert stager.staged_bytes == held and [s.data_ptr() for s in stager._pool] == addresses
    assert held == sum(
        t.numel() * t.element_size()
        for t in (*model.state_dict().values(), *(v for s in optimizer.state.values() for v in s.values()))
    )


def test_a_new_save_waits_for_the_previous_one(tmp_path, fabric):
    big = {"w": torch.randn(5_000_000)}
    first = fabric.save_async(tmp_path / "a.ckpt", big)
    second = fabric.save_async(tmp_path / "b.ckpt", big)
    assert first.done()  # save_async returned only after the first one finished
    second.wait()
    assert torch.equal(fabric.load(tmp_path / "a.ckpt")["w"], big["w"])


def test_a_background_error_surfaces_on_the_next_save_when_nobody_asked(tmp_path, fabric):
    (tmp_path / "blocked.ckpt").mkdir()  # a folder in the way: the background write fails
    fabric.save_async(tmp_path / "blocked.ckpt", {"step": 1})
    with pytest.raises(CheckpointError, match=r"The previous asynchronous save to '.*blocked.ckpt' failed"):
        fabric.save(tmp_path / "ok.ckpt", {"step": 2})
    fabric.save(tmp_path / "ok.ckpt", {"step": 3})  # reported once, then saving works again
    assert fabric.load(tmp_path / "ok.ckpt") == {"step": 3}


@pytest.mark.parametrize("ask", ["wait", "exception"])
def test_a_background_error_the_handle_reported_does_not_fail_later_saves(tmp_path, fabric, ask):
    (tmp_path / "blocked.ckpt").mkdir()
    handle = fabric.save_async(tmp_path / "blocked.ckpt", {"step": 1})
    if ask == "wait":
        with pytest.raises(IsADirectoryError, match=r"blocked\.ckpt"):
            handle.wait()
    else:
        while not handle.done():
            time.sleep(0.01)
        assert isinstance(handle.exception(), IsADirectoryError)
    fabric.save(tmp_path / "ok.ckpt", {"step": 2})  # the caller handled the error: nothing poisons this save
    fabric.save_async(tmp_path / "ok.ckpt", {"step": 3}).wait()
    fabric.wait_for_saves()
    assert fabric.load(tmp_path / "ok.ckpt") == {"step": 3}
    COUNTS["async errors reported once"] += 1


@pytest.mark.parametrize("ask", [True, False])
def test_a_failed_background_save_at_exit_is_reported_once(tmp_path, ask):
    (tmp_path / "blocked.ckpt").mkdir()
    script = textwrap.dedent(f"""
        import sys
        from fabric_ckpt import Fabric
        handle = Fabric(accelerator="cpu").save_async({str(tmp_path / "blocked.ckpt")!r}, {{"step": 1}})
        if {ask}:
            try:
                handle.wait()
            except IsADirectoryError:
                print("handled", file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    if ask:
        assert result.stderr.strip() == "handled"
    else:
        assert result.stderr.count("the asynchronous save to") == 1 and "blocked.ckpt" in result.stderr


def test_a_pending_save_is_finished_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from fabric_ckpt import Fabric
        Fabric(accelerator="cpu").save_async({str(tmp_path / "c.ckpt")!r}, {{"w": torch.ones(20_000_000)}})
        # the script ends at once: the interpreter must not drop the checkpoint being written
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert torch.equal(Fabric(accelerator="cpu").load(tmp_path / "c.ckpt")["w"], torch.ones(20_000_000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]


def test_manager_moves_latest_only_after_the_background_save(tmp_path, fabric):
    model = make_net(1)
    manager = CheckpointManager(
        fabric,
        tmp_path,
        filename="ep{epoch}.ckpt",
        latest_filename="latest",
        num_checkpoints_to_keep=2,
        run_name="r",
        async_save=True,
    )
    for _ in range(3):
        manager.on_epoch_end({"model": model})
    fabric.wait_for_saves()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep2.ckpt", "ep3.ckpt", "latest"]
    assert (tmp_path / "latest").resolve().name == "ep3.ckpt"
    resumed = make_net(5)
    again = CheckpointManager(
        fabric, tmp_path, filename="ep{epoch}.ckpt", latest_filename="latest", run_name="r", async_save=True
    )
    again.load_latest({"model": resumed})
    assert_same_state(snapshot(resumed), snapshot(model))


class _Paused:
    """Holds the background writer (one thread) until released, so a test acts between snapshot and write."""

    def __init__(self, fabric) -> None:
        fabric.save_async("memory://paused/warm.ckpt", {"warm": 1}).wait()  # starts the thread
        self._release = threading.Event()
        fabric._background._executor.submit(self._release.wait)

    def release(self) -> None:
        self._release.set()


def _mutable_state() -> dict:
    return {
        "seen": {1, 2, 3},
        "raw": bytearray(b"abc"),
        "frozen": frozenset({4, 5}),
        "nested": {"lists": [[1, 2], {7}], "bytes": [bytearray(b"xy")]},
        "tuple": ({"k": 1}, [2]),
        "w": torch.ones(3),
    }


def _mutate(state: dict) -> None:
    state["seen"].add(99)
    state["raw"][0] = ord("Z")
    state["nested"]["lists"][0].append(3)
    state["nested"]["lists"][1].discard(7)
    state["nested"]["bytes"][0].extend(b"!!")
    state["tuple"][0]["k"] = 2
    state["tuple"][1].append(3)
    state["w"].add_(1)


def test_save_async_writes_every_value_as_it_was_at_the_call(tmp_path, fabric):
    state = _mutable_state()
    expected = copy.deepcopy(state)
    paused = _Paused(fabric)
    handle = fabric.save_async(tmp_path / "c.ckpt", state)
    _mutate(state)  # the caller changes everything before the background write starts
    paused.release()
    handle.wait()
    written = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert {k: v for k, v in written.items() if k != "w"} == {k: v for k, v in expected.items() if k != "w"}
    assert torch.equal(written["w"], expected["w"])
    assert type(written["raw"]) is bytearray and type(written["frozen"]) is frozenset
    COUNTS["async snapshots of mutable values"] += len(state)


def test_save_async_writes_meta_tensors_as_save_does(tmp_path, fabric):
    meta = torch.empty(3, 4, device="meta")
    state = {"m": meta, "view": meta[1:], "p": nn.Parameter(torch.empty(2, device="meta")), "w": torch.ones(2)}
    fabric.save(tmp_path / "sync.ckpt", state)
    fabric.save_async(tmp_path / "async.ckpt", state).wait()
    for name in ("sync.ckpt", "async.ckpt"):
        for loaded in (torch.load(tmp_path / name, weights_only=True), fabric.load(tmp_path / name)):
            for key in ("m", "view", "p"):
                assert loaded[key].is_meta and loaded[key].shape == state[key].shape, (name, key)
            assert type(loaded["p"]) is nn.Parameter and loaded["p"].requires_grad, name
            assert torch.equal(loaded["w"], state["w"])
            COUNTS["async meta tensors"] += 3
