"""Saves and loads through a network that drops, delays, truncates and answers 500/503 (a proxy before moto).

Each operation either succeeds with the right data (after retries) or fails with a clear error; an object under a
final name is always a complete checkpoint; a load never returns wrong data.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import Counter

import fsspec
import pytest
import torch

from fabric_ckpt import CheckpointError, CheckpointManager, Fabric, StorageOptions
from fabric_ckpt.formats import save_file
from fabric_ckpt.storage import resolve
from fabric_ckpt.storage.object_store import WriteConflictError
from tests.fault_proxy import FaultProxy
from tests.reliability_figures import full_campaign, record

ROUNDS = 40 if full_campaign() else 12


@pytest.fixture
def faulty(s3_endpoint, monkeypatch):
    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port), rate=0.3, seed=7)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("FABRIC_CKPT_RETRIES", "3")
    fsspec.filesystem("s3").clear_instance_cache()
    yield proxy
    proxy.close()
    fsspec.filesystem("s3").clear_instance_cache()


def direct(endpoint: str):
    """An S3 client that bypasses the proxy, to see what the store really holds."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})


def stored_checkpoint(fs, key: str):
    """The object under ``key`` loaded and checked (CRCs included) without the faulty network, or None."""
    if not fs.exists(key):
        return None
    data = fs.cat_file(key)
    with open_bytes(data) as path:
        return Fabric(accelerator="cpu").load(path)


class open_bytes:
    def __init__(self, data: bytes) -> None:
        import tempfile

        self._file = tempfile.NamedTemporaryFile(suffix=".ckpt")  # noqa: SIM115 - closed in __exit__
        self._file.write(data)
        self._file.flush()

    def __enter__(self) -> str:
        return self._file.name

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def payload(round_number: int) -> torch.Tensor:
    return torch.full((300_000,), float(round_number))


@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_single_file_saves_and_loads_through_faults(bucket, s3_endpoint, faulty):
    fabric = Fabric(accelerator="cpu")
    url = f"{bucket}/c.ckpt"
    store = direct(s3_endpoint)
    outcomes: Counter[str] = Counter()
    committed: set[int] = set()
    for round_number in range(ROUNDS):
        try:
            fabric.save(url, {"w": payload(round_number), "round": round_number})
            outcomes["save succeeded"] += 1
            committed.add(round_number)
        except (OSError, CheckpointError):
            outcomes["save failed cleanly"] += 1
            committed.add(round_number)  # the upload may have completed before the error was reported
        stored = stored_checkpoint(store, url[5:])
        if stored is not None:  # whatever is visible is complete and is one of the saves
            assert stored["round"] in committed and torch.equal(stored["w"], payload(stored["round"]))
        try:
            loaded = fabric.load(url)
            outcomes["load succeeded"] += 1
            assert loaded["round"] in committed and torch.equal(loaded["w"], payload(loaded["round"]))
        except (OSError, CheckpointError):
            outcomes["load failed cleanly"] += 1
    assert sum(faulty.injected.values()) > 0
    assert outcomes["save succeeded"] > 0 and outcomes["load succeeded"] > 0
    print(json.dumps({"scenario": "single file", "faults": dict(faulty.injected), "outcomes": dict(outcomes)}))
    record("s3-faults", "single file", faults=sum(faulty.injected.values()), kinds=dict(faulty.injected), **outcomes)


@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_manager_latest_always_names_a_complete_checkpoint_through_faults(bucket, s3_endpoint, faulty):
    fabric = Fabric(accelerator="cpu")
    folder = f"{bucket}/managed"
    store = direct(s3_endpoint)
    model = torch.nn.Linear(64, 64)
    manager = CheckpointManager(
        fabric,
        folder,
        filename="ba{batch}.ckpt",
        latest_filename="latest",
        save_interval="1ba",
        num_checkpoints_to_keep=3,
        run_name="r",
    )
    failures = 0
    for _ in range(ROUNDS):
        try:
            manager.on_batch_end({"model": model})
        except (OSError, CheckpointError):
            failures += 1
        if store.exists(f"{folder[5:]}/latest"):
            pointer = json.loads(store.cat_file(f"{folder[5:]}/latest"))
            target = stored_checkpoint(store, f"{folder[5:]}/{pointer['checkpoint']}")
            assert target is not None and set(target) == {"model", "timestamp", "rng"}
    assert sum(faulty.injected.values()) > 0
    print(json.dumps({"scenario": "manager", "faults": dict(faulty.injected), "failed saves": failures}))
    record(
        "s3-faults",
        "manager",
        faults=sum(faulty.injected.values()),
        kinds=dict(faulty.injected),
        saves=ROUNDS,
        saves_failed_cleanly=failures,
    )


@pytest.mark.filterwarnings("ignore:.*retrying in")
def test_two_tier_uploads_through_faults_lose_nothing(bucket, s3_endpoint, faulty, tmp_path):
    """Each checkpoint is committed locally, then uploaded through the faulty network: failed uploads are reported at
    the next save and retried; once the network recovers, every checkpoint is in the bucket and `latest` names the
    last, and no local copy is left (``num_checkpoints_to_keep=0``)."""
    fabric = Fabric(accelerator="cpu")
    remote = f"{bucket}/two-tier"
    store = direct(s3_endpoint)
    manager = CheckpointManager(
        fabric,
        tmp_path / "local",
        filename="ba{batch}.ckpt",
        latest_filename="latest",
        save_interval="1ba",
        num_checkpoints_to_keep=0,
        remote_folder=remote,
        run_name="r",
    )
    reported = 0
    newest_seen = 0
    for round_number in range(1, ROUNDS + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manager.on_batch_end({"w": payload(round_number), "round": round_number})
        reported += sum("uploading" in str(warning.message) for warning in caught)
        if store.exists(f"{remote[5:]}/latest"):  # the remote `latest` names a complete copy, and never goes back
            target = json.loads(store.cat_file(f"{remote[5:]}/latest"))["checkpoint"]
            stored = stored_checkpoint(store, f"{remote[5:]}/{target}")
            assert stored is not None and torch.equal(stored["w"], payload(stored["round"]))
            assert stored["round"] >= newest_seen
            newest_seen = stored["round"]
    faults = sum(faulty.injected.values())
    faulty.rate = 0.0  # the network recovers
    manager.wait()
    lost = 0
    for round_number in range(1, ROUNDS + 1):
        stored = stored_checkpoint(store, f"{remote[5:]}/ba{round_number}.ckpt")
        if stored is None or not torch.equal(stored["w"], payload(round_number)):
            lost += 1
    assert lost == 0 and faults > 0
    assert json.loads(store.cat_file(f"{remote[5:]}/latest"))["checkpoint"] == f"ba{ROUNDS}.ckpt"
    assert os.listdir(tmp_path / "local") == []
    print(json.dumps({"scenario": "two-tier", "faults": dict(faulty.injected), "failed uploads reported": reported}))
    record(
        "s3-faults",
        "two-tier uploads",
        faults=faults,
        kinds=dict(faulty.injected),
        saves=ROUNDS,
        upload_failures_reported=reported,
        lost=lost,
    )


def test_concurrent_writers_on_one_key_never_remove_each_others_object(bucket):
    """Rounds of 3 writers saving different checkpoints to one key at once: the key always ends up holding one
    writer's complete checkpoint, bitwise; a writer either succeeds or raises WriteConflictError (its object was
    replaced by another's), never anything that removed someone else's object."""
    from tests.conftest import bitwise_equal

    url = f"{bucket}/shared/last.ckpt"
    writers = 3
    states = [{"w": torch.full((1000 * (i + 1),), float(i))} for i in range(writers)]
    outcomes_seen: Counter[str] = Counter()
    wrong = lost = 0
    for _ in range(ROUNDS):
        start = threading.Barrier(writers)
        outcomes: list[object] = [None] * writers

        def write(index: int, start=start, outcomes=outcomes) -> None:
            start.wait()
            try:  # moto answers some concurrent requests with a 500: retried, as a store's hiccup is
                save_file(resolve(url, StorageOptions(retries=4)), states[index])
                outcomes[index] = "saved"
            except Exception as err:  # judged below
                outcomes[index] = err

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for outcome in outcomes:
            assert outcome == "saved" or isinstance(outcome, WriteConflictError), outcome
            outcomes_seen["saved" if outcome == "saved" else "conflict"] += 1
        fs = direct_from_environment()
        if not fs.exists(url):
            lost += 1
            continue
        with fs.open(url, "rb") as f:
            stored = torch.load(f, weights_only=True)["w"]
        winners = [i for i, state in enumerate(states) if bitwise_equal(stored, state["w"])]
        if len(winners) != 1 or outcomes[winners[0]] != "saved":
            wrong += 1
    record("concurrency", "writers on one S3 key", rounds=ROUNDS, writers=writers, **outcomes_seen, lost=lost,
           wrong=wrong)  # fmt: skip
    assert lost == 0 and wrong == 0


def direct_from_environment():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)
