"""An image classifier, in the style of Lightning's examples/fabric/image_classifier: a small CNN with dropout, trained
with Adadelta and a StepLR schedule on synthetic 12x12 images, tested after every epoch.

Rank 0 writes the data set to disk first (as the example downloads MNIST), then every rank reads it. The loaders do
not shuffle (as in the example); in a multi-process run each rank reads its part through a DistributedSampler. A
checkpoint is saved after every epoch, with the random state dropout draws from; ``--resume`` continues from it.

    PROGRAM_FABRIC=lightning python tests/programs/image_classifier.py --devices 2 --out out --checkpoints ckpt
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

from tests.programs.common import IMPLEMENTATION, arguments, latest_checkpoint, strategy, write_record

if IMPLEMENTATION == "lightning":
    from lightning.fabric import Fabric
else:
    from fabric_ckpt import Fabric

SIDE = 12
CLASSES = 10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def make_data_set(folder: Path) -> None:
    """Images of ten classes, each a noisy copy of its class's template, written where every rank reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(2024)
    templates = (torch.rand(CLASSES, 1, SIDE, SIDE, generator=generator) > 0.5).float()
    for split, count in (("train", 192), ("test", 64)):
        labels = torch.randint(0, CLASSES, (count,), generator=generator)
        images = templates[labels] + 0.3 * torch.randn(count, 1, SIDE, SIDE, generator=generator)
        torch.save({"images": images, "labels": labels}, folder / f"{split}.pt")


def load_data_set(folder: Path, split: str) -> TensorDataset:
    data = torch.load(folder / f"{split}.pt")
    return TensorDataset((data["images"] - 0.5) / 0.3, data["labels"])


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy(args.devices))
    fabric.launch()
    fabric.seed_everything(1)

    with fabric.rank_zero_first():  # rank 0 "downloads" the data set, then the others read it
        if fabric.is_global_zero and not (args.data / "test.pt").exists():
            make_data_set(args.data)
        train_set, test_set = load_data_set(args.data, "train"), load_data_set(args.data, "test")

    train_loader = DataLoader(train_set, batch_size=args.batch_size)
    test_loader = DataLoader(test_set, batch_size=args.batch_size)
    train_loader, test_loader = fabric.setup_dataloaders(train_loader, test_loader)

    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0}
    if args.resume:
        checkpoint = latest_checkpoint(args.checkpoints)
        remainder = fabric.load(checkpoint, state)
        torch.set_rng_state(remainder["rng"])

    train_losses, test_losses, accuracies, steps = [], [], [], 0
    while state["epoch"] < args.epochs and (args.stop_after is None or steps < args.stop_after):
        model.train()
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            fabric.backward(loss)
            optimizer.step()
            train_losses.append(loss.detach())
            steps += 1
        scheduler.step()

        model.eval()
        test_loss, correct = 0.0, torch.zeros((), dtype=torch.long)
        with torch.no_grad():
            for data, target in test_loader:
                output = model(data)
                test_loss += F.nll_loss(output, target, reduction="sum").item()
                correct += (output.argmax(dim=1) == target).sum()
        # all_gather of a Python float: every rank's sum, as a tensor
        test_loss = fabric.all_gather(test_loss).sum() / len(test_set)
        accuracy = fabric.all_reduce(correct, reduce_op="sum") / len(test_set)
        fabric.print(f"epoch {state['epoch']}: test loss {test_loss:.4f}, accuracy {100 * accuracy:.0f}%")
        test_losses.append(test_loss)
        accuracies.append(accuracy)

        state["epoch"] += 1
        fabric.save(args.checkpoints / f"epoch-{state['epoch']:03d}.ckpt", {**state, "rng": torch.get_rng_state()})

    write_record(
        args.out, fabric.global_rank, model, train_losses=train_losses, test_losses=test_losses, accuracies=accuracies
    )


if __name__ == "__main__":
    main()
