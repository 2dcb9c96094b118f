"""DCP's ``CheckpointException`` is a ``BaseException``: it never reaches the caller, who gets one of our errors
(an ``Exception``), with DCP's exception kept as the cause. Lightning's strategies call DCP themselves; the
subclasses in ``fabric_ckpt.lightning`` translate what comes out of them."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from fabric_ckpt import CheckpointError
from tests.distributed import WorkerGroup
from tests.reliability_figures import record
from tests.test_lightning_strategies import new_model, shard

COUNTS: Counter[str] = Counter()  # the issue-16 cases tried, for `make reliability` (docs/reliability.md)


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("smaller", kind, inputs=count)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning as L

    from fabric_ckpt.lightning import FabricCkptModelParallelStrategy


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def _outcome(fn) -> dict:
    try:
        fn()
    except BaseException as err:  # what escapes, whatever it is
        return {
            "type": type(err).__name__,
            "is_exception": isinstance(err, Exception),
            "is_checkpoint_error": isinstance(err, CheckpointError),
            "cause": type(err.__cause__).__name__ if err.__cause__ is not None else None,
            "message": str(err),
        }
    return {"type": None}


def lightning_dcp_failures(path: str) -> dict:
    strategy = FabricCkptModelParallelStrategy(shard, data_parallel_size=2, tensor_parallel_size=1)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = fabric.setup_module(new_model())
    fabric.save(path, {"model": model})
    torch.manual_seed(1)
    bigger = fabric.setup_module(nn.Sequential(*new_model(), nn.Linear(4, 4)))  # a key the checkpoint lacks
    return _outcome(lambda: fabric.load(path, {"model": bigger}))  # DCP's planner refuses it on every rank


def test_dcp_failures_inside_lightning_strategies_surface_as_our_errors(group, tmp_path):
    for outcome in group.run(lightning_dcp_failures, str(tmp_path / "sharded")):
        assert outcome["is_exception"] and outcome["is_checkpoint_error"], outcome
        assert outcome["cause"] == CheckpointException.__name__, outcome
        assert "Missing key in checkpoint state_dict: model.3.weight" in outcome["message"], outcome
        COUNTS["DCP failures as our errors"] += 1
