"""The benchmark suite, run end to end at a tiny size (a few MB, one run, warm cache only) so it cannot rot."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.report import markdown, sweep
from benchmarks.workloads import GPT, GPTWorkload, config_for_size

TINY = {"layers": 2, "vocab": 1024, "block": 64}
SIZE_GIB = 0.004
SMALL_COUNT, SMALL_NUMEL = 200, 256
HEADLINE_LIBRARIES = (
    "disk",
    "torch",
    "torch_mmap",
    "lightning",
    "torch_checkpointing",
    "fabric_ckpt",
    "dcp",
    "fabric_ckpt_fsdp",
)
ASYNC_ROWS = (
    "memcpy",
    "fabric_ckpt_async",
    "fabric_ckpt_async_total",
    "fabric_ckpt_lazy",
    "fabric_ckpt_lazy_total",
    "torch_checkpointing_async",
    "torch_checkpointing_async_total",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("bench")
    output = folder / "bench-results.json"
    code = main(
        [
            f"--size-gib={SIZE_GIB}",
            *(f"--{name}={value}" for name, value in TINY.items()),
            "--reps=1",
            "--no-cold",
            f"--small-count={SMALL_COUNT}",
            f"--small-numel={SMALL_NUMEL}",
            "--sweep-gib=0.002,0.004",
            "--train-steps=4",
            "--train-every=2",
            f"--figures={folder / 'figures'}",
            f"--workdir={folder}",
            f"--output={output}",
        ]
    )
    assert code == 0
    return json.loads(output.read_text())


def _payload() -> int:
    """The checkpoint's tensor bytes, counted on a real model: weights, Adam's two moments, one `step` each."""
    model = GPT(config_for_size(SIZE_GIB, **TINY))
    params = list(model.parameters())
    return sum(3 * p.numel() * p.element_size() for p in params) + 4 * len(params)


def _headline(results: dict) -> dict[tuple[str, str], dict]:
    return {(row["library"], row["op"]): row for row in results["rows"] if row["group"] == "headline"}


def test_every_library_saves_and_loads_the_whole_checkpoint(results: dict) -> None:
    rows = _headline(results)
    payload = _payload()
    assert GPTWorkload(config_for_size(SIZE_GIB, **TINY)).payload_bytes() == payload
    assert set(rows) == {(library, op) for library in HEADLINE_LIBRARIES for op in ("save", "load")}
    for (library, op), row in rows.items():
        assert row["error"] is None, row["error"]
        assert row["bytes"] == payload, (library, op)
        assert row["verified"] is True, (library, op)
        assert len(row["runs"]) == 1
        seconds = row["seconds"]
        assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
        assert row["mb_per_s"]["median"] == pytest.approx(payload / 1e6 / seconds["median"])
        assert row["extra_anon_bytes"]["median"] >= 0
        if library == "disk":
            assert row["file_bytes"] == payload
        else:
            assert payload <= row["file_bytes"] < payload + (1 << 20), (library, op)
        if op == "load":
            assert row["cache"] == "warm"
    assert rows[("dcp", "save")]["ranks"] == 2
    assert rows[("fabric_ckpt_fsdp", "save")]["ranks"] == 2


def test_async_rows_time_the_blocked_call_and_the_whole_save(results: dict) -> None:
    rows = {row["library"]: row for row in results["rows"] if row["group"] == "async"}
    assert sorted(rows) == sorted(ASYNC_ROWS)
    for library, row in rows.items():
        assert row["error"] is None and row["verified"] is True, (library, row["error"])
        if library != "memcpy":
            assert row["file_bytes"] >= _payload()
    ratios = {ratio["name"]: ratio for ratio in results["ratios"]}
    assert ratios["async save (eager): caller blocked vs one memory copy of the state"]["value"] > 0
    assert ratios["async save (lazy): caller blocked, % of one memory copy of the state"]["value"] > 0
    assert ratios["sharded save (FSDP2, 2 ranks) time vs DCP's defaults (never slower)"]["value"] > 0
    # The bench reads fabric_ckpt's own telemetry: the blocked time, the copies, the write.
    assert {"blocked", "stage", "write"} <= set(rows["fabric_ckpt_async_total"]["stages"])


def test_training_and_resume_rows(results: dict) -> None:
    training = {row["library"]: row for row in results["rows"] if row["group"] == "training"}
    assert sorted(training) == ["train_eager", "train_lazy", "train_plain"]
    # verified: the last checkpoint each loop wrote is the state at its call (lazy included)
    assert all(row["error"] is None and row["verified"] is True for row in training.values())
    resume = {row["op"]: row for row in results["rows"] if row["group"] == "resume"}
    assert set(resume) == {"save", "load"} and all(row["verified"] is True for row in resume.values())
    ratios = {ratio["name"]: ratio for ratio in results["ratios"]}
    assert ratios["training loop with a lazy async checkpoint every K steps: steps/s vs none"]["value"] > 0


def test_figures_are_drawn(results: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.figures import draw

    folder = tmp_path_factory.mktemp("figures")
    written = draw(results, str(folder))
    assert [path.rsplit("/", 1)[-1] for path in written] == ["save.png", "load.png", "async.png"]
    assert all((folder / name).read_bytes().startswith(b"\x89PNG") for name in ("save.png", "load.png", "async.png"))


def test_memory_sampling_sees_copies_but_not_memory_maps(results: dict) -> None:
    rows = _headline(results)
    payload = _payload()
    # torch.load materialises the whole checkpoint in anonymous memory and the result is held while sampling.
    assert rows[("torch", "load")]["extra_anon_bytes"]["median"] >= 0.5 * payload
    # fabric_ckpt maps the file and copies into the live tensors.
    assert rows[("fabric_ckpt", "load")]["extra_anon_bytes"]["median"] < 0.5 * payload
    # The sampler ran in every run (how often it managed to is a figure of the report, not a timed assertion).
    intervals = [run["sample_interval_ms"] for row in results["rows"] for run in row["runs"]]
    assert intervals and all(interval > 0 for interval in intervals)


def test_small_tensors_and_sweep_rows(results: dict) -> None:
    small = [row for row in results["rows"] if row["group"] == "small tensors"]
    assert {(row["library"], row["op"]) for row in small} == {
        (library, op) for library in ("fabric_ckpt", "torch") for op in ("save", "load")
    }
    assert all(row["bytes"] == SMALL_COUNT * SMALL_NUMEL * 4 and row["verified"] for row in small)
    points = sweep(results["rows"])
    assert len(points) == 2
    assert all(p["save_s_per_gib"] > 0 and p["load_s_per_gib"] > 0 for p in points)


def test_ratios_machine_and_report(results: dict) -> None:
    ratios = {ratio["name"]: ratio for ratio in results["ratios"]}
    assert ratios["fabric_ckpt save speed vs torch.save + fsync (never slower)"]["value"] > 0
    assert ratios["fabric_ckpt warm load time vs the ideal in-place load (torch.load mmap + copy)"]["value"] > 0
    # No cold rows were measured, so the cold ratios cannot be computed.
    assert ratios["fabric_ckpt cold load vs disk cold read bandwidth"]["value"] is None
    assert all(r["meets"] is None or isinstance(r["meets"], bool) for r in ratios.values())
    machine = results["machine"]
    assert machine["cpu"]["cores"] >= 1 and machine["memory_gib"] > 0 and machine["kernel"]
    assert results["run"]["cold_cache"] is False
    report = markdown(results)
    for row in results["rows"]:
        assert f"| {row['label']} | " in report
    for name in ratios:
        assert f"| {name} | " in report


def test_object_store_rows_move_the_checkpoint_through_the_s3_server(results: dict) -> None:
    rows = {(row["library"], row["op"]): row for row in results["rows"] if row["group"] == "object store"}
    assert set(rows) == {(library, op) for library in ("s3fs", "fabric_ckpt") for op in ("save", "load")}
    payload = _payload()
    for (library, op), row in rows.items():
        assert row["error"] is None and row["verified"] is True, (library, op, row["error"])
        assert row["storage"] == "s3" and row["bytes"] == payload
        if library == "s3fs":
            assert row["file_bytes"] == payload
        else:
            assert payload <= row["file_bytes"] < payload + (1 << 20)
    ratios = {ratio["name"]: ratio for ratio in results["ratios"]}
    assert ratios["object store: fabric_ckpt upload speed vs s3fs raw"]["value"] > 0
    assert ratios["object store: fabric_ckpt download + load speed vs s3fs raw download"]["value"] > 0
