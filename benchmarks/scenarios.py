"""The rows of the benchmark: which library does which operation on which workload, in what cache state.

:func:`plan` is the registry of rows. Extension points:

- a new library or mode (fabric_ckpt async save, ``Fabric(strategy="fsdp", devices=2)``): register a
  :class:`~benchmarks.checkpointers.Checkpointer` and add its key to :data:`HEADLINE_LIBRARIES` (or its own group);
- a new storage: a :class:`~benchmarks.storage.Storage` (as ``S3Bucket``), created in
  :func:`benchmarks.runner.run`, and rows planned with ``storage=<its key>``;
- a new ratio: add it to :func:`benchmarks.report.ratios`.

Rows of one checkpoint are planned save first, then cold loads, then warm loads: the loads read what the save wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import benchmarks.peers  # noqa: F401  (registers torch_checkpointing, lazy snapshots and the reference rows)
from benchmarks.checkpointers import CHECKPOINTERS, Checkpointer
from benchmarks.training import TrainingWorkload
from benchmarks.workloads import GIB, GPTWorkload, SmallTensorsWorkload, Workload, config_for_size

__all__ = [
    "ASYNC_LIBRARIES",
    "TRAINING_LIBRARIES",
    "HEADLINE_LIBRARIES",
    "OBJECT_STORE_LIBRARIES",
    "SMALL_TENSOR_LIBRARIES",
    "SWEEP_LIBRARIES",
    "describe",
    "PlanOptions",
    "Scenario",
    "plan",
    "sweep_sizes",
]

HEADLINE_LIBRARIES = (
    "disk",
    "torch",
    "torch_mmap",
    "lightning",
    "torch_checkpointing",
    "fabric_ckpt",
    "dcp",
    "fabric_ckpt_fsdp",
)
# Save-only rows: one memory copy of the state (the floor of any snapshot), then the caller-blocked and
# until-complete times of asynchronous saves.
ASYNC_LIBRARIES = (
    "memcpy",
    "fabric_ckpt_async",
    "fabric_ckpt_async_total",
    "fabric_ckpt_lazy",
    "fabric_ckpt_lazy_total",
    "torch_checkpointing_async",
    "torch_checkpointing_async_total",
)
# The training loop without checkpoints, then with an eager and a lazy asynchronous checkpoint every K steps.
TRAINING_LIBRARIES = ("train_plain", "train_eager", "train_lazy")
SMALL_TENSOR_LIBRARIES = ("fabric_ckpt", "torch")
# Rows on the local S3 server: s3fs moving the same bytes raw, and fabric_ckpt's save/load to and from s3:// URLs.
OBJECT_STORE_LIBRARIES = ("s3fs", "fabric_ckpt")
SWEEP_LIBRARIES = ("fabric_ckpt",)

SAVE, LOAD = "save", "load"
COLD, WARM = "cold", "warm"


@dataclass(frozen=True)
class Scenario:
    """One row: ``checkpointer`` does ``op`` on ``workload`` (loads with a ``cold`` or ``warm`` page cache)."""

    group: str
    checkpointer: str
    op: str
    workload: Workload | TrainingWorkload
    cache: str = ""
    storage: str = "local"

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.group, self.workload.name, self.checkpointer, self.op, self.cache) if p)

    @property
    def adapter(self) -> type[Checkpointer]:
        return CHECKPOINTERS[self.checkpointer]

    @property
    def label(self) -> str:
        adapter = self.adapter
        return adapter.save_label if self.op == SAVE else adapter.load_label

    @property
    def checkpoint_name(self) -> str:
        """The file (or folder) shared by this workload's save and loads for this library (on its storage)."""
        where = "" if self.storage == "local" else f"-{self.storage}"
        return f"{self.workload.name}-{self.checkpointer}{where}.ckpt"


@dataclass(frozen=True)
class PlanOptions:
    """What to measure. Defaults are ``make bench``'s."""

    size_gib: float = 1.0
    layers: int = 12
    vocab: int = 50304
    block: int = 1024
    cold: bool = True
    libraries: tuple[str, ...] = HEADLINE_LIBRARIES
    small_count: int = 20_000
    small_numel: int = 256
    sweep_gib: tuple[float, ...] | None = None
    # Checkpoint size on the local S3 server (0: no object-store rows). Smaller than the headline because the
    # server is slow (~100 MB/s), but well above a part (64 MiB), so memory bounded by parts in flight shows.
    object_store_gib: float = 0.5
    # The training-loop rows: steps per run and steps between checkpoints (0 steps: no training or resume rows).
    train_steps: int = 30
    train_every: int = 10

    def gpt(self, size_gib: float) -> GPTWorkload:
        return GPTWorkload(config_for_size(size_gib, layers=self.layers, vocab=self.vocab, block=self.block))


def sweep_sizes(size_gib: float) -> tuple[float, ...]:
    """0.25, 0.5, 1, 2, ... GiB below ``size_gib``, then ``size_gib`` itself."""
    sizes: list[float] = []
    size = 0.25
    while size < size_gib * 0.999:
        sizes.append(size)
        size *= 2
    return (*sizes, size_gib)


def _rows(group: str, library: str, workload: Workload, caches: tuple[str, ...]) -> list[Scenario]:
    return [Scenario(group, library, SAVE, workload)] + [
        Scenario(group, library, LOAD, workload, cache) for cache in caches
    ]


def plan(options: PlanOptions) -> list[Scenario]:
    """Every row to measure, in the order to measure it."""
    headline = options.gpt(options.size_gib)
    caches = (COLD, WARM) if options.cold else (WARM,)
    rows: list[Scenario] = []
    for library in options.libraries:
        rows += _rows("headline", library, headline, caches)
    if "fabric_ckpt" in options.libraries:
        rows += [Scenario("async", library, SAVE, headline) for library in ASYNC_LIBRARIES]
        if options.train_steps > 0:
            training = TrainingWorkload(headline, options.train_steps, options.train_every)
            rows += [Scenario("training", library, SAVE, training) for library in TRAINING_LIBRARIES]
            rows += _rows("resume", "fabric_ckpt_resume", headline, (WARM,))
    if options.object_store_gib > 0:
        remote = options.gpt(min(options.size_gib, options.object_store_gib))
        for library in OBJECT_STORE_LIBRARIES:
            rows += [
                Scenario("object store", library, SAVE, remote, storage="s3"),
                Scenario("object store", library, LOAD, remote, storage="s3"),
            ]
    small = SmallTensorsWorkload(options.small_count, options.small_numel)
    for library in SMALL_TENSOR_LIBRARIES:
        rows += _rows("small tensors", library, small, (WARM,))
    sweep_cache = COLD if options.cold else WARM
    for size in options.sweep_gib or sweep_sizes(options.size_gib):
        workload = options.gpt(size)
        if workload == headline:
            continue  # the headline rows already measure this point
        for library in SWEEP_LIBRARIES:
            rows += _rows("sweep", library, workload, (sweep_cache,))
    return rows


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 4 else f"{nbytes / (1 << 20):.1f} MiB"


def describe(workload: Workload | TrainingWorkload) -> str:
    """A human description for the report."""
    if isinstance(workload, TrainingWorkload):
        return f"{workload.steps} training steps, a checkpoint after every {workload.every}; " + describe(workload.gpt)
    if isinstance(workload, GPTWorkload):
        c = workload.config
        return (
            f"GPT (width {c.width}, {c.layers} layers, vocab {c.vocab}; {c.num_tensors} tensors, "
            f"{_size(4 * c.num_weights)} float32) + Adam state = {_size(workload.payload_bytes())}"
        )
    return f"{workload.count} tensors of {workload.numel} float32 = {_size(workload.payload_bytes())}"
