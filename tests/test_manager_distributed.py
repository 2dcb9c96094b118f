"""CheckpointManager on a real 2-process DDP group: every rank resumes where it stopped, RNG included."""

from __future__ import annotations

import pytest
import torch

from tests import dist_cases as cases
from tests.distributed import WorkerGroup


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_stop_and_resume_from_latest_matches_an_uninterrupted_run(group, tmp_path, kind):
    reference = group.run(cases.manager_resume, kind, str(tmp_path / "reference"), None)
    stopped = group.run(cases.manager_resume, kind, str(tmp_path / "run"), 3)
    resumed = group.run(cases.manager_resume, kind, str(tmp_path / "run"), None)
    for rank in range(2):
        assert not stopped[rank]["resumed"] and resumed[rank]["resumed"]
        # Saved at batch 2; the resumed run redoes batch 3 onward, drawing each rank's own random numbers.
        assert stopped[rank]["draws"][:2] + resumed[rank]["draws"] == reference[rank]["draws"]
        assert stopped[rank]["losses"][:2] + resumed[rank]["losses"] == reference[rank]["losses"]
        assert all(torch.equal(resumed[rank]["params"][k], v) for k, v in reference[rank]["params"].items())
        # Keeps the newest 2, plus ba2: the checkpoint this run resumed from is never pruned.
        assert resumed[rank]["files"] == ["ba2", "ba4", "ba6", "latest"] and resumed[rank]["latest"] == "ba6"
    assert reference[0]["draws"] != reference[1]["draws"]  # the ranks really had different RNG streams


def test_a_resumed_run_with_per_rank_names_saves_again_on_every_rank(group, tmp_path):
    """The default names hold {rank}: rank 0 writes ep0-ba4-rank0 and every rank must agree on whether it may
    replace it; ranks other than 0 once skipped that agreement and waited for rank 0 forever."""
    names = {"filename": "ep{epoch}-ba{batch}-rank{rank}", "latest_filename": "latest-rank{rank}"}
    reference = group.run(cases.manager_resume, "ddp", str(tmp_path / "reference"), None, **names)
    group.run(cases.manager_resume, "ddp", str(tmp_path / "run"), 3, **names)
    resumed = group.run(cases.manager_resume, "ddp", str(tmp_path / "run"), None, **names)
    for rank in range(2):
        assert all(torch.equal(resumed[rank]["params"][k], v) for k, v in reference[rank]["params"].items())
        assert resumed[rank]["latest"] == "ep0-ba6-rank0"
