"""The process's random number generators as a checkpointable object.

Put an :class:`RNGState` in the state given to ``fabric.save``/``fabric.load`` and a resumed run draws the same random
numbers (dropout masks, shuffles, augmentations) as a run that never stopped. Its state dict holds only tensors,
ints, floats, strings, lists and dicts, so it loads under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.distributed as dist

__all__ = ["RNGState", "process_rng_state", "set_process_rng_state"]


class RNGState:
    """Captures (``state_dict``) and restores (``load_state_dict``) Python's, NumPy's and torch's global RNGs.

    Covered: ``random``, NumPy's global ``numpy.random`` generator (when NumPy is installed), torch's CPU generator,
    and every CUDA device's generator when CUDA is available. A state without a component (saved where NumPy or
    CUDA was missing) leaves that generator as it is; CUDA state that does not fit this machine is skipped with a
    warning.

    Example:
        >>> fabric.save("ckpt.pt", {"model": model, "rng": RNGState()})
        >>> fabric.load("ckpt.pt", {"model": model, "rng": RNGState()})  # later draws repeat the saved run's
    """

    def state_dict(self) -> dict[str, Any]:
        """The current state of every generator; in a multi-process run, every rank's (``{"per_rank": [...]}``).

        In a process group this is a collective: every rank must call it, as ``fabric.save`` does.

        Example:
            >>> sorted(RNGState().state_dict())
            ['numpy', 'python', 'torch']
        """
        own = process_rng_state()
        world_size = _world_size()
        if world_size == 1:
            return own
        every_rank: list[Any] = [None] * world_size
        dist.all_gather_object(every_rank, own)
        return {"per_rank": every_rank}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Set every generator present in ``state_dict`` (from :meth:`state_dict`); each rank takes its own entry.

        A multi-process state restored at another world size leaves the generators as they are, with a warning.

        Raises:
            ValueError: a component is malformed; checked for all components before any generator is set.

        Example:
            >>> RNGState().load_state_dict(saved)
        """
        if isinstance(state_dict, Mapping) and "per_rank" in state_dict:
            ranks = state_dict["per_rank"]
            world_size, rank = _world_size(), _rank()
            if not isinstance(ranks, (list, tuple)) or len(ranks) != world_size:
                count = len(ranks) if isinstance(ranks, (list, tuple)) else "?"
                warnings.warn(
                    f"the checkpoint holds the RNG state of {count} rank(s), this run has {world_size}; "
                    "the generators were not restored",
                    stacklevel=2,
                )
                return
            state_dict = ranks[rank]
        set_process_rng_state(state_dict)

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` would restore ``state_dict`` completely.

        ``fabric.load`` calls it before restoring anything, so a state that does not fit (e.g. a generator state of
        the wrong size) fails the load with every object, generators included, untouched.

        Example:
            >>> RNGState().check_state_dict(checkpoint["rng"])
        """
        check_rng_state(state_dict)

    def __repr__(self) -> str:
        return "RNGState()"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def process_rng_state() -> dict[str, Any]:
    """This process's generators (Python's, NumPy's, torch's CPU and CUDA ones), with no collective.

    Example:
        >>> saved = process_rng_state()
        >>> torch.rand(1)
        >>> set_process_rng_state(saved)  # the next draw repeats the one above
    """
    state: dict[str, Any] = {"python": _python_state(), "torch": torch.get_rng_state()}
    numpy_state = _numpy_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_process_rng_state(state_dict: Mapping[str, Any]) -> None:
    """Set this process's generators from :func:`process_rng_state`'s dict (validated first).

    Example:
        >>> set_process_rng_state(saved)
    """
    check_rng_state(state_dict)
    python = state_dict.get("python")
    if python is not None:
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if "numpy" in state_dict:
        _set_numpy_state(state_dict["numpy"])
    if "torch" in state_dict:
        torch.set_rng_state(state_dict["torch"])
    if "cuda" in state_dict:
        _set_cuda_state(state_dict["cuda"])


def check_rng_state(state_dict: Any) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has the shape :meth:`RNGState.state_dict` produces, and each
    component fits its generator (set on a fresh generator of the same kind, never the process's own)."""
    if isinstance(state_dict, Mapping) and "per_rank" in state_dict:
        ranks = state_dict["per_rank"]
        if not isinstance(ranks, (list, tuple)) or len(state_dict) != 1:
            raise ValueError("a multi-process RNG state must be {'per_rank': [one state per rank]}")
        for rank_state in ranks:
            check_rng_state(rank_state)
        return
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"an RNG state dict must be a dict, got {type(state_dict).__name__}")
    unknown = sorted(set(state_dict) - {"python", "numpy", "torch", "cuda"})
    if unknown:
        raise ValueError(f"an RNG state dict has unknown keys {unknown}")
    python = state_dict.get("python")
    if python is not None and not (
        isinstance(python, Mapping)
        and isinstance(python.get("version"), int)
        and isinstance(python.get("state"), (list, tuple))
        and all(isinstance(word, int) for word in python["state"])
        and (python.get("gauss_next") is None or isinstance(python.get("gauss_next"), float))
    ):
        raise ValueError("the 'python' RNG state must be {'version': int, 'state': [int, ...], 'gauss_next': float}")
    numpy_state = state_dict.get("numpy")
    if numpy_state is not None and not (
        isinstance(numpy_state, Mapping)
        and isinstance(numpy_state.get("keys"), torch.Tensor)
        and {"bit_generator", "pos", "has_gauss", "cached_gaussian"} <= set(numpy_state)
    ):
        raise ValueError("the 'numpy' RNG state must hold 'bit_generator', 'keys' (a tensor), 'pos', 'has_gauss', ...")
    for name in ("torch", "cuda"):
        value = state_dict.get(name)
        tensors = [value] if name == "torch" else value
        if value is not None and not (
            isinstance(tensors, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in tensors)
        ):
            raise ValueError(f"the {name!r} RNG state must be a tensor{'' if name == 'torch' else ' list'}")
    _rehearse(state_dict)


def _rehearse(state_dict: Mapping[str, Any]) -> None:
    """Set each component on a fresh generator of its kind: what would fail on the process's own fails here."""
    component = ""
    try:
        python = state_dict.get("python")
        if python is not None:
            component = "python"
            random.Random().setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        numpy_state = state_dict.get("numpy")
        if numpy_state is not None:
            component = "numpy"
            _rehearse_numpy(numpy_state)
        if state_dict.get("torch") is not None:
            component = "torch"
            torch.Generator().set_state(state_dict["torch"])
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            component = "cuda"  # a state for another number of devices is skipped with a warning instead
            for index, device_state in enumerate(cuda):
                torch.Generator(device=f"cuda:{index}").set_state(device_state)
    except (ValueError, TypeError, RuntimeError, OverflowError, KeyError, IndexError) as err:
        raise ValueError(f"the {component!r} RNG state does not fit its generator: {err}") from err


def _rehearse_numpy(state: Mapping[str, Any]) -> None:
    try:
        import numpy
    except ImportError:
        return  # restoring skips it with a warning
    keys = state["keys"]
    if keys.dim() != 1 or keys.is_floating_point() or keys.is_complex():
        raise ValueError(f"'keys' must be a 1-D integer tensor, got {list(keys.shape)} {keys.dtype}")
    numpy.random.RandomState().set_state(
        (
            str(state["bit_generator"]),
            keys.numpy().astype(numpy.uint32),
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def _python_state() -> dict[str, Any]:
    # A dict names the parts of getstate()'s (version, 625 ints, gauss_next) tuple.
    version, words, gauss_next = random.getstate()
    return {"version": version, "state": list(words), "gauss_next": gauss_next}


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy
    except ImportError:
        return None
    legacy_state = cast(tuple[str, Any, int, int, float], numpy.random.get_state(legacy=True))
    bit_generator, keys, pos, has_gauss, cached_gaussian = legacy_state
    # A numpy array would need unpickling beyond weights_only=True; a tensor of the same words does not.
    return {
        "bit_generator": str(bit_generator),
        "keys": torch.from_numpy(keys.astype(numpy.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    try:
        import numpy
    except ImportError:
        warnings.warn("the checkpoint holds NumPy's RNG state, but NumPy is not installed; skipped", stacklevel=3)
        return
    keys = state["keys"].numpy().astype(numpy.uint32)
    numpy.random.set_state(
        (state["bit_generator"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    )


def _set_cuda_state(states: list[torch.Tensor]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(states):
        warnings.warn(
            f"the checkpoint holds the RNG state of {len(states)} CUDA device(s), this process sees {available}; "
            "the CUDA generators were not restored",
            stacklevel=3,
        )
        return
    torch.cuda.set_rng_state_all(states)
