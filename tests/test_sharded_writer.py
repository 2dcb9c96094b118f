"""The sharded writer: how many threads write a rank's shards (a setting), and the CRC-32s kept while they write."""

from __future__ import annotations

import itertools
import os
import random
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fabric_ckpt import FSDPStrategy, StorageOptions
from fabric_ckpt.core import checksum
from fabric_ckpt.formats import dcp as dcp_format
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import resolve
from tests import dist_cases as cases
from tests.distributed import WorkerGroup
from tests.test_ddp import assert_states_equal


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(2)
    yield workers
    workers.close()


def shard_names(threads: int) -> list[str]:
    return [".metadata"] + [f"__{rank}_{index}.distcp" for rank in range(2) for index in range(threads)]


def test_storage_options_writer_threads_reach_dcp_one_file_per_thread(group, tmp_path):
    path = str(tmp_path / "three.ckpt")
    results = group.run(cases.writer_threads_round_trip, path, None, 3, False)
    for result in results:
        assert result["files"] == shard_names(3)
        assert_states_equal(result["loaded"], result["saved"])


def test_the_strategy_argument_overrides_storage_options_in_async_saves_too(group, tmp_path):
    path = str(tmp_path / "two.ckpt")
    results = group.run(cases.writer_threads_round_trip, path, 2, 3, True)
    for result in results:
        assert result["files"] == shard_names(2)
        assert_states_equal(result["loaded"], result["saved"])


def test_writer_threads_default_to_one_and_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("FABRIC_CKPT_WRITER_THREADS", raising=False)
    assert StorageOptions().writer_threads == 1
    assert StorageOptions.from_environment().writer_threads == 1
    monkeypatch.setenv("FABRIC_CKPT_WRITER_THREADS", "4")
    assert StorageOptions.from_environment().writer_threads == 4
    assert StorageOptions.from_environment(writer_threads=2).writer_threads == 2


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_a_bad_writer_thread_count_is_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"StorageOptions\(writer_threads="):
        StorageOptions(writer_threads=bad)
    with pytest.raises(ValueError, match=r"FSDPStrategy\(writer_threads="):
        FSDPStrategy(accelerator="cpu", writer_threads=bad)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("threads", [1, 3])
def test_checksums_kept_while_writing_equal_a_second_read_of_the_files(tmp_path, threads):
    generator = torch.Generator().manual_seed(threads)
    state = {f"layer{index}.weight": torch.randn(37 * index + 5, 11, generator=generator) for index in range(1, 8)}
    state["step"] = 12  # written as a pickled bytes item, between the tensors
    state["names"] = ["a", "b"]
    folder = resolve(str(tmp_path / "dcp"))
    folder.makedirs()
    writer = dcp_format.writer_for(folder, thread_count=threads)
    metadata = dcp.save(state, storage_writer=writer)
    names = sorted(os.listdir(folder.path))
    written = dcp_format.written_files(writer)
    assert sorted(written) == names  # every file DCP wrote, ``.metadata`` included (written, then renamed)
    kept = sharded.file_checksums(folder, names, metadata, written)
    read_back = sharded.file_checksums(folder, names, metadata)
    assert kept == read_back
    assert sum(len(record.items) for record in kept) == len(metadata.storage_data)
    for name in names:  # the records came from the writer's running CRC-32s, not from a fallback read
        items = [
            (index.fqn, info.offset, info.length)
            for index, info in metadata.storage_data.items()
            if info.relative_path == name
        ]
        assert written[name].chunk_checksums(sorted(items, key=lambda item: item[1])) is not None


@pytest.mark.parametrize("accelerated_combine", [True, False])
def test_crc32_between_recovers_the_crc_of_any_stretch_of_a_stream(monkeypatch, accelerated_combine):
    if not accelerated_combine:
        monkeypatch.setattr(checksum, "_zlib_combine", None)  # the pure-Python fallback
    rng = random.Random(7)
    data = rng.randbytes(1 << 16)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(12))})
    running = {0: 0}
    for start, end in itertools.pairwise(cuts):
        running[end] = zlib.crc32(data[start:end], running[start])
    for start, end in itertools.pairwise(cuts):
        expected = zlib.crc32(data[start:end])
        assert checksum.crc32_between(running[start], running[end], end - start) == expected, (start, end)
    assert checksum.crc32_combine(zlib.crc32(data[:100]), zlib.crc32(data[100:]), len(data) - 100) == zlib.crc32(data)
    assert checksum.crc32_between(running[0], running[0], 0) == 0
