"""The same checks on every object store: S3 (moto), GCS (gcp-storage-emulator) and Azure (Azurite), as users
reach them, through their own clients (s3fs, gcsfs, adlfs) and their standard settings (issue 17)."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
import torch

from fabric_ckpt import CheckpointManager, Fabric, StorageOptions
from fabric_ckpt.formats import save_file
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import Location, resolve
from fabric_ckpt.storage.object_store import WriteConflictError
from tests import dist_cases as cases
from tests.conftest import assert_same_state, bitwise_equal, make_net, snapshot, trained
from tests.distributed import WorkerGroup


def client(url: str):
    return fsspec.filesystem(url.split("://", 1)[0], skip_instance_cache=True, **_client_options(url))


def _client_options(url: str) -> dict:
    return {"token": "anon"} if url.startswith("gs://") else {}


def names(url: str) -> list[str]:
    fs = client(url)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))


def test_storage_class_per_store(store):
    storage = resolve(f"{store}/run/c.ckpt").storage
    assert type(storage).__name__ == {"s3": "S3Storage", "gs": "GcsStorage", "az": "AzureBlobStorage"}[store[:2]]


def test_single_file_round_trip(store, fabric):
    model, optimizer = trained(seed=1)
    url = f"{store}/runs/exp/c.ckpt"
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 5})
    assert names(f"{store}/runs/exp") == ["c.ckpt"]
    with client(url).open(url, "rb") as f:  # a plain torch file on the store
        assert torch.load(f, weights_only=True)["step"] == 5
    target, target_optimizer = trained(seed=2)
    assert fabric.load(url, {"model": target, "optimizer": target_optimizer}) == {"step": 5}
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))


@pytest.mark.parametrize("store", ["gs", "az"], indirect=True)  # S3's: tests/test_object_store.py
def test_a_checkpoint_larger_than_one_part_round_trips(store, fabric):
    big = torch.randn(18_000_000)  # 72 MB: more than one 64 MiB part (block)
    url = f"{store}/big.ckpt"
    fabric.save(url, {"big": big})
    assert client(url).info(url)["size"] > 72_000_000
    assert bitwise_equal(fabric.load(url)["big"], big)


def test_a_failed_upload_leaves_the_previous_object(store, fabric):
    url = f"{store}/c.ckpt"
    fabric.save(url, {"step": 1})

    def broken() -> torch.Tensor:
        raise RuntimeError("the producer failed mid-upload")

    # More than one part is sent before the failure; on the GCS emulator, less: it cannot cancel an upload session
    # (501, which gcsfs retries for half a minute), while real GCS can.
    size = 1_000_000 if store.startswith("gs://") else 18_000_000
    state = {"big": torch.randn(size), "late": LazyTensor((3,), torch.float32, broken)}
    with pytest.raises(RuntimeError, match="mid-upload"):
        save_file(url, state)
    assert fabric.load(url) == {"step": 1}
    assert names(store) == ["c.ckpt"]


def test_manager_keeps_latest_and_retention(store, fabric):
    folder = f"{store}/managed"
    model = make_net(1)
    manager = CheckpointManager(
        fabric, folder, filename="ep{epoch}.ckpt", latest_filename="latest", num_checkpoints_to_keep=2, run_name="r"
    )
    for _ in range(3):
        manager.on_epoch_end({"model": model})
    assert names(folder) == ["ep2.ckpt", "ep3.ckpt", "latest"]
    assert json.loads(client(folder).cat_file(f"{folder}/latest"))["checkpoint"] == "ep3.ckpt"
    resumed = make_net(9)
    again = CheckpointManager(fabric, folder, filename="ep{epoch}.ckpt", latest_filename="latest", run_name="r")
    assert again.load_latest({"model": resumed}) is not None
    assert again.timestamp.epoch == 3 and again.resumed_from.endswith("/ep3.ckpt")
    assert_same_state(snapshot(resumed), snapshot(model))


@pytest.mark.parametrize("store", ["gs", "az"], indirect=True)  # S3's: tests/test_object_store.py
def test_sharded_fsdp_on_two_ranks(store):
    group = WorkerGroup(2)  # started after the store's environment is set, so the workers reach its server too
    try:
        results = group.run(cases.s3_sharded_round_trip, "fsdp", f"{store}/sharded.ckpt")
    finally:
        group.close()
    from tests.test_ddp import assert_states_equal

    for result in results:
        assert_states_equal(result["loaded"], result["saved"])
        assert result["step"] == 2
    consolidated = Fabric(accelerator="cpu").load(f"{store}/sharded.ckpt")
    assert all(torch.equal(consolidated["model"][k], v) for k, v in results[0]["saved"]["model"].items())


def test_the_writer_that_lost_never_removes_the_other_writers_object(store):
    url = f"{store}/run/last.ckpt"
    mine, theirs = {"w": torch.arange(10.0)}, {"w": torch.arange(5000.0) * 3}
    plain = resolve(url, StorageOptions(retries=4))
    calls: list[str] = []

    class Delayed(type(plain.storage)):  # its confirmation reaches the store after the other writer committed
        def _confirm_size(self, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == 1:
                save_file(url, theirs)
            return super()._confirm_size(path, *args, **kwargs)

    location = Location(Delayed(plain.storage.fs, StorageOptions(retries=4)), plain.path, url)
    with pytest.raises(WriteConflictError, match=r"not retried|cannot tell whether it is this writer's"):
        save_file(location, mine)
    assert len(calls) == 1
    with client(url).open(url, "rb") as f:
        assert bitwise_equal(torch.load(f, weights_only=True)["w"], theirs["w"])


def test_gs_urls_with_composers_hmac_key_go_through_the_s3_compatible_endpoint(bucket, monkeypatch):
    # Composer's route for GCS: GCS_KEY/GCS_SECRET (an HMAC key) and GCS's S3-compatible XML API. The local S3
    # server stands in for storage.googleapis.com, given per Fabric through filesystem_options.
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    name = bucket[5:]
    monkeypatch.setenv("GCS_KEY", "testing")
    monkeypatch.setenv("GCS_SECRET", "testing")
    assert resolve(f"gs://{name}/c.ckpt").storage.fs.client_kwargs == {"endpoint_url": "https://storage.googleapis.com"}
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the Fabric's setting leads to the server
    options = StorageOptions(filesystem_options={"client_kwargs": {"endpoint_url": endpoint}})
    fabric = Fabric(accelerator="cpu", storage_options=options)
    url = f"gs://{name}/hmac/c.ckpt"
    assert type(resolve(url, options).storage).__name__ == "GcsHmacStorage"
    fabric.save(url, {"step": 7})
    assert fabric.load(url) == {"step": 7}
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert client(bucket).ls(f"{bucket}/hmac", detail=False) == [f"{name}/hmac/c.ckpt"]
    with pytest.raises(FileNotFoundError, match=rf"gs://{name}/hmac/missing\.ckpt"):
        fabric.load(f"gs://{name}/hmac/missing.ckpt")


def test_oci_urls_use_ocifs_where_it_is_installed():
    pytest.importorskip("ocifs", reason="ocifs (the `oci` extra) is not installed; Oracle's S3 endpoint is s3://")
    storage = resolve("oci://bucket@namespace/run/last.ckpt").storage
    assert type(storage).__name__ == "ObjectStoreStorage" and storage.protocol == "oci"
