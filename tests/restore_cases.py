"""Rank functions for tests/test_partial_load_distributed.py: checkpoints that cannot be restored, written and loaded
on every rank of a :class:`tests.distributed.WorkerGroup` (importable, hence module level)."""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

from fabric_ckpt import CheckpointError, RNGState
from tests.dist_cases import Model, build, full, full_state, make_fabric, train


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def save_unloadable(kind: str, path: str, damage: str) -> None:
    """Save a trained run whose checkpoint cannot be restored into :func:`build`'s objects, as ``damage`` says."""
    fabric = make_fabric(kind)
    if damage == "sgd":  # an optimizer of another class than build()'s AdamW
        torch.manual_seed(0)
        module = Model()
        model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9))
    else:
        model, optimizer = build(fabric, 0)
    train(fabric, model, optimizer, 0, 2)
    rng: Any = RNGState().state_dict()
    if damage == "rng":
        for rank_state in rng["per_rank"]:
            rank_state["torch"] = rank_state["torch"][:-8]
    if damage == "non-tensor":
        param = next(iter(optimizer.state))
        optimizer.state[param]["exp_avg_sq"] = "text"
    fabric.save(path, {"model": model, "optimizer": optimizer, "rng": rng, "step": 3})


def refused_load_changes_nothing(kind: str, path: str, strict: bool = True) -> dict[str, Any]:
    """Load ``path`` into trained objects: the error each rank saw, and whether everything stayed bitwise as it was."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 123)
    train(fabric, model, optimizer, 5, 6)
    random.seed(7)
    torch.manual_seed(7)
    before = {**full_state(model, optimizer), "torch": torch.get_rng_state(), "python": random.getstate()}
    state = {"model": model, "optimizer": optimizer, "rng": RNGState(), "step": 0}
    error = None
    try:
        fabric.load(path, state, strict=strict)
    except CheckpointError as err:
        error = str(err)
    after = {**full_state(model, optimizer), "torch": torch.get_rng_state(), "python": random.getstate()}
    return {"error": error, "unchanged": _same(before, after) and state["step"] == 0}


def full_model_state(seed: int = 0) -> dict[str, Any]:
    """The model of :func:`build` in one process, as a plain state dict."""
    torch.manual_seed(seed)
    return full(Model().state_dict())


def save_quantized_sharded(kind: str, path: str) -> str | None:
    """A sharded save of a state holding a quantized tensor: the error each rank saw (``None`` if it saved)."""
    fabric = make_fabric(kind)
    model, optimizer = build(fabric, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.qint8)
    try:
        fabric.save(path, {"model": model, "optimizer": optimizer, "calibration": {"scale": quantized}})
    except CheckpointError as err:
        return str(err)
    return None
