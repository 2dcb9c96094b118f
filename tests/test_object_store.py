"""S3 through a real S3 API server on 127.0.0.1 (moto's) and s3fs, as users run them: what only S3 has (the checks
every store shares, a round trip and the manager included, are in tests/test_object_stores.py)."""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile

import fsspec
import pytest
import torch

from fabric_ckpt import CheckpointCorruptedError, Fabric, StorageOptions
from fabric_ckpt.formats import save_file
from fabric_ckpt.formats.torch_format import LazyTensor
from tests import dist_cases as cases
from tests.distributed import WorkerGroup


def s3():
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return fs


def test_large_checkpoint_is_a_streamed_multipart_upload(bucket, fabric):
    big = torch.randn(20_000_000)  # 80 MB: more than one 64 MiB part
    url = f"{bucket}/big.ckpt"
    fabric.save(url, {"big": big})
    assert s3().info(url)["size"] > 80_000_000
    assert torch.equal(fabric.load(url)["big"], big)


def test_failed_upload_leaves_the_previous_object_and_no_pending_upload(bucket, fabric):
    url = f"{bucket}/c.ckpt"
    fabric.save(url, {"step": 1})

    def broken() -> torch.Tensor:
        raise RuntimeError("the producer failed mid-upload")

    state = {"big": torch.randn(20_000_000), "late": LazyTensor((3,), torch.float32, broken)}
    with pytest.raises(RuntimeError, match="mid-upload"):
        save_file(url, state)
    assert fabric.load(url) == {"step": 1}
    fs = s3()
    assert fs.ls(bucket, detail=False) == [f"{bucket[5:]}/c.ckpt"]
    assert fs.list_multipart_uploads(bucket[5:]) == []  # the aborted upload holds no parts


def test_s3_endpoint_url_variable_is_honoured(bucket, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)  # Composer's name for S3-compatible stores
    fsspec.filesystem("s3").clear_instance_cache()
    fabric = Fabric(accelerator="cpu")  # the environment's settings are read when a Fabric is made
    try:
        fabric.save(f"{bucket}/via-s3-endpoint.ckpt", {"step": 3})
        assert fabric.load(f"{bucket}/via-s3-endpoint.ckpt") == {"step": 3}
    finally:
        fsspec.filesystem("s3").clear_instance_cache()


def test_downloads_are_cached_when_asked(bucket, tmp_path, monkeypatch):
    url = f"{bucket}/cached.ckpt"
    monkeypatch.setenv("FABRIC_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    fabric = Fabric(accelerator="cpu")
    fabric.save(url, {"w": torch.arange(5.0)})
    assert torch.equal(fabric.load(url)["w"], torch.arange(5.0))
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(cached) == 1
    first_inode = cached[0].stat().st_ino
    assert torch.equal(fabric.load(url)["w"], torch.arange(5.0))
    assert [p.stat().st_ino for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [first_inode]
    fabric.save(url, {"w": torch.arange(6.0)})  # a new version is downloaded again
    assert torch.equal(fabric.load(url)["w"], torch.arange(6.0))


def test_two_fabrics_in_one_process_keep_their_own_storage_options(bucket, tmp_path, monkeypatch):
    url = f"{bucket}/two.ckpt"
    monkeypatch.delenv("FABRIC_CKPT_CACHE_DIR", raising=False)
    cached = Fabric(accelerator="cpu", storage_options=StorageOptions(cache_dir=str(tmp_path / "cache")))
    plain = Fabric(accelerator="cpu")
    plain.save(url, {"w": torch.arange(4.0)})
    assert torch.equal(plain.load(url)["w"], torch.arange(4.0))
    assert not (tmp_path / "cache").exists()
    assert torch.equal(cached.load(url)["w"], torch.arange(4.0))
    assert len([p for p in (tmp_path / "cache").rglob("*") if p.is_file()]) == 1
    assert plain.storage_options.cache_dir is None


def test_corrupted_object_is_detected(bucket, fabric):
    url = f"{bucket}/c.ckpt"
    fabric.save(url, {"w": torch.arange(1000.0)})
    fs = s3()
    data = bytearray(fs.cat_file(url))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(url, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"c\.ckpt"):
        fabric.load(url)


def test_sharded_fsdp_on_two_ranks(bucket):
    group = WorkerGroup(2)  # started after the S3 environment is set, so the workers reach the server too
    try:
        results = group.run(cases.s3_sharded_round_trip, "fsdp", f"{bucket}/sharded.ckpt")
    finally:
        group.close()
    from tests.test_ddp import assert_states_equal

    for result in results:
        assert_states_equal(result["loaded"], result["saved"])
        assert result["step"] == 2
    fs = s3()
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/sharded.ckpt", detail=False))
    live = json.loads(fs.cat_file(f"{bucket}/sharded.ckpt/fabric_ckpt.json"))["manifest"]["generation"]
    generations = [name for name in names if name.startswith(".gen-")]
    # The manifest and its generation; the generation the second save replaced stays for its grace period.
    assert names == sorted(["fabric_ckpt.json", *generations]) and live in generations and len(generations) <= 2
    consolidated = Fabric(accelerator="cpu").load(f"{bucket}/sharded.ckpt")
    assert all(torch.equal(consolidated["model"][k], v) for k, v in results[0]["saved"]["model"].items())


def _stage_generation(url: str, state: dict) -> tuple:
    """What a sharded save does up to its commit: DCP files in a new generation, checksummed."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from fabric_ckpt.formats import dcp as dcp_format
    from fabric_ckpt.formats import sharded
    from fabric_ckpt.storage import resolve

    location = resolve(url)
    generation = sharded.new_generation(location)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp_format.writer_for(generation), no_dist=True)
    names = [*sharded.own_files(generation, 0), dcp_format.METADATA_NAME]
    return location, generation, sharded.file_checksums(generation, names, dcp_format.read_metadata(generation))


@pytest.mark.parametrize("committed", [False, True], ids=["failed-before-commit", "failed-after-commit"])
def test_cleanup_of_a_failed_sharded_save_never_removes_the_committed_generation(bucket, fabric, committed):
    # A save can fail after rank 0 stored the manifest (another rank dies before agreeing): the generation the
    # manifest names is then the checkpoint, and the failed save's cleanup must leave it.
    from fabric_ckpt.formats import sharded

    url = f"{bucket}/sharded.ckpt"
    old, new = {"w": torch.arange(6.0)}, {"w": torch.arange(6.0) * 2}
    location, temporary, records = _stage_generation(url, old)
    sharded.commit(temporary, location, records, world_size=1)
    location, temporary, records = _stage_generation(url, new)
    if committed:
        sharded.commit(temporary, location, records, world_size=1)
    sharded.discard(temporary, location)
    assert torch.equal(fabric.load(url)["w"], (new if committed else old)["w"])
    fs = s3()
    fs.invalidate_cache()
    generations = [p for p in fs.ls(url, detail=False) if ".gen-" in p]
    # After a commit, the generation it replaced stays for its grace period (listed as retired in the manifest).
    assert len(generations) == (2 if committed else 1)


def test_an_unreachable_store_raises_connection_error_naming_the_url(bucket):
    """Connection refused (nothing listens on the endpoint's port): save, load and exists raise an OSError that
    names the checkpoint, not botocore's EndpointConnectionError, which callers catching I/O errors would miss."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    endpoint = {"endpoint_url": f"http://127.0.0.1:{closed_port}", "config_kwargs": {"retries": {"max_attempts": 1}}}
    options = StorageOptions(filesystem_options=endpoint, retries=1)
    fabric = Fabric(accelerator="cpu", storage_options=options)
    url = f"{bucket}/unreachable.ckpt"
    for call in (lambda: fabric.save(url, {"step": 1}), lambda: fabric.load(url)):
        with pytest.raises(ConnectionError, match="could not be reached") as raised:
            call()
        assert "unreachable.ckpt" in str(raised.value)


@pytest.mark.parametrize("url", ["s3", "memory"])
def test_a_download_of_many_parts_in_flight_arrives_whole_and_in_order(bucket, monkeypatch, url):
    """Ranges are fetched several at a time (S3: async, 4 in flight) or one by one (memory://: a synchronous
    filesystem) and each is written at its own offset: the load is bitwise the saved state, with the head sniffed
    from a ranged read of its own."""
    from fabric_ckpt.storage import fsspec_storage

    monkeypatch.setattr(fsspec_storage, "_DOWNLOAD_CHUNK", 1 << 20)  # 13 parts instead of one
    path = f"s3://{bucket}/parts.ckpt" if url == "s3" else "memory://parts/parts.ckpt"
    state = {"a": torch.randn(2_000_000), "b": torch.arange(1_000_000, dtype=torch.int64), "step": 9}
    fabric = Fabric(accelerator="cpu", storage_options=StorageOptions(progress=False))
    fabric.save(path, state)
    target = {"a": torch.zeros(2_000_000), "b": torch.zeros(1_000_000, dtype=torch.int64)}
    assert fabric.load(path, target) == {"step": 9}
    assert torch.equal(target["a"], state["a"]) and torch.equal(target["b"], state["b"])


def test_a_load_downloads_the_objects_bytes_once(bucket, s3_endpoint):
    """Sniffing the format, then loading, costs one transfer of the object: counted on the wire by a proxy."""
    from tests.fault_proxy import FaultProxy

    url = f"s3://{bucket}/once.ckpt"
    state = {"w": torch.randn(5_000_000), "step": 4}  # 20 MB: under s3fs's 50 MiB read-ahead block
    Fabric(accelerator="cpu").save(url, state)
    size = s3().info(url)["size"]
    proxy = FaultProxy(("127.0.0.1", int(s3_endpoint.rsplit(":", 1)[1])), rate=0.0)
    downloads = set(glob.glob(os.path.join(tempfile.gettempdir(), "fabric_ckpt-download-*")))
    try:
        options = StorageOptions(progress=False, filesystem_options={"client_kwargs": {"endpoint_url": proxy.endpoint}})
        target = {"w": torch.zeros(5_000_000)}
        assert Fabric(accelerator="cpu", storage_options=options).load(url, target) == {"step": 4}
        assert torch.equal(target["w"], state["w"])
        assert size <= proxy.response_bytes < size + (256 << 10)  # + headers and metadata answers
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "fabric_ckpt-download-*"))) == downloads  # removed
    finally:
        proxy.close()
