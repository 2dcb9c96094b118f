"""Checkpointing measured where users feel it: a training loop's steps per second, and the time to resume.

- ``train_*`` rows run the GPT-like model's forward, backward and Adam step for ``steps`` steps; ``train_eager``
  and ``train_lazy`` take an asynchronous checkpoint after every ``every`` steps (eager or lazy snapshot) and wait
  for the last one before the clock stops; ``train_plain`` takes none. The checkpoint the loop wrote last is loaded
  afterwards and checked against the state at the call that wrote it.
- ``fabric_ckpt_resume``: the save is a :class:`~fabric_ckpt.CheckpointManager` save; the load is a new Python
  process, timed from its start to the end of its first training step after ``load_latest`` (imports, model
  construction with ``empty_init``, the load and one step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.checkpointers import Checkpointer, _set_up, fingerprint, register
from benchmarks.workloads import GPTWorkload, LiveState

__all__ = ["TrainingWorkload"]

_BATCH, _TOKENS = 2, 32


@dataclass(frozen=True)
class TrainingWorkload:
    """The GPT workload trained for ``steps`` steps, checkpointed after every ``every`` steps (by the row's mode)."""

    gpt: GPTWorkload
    steps: int = 30
    every: int = 10

    @property
    def name(self) -> str:
        return f"train{self.steps}x{self.every}-{self.gpt.name}"

    @property
    def config(self) -> Any:
        return self.gpt.config

    def payload_bytes(self) -> int:
        return self.gpt.payload_bytes()

    def tiny(self) -> TrainingWorkload:
        return TrainingWorkload(self.gpt.tiny(), steps=2, every=1)

    def build(self, seed: int, shard: Any = None) -> LiveState:
        return self.gpt.build(seed, shard)


def _train_step(model: Any, optimizer: Any, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@register
class TrainingLoopPlain(Checkpointer):
    """The training loop with no checkpoints: the steps per second every checkpointing loop is compared with."""

    key = "train_plain"
    save_label = "training loop, no checkpoints"
    load_label = "-"
    writes_file = False
    has_load = False
    snapshot: str | None = None

    def build(self, workload: Any, seed: int) -> LiveState:
        from fabric_ckpt import Fabric

        state = _set_up(Fabric(accelerator="cpu"), workload.build(seed))
        assert state.extra is not None and state.model is not None
        config = workload.config
        generator = torch.Generator().manual_seed(seed)
        state.extra["tokens"] = torch.randint(config.vocab, (_BATCH, min(_TOKENS, config.block)), generator=generator)
        state.extra["steps"], state.extra["every"] = workload.steps, workload.every
        _train_step(state.model, state.optimizer, state.extra["tokens"])  # first-step allocations, not timed
        if self.snapshot is not None:  # the first save allocates the staging memory, as in any run
            with tempfile.TemporaryDirectory() as scratch:
                state.extra["fabric"].save_async(os.path.join(scratch, "prime.ckpt"), state.objects()).wait()
        return state

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        fabric, tokens = state.extra["fabric"], state.extra["tokens"]
        steps, every = state.extra["steps"], state.extra["every"]
        for step in range(1, steps + 1):
            _train_step(state.model, state.optimizer, tokens)
            if self.snapshot is not None and step % every == 0 and step < steps:
                state.extra["expected"] = fingerprint(state)
                fabric.save_async(path, state.objects(), snapshot=self.snapshot)
                state.extra["path"] = path
        fabric.wait_for_saves()

    def load(self, path: str, state: LiveState) -> Any:
        raise NotImplementedError("training rows only run the loop")

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        """The state's sums; for checkpointing loops, ``None`` unless the last checkpoint is the state at its call."""
        assert state.extra is not None
        if self.snapshot is None:
            return fingerprint(state)
        from fabric_ckpt import Fabric

        fresh = _set_up(Fabric(accelerator="cpu"), GPTWorkloadLike.of(state).build(seed=99))
        assert fresh.extra is not None
        fresh.extra["fabric"].load(state.extra["path"], fresh.objects())
        restored = fingerprint(fresh)
        return restored if restored == state.extra["expected"] else None


class GPTWorkloadLike:
    """Rebuilds a model of the same shape as a live state's (to load its checkpoint into)."""

    @staticmethod
    def of(state: LiveState) -> GPTWorkload:
        from benchmarks.workloads import GPTConfig

        assert state.model is not None
        model: Any = getattr(state.model, "module", state.model)
        config = GPTConfig(
            vocab=model.wte.weight.shape[0],
            block=model.wpe.weight.shape[0],
            width=model.wte.weight.shape[1],
            layers=len(model.h),
        )
        return GPTWorkload(config)


@register
class TrainingLoopEager(TrainingLoopPlain):
    """The training loop with an eager asynchronous checkpoint every ``every`` steps."""

    key = "train_eager"
    save_label = "training loop, save_async (eager) every K steps"
    snapshot = "eager"


@register
class TrainingLoopLazy(TrainingLoopPlain):
    """The training loop with a lazy asynchronous checkpoint every ``every`` steps."""

    key = "train_lazy"
    save_label = "training loop, save_async (lazy) every K steps"
    snapshot = "lazy"


_RESUME_SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from fabric_ckpt import CheckpointManager, Fabric
from benchmarks.workloads import GPT, GPTConfig
from benchmarks.training import _train_step
config = GPTConfig(**json.loads(sys.argv[2]))
fabric = Fabric(accelerator="cpu")
with fabric.init_module(empty_init=True):
    model = GPT(config)
model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=1e-4))
CheckpointManager(fabric, sys.argv[1], run_name="bench").load_latest({"model": model, "optimizer": optimizer})
params = list(model.parameters())
picks = [params[0], params[-1], optimizer.state[params[0]]["exp_avg"], optimizer.state[params[-1]]["exp_avg_sq"]]
sums = [float(t.detach().double().sum()) for t in picks]
tokens = torch.randint(config.vocab, (2, min(32, config.block)))
_train_step(model, optimizer, tokens)
print(json.dumps({"fingerprint": sums}), flush=True)
"""


@register
class FabricCkptResume(Checkpointer):
    """Time to resume: a new process's start to its first training step after ``CheckpointManager.load_latest``."""

    key = "fabric_ckpt_resume"
    save_label = "fabric_ckpt CheckpointManager.save"
    load_label = "time to resume: process start to first step after load_latest"

    def build(self, workload: Any, seed: int) -> LiveState:
        from fabric_ckpt import Fabric

        state = _set_up(Fabric(accelerator="cpu"), workload.build(seed))
        assert state.extra is not None
        state.extra["config"] = asdict(workload.config)
        return state

    def save(self, path: str, state: LiveState) -> None:
        from fabric_ckpt import CheckpointManager

        assert state.extra is not None
        manager = CheckpointManager(state.extra["fabric"], path, run_name="bench", overwrite=True)
        manager.save(state.objects())

    def load(self, path: str, state: LiveState) -> Any:
        assert state.extra is not None
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        result = subprocess.run(
            [sys.executable, "-c", _RESUME_SCRIPT, path, json.dumps(state.extra["config"])],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if result.returncode != 0:
            raise RuntimeError(f"the resuming process failed:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        if isinstance(loaded, dict):
            return list(loaded["fingerprint"])
        return fingerprint(state)
