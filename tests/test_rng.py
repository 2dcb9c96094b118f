"""RNGState: capture and restore Python's, NumPy's and torch's generators, through weights_only=True files."""

from __future__ import annotations

import io
import random
import re

import numpy
import pytest
import torch

from fabric_ckpt.core.rng import RNGState


def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(5).tolist(), [random.random() for _ in range(5)], numpy.random.rand(5).tolist()


def seed_all(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def plain(value) -> bool:
    """Whether ``value`` is made of tensors, ints, floats, strings, None, lists, tuples and dicts only."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, int, float, str))


def test_state_dict_is_plain_and_loads_under_weights_only():
    state = RNGState().state_dict()
    assert {"python", "numpy", "torch"} <= set(state)
    assert plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["python"] == state["python"] and torch.equal(loaded["torch"], state["torch"])


def test_restoring_repeats_every_generators_draws():
    seed_all(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state: it must round-trip too
    numpy.random.standard_normal()
    state = RNGState().state_dict()
    expected = (*draws(), random.gauss(0, 1), numpy.random.standard_normal())
    seed_all(99)
    RNGState().load_state_dict(state)
    assert (*draws(), random.gauss(0, 1), numpy.random.standard_normal()) == expected


def test_through_fabric_save_and_load(tmp_path, fabric):
    seed_all(5)
    fabric.save(tmp_path / "rng.ckpt", {"rng": RNGState()})
    expected = draws()
    seed_all(6)
    assert draws() != expected
    fabric.load(tmp_path / "rng.ckpt", {"rng": RNGState()})
    assert draws() == expected


def test_components_absent_from_the_state_are_left_alone():
    seed_all(1)
    state = RNGState().state_dict()
    del state["numpy"]
    seed_all(2)
    numpy_expected = numpy.random.get_state()[1].copy()
    RNGState().load_state_dict(state)
    assert numpy.array_equal(numpy.random.get_state()[1], numpy_expected)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(extra=1), "an RNG state dict has unknown keys ['extra']"),
        (
            lambda s: s.update(python={"version": 3, "state": "x"}),
            "the 'python' RNG state must be {'version': int, 'state': [int, ...], 'gauss_next': float}",
        ),
        (lambda s: s.update(torch=[1, 2]), "the 'torch' RNG state must be a tensor"),
        (lambda s: s.update(cuda=torch.zeros(3)), "the 'cuda' RNG state must be a tensor list"),
        (
            lambda s: s["numpy"].pop("keys"),
            "the 'numpy' RNG state must hold 'bit_generator', 'keys' (a tensor), 'pos', 'has_gauss', ...",
        ),
    ],
)
def test_malformed_states_are_rejected_before_any_generator_changes(edit, message):
    seed_all(4)
    state = RNGState().state_dict()
    edit(state)
    seed_all(8)
    expected = draws()
    seed_all(8)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RNGState().load_state_dict(state)
    assert draws() == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_state_without_cuda_is_skipped_with_a_warning():
    state = RNGState().state_dict()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with pytest.warns(UserWarning, match=r"RNG state of 1 CUDA device\(s\), this process sees 0"):
        RNGState().load_state_dict(state)
