"""Two writers on one key of the local S3 server, and the uploads killed writers leave (issue 16)."""

from __future__ import annotations

import fsspec
import pytest
import torch

from fabric_ckpt import StorageOptions
from fabric_ckpt.formats import save_file
from fabric_ckpt.storage import Location, resolve
from fabric_ckpt.storage.object_store import WriteConflictError
from tests.conftest import bitwise_equal


def s3():
    return fsspec.filesystem("s3", skip_instance_cache=True)


def _confirmation_after(storage_class: type, other_save, calls: list[str]) -> type:
    """The storage of a writer whose confirmation request reaches the store only after ``other_save`` committed:
    the timing a slow network gives when two writers finish together."""

    class Delayed(storage_class):
        def _confirm_size(self, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == 1:
                other_save()
            return super()._confirm_size(path, *args, **kwargs)

    return Delayed


def test_the_writer_that_lost_leaves_the_other_writers_object_and_is_not_retried(bucket):
    url = f"{bucket}/run/last.ckpt"
    mine, theirs = {"w": torch.arange(10.0)}, {"w": torch.arange(5000.0) * 3}  # different sizes
    plain = resolve(url, StorageOptions(retries=4))
    calls: list[str] = []
    delayed = _confirmation_after(type(plain.storage), lambda: save_file(url, theirs), calls)
    location = Location(delayed(plain.storage.fs, StorageOptions(retries=4)), plain.path, url)

    with pytest.raises(WriteConflictError, match=r"another writer replaced the object") as caught:
        save_file(location, mine)
    assert caught.value.filename == url and "not retried" in str(caught.value)
    assert len(calls) == 1  # one attempt: a retry would have overwritten the other writer's checkpoint
    with fsspec.open(url, "rb") as f:  # the other writer's object, bitwise
        assert bitwise_equal(torch.load(f, weights_only=True)["w"], theirs["w"])
    assert s3().list_multipart_uploads(bucket[5:]) == []


def _start_upload(fs, key: str) -> str:
    """A multipart upload with one part sent, as a writer killed mid-upload leaves it."""
    bucket, name = key.split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=name)["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=name, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))
    return upload


def _pending(fs, bucket: str) -> set[str]:
    return {upload["Key"] for upload in fs.list_multipart_uploads(bucket)}


def test_a_save_aborts_the_abandoned_uploads_of_its_folder_once_old_enough(bucket):
    fs = s3()
    name = bucket[5:]
    left = {
        f"{name}/run/ep3.ckpt",  # a killed single-file save
        f"{name}/run/.gen-0a1b/__1_0.distcp",  # a killed rank's shard of a sharded save
    }
    elsewhere = {f"{name}/other-run/ep3.ckpt", f"{name}/run/user-data/big.bin"}
    for key in left | elsewhere:
        _start_upload(fs, key)
    url = f"{bucket}/run/ep4.ckpt"

    save_file(resolve(url, StorageOptions()), {"step": 4})  # the default age (a day): a live writer's upload stays
    assert _pending(fs, name) == {key.split("/", 1)[1] for key in left | elsewhere}

    save_file(resolve(url, StorageOptions(abort_uploads_after=0)), {"step": 4})
    assert _pending(fs, name) == {key.split("/", 1)[1] for key in elsewhere}


def test_abort_uploads_after_is_checked_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="abort_uploads_after"):
        StorageOptions(abort_uploads_after=-1)
    monkeypatch.setenv("FABRIC_CKPT_ABORT_UPLOADS_AFTER", "3600")
    assert StorageOptions.from_environment().abort_uploads_after == 3600.0
