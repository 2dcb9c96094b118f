"""A failed load changes nothing on any rank: DDP (every rank reads one file) and FSDP (sharded folders read in
place, and full files cut into shards), on a real 2-process gloo group."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests import restore_cases as cases
from tests.distributed import WorkerGroup
from tests.reliability_figures import record

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("restore", kind, inputs=count)


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def assert_refused_everywhere(results: list[dict], *names: str) -> None:
    for rank, result in enumerate(results):
        assert result["error"] is not None, rank
        for name in names:
            assert name in result["error"], (rank, result["error"])
        assert result["unchanged"], rank


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize(
    "damage, names",
    [("sgd", ["'optimizer'", "AdamW"]), ("rng", ["'rng'"]), ("non-tensor", ["'optimizer'", "exp_avg_sq"])],
)
def test_an_unloadable_checkpoint_changes_nothing_on_any_rank(group, tmp_path, kind, damage, names):
    path = str(tmp_path / "c.ckpt")
    group.run(cases.save_unloadable, kind, path, damage)
    assert_refused_everywhere(group.run(cases.refused_load_changes_nothing, kind, path), *names)
    COUNTS[f"distributed ({kind})"] += 1


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("layout", ["meta", "sparse"])
def test_a_full_file_with_a_value_of_another_layout_changes_nothing_on_any_rank(group, tmp_path, kind, layout):
    model = cases.full_model_state()
    weight = model["head.weight"]
    model["head.weight"] = torch.empty_like(weight, device="meta") if layout == "meta" else weight.to_sparse()
    path = str(tmp_path / "full.pt")
    torch.save({"model": model}, path)
    results = group.run(cases.refused_load_changes_nothing, kind, path, strict=False)
    assert_refused_everywhere(results, "'model'", "head.weight")
    COUNTS[f"distributed ({kind})"] += 1


def test_a_sharded_save_refuses_a_quantized_tensor_before_writing(group, tmp_path):
    path = tmp_path / "sharded.ckpt"
    errors = group.run(cases.save_quantized_sharded, "fsdp", str(path))
    for error in errors:
        assert error is not None and "entry 'calibration/scale' is a quantized tensor" in error
    assert not path.exists()
