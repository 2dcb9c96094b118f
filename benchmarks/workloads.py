"""What gets checkpointed: a GPT-like model with real Adam state, or many small tensors.

Workloads are small frozen descriptions (picklable, so they travel to worker processes); ``build`` makes the live
objects inside the worker. Every workload knows its payload size (the bytes of all tensors in the checkpoint) without
building anything, so the parent can size the raw-disk rows and check what each library wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GIB", "GPT", "GPTConfig", "GPTWorkload", "LiveState", "SmallTensorsWorkload", "Workload", "config_for_size"]

GIB = 1 << 30
_FLOAT32 = 4
# Adam keeps exp_avg and exp_avg_sq (one float32 each per weight) and a float32 scalar `step` per parameter.
_ADAM_SLOTS = 2
_TENSORS_PER_BLOCK = 16
_WIDTH_STEP = 16

Sharder = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class GPTConfig:
    """A GPT-2-style decoder. The default is the headline model: 196 tensors, 1.0 GiB of float32 weights."""

    vocab: int = 50304
    block: int = 1024
    width: int = 1200
    layers: int = 12

    @property
    def heads(self) -> int:
        """The largest head count up to ``width // 64`` that divides the width (it only shapes the forward pass)."""
        return next(h for h in range(max(1, self.width // 64), 0, -1) if self.width % h == 0)

    @property
    def num_tensors(self) -> int:
        return _TENSORS_PER_BLOCK * self.layers + 4

    @property
    def num_weights(self) -> int:
        d = self.width
        attention = 4 * (d * d + d)
        mlp = (4 * d * d + 4 * d) + (4 * d * d + d)
        norms = 2 * 2 * d
        return self.layers * (attention + mlp + norms) + (self.vocab + self.block) * d + 2 * d

    def payload_bytes(self) -> int:
        """Bytes of every tensor in ``{"model": ..., "optimizer": Adam}`` after one step."""
        return _FLOAT32 * (1 + _ADAM_SLOTS) * self.num_weights + _FLOAT32 * self.num_tensors


def config_for_size(total_gib: float, *, layers: int = 12, vocab: int = 50304, block: int = 1024) -> GPTConfig:
    """The config whose model + Adam checkpoint is closest to ``total_gib``; only the width is scaled.

    ``config_for_size(3)`` is the headline model (width 1200).
    """
    target = total_gib * GIB

    def size(width: int) -> int:
        return GPTConfig(vocab, block, width, layers).payload_bytes()

    # Payload grows monotonically with width: a rough quadratic guess, then the nearest multiple of the step.
    guess = max(_WIDTH_STEP, int(math.sqrt(target / (_FLOAT32 * 3 * 12 * max(layers, 1)))))
    candidates = range(_WIDTH_STEP, 4 * guess + 4 * _WIDTH_STEP, _WIDTH_STEP)
    width = min(candidates, key=lambda w: abs(size(w) - target))
    return GPTConfig(vocab, block, width, layers)


class _Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.width
        self.heads = config.heads
        self.ln_1 = nn.LayerNorm(d)
        # Separate q/k/v projections: 16 tensors per block, as in the 196-tensor model.
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        h = self.ln_1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, d // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """Token and position embeddings, pre-norm blocks, a final norm, and an output head tied to the embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab, config.width)
        self.wpe = nn.Embedding(config.block, config.width)
        self.h = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


@dataclass
class LiveState:
    """The objects one process checkpoints; checkpointers may add their own (e.g. a Fabric, a raw buffer)."""

    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    extra: dict[str, Any] | None = None

    def objects(self) -> dict[str, Any]:
        """What goes into ``save(path, state)``: the model and, if any, the optimizer."""
        state: dict[str, Any] = {"model": self.model}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        return state


@dataclass(frozen=True)
class GPTWorkload:
    """The GPT model plus Adam state after one real optimizer step."""

    config: GPTConfig

    @property
    def name(self) -> str:
        c = self.config
        return f"gpt-d{c.width}-l{c.layers}-v{c.vocab}-b{c.block}"

    def payload_bytes(self) -> int:
        return self.config.payload_bytes()

    def tiny(self) -> GPTWorkload:
        """A few-hundred-KB model of the same shape family, for warming up code paths before measuring."""
        return GPTWorkload(GPTConfig(vocab=256, block=16, width=32, layers=2))

    def build(self, seed: int, shard: Sharder | None = None) -> LiveState:
        """Build the model (sharded by ``shard`` before the optimizer exists, as FSDP2 needs) and take one step."""
        torch.manual_seed(seed)
        model: nn.Module = GPT(self.config)
        if shard is not None:
            model = shard(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        tokens = torch.randint(self.config.vocab, (1, min(8, self.config.block)))
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        # Gradients are not part of a checkpoint; freeing them keeps the memory baseline to what training keeps.
        optimizer.zero_grad(set_to_none=True)
        return LiveState(model, optimizer)


@dataclass(frozen=True)
class SmallTensorsWorkload:
    """Many small parameters in one module and no optimizer: per-tensor overhead dominates."""

    count: int = 20_000
    numel: int = 256

    @property
    def name(self) -> str:
        return f"small-{self.count}x{self.numel}"

    def payload_bytes(self) -> int:
        return self.count * self.numel * _FLOAT32

    def tiny(self) -> SmallTensorsWorkload:
        return SmallTensorsWorkload(min(self.count, 100), self.numel)

    def build(self, seed: int, shard: Sharder | None = None) -> LiveState:
        generator = torch.Generator().manual_seed(seed)
        module = nn.Module()
        module.params = nn.ParameterList(torch.randn(self.numel, generator=generator) for _ in range(self.count))
        return LiveState(module, None)


Workload = GPTWorkload | SmallTensorsWorkload
