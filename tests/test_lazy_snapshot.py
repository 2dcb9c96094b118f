"""save_async(snapshot="lazy"): return before the big copies; the set-up optimizers' step waits for what is uncopied.

What is written must be bitwise the state at the call: parameters and optimizer state (copied in the background,
guarded by the optimizer's step), and every other tensor (copied before the call returns, e.g. BatchNorm's running
statistics, which the next forward pass changes).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

from fabric_ckpt import CheckpointManager, Fabric
from fabric_ckpt.core import snapshot as snapshot_module
from fabric_ckpt.core import staging
from fabric_ckpt.core.snapshot import pending_snapshots
from tests.conftest import assert_same_state, snapshot

WIDTH = 300_000


class Wide(nn.Module):
    """Large parameters (copied lazily) and large BatchNorm buffers that every forward changes (copied eagerly)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(WIDTH))
        self.norm = nn.BatchNorm1d(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x * self.scale)


def _set_up(fabric: Fabric, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = Wide()
    model, optimizer = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=0.1))
    _train_step(fabric, model, optimizer)
    return model, optimizer


def _train_step(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, WIDTH)).pow(2).mean()
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()


@pytest.fixture
def held_background_copies(monkeypatch):
    """Background copies wait for this event, so the test decides when they may run."""
    release = threading.Event()
    original = snapshot_module._Copy.run

    def gated(self):
        if threading.current_thread().name == "fabric_ckpt-snapshot":
            release.wait(timeout=60)
        return original(self)

    monkeypatch.setattr(snapshot_module._Copy, "run", gated)
    yield release
    release.set()


def test_the_step_waits_for_the_lazy_copies_and_the_checkpoint_is_the_state_at_the_call(
    tmp_path, fabric, held_background_copies
):
    model, optimizer = _set_up(fabric)
    expected_model, expected_optimizer = snapshot(model), snapshot(optimizer)
    handle = fabric.save_async(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer}, snapshot="lazy")
    assert pending_snapshots()  # save_async returned with the large copies still to do
    loss = model(torch.randn(4, WIDTH)).pow(2).mean()  # forward and backward run meanwhile
    optimizer.zero_grad()
    fabric.backward(loss)  # (the forward also changed BatchNorm's running statistics, which were copied eagerly)
    stepper = threading.Thread(target=optimizer.step)
    stepper.start()
    time.sleep(0.2)
    assert stepper.is_alive()  # the step cannot run before the copies are done
    held_background_copies.set()
    stepper.join(timeout=60)
    handle.wait()
    restored_model, restored_optimizer = _set_up(Fabric(accelerator="cpu"), seed=1)
    fabric.load(tmp_path / "c.ckpt", {"model": restored_model, "optimizer": restored_optimizer})
    assert_same_state(snapshot(restored_model), expected_model)
    assert_same_state(snapshot(restored_optimizer), expected_optimizer)


def test_only_what_set_up_optimizers_change_is_left_to_the_background(tmp_path, fabric):
    model, optimizer = _set_up(fabric)
    handle = fabric.save_async(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer}, snapshot="lazy")
    handle.wait()
    stages = handle.telemetry.stages
    # Every parameter and every optimizer state tensor, whatever its size (Adam's step counts are scalars).
    lazy = [model.scale, model.norm.weight, model.norm.bias]
    lazy += [value for state in optimizer.state.values() for value in state.values()]
    assert any(t.numel() == 1 for t in lazy)
    assert stages["stage (background)"].bytes == sum(t.numel() * t.element_size() for t in lazy)
    # Buffers (changed by forward, not by step) and BatchNorm's batch count: copied before the call returned.
    eager = [model.norm.running_mean, model.norm.running_var, model.norm.num_batches_tracked]
    assert stages["stage"].bytes == sum(t.numel() * t.element_size() for t in eager)


def test_a_model_whose_optimizer_was_not_set_up_is_copied_before_the_call_returns(tmp_path, fabric):
    module = Wide()
    model = fabric.setup(module)
    own_optimizer = torch.optim.SGD(module.parameters(), lr=1.0)  # not set up: its step does not wait
    expected = snapshot(model)
    handle = fabric.save_async(tmp_path / "c.ckpt", {"model": model}, snapshot="lazy")
    assert not pending_snapshots()
    model(torch.randn(2, WIDTH)).sum().backward()
    own_optimizer.step()
    handle.wait()
    restored = Wide()
    fabric.load(tmp_path / "c.ckpt", {"model": restored})
    assert_same_state(snapshot(restored), expected)


def test_saving_and_loading_wait_for_a_lazy_snapshot(tmp_path, fabric, held_background_copies):
    model, optimizer = _set_up(fabric)
    expected = snapshot(model)
    fabric.save_async(tmp_path / "a.ckpt", {"model": model, "optimizer": optimizer}, snapshot="lazy")
    releaser = threading.Timer(0.2, held_background_copies.set)
    releaser.start()
    fabric.save(tmp_path / "b.ckpt", {"model": model})  # waits for the lazy save first
    releaser.join()
    for name in ("a.ckpt", "b.ckpt"):
        restored = Wide()
        fabric.load(tmp_path / name, {"model": restored}, strict=False)
        assert_same_state(snapshot(restored), expected)


def test_a_lazy_save_pending_at_exit_is_finished(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from fabric_ckpt import Fabric
        fabric = Fabric(accelerator="cpu")
        module = torch.nn.Linear(1000, 1000)
        model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
        torch.save(module.state_dict(), {str(tmp_path / "expected.pt")!r})
        fabric.save_async({str(tmp_path / "c.ckpt")!r}, {{"model": model}}, snapshot="lazy")
        # the script ends at once: the copies and the write must still be finished
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = torch.load(tmp_path / "expected.pt")
    loaded = Fabric(accelerator="cpu").load(tmp_path / "c.ckpt")["model"]
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_the_manager_takes_lazy_snapshots(tmp_path, fabric):
    model, optimizer = _set_up(fabric)
    manager = CheckpointManager(fabric, tmp_path, filename="ep{epoch}.ckpt", run_name="r", async_save="lazy")
    expected = snapshot(model)
    manager.on_epoch_end({"model": model, "optimizer": optimizer})
    _train_step(fabric, model, optimizer)  # the step waits for the copies, then changes the weights
    manager.last_save.wait()
    restored = Wide()
    fabric.load(tmp_path / "ep1.ckpt", {"model": restored}, strict=False)
    assert_same_state(snapshot(restored), expected)


def test_an_unknown_snapshot_mode_is_refused_by_name(tmp_path, fabric):
    with pytest.raises(ValueError, match=r"snapshot='later'"):
        fabric.save_async(tmp_path / "c.ckpt", {"step": 1}, snapshot="later")
    with pytest.raises(ValueError, match=r"async_save='sometimes'"):
        CheckpointManager(fabric, tmp_path, async_save="sometimes")
    assert not (tmp_path / "c.ckpt").exists()


def test_the_background_copy_lets_the_training_threads_python_run():
    """A lazy snapshot copies while the loop runs: its copies must release the GIL, or the loop's Python stalls.

    With a very long switch interval, a thread gives up the GIL only where a call releases it; the caller of
    ``start`` then runs again while the copies are still going only if the copies release it.
    """
    sources = [torch.full((16 << 20,), float(i)).untyped_storage() for i in range(4)]  # 4 x 64 MiB
    plan = snapshot_module.Snapshot()
    targets = [torch.empty(s.nbytes(), dtype=torch.uint8).untyped_storage() for s in sources]
    for source, target in zip(sources, targets, strict=True):
        plan.add(source, target, lazy=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        plan.start()
        ran_while_copying = not plan.copied
    finally:
        sys.setswitchinterval(interval)
        plan.wait_copied()
    assert ran_while_copying
    for i, target in enumerate(targets):
        assert torch.equal(torch.empty((0,), dtype=torch.float32).set_(target), torch.full((16 << 20,), float(i)))


def test_lazy_tensors_in_lists_tuples_and_views_are_written_as_they_were_at_the_call(tmp_path, fabric):
    """The background thread stages lazy tensors held in dicts and lists; ones in tuples are staged at the call;
    either way the file holds the values at the call, and views keep sharing their storage."""
    model, optimizer = _set_up(fabric)
    extras = {
        "list": [model.scale, 1],
        "tuple": (model.norm.weight, "x"),
        "view": model.scale[10:20],
        "nested": {"deeper": [[model.norm.bias]]},
    }
    expected = {
        "list": model.scale.detach().clone(),
        "tuple": model.norm.weight.detach().clone(),
        "view": model.scale[10:20].detach().clone(),
        "bias": model.norm.bias.detach().clone(),
    }
    handle = fabric.save_async(
        tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "extras": extras}, snapshot="lazy"
    )
    _train_step(fabric, model, optimizer)  # changes every parameter, once the background copies are done
    handle.wait()
    assert not torch.equal(model.scale.detach(), expected["list"])
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["extras"]
    assert torch.equal(saved["list"][0], expected["list"]) and saved["list"][1] == 1
    assert torch.equal(saved["tuple"][0], expected["tuple"]) and saved["tuple"][1] == "x"
    assert torch.equal(saved["view"], expected["view"])
    assert saved["view"].untyped_storage().data_ptr() == saved["list"][0].untyped_storage().data_ptr()
    assert torch.equal(saved["nested"]["deeper"][0][0], expected["bias"])


def test_a_failure_staging_in_the_background_fails_the_save_and_keeps_the_previous_checkpoint(
    tmp_path, fabric, monkeypatch
):
    model, optimizer = _set_up(fabric)
    fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
    previous = snapshot(model)

    def fails(self):
        raise MemoryError("no staging memory left")

    monkeypatch.setattr(staging.Stager, "_stage_deferred", fails)
    _train_step(fabric, model, optimizer)
    handle = fabric.save_async(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer}, snapshot="lazy")
    _train_step(fabric, model, optimizer)  # the step is not held up by the failed snapshot
    with pytest.raises(Exception, match="no staging memory left"):
        handle.wait()
    monkeypatch.undo()
    restored, _ = _set_up(Fabric(accelerator="cpu"), seed=1)
    fabric.load(tmp_path / "c.ckpt", {"model": restored})
    assert_same_state(snapshot(restored), previous)
    fabric.save_async(tmp_path / "d.ckpt", {"model": model}, snapshot="lazy").wait()  # the next save works
    fabric.load(tmp_path / "d.ckpt", {"model": restored})
    assert_same_state(snapshot(restored), snapshot(model))
