"""Training loops on a real 2-process gloo group: step methods under DDP/FSDP, and stateful data loaders."""

from __future__ import annotations

import pytest
import torch

from tests import runtime_cases as cases
from tests.distributed import WorkerGroup


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_training_step_runs_through_the_strategy_wrapper(group, kind):
    """Ranks with different data that call ``model.training_step`` train exactly as ``model(x)`` in the loop does."""
    reference = group.run(cases.train_with, kind, "forward")
    stepped = group.run(cases.train_with, kind, "training_step")
    assert_same_params(reference[0]["params"], reference[1]["params"])
    for rank in range(2):
        assert_same_params(stepped[rank]["params"], reference[rank]["params"])
        assert not stepped[rank]["forward_patched"]  # the redirection leaves the user's module as it was


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_redirected_steps_run_in_the_precision(group, kind):
    """Under bf16-mixed, ``training_step`` runs under autocast with its batch converted, as in Lightning."""
    stepped = group.run(cases.train_with, kind, "training_step", precision="bf16-mixed")
    full_precision = group.run(cases.train_with, kind, "training_step")
    assert_same_params(stepped[0]["params"], stepped[1]["params"])
    for rank in range(2):
        torch.manual_seed(0)
        module = cases.StepModel()  # the same start as every rank's
        inputs, targets = cases.step_batch(0, rank)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = module.training_step((inputs.bfloat16(), targets.bfloat16()))
        assert torch.equal(stepped[rank]["losses"][0], expected.float())
        assert not torch.equal(stepped[rank]["params"]["head.weight"], full_precision[rank]["params"]["head.weight"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("call", ["custom_step", "custom_step_bound"])
def test_marked_methods_run_through_the_strategy_wrapper(group, kind, call):
    reference = group.run(cases.train_with, kind, "forward")
    marked = group.run(cases.train_with, kind, call)
    for rank in range(2):
        assert_same_params(marked[rank]["params"], reference[rank]["params"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_unmarked_methods_that_run_submodules_are_refused(group, kind):
    for result in group.run(cases.forward_method_errors, kind):
        assert result["unmarked"]["error"] == "RuntimeError"
        assert result["unmarked"]["message"].startswith("StepModel.custom_step() runs")  # the user's class
        assert "mark_forward_method('custom_step')" in result["unmarked"]["message"]
        assert result["plain"] == {"value": "49 parameters"}
        assert result["not_a_method"]["error"] == "TypeError" and "int" in result["not_a_method"]["message"]
        assert result["forward"]["error"] == "ValueError" and "'forward'" in result["forward"]["message"]
        assert result["missing"]["error"] == "AttributeError"
        assert "StepModel.no_such_step" in result["missing"]["message"]
        assert result["attribute"]["error"] == "AttributeError"  # a submodule, not a method
        assert isinstance(result["after"]["value"], float)
        assert not result["forward_patched"] and result["unchanged"]


def test_a_stateful_loader_subclass_keeps_its_class_and_state_on_2_ranks(group):
    results = group.run(cases.stateful_loader_resumes, "ddp")
    for result in results:
        assert result["class"] == "TaggedLoader" and result["same_class"]
        assert result["tag"] == "train" and result["batch_size"] == 2 and result["snapshot_every_n_steps"] == 2
        assert result["sampler"] == "DistributedSampler" and result["shuffles"]
        assert result["batch_sampler"] == "torchdata.stateful_dataloader.sampler.BatchSampler"  # made by the loader
        assert "_num_yielded" in result["state_keys"]
        assert result["resumed"] == result["expected"]
        assert len(result["consumed"]) + len(result["expected"]) == 6  # 24 items, 2 ranks, batches of 2
    everything = [x for result in results for batch in result["consumed"] + result["expected"] for x in batch]
    assert sorted(everything) == [float(i) for i in range(24)]  # each rank reads its own half


def test_a_stateful_loader_position_round_trips_through_fabric_save(group, tmp_path):
    path = str(tmp_path / "loader.ckpt")
    for result in group.run(cases.stateful_loader_checkpoint, "ddp", path):
        assert result["step"] == 2
        assert len(result["expected"]) == 4 and result["resumed"] == result["expected"]
