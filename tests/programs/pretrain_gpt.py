"""GPT pretraining, in the style of litgpt's pretrain.py: a tiny decoder-only transformer on synthetic tokens, built
with ``init_module(empty_init=True)`` and initialised explicitly, compiled with ``torch.compile``, trained in
``bf16-mixed`` with gradient accumulation (``no_backward_sync`` on the accumulating micro-batches), gradient clipping,
a warm-up and cosine learning rate, and a torchdata ``StatefulDataLoader`` whose position is saved in every
checkpoint; ``--resume`` continues from the latest one, in the middle of an epoch if that is where it was saved.

    PROGRAM_FABRIC=fabric_ckpt python tests/programs/pretrain_gpt.py --devices 2 --out out --checkpoints ckpt
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from tests.programs.common import IMPLEMENTATION, arguments, latest_checkpoint, strategy, write_record

if IMPLEMENTATION == "lightning":
    from lightning.fabric import Fabric
else:
    from fabric_ckpt import Fabric


@dataclass
class Config:
    vocab_size: int = 64
    block_size: int = 16
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(), nn.Linear(4 * config.n_embd, config.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.max_seq_length = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def initialize_weights(model: GPT) -> None:
    """Every parameter set explicitly: ``init_module(empty_init=True)`` left them uninitialised."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for block in model.blocks:  # scaled residual projections (GPT-2)
        nn.init.normal_(block.attn.proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * model.config.n_layer))


def token_data(count: int, config: Config, seed: int) -> TensorDataset:
    """Sequences of ``block_size + 1`` tokens with structure to learn: each token is mostly its predecessor plus one."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, config.vocab_size, (count, 1), generator=generator)
    steps = torch.where(torch.rand(count, config.block_size, generator=generator) < 0.8, 1, 2)
    tokens = (start + torch.cat([torch.zeros_like(start), steps.cumsum(1)], dim=1)) % config.vocab_size
    return TensorDataset(tokens)


class CycleIterator:
    """Loops over a loader forever, counting the epochs (litgpt's)."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable
        self.epoch = 0
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> CycleIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.iterable)
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.iterable)
            self.epoch += 1
            return next(self._iterator)


def get_lr(learning_rate: float, it: int, warmup_iters: int, max_iters: int, min_lr: float) -> float:
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


@torch.no_grad()
def validate(fabric: Any, model: nn.Module, loader: Iterable[Any]) -> torch.Tensor:
    model.eval()
    losses = []
    for (batch,) in loader:
        logits = model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    model.train()
    return fabric.all_reduce(torch.stack(losses).mean())


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--max-iters", type=int, default=16, help="micro-batches per rank")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--save-interval", type=int, default=1, help="optimizer steps between checkpoints")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()

    config = Config()
    fabric = Fabric(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy(args.devices),
        precision="bf16-mixed",
        loggers=CSVLogger(args.out / "logs", name="pretrain", version=0),
    )
    fabric.launch()
    fabric.seed_everything(1337)

    with fabric.init_module(empty_init=True):
        model = GPT(config)
    initialize_weights(model)
    model = torch.compile(model, backend=args.compile_backend)
    model = fabric.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)

    train_loader = StatefulDataLoader(
        token_data(32, config, seed=1), batch_size=args.micro_batch_size, shuffle=not args.no_shuffle
    )
    val_loader = StatefulDataLoader(token_data(8, config, seed=2), batch_size=args.micro_batch_size)
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)

    state = {"model": model, "optimizer": optimizer, "train_dataloader": train_loader, "iter_num": 0, "step_count": 0}
    if args.resume:
        fabric.load(latest_checkpoint(args.checkpoints), state)

    losses, val_losses = [], []
    train_iterator = CycleIterator(train_loader)
    for (batch,) in train_iterator:
        if state["iter_num"] >= args.max_iters:
            break
        lr = get_lr(3e-3, state["iter_num"], warmup_iters=4, max_iters=args.max_iters, min_lr=3e-4)
        for group in optimizer.param_groups:
            group["lr"] = lr
        state["iter_num"] += 1
        # The model's own attribute, read through the set-up (and compiled) module, as litgpt does.
        input_ids = batch[:, 0 : model.max_seq_length].contiguous()
        targets = batch[:, 1 : model.max_seq_length + 1].contiguous()

        is_accumulating = state["iter_num"] % args.grad_accum != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            logits = model(input_ids)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            fabric.backward(loss / args.grad_accum)
        losses.append(loss.detach())

        if not is_accumulating:
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad()
            state["step_count"] += 1
            fabric.log_dict({"loss": loss.detach(), "lr": lr, "epoch": train_iterator.epoch}, step=state["iter_num"])
            if state["step_count"] % args.save_interval == 0:
                val_losses.append(validate(fabric, model, val_loader))
                fabric.log("val_loss", val_losses[-1], step=state["iter_num"])
                fabric.save(args.checkpoints / f"step-{state['step_count']:08d}.pth", state)
                if args.stop_after is not None and state["step_count"] >= args.stop_after:
                    break
    fabric.logger.finalize("success")

    write_record(
        args.out,
        fabric.global_rank,
        model,
        losses=losses,
        val_losses=val_losses,
        logits_dtype=str(logits.dtype),
        iter_num=state["iter_num"],
    )


if __name__ == "__main__":
    main()
