"""Two-tier checkpoints on a real 2-process gloo group: DDP (one file) and FSDP (sharded folders uploaded into a
new generation and committed by their manifest); the local folder is lost between runs."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest
import torch

from tests import dist_cases as cases
from tests import two_tier_cases
from tests.distributed import WorkerGroup


@pytest.fixture(scope="module")
def group(s3_endpoint):
    workers = WorkerGroup(2)  # started after the S3 environment is set, so the workers reach the server too
    yield workers
    workers.close()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_run_that_lost_its_local_folder_resumes_from_the_bucket_and_matches(group, bucket, tmp_path, kind):
    reference = group.run(cases.manager_resume, kind, str(tmp_path / "reference"), None)
    local, remote = str(tmp_path / "local"), f"{bucket}/run"
    stopped = group.run(two_tier_cases.two_tier_resume, kind, local, remote, 3, 0)
    assert stopped[0]["local"] == []  # num_checkpoints_to_keep=0: every local copy went once uploaded
    shutil.rmtree(local, ignore_errors=True)
    resumed = group.run(two_tier_cases.two_tier_resume, kind, local, remote, None, 1)
    for rank in range(2):
        assert resumed[rank]["resumed_from"] == f"{remote}/ba2"
        assert stopped[rank]["losses"][:2] + resumed[rank]["losses"] == reference[rank]["losses"]
        assert all(torch.equal(resumed[rank]["params"][k], v) for k, v in reference[rank]["params"].items())
    assert resumed[0]["local"] == ["ba6", "latest"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls(remote, detail=False))
    assert names == ["ba2", "ba4", "ba6", "latest"]
    assert json.loads(fs.cat_file(f"{remote}/latest"))["checkpoint"] == "ba6"
    if kind == "fsdp":  # a sharded folder: its manifest and the one generation it names
        manifest = json.loads(fs.cat_file(f"{remote}/ba6/fabric_ckpt.json"))["manifest"]
        assert sorted(path.rsplit("/", 1)[-1] for path in fs.ls(f"{remote}/ba6", detail=False)) == sorted(
            ["fabric_ckpt.json", manifest["generation"]]
        )
        assert len(manifest["files"]) == 3  # .metadata and each rank's shards
