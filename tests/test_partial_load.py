"""A failed load changes nothing: every check runs before the first byte reaches a live object.

Each case loads a checkpoint that cannot be restored into a trained model, its optimizer, the process's RNGs and a
plain value, and checks that the load raises a ``CheckpointError`` naming the state key at fault and that all of
them are bitwise as before (also with ``strict=False`` where the value cannot be loaded at all). The module fixture
counts the cases for ``make reliability`` (docs/reliability.md).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fabric_ckpt import CheckpointError, CheckpointManager, Fabric, RNGState
from tests.conftest import Net, assert_same_state, bitwise_equal, snapshot, trained
from tests.reliability_figures import full_campaign, record

COUNTS: Counter[str] = Counter()
SCALE = 10 if full_campaign() else 1


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("restore", kind, inputs=count)


def rng_snapshot() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": numpy.random.get_state()[1].copy(), "torch": torch.get_rng_state()}


def assert_same_rng(before: dict[str, Any]) -> None:
    after = rng_snapshot()
    assert after["python"] == before["python"]
    assert numpy.array_equal(after["numpy"], before["numpy"])
    assert torch.equal(after["torch"], before["torch"])


def good_checkpoint(seed: int = 1) -> dict[str, Any]:
    """A checkpoint every target below fits, as plain data (tests damage one entry of it)."""
    model, optimizer = trained(seed=seed)
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    return {
        "model": dict(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "rng": RNGState().state_dict(),
        "step": 11,
    }


def assert_load_changes_nothing(
    fabric, path, kind: str, key: str, strict: bool = True, target: tuple[nn.Module, Any] | None = None
) -> CheckpointError:
    """Load ``path`` into trained live objects; it must fail naming ``key`` and leave everything as it was."""
    model, optimizer = target or trained(seed=5)
    state = {"model": model, "optimizer": optimizer, "rng": RNGState(), "step": 0}
    expected_model, expected_optimizer = snapshot(model), snapshot(optimizer)
    random.seed(99)
    numpy.random.seed(99)
    torch.manual_seed(99)
    expected_rng = rng_snapshot()
    with pytest.raises(CheckpointError) as raised:
        fabric.load(path, state, strict=strict)
    assert f"'{key}'" in str(raised.value), str(raised.value)
    assert_same_state(snapshot(model), expected_model)
    assert_same_state(snapshot(optimizer), expected_optimizer)
    assert_same_rng(expected_rng)
    assert state["step"] == 0
    COUNTS[kind] += 1
    return raised.value


# ---------------------------------------------------------------------------------------------- module values
def _sparse_coo(t: torch.Tensor) -> torch.Tensor:
    return t.to_sparse()


def _sparse_csr(t: torch.Tensor) -> torch.Tensor:
    return t.to_sparse_csr()


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _quantized(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sparse COO": _sparse_coo,
    "sparse CSR": _sparse_csr,
    "meta": _meta,
    "quantized": _quantized,
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_module_value_of_another_layout_is_refused_before_anything_changes(tmp_path, fabric, layout, strict):
    checkpoint = good_checkpoint()
    checkpoint["model"]["fc2.weight"] = LAYOUTS[layout](checkpoint["model"]["fc2.weight"])  # fc1 would load first
    torch.save(checkpoint, tmp_path / "c.pt")
    error = assert_load_changes_nothing(fabric, tmp_path / "c.pt", "module values of another layout", "model", strict)
    assert "fc2.weight" in str(error)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_optimizer_value_of_another_layout_is_refused_before_anything_changes(tmp_path, fabric, layout):
    checkpoint = good_checkpoint()
    state = checkpoint["optimizer"]["state"]
    last = max(index for index, values in state.items() if values["exp_avg"].dim() == 2)  # CSR needs 2 dimensions
    state[last]["exp_avg"] = LAYOUTS[layout](state[last]["exp_avg"])
    torch.save(checkpoint, tmp_path / "c.pt")
    error = assert_load_changes_nothing(
        fabric, tmp_path / "c.pt", "optimizer values of another layout", "optimizer", strict=False
    )
    assert "exp_avg" in str(error)


# ---------------------------------------------------------------------------------------------- load pre-hooks
class SpectralNet(Net):
    """Net whose last layer loads through spectral norm's load_state_dict pre-hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.utils.spectral_norm(nn.Linear(8, 2))


class WeightNormNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.utils.parametrizations.weight_norm(nn.Linear(8, 2))


def _trained_like(model: nn.Module, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        loss = model(torch.randn(6, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


HOOKED = {"spectral norm": SpectralNet, "weight norm": WeightNormNet}


def _damage_fc2(model_state: dict[str, Any], how: str) -> None:
    key = next(k for k in model_state if k.startswith("fc2.") and model_state[k].dim() == 2)
    if how == "missing":
        del model_state[key]
    elif how == "unexpected":
        model_state["fc2.surplus"] = torch.zeros(2)
    else:
        model_state[key] = torch.zeros(3, 8)


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape"])
@pytest.mark.parametrize("kind", list(HOOKED))
def test_submodules_with_load_pre_hooks_are_checked_up_front(tmp_path, fabric, kind, how):
    source, source_optimizer = _trained_like(HOOKED[kind](), seed=1)
    model_state = dict(source.state_dict())
    _damage_fc2(model_state, how)
    checkpoint = {"model": model_state, "optimizer": source_optimizer.state_dict(), "step": 11}
    checkpoint["rng"] = RNGState().state_dict()
    torch.save(checkpoint, tmp_path / "c.pt")
    target = _trained_like(HOOKED[kind](), seed=2)
    # the shape case cannot load at all; missing and unexpected keys are refused under strict loading
    assert_load_changes_nothing(fabric, tmp_path / "c.pt", "modules with load pre-hooks", "model", target=target)


@pytest.mark.parametrize("kind", list(HOOKED))
def test_submodules_with_load_pre_hooks_still_load(tmp_path, fabric, kind):
    source, source_optimizer = _trained_like(HOOKED[kind](), seed=1)
    fabric.save(tmp_path / "c.ckpt", {"model": source, "optimizer": source_optimizer})
    target, target_optimizer = _trained_like(HOOKED[kind](), seed=2)
    fabric.load(tmp_path / "c.ckpt", {"model": target, "optimizer": target_optimizer})
    assert_same_state(snapshot(target), snapshot(source))
    assert_same_state(snapshot(target_optimizer), snapshot(source_optimizer))
    COUNTS["modules with load pre-hooks"] += 1


def test_an_old_spectral_norm_checkpoint_still_loads_through_its_hook(tmp_path, fabric):
    """Version-0 spectral norm checkpoints hold 'weight' and no 'weight_v': only the hook makes them fit."""
    source, _ = _trained_like(SpectralNet(), seed=1)
    state = source.state_dict()
    weight_orig = state["fc2.weight_orig"]
    state["fc2.weight"] = weight_orig / 2.0
    del state["fc2.weight_v"]
    del state._metadata["fc2"]["spectral_norm"]
    fabric.save(tmp_path / "old.ckpt", {"model": state})
    target, _ = _trained_like(SpectralNet(), seed=2)
    fabric.load(tmp_path / "old.ckpt", {"model": target})
    assert bitwise_equal(target.fc2.weight_orig.detach(), weight_orig)
    COUNTS["modules with load pre-hooks"] += 1


def test_lazy_modules_still_load_and_refuse_values_of_another_layout(tmp_path, fabric):
    source = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    source(torch.ones(1, 3))
    fabric.save(tmp_path / "c.ckpt", {"model": source})
    target = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    fabric.load(tmp_path / "c.ckpt", {"model": target})  # the lazy module's own pre-hook sizes it
    assert torch.equal(target[1].weight, source[1].weight)
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)
    checkpoint["model"]["1.weight"] = checkpoint["model"]["1.weight"].to_sparse()
    torch.save(checkpoint, tmp_path / "sparse.pt")
    target = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    before = target[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"'model': '1\.weight' is a sparse_coo tensor"):
        fabric.load(tmp_path / "sparse.pt", {"model": target})
    assert nn.parameter.is_lazy(target[1].weight) and torch.equal(target[0].weight, before)
    COUNTS["modules with load pre-hooks"] += 2


# ---------------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("stepped", [True, False])
def test_an_optimizer_checkpoint_of_another_class_is_refused_before_the_model_loads(tmp_path, fabric, stepped):
    checkpoint = good_checkpoint()
    _, sgd = trained(seed=1, optimizer_cls=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
    checkpoint["optimizer"] = sgd.state_dict()
    torch.save(checkpoint, tmp_path / "c.pt")
    model, adamw = trained(seed=5, steps=3 if stepped else 0, optimizer_cls=torch.optim.AdamW)
    error = assert_load_changes_nothing(
        fabric, tmp_path / "c.pt", "optimizers of another class", "optimizer", target=(model, adamw)
    )
    assert "betas" in str(error)


@pytest.mark.parametrize("value", ["text", [1.0, 2.0], None, 3], ids=["str", "list", "None", "int"])
@pytest.mark.parametrize("stepped", [True, False])
def test_non_tensor_optimizer_state_is_refused_before_anything_changes(tmp_path, fabric, value, stepped):
    checkpoint = good_checkpoint()
    state = checkpoint["optimizer"]["state"]
    state[max(state)]["exp_avg_sq"] = value
    torch.save(checkpoint, tmp_path / "c.pt")
    target = trained(seed=5, steps=3 if stepped else 0)
    for strict in (True, False):
        error = assert_load_changes_nothing(
            fabric, tmp_path / "c.pt", "non-tensor optimizer state", "optimizer", strict, target=target
        )
        assert "exp_avg_sq" in str(error)


# ---------------------------------------------------------------------------------------------- RNG
def _short_torch(rng: dict[str, Any]) -> None:
    rng["torch"] = rng["torch"][:-8]


def _short_python(rng: dict[str, Any]) -> None:
    rng["python"]["state"] = rng["python"]["state"][:600]


def _python_index_out_of_range(rng: dict[str, Any]) -> None:
    rng["python"]["state"][-1] = 10_000


def _short_numpy(rng: dict[str, Any]) -> None:
    rng["numpy"]["keys"] = rng["numpy"]["keys"][:100]


def _torch_of_floats(rng: dict[str, Any]) -> None:
    rng["torch"] = rng["torch"].float()


RNG_DAMAGE = {
    "torch short": _short_torch,
    "torch dtype": _torch_of_floats,
    "python short": _short_python,
    "python index": _python_index_out_of_range,
    "numpy short": _short_numpy,
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("damage", list(RNG_DAMAGE))
def test_rng_state_that_does_not_fit_is_refused_before_anything_changes(tmp_path, fabric, damage, strict):
    checkpoint = good_checkpoint()
    RNG_DAMAGE[damage](checkpoint["rng"])
    torch.save(checkpoint, tmp_path / "c.pt")
    assert_load_changes_nothing(fabric, tmp_path / "c.pt", "RNG states that do not fit", "rng", strict)


class _Picky:
    """A stateful object of the user's that refuses the checkpoint's state only when it loads it."""

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise ValueError("unsupported version")


def test_a_stateful_object_that_refuses_its_state_leaves_the_others_untouched(tmp_path, fabric):
    _, optimizer = trained(seed=1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    for _ in range(3):
        scheduler.step()
    fabric.save(tmp_path / "c.ckpt", {"scheduler": scheduler, "rng": RNGState(), "picky": _Picky()})
    _, target_optimizer = trained(seed=5)
    target_scheduler = torch.optim.lr_scheduler.StepLR(target_optimizer, step_size=7)
    scheduler_before = dict(target_scheduler.state_dict())
    optimizer_before = snapshot(target_optimizer)
    torch.manual_seed(99)
    rng_before = rng_snapshot()
    state = {"scheduler": target_scheduler, "rng": RNGState(), "picky": _Picky()}
    with pytest.raises(ValueError, match="unsupported version"):
        fabric.load(tmp_path / "c.ckpt", state)
    assert target_scheduler.state_dict() == scheduler_before
    assert_same_state(snapshot(target_optimizer), optimizer_before)  # the scheduler sets the group's lr
    assert_same_rng(rng_before)
    COUNTS["stateful objects that refuse their state"] += 1


# ---------------------------------------------------------------------------------------------- manager
def _managed(fabric, folder, seeds: list[int]) -> None:
    manager = CheckpointManager(fabric, folder, num_checkpoints_to_keep=5)
    for seed in seeds:
        model, optimizer = trained(seed=seed)
        torch.manual_seed(seed)
        manager.on_epoch_end({"model": model, "optimizer": optimizer})


def _newest(folder) -> Any:
    return max((p for p in folder.iterdir() if not p.name.startswith("latest")), key=lambda p: p.stat().st_mtime_ns)


def _rewrite(path, edit: Callable[[dict[str, Any]], None]) -> None:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)


def test_load_latest_raises_naming_an_unloadable_newest_checkpoint_and_changes_nothing(tmp_path, fabric):
    _managed(fabric, tmp_path, seeds=[1, 2])
    newest = _newest(tmp_path)
    _rewrite(newest, lambda c: c["model"].update({"fc2.weight": _sparse_coo(c["model"]["fc2.weight"])}))
    model, optimizer = trained(seed=5)
    expected_model, expected_optimizer = snapshot(model), snapshot(optimizer)
    torch.manual_seed(99)
    expected_rng = rng_snapshot()
    manager = CheckpointManager(fabric, tmp_path)
    with pytest.raises(CheckpointError) as raised:
        manager.load_latest({"model": model, "optimizer": optimizer})
    assert newest.name in str(raised.value) and "'model'" in str(raised.value) and "fc2.weight" in str(raised.value)
    assert_same_state(snapshot(model), expected_model)
    assert_same_state(snapshot(optimizer), expected_optimizer)
    assert_same_rng(expected_rng)
    assert manager.resumed_from is None
    COUNTS["manager resumes"] += 1


def test_load_latest_falls_back_completely_from_a_newest_checkpoint_with_a_broken_rng(tmp_path, fabric):
    _managed(fabric, tmp_path, seeds=[1, 2])
    newest = _newest(tmp_path)
    (older_path,) = [p for p in tmp_path.iterdir() if p.name != newest.name and not p.name.startswith("latest")]
    older_rng = torch.load(older_path, weights_only=True)["rng"]
    _rewrite(newest, lambda c: _short_torch(c["rng"]))
    older_model, older_optimizer = trained(seed=1)
    model, optimizer = trained(seed=5)
    manager = CheckpointManager(fabric, tmp_path)
    with pytest.warns(UserWarning, match=rf"instead of `latest`: could not load .*{newest.name}"):
        manager.load_latest({"model": model, "optimizer": optimizer})
    assert manager.resumed_from is not None and manager.resumed_from.endswith(older_path.name)
    assert_same_state(snapshot(model), snapshot(older_model))
    assert_same_state(snapshot(optimizer), snapshot(older_optimizer))
    assert torch.equal(torch.get_rng_state(), older_rng["torch"])  # the RNG comes from the older one too
    python = older_rng["python"]
    assert random.getstate() == (python["version"], tuple(python["state"]), python["gauss_next"])
    COUNTS["manager resumes"] += 1


# ---------------------------------------------------------------------------------------------- fuzzed
MODEL_DAMAGE = ["sparse COO", "meta", "quantized", "shape", "non-tensor", "missing", "unexpected"]
OPTIMIZER_DAMAGE = ["sparse COO", "meta", "shape", "non-tensor"]


def _damage_tensor(value: torch.Tensor, how: str) -> Any:
    if how in LAYOUTS:
        return LAYOUTS[how](value)
    if how == "shape":
        return torch.zeros(value.numel() + 1)
    return "not a tensor"


@settings(
    max_examples=20 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    entry=st.sampled_from(["model", "optimizer", "rng"]),
    choice=st.integers(0, 1_000),
    how=st.integers(0, 1_000),
    strict=st.booleans(),
)
def test_any_damaged_entry_either_changes_nothing_or_loads_exactly(tmp_path_factory, entry, choice, how, strict):
    checkpoint = good_checkpoint(seed=choice % 3)
    path = tmp_path_factory.mktemp("fuzzed") / "c.pt"
    loads_anyway = False
    if entry == "model":
        key = sorted(checkpoint["model"])[choice % len(checkpoint["model"])]
        damage = MODEL_DAMAGE[how % len(MODEL_DAMAGE)]
        if damage == "missing":
            del checkpoint["model"][key]
        elif damage == "unexpected":
            checkpoint["model"][f"{key}.surplus"] = torch.zeros(1)
        else:
            if damage == "quantized" and not checkpoint["model"][key].is_floating_point():
                damage = "sparse COO"  # only floating-point values quantize
            checkpoint["model"][key] = _damage_tensor(checkpoint["model"][key], damage)
        loads_anyway = not strict and damage in ("missing", "unexpected")
    elif entry == "optimizer":
        state = checkpoint["optimizer"]["state"]
        param_state = state[sorted(state)[choice % len(state)]]
        key = ["exp_avg", "exp_avg_sq", "step"][choice % 3]
        damage = OPTIMIZER_DAMAGE[how % len(OPTIMIZER_DAMAGE)]
        param_state[key] = _damage_tensor(param_state[key], damage if key != "step" else "shape")
    else:
        RNG_DAMAGE[list(RNG_DAMAGE)[how % len(RNG_DAMAGE)]](checkpoint["rng"])
    torch.save(checkpoint, path)
    if not loads_anyway:
        assert_load_changes_nothing(Fabric(accelerator="cpu"), path, "fuzzed damage", entry, strict)
        return
    model, optimizer = trained(seed=5)
    before = snapshot(model)
    from_checkpoint = {k: v for k, v in checkpoint["model"].items() if k in before}
    Fabric(accelerator="cpu").load(path, {"model": model, "optimizer": optimizer}, strict=False)
    assert_same_state(snapshot(model), {**before, **from_checkpoint})
    COUNTS["fuzzed damage"] += 1
