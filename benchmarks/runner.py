"""The measuring side: runs every planned row ``reps`` times, each run in fresh worker processes.

Isolation: workers are forked from a forkserver that has only imported the libraries (torch, Lightning, fabric_ckpt),
so every run starts from the same clean process with nothing allocated, and without paying ~5 s of imports per run.
The page cache is set before each run (dropped for cold loads, filled for warm loads); memory is sampled from here.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from benchmarks.memory import RssAnonSampler
from benchmarks.scenarios import COLD, LOAD, SAVE, PlanOptions, Scenario, describe, plan
from benchmarks.storage import LocalDisk, S3Bucket, Storage, drop_page_cache, object_store
from benchmarks.worker import Task, worker_main

__all__ = ["Measurement", "RowResult", "RunOptions", "run"]

_PRELOAD = ["benchmarks._preload"]
_SAVE_SEED, _LOAD_SEED = 0, 1
_WARM_ONLY = "warm only"
_MEMORY_PRIMING_FACTOR = 4


@dataclass(frozen=True)
class RunOptions:
    """How to run the plan: repetitions, where files go, and how long a silent worker may take."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    reps: int = 3
    workdir: str | None = None
    timeout_s: float = 1800.0
    prime_memory: bool = True
    sample_interval_s: float = 0.0005
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))


@dataclass
class Measurement:
    """One run of one row."""

    seconds: float
    extra_anon_bytes: int
    baseline_anon_bytes: int
    samples: int
    sample_interval_ms: float
    cache: str
    file_bytes: int | None
    fingerprint: list[float] | None = None
    # fabric_ckpt's telemetry of the operation: {stage: {"seconds", "wall_seconds", "bytes", "calls"}}
    stages: dict[str, Any] | None = None


@dataclass
class RowResult:
    """Every run of one row, with what the runs have in common."""

    scenario: Scenario
    payload_bytes: int
    runs: list[Measurement] = field(default_factory=list)
    verified: bool | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.scenario
        seconds = [r.seconds for r in self.runs]
        extra = [r.extra_anon_bytes for r in self.runs]
        return {
            "key": s.key,
            "group": s.group,
            "library": s.checkpointer,
            "op": s.op,
            "cache": self.runs[0].cache if self.runs else s.cache,
            "requested_cache": s.cache,
            "label": s.label,
            "ranks": s.adapter.ranks,
            "storage": s.storage,
            "workload": describe(s.workload),
            "bytes": self.payload_bytes,
            "file_bytes": self.runs[-1].file_bytes if self.runs else None,
            "seconds": _spread(seconds),
            "mb_per_s": _spread([self.payload_bytes / 1e6 / t for t in seconds]),
            "extra_anon_bytes": _spread(extra),
            "verified": self.verified,
            "error": self.error,
            "runs": [{k: v for k, v in asdict(r).items() if k != "fingerprint"} for r in self.runs],
            "stages": _stage_medians([r.stages for r in self.runs if r.stages]),
        }


def _stage_medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """Per stage, the median over runs of its busy seconds and bytes (``None`` without telemetry)."""
    if not runs:
        return None
    names = list(dict.fromkeys(name for stages in runs for name in stages))
    return {
        name: {
            "seconds": statistics.median(stages.get(name, {}).get("seconds", 0.0) for stages in runs),
            "bytes": statistics.median(stages.get(name, {}).get("bytes", 0) for stages in runs),
        }
        for name in names
    }


def _spread(values: list[float] | list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(options: RunOptions) -> tuple[list[RowResult], dict[str, Any]]:
    """Measure every planned row; return the rows and facts about the run (cold cache, workdir)."""
    rows = plan(options.plan)
    cold_available = options.plan.cold and drop_page_cache()
    root = tempfile.mkdtemp(prefix="fabric-ckpt-bench-", dir=options.workdir)
    facts = {"workdir": root, "cold_cache": cold_available, "reps": options.reps}
    if options.plan.cold and not cold_available:
        options.log("drop_caches is not allowed here: 'cold' rows are measured with a warm cache ('warm only')")
    try:
        with contextlib.ExitStack() as stack:
            storages: dict[str, Storage] = {"local": LocalDisk(root)}
            if any(s.storage == S3Bucket.key for s in rows):
                options.log("starting a local S3 server (moto) for the object-store rows")
                storages[S3Bucket.key] = S3Bucket(stack.enter_context(object_store()))
            context = _context()  # after the S3 environment is set: the workers inherit it
            if options.prime_memory:
                _prime_memory(max(s.workload.payload_bytes() for s in rows), options.log)
            results = _run_rows(rows, storages, context, options, cold_available)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results, facts


def _run_rows(
    rows: list[Scenario],
    storages: dict[str, Storage],
    context: BaseContext,
    options: RunOptions,
    cold_available: bool,
) -> list[RowResult]:
    results: list[RowResult] = []
    saved: dict[str, RowResult] = {}
    for index, scenario in enumerate(rows):
        storage = storages[scenario.storage]
        options.log(f"[{index + 1}/{len(rows)}] {scenario.key}")
        result = RowResult(scenario, scenario.workload.payload_bytes())
        source = saved.get(scenario.checkpoint_name)
        try:
            if scenario.op == LOAD and (source is None or source.error):
                raise RuntimeError(f"no checkpoint to load: the save row for {scenario.checkpoint_name} failed")
            for _ in range(options.reps):
                result.runs.append(_run_once(scenario, storage, context, options, cold_available))
                options.log(f"    {result.runs[-1].seconds:.3f} s, +{result.runs[-1].extra_anon_bytes >> 20} MiB")
            result.verified = _verify(result, source)
        except Exception as err:
            result.error = f"{type(err).__name__}: {err}"
            options.log(f"    FAILED: {result.error}")
        if scenario.op == SAVE:
            saved[scenario.checkpoint_name] = result
        results.append(result)
        if scenario.op == LOAD and _last_use(rows, index):
            storage.remove(storage.path(scenario.checkpoint_name))
    return results


def _last_use(rows: list[Scenario], index: int) -> bool:
    name = rows[index].checkpoint_name
    return all(later.checkpoint_name != name for later in rows[index + 1 :])


def _verify(result: RowResult, source: RowResult | None) -> bool | None:
    """A load is verified when every run restored the values the save saw; a save, when it saved the payload."""
    if result.scenario.op == SAVE and not result.scenario.adapter.writes_file:
        return all(r.fingerprint is not None for r in result.runs)
    if result.scenario.op == SAVE:
        return all(r.file_bytes is not None and r.file_bytes >= result.payload_bytes for r in result.runs)
    assert source is not None
    expected = source.runs[-1].fingerprint
    return expected is not None and all(_same(r.fingerprint, expected) for r in result.runs)


def _same(a: list[float] | None, b: list[float]) -> bool:
    if a is None or len(a) != len(b):
        return False
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


def _run_once(
    scenario: Scenario, storage: Storage, context: BaseContext, options: RunOptions, cold_available: bool
) -> Measurement:
    path = storage.path(scenario.checkpoint_name)
    warmup_path = storage.path(f"warmup-{scenario.checkpoint_name}")
    ranks = scenario.adapter.ranks
    port = _free_port() if ranks > 1 else 0
    seed = _SAVE_SEED if scenario.op == SAVE else _LOAD_SEED
    tasks = [
        Task(scenario.checkpointer, scenario.op, scenario.workload, path, warmup_path, seed, rank, ranks, port)
        for rank in range(ranks)
    ]
    workers = _start(context, tasks)
    try:
        ready = _gather(workers, "ready", options.timeout_s)
        payload = ready[0]["payload_bytes"]
        if payload != scenario.workload.payload_bytes():
            raise RuntimeError(f"built {payload} bytes of tensors, expected {scenario.workload.payload_bytes()}")
        storage.remove(warmup_path)
        cache = _set_cache(scenario, storage, path, cold_available)
        pids = [process.pid for process, _ in workers if process.pid is not None]
        with RssAnonSampler(pids, options.sample_interval_s) as sampler:
            sampler.start()
            _send(workers, "go")
            done = _gather(workers, "done", options.timeout_s)
            peak = sampler.stop()
        _send(workers, "finish")
        result = _gather(workers, "result", options.timeout_s)
    finally:
        _stop(workers)
    return Measurement(
        seconds=max(d["seconds"] for d in done),
        extra_anon_bytes=peak.extra,
        baseline_anon_bytes=peak.baseline,
        samples=peak.samples,
        sample_interval_ms=round(peak.interval_ms, 3),
        cache=cache,
        file_bytes=scenario.adapter().file_bytes(path) if scenario.adapter.writes_file else None,
        fingerprint=result[0]["fingerprint"],
        stages=(result[0].get("telemetry") or {}).get("stages"),
    )


def _set_cache(scenario: Scenario, storage: Storage, path: str, cold_available: bool) -> str:
    """Put the page cache in the state the row asks for; return the state it is really in."""
    if scenario.op == SAVE:
        storage.remove(path)
        storage.settle()
        return ""
    if scenario.cache == COLD:
        return COLD if cold_available and storage.make_cold() else _WARM_ONLY
    storage.make_warm(path)
    return scenario.cache


Worker = tuple[BaseProcess, Connection]


def _context() -> BaseContext:
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _start(context: BaseContext, tasks: list[Task]) -> list[Worker]:
    workers: list[Worker] = []
    for task in tasks:
        parent_end, child_end = context.Pipe()
        # Not daemonic: torch_checkpointing starts its writer process from the worker. _stop ends every worker.
        process = context.Process(target=worker_main, args=(task, child_end), daemon=False)  # type: ignore[attr-defined]
        process.start()
        child_end.close()
        workers.append((process, parent_end))
    return workers


def _gather(workers: list[Worker], kind: str, timeout_s: float) -> list[dict[str, Any]]:
    return [_receive(process, conn, kind, timeout_s) for process, conn in workers]


def _receive(process: BaseProcess, conn: Connection, kind: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.05):
        if not process.is_alive() and not conn.poll(0):
            raise RuntimeError(f"worker {process.pid} died (exit code {process.exitcode}) before sending {kind!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {process.pid} sent no {kind!r} within {timeout_s:.0f} s")
    received, payload = conn.recv()
    if received == "error":
        raise RuntimeError(f"worker {process.pid} failed:\n{payload}")
    if received != kind:
        raise RuntimeError(f"worker {process.pid} sent {received!r}, expected {kind!r}")
    return payload


def _send(workers: list[Worker], message: str) -> None:
    for _, conn in workers:
        conn.send(message)


def _stop(workers: list[Worker]) -> None:
    """Let workers exit; end the ones (ours) that do not, e.g. when another rank failed mid-collective."""
    for _, conn in workers:
        conn.close()  # a worker still waiting for a message gets EOF and exits
    for process, _ in workers:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join(timeout=10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prime_memory(largest_payload: int, log: Callable[[str], None]) -> None:
    """Touch the memory the runs will use once: in a VM, a page's first touch is far slower than later ones."""
    available = _mem_available()
    size = min(_MEMORY_PRIMING_FACTOR * largest_payload, available // 2)
    log(f"priming {size / (1 << 30):.1f} GiB of memory")
    block = torch.ones(max(1, size // 4), dtype=torch.float32)
    del block


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
