"""Seeding every random number generator of a run, with Lightning's rules and environment variables.

A program that calls Lightning's ``seed_everything`` gets the same random numbers with ours: the same generators are
seeded (Python's, NumPy's global one when NumPy is installed, torch's on every device), the same environment
variables carry the seed to processes started later (``PL_GLOBAL_SEED``) and ask for seeded dataloader workers
(``PL_SEED_WORKERS``), and a worker's generators are derived from its process seed, worker id and rank the same way.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from functools import partial
from typing import Any

import torch

try:  # NumPy is optional; its global generator is seeded when it is installed
    import numpy
except ImportError:  # pragma: no cover - numpy is a dependency of torch's usual wheels
    numpy = None  # type: ignore[assignment]

__all__ = ["MAX_SEED", "MIN_SEED", "add_worker_init_fn", "reset_seed", "seed_everything", "worker_init_function"]

log = logging.getLogger(__name__)

MIN_SEED = 0
MAX_SEED = 2**32 - 1  # NumPy's global generator takes a uint32
SEED_VARIABLE = "PL_GLOBAL_SEED"
WORKERS_VARIABLE = "PL_SEED_WORKERS"
_MASK_64 = (1 << 64) - 1


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python's ``random``, NumPy's global generator and torch (every device); return the seed.

    Args:
        seed: an int in ``[0, 2**32 - 1]`` (anything ``int()`` accepts). ``None`` takes ``$PL_GLOBAL_SEED``, or 0 with
            a warning when that is unset.
        workers: ask ``fabric.setup_dataloaders`` to give loaders without a ``worker_init_fn`` one that seeds each
            worker from its process seed, worker id and rank (``PL_SEED_WORKERS=1``).
        verbose: log ``"Seed set to N"`` (and warn when no seed was found).

    The seed is stored in ``PL_GLOBAL_SEED`` so that processes started later (and :func:`reset_seed`) use it too.

    Raises:
        ValueError: the seed is outside ``[0, 2**32 - 1]``, or ``PL_GLOBAL_SEED`` is not an integer.

    Example:
        >>> seed_everything(42)
        42
    """
    if seed is None:
        from_environment = os.environ.get(SEED_VARIABLE)
        if from_environment is None:
            seed = 0
            if verbose:
                _warn_on_rank_zero(f"No seed given and ${SEED_VARIABLE} is unset: seed set to {seed}")
        else:
            try:
                seed = int(from_environment)
            except ValueError:
                raise ValueError(f"${SEED_VARIABLE}={from_environment!r} is not an integer seed") from None
    elif not isinstance(seed, int):
        seed = int(seed)
    if not MIN_SEED <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is out of range: seeds go from {MIN_SEED} to {MAX_SEED} (NumPy's limit)")
    if verbose:
        rank = _rank_from_environment()
        log.info(f"Seed set to {seed}" if rank is None else f"[rank: {rank}] Seed set to {seed}")
    os.environ[SEED_VARIABLE] = str(seed)
    random.seed(seed)
    if numpy is not None:
        numpy.random.seed(seed)
    torch.manual_seed(seed)
    os.environ[WORKERS_VARIABLE] = str(int(workers))
    return seed


def reset_seed() -> None:
    """Seed everything again with the seed (and ``workers`` flag) the last :func:`seed_everything` stored.

    Does nothing when no seed was set.

    Example:
        >>> seed_everything(7)
        7
        >>> reset_seed()  # the generators start over from seed 7
    """
    seed = os.environ.get(SEED_VARIABLE)
    if seed is None:
        return
    workers = bool(int(os.environ.get(WORKERS_VARIABLE, "0")))
    seed_everything(int(seed), workers=workers, verbose=False)


def worker_init_function(worker_id: int, rank: int | None = None) -> None:
    """Seed a dataloader worker's generators from its process seed, its id and the rank (Lightning's scheme).

    Workers of different ranks (and of different epochs) then draw different numbers, and a rerun draws the same
    ones. ``fabric.setup_dataloaders`` installs this after ``seed_everything(..., workers=True)``.

    Example:
        >>> loader = DataLoader(dataset, num_workers=2, worker_init_fn=partial(worker_init_function, rank=0))
    """
    global_rank = (_rank_from_environment() or 0) if rank is None else rank
    # DataLoader seeds worker `worker_id` with base_seed + worker_id; recover the base to use all of its bits.
    base_seed = torch.initial_seed() - worker_id
    seeds = _seed_sequence(base_seed, worker_id, global_rank, count=4)
    torch.manual_seed(seeds[0])
    random.seed((seeds[1] << 32) | seeds[2])
    if numpy is not None:
        numpy.random.seed(numpy.random.SeedSequence([base_seed, worker_id, global_rank]).generate_state(4))


def add_worker_init_fn(loader: Any, rank: int) -> None:
    """Give ``loader`` the seeding :func:`worker_init_function` if workers were asked to be seeded and it has none.

    Example:
        >>> seed_everything(0, workers=True)
        0
        >>> add_worker_init_fn(loader, rank=fabric.global_rank)
    """
    if not hasattr(loader, "worker_init_fn"):
        return
    if int(os.environ.get(WORKERS_VARIABLE, "0")) and loader.worker_init_fn is None:
        loader.worker_init_fn = partial(worker_init_function, rank=rank)


def _seed_sequence(base_seed: int, worker_id: int, global_rank: int, count: int) -> list[int]:
    """``count`` 64-bit seeds from one number packing the three inputs.

    The packed number is mixed with MurmurHash3's 64-bit finaliser (so small inputs still set high bits), then
    stepped through Knuth's MMIX linear congruential generator; the same scheme as Lightning, so workers draw the same
    numbers under either library.
    """
    state = (base_seed << 32) | (worker_id << 16) | global_rank
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        state ^= state >> 33
        state = (state * multiplier) & _MASK_64
    state ^= state >> 33
    seeds = []
    for _ in range(count):
        state = (state * 6364136223846793005 + 1) & _MASK_64
        seeds.append(state)
    return seeds


def _rank_from_environment() -> int | None:
    """This process's global rank as a launcher (ours, torchrun, SLURM, LSF) set it; ``None`` if none did."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(variable)
        if value is not None:
            return int(value)
    return None


def _warn_on_rank_zero(message: str) -> None:
    if not _rank_from_environment():
        warnings.warn(message, stacklevel=3)
