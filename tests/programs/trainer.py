"""A trainer of our own for LightningModules, in the style of Lightning's examples/fabric/build_your_own_trainer.

The loop calls ``model.training_step``/``validation_step`` (not ``forward``), runs the module's and the callbacks'
hooks through ``fabric.call``, steps the optimizer with a closure, accumulates gradients with ``no_backward_sync``,
steps a scheduler each epoch, logs to a CSVLogger, and saves a checkpoint after every epoch; ``--resume`` continues
from the latest one. The data (synthetic points of four classes) is shuffled.

    PROGRAM_FABRIC=fabric_ckpt python tests/programs/trainer.py --devices 2 --out out --checkpoints ckpt
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.programs.common import IMPLEMENTATION, arguments, latest_checkpoint, strategy, write_record

if IMPLEMENTATION == "lightning":
    from lightning.fabric import Fabric
else:
    from fabric_ckpt import Fabric

CLASSES = 4
FEATURES = 6


class PointClassifier(pl.LightningModule):
    """A LightningModule whose hooks count how often the trainer called them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
        self.hook_calls: Counter[str] = Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log("train_loss", loss.detach())
        return {"loss": loss, "accuracy": accuracy}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = self(inputs)
        return {"loss": F.cross_entropy(logits, labels), "correct": (logits.argmax(-1) == labels).sum()}

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=3e-3)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.8)}

    def on_train_epoch_start(self) -> None:
        self.hook_calls["on_train_epoch_start"] += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.hook_calls["on_train_batch_end"] += 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.hook_calls["on_before_optimizer_step"] += 1

    def on_validation_epoch_end(self) -> None:
        self.hook_calls["on_validation_epoch_end"] += 1


class HookCounter:
    """A Fabric callback, told of the setup and of every optimizer step."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def on_after_setup(self, fabric: Any) -> None:  # Lightning also passes module=; a callback may take fewer
        self.calls["on_after_setup"] += 1

    def on_after_optimizer_step(self, strategy: Any, optimizer: torch.optim.Optimizer) -> None:
        self.calls["on_after_optimizer_step"] += 1

    def on_train_epoch_end(self, epoch: int) -> None:
        self.calls["on_train_epoch_end"] += 1


class Trainer:
    def __init__(self, devices: int, checkpoints: Path, logs: Path, max_epochs: int, grad_accum_steps: int) -> None:
        self.callback = HookCounter()
        self.fabric = Fabric(
            accelerator="cpu",
            devices=devices,
            strategy=strategy(devices),
            callbacks=[self.callback],
            loggers=CSVLogger(logs, name="trainer", version=0),
        )
        self.checkpoints = checkpoints
        self.max_epochs = max_epochs
        self.grad_accum_steps = grad_accum_steps
        self.global_step = 0
        self.current_epoch = 0
        self.train_losses: list[torch.Tensor] = []
        self.val_losses: list[torch.Tensor] = []
        self._last_outputs: dict[str, torch.Tensor] = {}

    def fit(
        self, model: PointClassifier, train_loader: DataLoader, val_loader: DataLoader, resume: bool, stop: int | None
    ) -> Any:
        fabric = self.fabric
        fabric.launch()
        train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)
        config = model.configure_optimizers()
        scheduler = config["lr_scheduler"]
        model, optimizer = fabric.setup(model, config["optimizer"])
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        if resume:
            self.load(state)
        while self.current_epoch < self.max_epochs and (stop is None or self.global_step < stop):
            self.train_epoch(model, optimizer, train_loader)
            self.validate(model, val_loader)
            scheduler.step()
            self.current_epoch += 1
            self.save(state)
        fabric.logger.finalize("success")
        return model

    def train_epoch(self, model: Any, optimizer: torch.optim.Optimizer, loader: Any) -> None:
        fabric = self.fabric
        fabric.call("on_train_epoch_start")
        for batch_idx, batch in enumerate(loader):
            fabric.call("on_train_batch_start", batch, batch_idx)
            should_step = (batch_idx + 1) % self.grad_accum_steps == 0
            if should_step:
                fabric.call("on_before_optimizer_step", optimizer)
                optimizer.step(partial(self.training_step, model, batch, batch_idx, accumulating=False))
                fabric.call("on_before_zero_grad", optimizer)
                optimizer.zero_grad()
                self.global_step += 1
            else:
                self.training_step(model, batch, batch_idx, accumulating=True)
            fabric.call("on_train_batch_end", self._last_outputs, batch, batch_idx)
        fabric.call("on_train_epoch_end", epoch=self.current_epoch)

    def training_step(self, model: Any, batch: Any, batch_idx: int, accumulating: bool) -> torch.Tensor:
        with self.fabric.no_backward_sync(model, enabled=accumulating):
            outputs = model.training_step(batch, batch_idx)
            loss = outputs["loss"] / self.grad_accum_steps
            self.fabric.backward(loss)
        self._last_outputs = {name: value.detach() for name, value in outputs.items()}
        # Every rank's loss, in rank order: the ranks' own data, so the record shows each rank trained on its part.
        self.train_losses.append(self.fabric.all_gather(outputs["loss"].detach()))
        return loss

    @torch.no_grad()
    def validate(self, model: Any, loader: Any) -> None:
        fabric = self.fabric
        model.eval()
        fabric.call("on_validation_epoch_start")
        total, correct, batches = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
        for batch_idx, batch in enumerate(loader):
            outputs = model.validation_step(batch, batch_idx)
            total += outputs["loss"]
            correct += outputs["correct"]
            batches += 1
        fabric.call("on_validation_epoch_end")
        model.train()
        val_loss = fabric.all_reduce(total / batches)
        correct = fabric.all_reduce(correct, reduce_op="sum")
        self.val_losses.append(val_loss)
        fabric.log_dict({"val_loss": val_loss, "val_correct": correct}, step=self.global_step)

    def save(self, state: dict[str, Any]) -> None:
        state.update(global_step=self.global_step, current_epoch=self.current_epoch, rng=torch.get_rng_state())
        self.fabric.save(self.checkpoints / f"epoch-{self.current_epoch:04d}.ckpt", state)

    def load(self, state: dict[str, Any]) -> None:
        path = latest_checkpoint(self.checkpoints)
        assert path is not None, f"nothing to resume from in {self.checkpoints}"
        remainder = self.fabric.load(path, state)
        self.global_step = remainder.pop("global_step")
        self.current_epoch = remainder.pop("current_epoch")
        torch.set_rng_state(remainder.pop("rng"))  # the shuffling of a loader without a sampler of its own
        assert not remainder, f"unused checkpoint values: {sorted(remainder)}"


def points(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=generator) * 2
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    return TensorDataset(centres[labels] + torch.randn(count, FEATURES, generator=generator), labels)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--grad-accum-steps", type=int, default=2)
    args = parser.parse_args()

    trainer = Trainer(args.devices, args.checkpoints, args.out / "logs", args.epochs, args.grad_accum_steps)
    trainer.fabric.seed_everything(7)
    module = PointClassifier()
    train_loader = DataLoader(points(96, seed=1), batch_size=8, shuffle=True)
    val_loader = DataLoader(points(32, seed=2), batch_size=16)
    model = trainer.fit(module, train_loader, val_loader, args.resume, args.stop_after)

    write_record(
        args.out,
        trainer.fabric.global_rank,
        model,
        train_losses=trainer.train_losses,
        val_losses=trainer.val_losses,
        global_step=trainer.global_step,
        module_hooks=dict(module.hook_calls),
        callback_hooks=dict(trainer.callback.calls),
    )


if __name__ == "__main__":
    main()
