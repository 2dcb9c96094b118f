"""Training programs written for Lightning Fabric (tests/programs/), run with only the ``Fabric`` import changed.

Each program runs as a real script: one process, or two DDP processes on gloo started by its own ``fabric.launch()``.
Under Lightning and under fabric_ckpt the losses, the final weights of every rank and the logged metrics must be
bitwise equal; a run stopped after a checkpoint and resumed in new processes must end bitwise where the uninterrupted
run ended. Each configuration runs once per session; the tests compare the records the runs leave.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import bitwise_equal

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "tests" / "programs"
# torch.compile's default backend (inductor) generates and builds C++ on the CPU: about a minute per process on a
# cold cache, and its embedding backward adds up in a thread-dependent order. aot_eager runs the same capture
# (dynamo graphs, AOT autograd) without code generation.
GPT = ("--compile-backend", "aot_eager")


@dataclass
class Run:
    out: Path
    records: list[dict[str, Any]]  # per rank

    def metrics_csv(self, name: str) -> str:
        return (self.out / "logs" / name / "version_0" / "metrics.csv").read_text()


class Programs:
    """Runs each program configuration once, in a folder of its own, and keeps what it recorded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[tuple[Any, ...], Run] = {}

    def run(self, program: str, implementation: str, devices: int, *options: str, folder: str | None = None) -> Run:
        key = (program, implementation, devices, options, folder)
        if key not in self.runs:
            self.runs[key] = self._start(program, implementation, devices, options, folder)
        return self.runs[key]

    def resume(self, program: str, implementation: str, devices: int, *options: str, stopped: str) -> Run:
        """Run ``program`` with ``--resume`` from a copy of the checkpoints the run in folder ``stopped`` left."""
        folder = f"{stopped}-resumed-by-{implementation}"
        if not (self.root / folder).exists():
            shutil.copytree(self.root / stopped / "checkpoints", self.root / folder / "checkpoints")
        return self.run(program, implementation, devices, *options, "--resume", folder=folder)

    def _start(
        self, program: str, implementation: str, devices: int, options: tuple[str, ...], folder: str | None
    ) -> Run:
        name = folder or f"{program}-{implementation}-{devices}-{len(self.runs)}"
        run_folder = self.root / name
        out = run_folder / "out"
        if program == "image_classifier":
            options = ("--data", str(self.root / "images"), *options)
        command = [
            sys.executable,
            str(PROGRAMS / f"{program}.py"),
            *("--devices", str(devices), "--out", str(out), "--checkpoints", str(run_folder / "checkpoints")),
            *options,
        ]
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PROGRAM_FABRIC": implementation, "PYTHONPATH": pythonpath}
        env.pop("OMP_NUM_THREADS", None)  # both Fabrics choose the threads per process (one each under DDP on 2 cores)
        completed = subprocess.run(command, cwd=run_folder.parent, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}"
        records = [torch.load(out / f"record-rank{rank}.pt", weights_only=True) for rank in range(devices)]
        return Run(out, records)


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> Programs:
    return Programs(tmp_path_factory.mktemp("programs"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not bitwise_equal(a[name], b[name])]
    assert not different, f"weights differ: {different}"


def assert_same_tensors(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} values against {len(b)}"
    different = [index for index, (x, y) in enumerate(zip(a, b, strict=True)) if not bitwise_equal(x, y)]
    assert not different, (
        f"{what} differ at {different}: {[a[i] for i in different]} against {[b[i] for i in different]}"
    )


def assert_same_record(lightning: dict[str, Any], ours: dict[str, Any]) -> None:
    """Everything the program recorded, bitwise: losses, metrics, counts, weights."""
    assert (lightning["implementation"], ours["implementation"]) == ("lightning", "fabric_ckpt")
    assert lightning.keys() == ours.keys()
    for key in lightning.keys() - {"implementation", "weights"}:
        if isinstance(lightning[key], list):
            assert_same_tensors(lightning[key], ours[key], key)
        else:
            assert lightning[key] == ours[key], key
    assert_same_weights(lightning["weights"], ours["weights"])


def assert_resumed_exactly(whole: dict[str, Any], stopped: dict[str, Any], resumed: dict[str, Any]) -> None:
    """The stopped run did the first part of the uninterrupted one, the resumed run the rest, ending where it ended."""
    for key, values in whole.items():
        if isinstance(values, list):
            done = len(stopped[key])
            assert 0 < done < len(values), f"{key}: the stopped run did {done} of {len(values)}"
            assert_same_tensors(stopped[key], values[:done], f"{key} before the stop")
            assert_same_tensors(resumed[key], values[done:], f"{key} after resuming")
    assert_same_weights(resumed["weights"], whole["weights"])


def assert_ranks_in_step(run: Run) -> None:
    """DDP kept the ranks' models identical (gradients synchronised), though each rank trained on its own data."""
    first, second = run.records
    assert_same_weights(first["weights"], second["weights"])


# ---------------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("devices", [1, 2])
def test_lightning_module_trainer_runs_as_under_lightning(programs, devices):
    """training_step/validation_step through the strategy, the hooks fabric.call reaches, self.log and CSVLogger."""
    lightning = programs.run("trainer", "lightning", devices)
    ours = programs.run("trainer", "fabric_ckpt", devices)
    for rank in range(devices):
        assert_same_record(lightning.records[rank], ours.records[rank])
    steps = 24 // devices
    assert ours.records[0]["module_hooks"] == {
        "on_train_epoch_start": 4,
        "on_train_batch_end": 2 * steps,
        "on_before_optimizer_step": steps,
        "on_validation_epoch_end": 4,
    }
    assert ours.records[0]["callback_hooks"] == {
        "on_after_setup": 1,
        "on_after_optimizer_step": steps,
        "on_train_epoch_end": 4,
    }
    logged = ours.metrics_csv("trainer")
    assert logged == lightning.metrics_csv("trainer")
    assert logged.splitlines()[0] == "step,train_loss,val_correct,val_loss"  # self.log in training_step reached it
    if devices == 2:
        assert_ranks_in_step(ours)
        gathered = ours.records[0]["train_losses"][0]
        assert gathered.shape == (2,) and gathered[0] != gathered[1]  # each rank its own batch


def test_lightning_module_trainer_resumes_bitwise(programs):
    """Stopped after two of four epochs (12 optimizer steps), resumed from the epoch's checkpoint in a new process."""
    whole = programs.run("trainer", "fabric_ckpt", 1)
    stopped = programs.run("trainer", "fabric_ckpt", 1, "--stop-after", "12", folder="trainer-stopped")
    resumed = programs.resume("trainer", "fabric_ckpt", 1, stopped="trainer-stopped")
    assert stopped.records[0]["global_step"] == 12
    assert_resumed_exactly(whole.records[0], stopped.records[0], resumed.records[0])


def test_lightning_resumes_the_trainer_from_our_checkpoint(programs):
    """Our checkpoint of a LightningModule, its optimizer, scheduler and random state, resumed by Lightning Fabric."""
    whole = programs.run("trainer", "fabric_ckpt", 1)
    stopped = programs.run("trainer", "fabric_ckpt", 1, "--stop-after", "12", folder="trainer-stopped")
    resumed = programs.resume("trainer", "lightning", 1, stopped="trainer-stopped")
    assert_resumed_exactly(whole.records[0], stopped.records[0], resumed.records[0])


# ---------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("devices", [1, 2])
def test_image_classifier_runs_as_under_lightning(programs, devices):
    """A CNN with dropout, Adadelta and StepLR; rank_zero_first data preparation; DistributedSampler under DDP."""
    lightning = programs.run("image_classifier", "lightning", devices)
    ours = programs.run("image_classifier", "fabric_ckpt", devices)
    for rank in range(devices):
        assert_same_record(lightning.records[rank], ours.records[rank])
    assert len(ours.records[0]["train_losses"]) == 3 * 192 // (16 * devices)  # each rank its share of every epoch
    if devices == 2:
        assert_ranks_in_step(ours)


def test_image_classifier_resumes_bitwise_under_ddp(programs):
    whole = programs.run("image_classifier", "fabric_ckpt", 2)
    stopped = programs.run("image_classifier", "fabric_ckpt", 2, "--stop-after", "6", folder="images-stopped")
    resumed = programs.resume("image_classifier", "fabric_ckpt", 2, stopped="images-stopped")
    for rank in range(2):
        assert_resumed_exactly(whole.records[rank], stopped.records[rank], resumed.records[rank])


# ---------------------------------------------------------------------------------------------------- GPT
@pytest.mark.parametrize(
    "devices, shuffle",
    [
        (1, ()),
        # A shuffling StatefulDataLoader gets our DistributedSampler under DDP, which orders the data otherwise than
        # Lightning's per-rank samplers (docs/migrating.md): unshuffled, both read the same batches.
        (2, ("--no-shuffle",)),
    ],
)
def test_gpt_pretraining_runs_as_under_lightning(programs, devices, shuffle):
    """torch.compile, bf16-mixed, gradient accumulation with no_backward_sync, clipping, a StatefulDataLoader."""
    lightning = programs.run("pretrain_gpt", "lightning", devices, *GPT, *shuffle)
    ours = programs.run("pretrain_gpt", "fabric_ckpt", devices, *GPT, *shuffle)
    for rank in range(devices):
        assert_same_record(lightning.records[rank], ours.records[rank])
    assert ours.metrics_csv("pretrain") == lightning.metrics_csv("pretrain")
    assert ours.records[0]["logits_dtype"] == "torch.float32"  # autocast inside, outputs back in float32
    if devices == 2:
        assert_ranks_in_step(ours)


@pytest.mark.parametrize(
    "devices, options",
    [
        # Shuffled, stopped in the second epoch (iteration 10 of 16): the loader's own shuffling sampler resumes with
        # its generator's state.
        (1, ("--stop-after", "5")),
        # Stopped in the second epoch (iteration 6 of 16, 4 per epoch). Unshuffled, as compared with Lightning above:
        # a resumed set-up loader does not know its epoch yet, which seeds a shuffling DistributedSampler.
        (2, ("--no-shuffle", "--stop-after", "3")),
    ],
)
def test_gpt_pretraining_resumes_mid_epoch_bitwise(programs, devices, options):
    *order, _, stop = options
    whole = programs.run("pretrain_gpt", "fabric_ckpt", devices, *GPT, *order)
    stopped = programs.run("pretrain_gpt", "fabric_ckpt", devices, *GPT, *options, folder=f"gpt-{devices}-stopped")
    resumed = programs.resume("pretrain_gpt", "fabric_ckpt", devices, *GPT, *order, stopped=f"gpt-{devices}-stopped")
    assert len(stopped.records[0]["losses"]) == 2 * int(stop)  # two micro-batches per optimizer step
    for rank in range(devices):
        assert_resumed_exactly(whole.records[rank], stopped.records[rank], resumed.records[rank])
