"""Reading DCP shard files in place (by position, one copy into the target) must give exactly what DCP's reader gives.

The reference is DCP's own ``FileSystemReader`` on the same folder: every dtype and shape DCP writes, the non-tensor
entries, loads in place into existing tensors, a folder on an fsspec filesystem (read DCP's way), and memory: the
in-place read holds no second copy of an item.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from fabric_ckpt import CheckpointError, Fabric
from fabric_ckpt.formats.dcp import reader_for
from fabric_ckpt.storage import resolve
from tests.conftest import bitwise_equal
from tests.memory_peak import REPOSITORY


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    tensors = {
        "float32": torch.randn(5, 7, generator=generator),
        "bfloat16": torch.randn(9, generator=generator).bfloat16(),
        "float16": torch.randn(3, 3, generator=generator).half(),
        "int64": torch.arange(11),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.randn(4, dtype=torch.complex64, generator=generator),
        "uint16": torch.arange(6).to(torch.uint16),
        "float8": torch.randn(4, generator=generator).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "zero_size": torch.empty(0, 4),
        "strided_view": base[:, ::2],
        "large": torch.randn(1 << 20, generator=generator),
    }
    return {f"w_{name}": value for name, value in tensors.items()}  # (names a module can hold as buffers)


def _write(path) -> dict[str, object]:
    state = {"model": _tensors(), "step": 12, "notes": ["a", {"b": 2}]}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state


def _read_by_dcp(path) -> dict[str, torch.Tensor]:
    """What DCP's own reader puts into fresh targets of the right shapes."""
    targets = {name: torch.zeros_like(value) for name, value in _tensors().items()}
    dcp.load({"model": targets}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return targets


def test_a_bare_dcp_folder_reads_in_place_exactly_as_dcps_reader_reads_it(tmp_path):
    written = _write(tmp_path / "bare")
    expected = _read_by_dcp(tmp_path / "bare")
    loaded = Fabric(accelerator="cpu").load(tmp_path / "bare")
    assert loaded["step"] == 12 and loaded["notes"] == ["a", {"b": 2}]
    assert loaded["model"].keys() == expected.keys()
    for name, value in expected.items():
        assert bitwise_equal(loaded["model"][name], value), name
        assert bitwise_equal(value, written["model"][name]), name  # (DCP's reader gives what was written)


def test_a_load_into_a_module_fills_its_tensors_in_place(tmp_path):
    _write(tmp_path / "bare")
    expected = _read_by_dcp(tmp_path / "bare")
    module = nn.Module()
    for name, value in expected.items():
        module.register_buffer(name, torch.zeros_like(value))
    addresses = {name: t.data_ptr() for name, t in module.state_dict().items()}
    remainder = Fabric(accelerator="cpu").load(tmp_path / "bare", {"model": module})
    assert remainder == {"step": 12, "notes": ["a", {"b": 2}]}
    for name, value in expected.items():
        assert bitwise_equal(getattr(module, name), value), name
        assert getattr(module, name).data_ptr() == addresses[name], name


def test_a_folder_on_an_fsspec_filesystem_is_read_as_dcp_reads_it(tmp_path):
    """Only a local disk is read in place; elsewhere DCP's streaming reader runs, with the same result."""
    _write(tmp_path / "bare")
    expected = _read_by_dcp(tmp_path / "bare")
    remote = "memory://dcp-reader/bare"
    target = resolve(remote)
    for name in sorted(p.name for p in (tmp_path / "bare").iterdir()):
        with target.storage.open_write(target.storage.join(target.path, name)) as out:
            out.write((tmp_path / "bare" / name).read_bytes())
    assert not target.storage.reads_in_place and resolve(str(tmp_path)).storage.reads_in_place
    loaded = Fabric(accelerator="cpu").load(remote)
    for name, value in expected.items():
        assert bitwise_equal(loaded["model"][name], value), name


def test_an_item_whose_bytes_are_not_an_archive_fails_naming_the_checkpoint(tmp_path):
    _write(tmp_path / "bare")
    (shard,) = [p for p in (tmp_path / "bare").iterdir() if p.suffix == ".distcp"]
    data = bytearray(shard.read_bytes())
    data[:64] = b"\0" * 64  # the first item's zip header
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bare"):
        Fabric(accelerator="cpu").load(tmp_path / "bare", verify=False)


def test_a_shard_shorter_than_its_metadata_says_fails_unchecked_naming_the_file_entry_and_missing_bytes(tmp_path):
    """With ``verify=False`` nothing checks the file first: the read itself must refuse the missing bytes."""
    _write(tmp_path / "bare")
    (shard,) = [p for p in (tmp_path / "bare").iterdir() if p.suffix == ".distcp"]
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    with pytest.raises(CheckpointError, match=r"bare") as caught:
        Fabric(accelerator="cpu").load(tmp_path / "bare", verify=False)
    message = str(caught.value)
    assert shard.name in message and "is shorter than the entry needs" in message
    assert f"the file has {size - 100} bytes" in message


def test_an_item_whose_pickle_points_past_its_bytes_is_refused_not_read_from_elsewhere_in_the_file(tmp_path):
    """Unchecked (``verify=False``), an item whose pickle puts its tensor past the bytes of its record must fail as
    ``torch.load`` does, not be filled from whatever follows the record in the shard file."""
    dcp.save({"model": {"w": torch.arange(4.0), "v": torch.full((64,), 7.0)}}, checkpoint_id=str(tmp_path / "bare"))
    (shard,) = [p for p in (tmp_path / "bare").iterdir() if p.suffix == ".distcp"]
    data = shard.read_bytes()
    # _rebuild_tensor_v2(storage, offset=0, size=(4,), ...) -> offset 16 elements: 64 bytes past a 16-byte storage
    assert data.count(b"QK\x00K\x04\x85") == 1
    shard.write_bytes(data.replace(b"QK\x00K\x04\x85", b"QK\x10K\x04\x85"))
    module = nn.Module()
    module.register_buffer("w", torch.zeros(4))
    module.register_buffer("v", torch.zeros(64))
    with pytest.raises(CheckpointError, match=r"model\.w"):
        Fabric(accelerator="cpu").load(tmp_path / "bare", {"model": module}, verify=False, strict=False)


def test_an_in_place_read_holds_no_second_copy_of_the_items(tmp_path):
    """DCP's reader allocates each item again before copying it; read in place, the only copy is into the target."""
    item_bytes = 32 << 20
    tensors = {f"w{i}": torch.full((item_bytes // 4,), float(i)) for i in range(4)}
    dcp.save({"model": tensors}, checkpoint_id=str(tmp_path / "big"), no_dist=True)
    script = textwrap.dedent(f"""
        import warnings
        import torch
        import torch.distributed.checkpoint as dcp
        from fabric_ckpt.formats.dcp import reader_for
        from fabric_ckpt.storage import resolve
        from tests.memory_peak import PeakAnonymousMemory

        warnings.simplefilter("ignore")

        def peak_extra(reader):
            targets = {{f"w{{i}}": torch.zeros({item_bytes // 4}) for i in range(4)}}
            with PeakAnonymousMemory() as memory:
                dcp.load({{"model": targets}}, storage_reader=reader, no_dist=True)
            assert all(torch.all(targets[f"w{{i}}"] == i) for i in range(4))
            return memory.extra

        folder = {str(tmp_path / "big")!r}
        print(peak_extra(dcp.FileSystemReader(folder)), peak_extra(reader_for(resolve(folder))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    by_dcp, in_place = (int(word) for word in result.stdout.split()[-2:])
    assert by_dcp >= item_bytes // 2, f"the sampler missed DCP's own copy of an item ({by_dcp >> 20} MiB)"
    assert in_place < item_bytes // 4, f"{in_place >> 20} MiB of anonymous memory for items of {item_bytes >> 20} MiB"


def test_a_shard_shortened_while_its_items_are_read_raises_naming_the_file_instead_of_killing_the_process(tmp_path):
    """Another process truncates the shard after its first item was read. Read from a memory map, the next item's
    page fault killed the process (SIGBUS, exit 135); read by position it is an error naming the file and entry,
    as DCP's own reader gives. The truncation is timed by a DCP load planner (a public extension point)."""
    tensors = {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(4)}
    dcp.save({"model": tensors}, checkpoint_id=str(tmp_path / "bare"), no_dist=True)
    script = textwrap.dedent(f"""
        import os, warnings
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from fabric_ckpt.formats.dcp import reader_for
        from fabric_ckpt.storage import resolve

        warnings.simplefilter("ignore")
        folder = {str(tmp_path / "bare")!r}
        (shard,) = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".distcp")]

        class AnotherProcessTruncates(DefaultLoadPlanner):
            resolved = 0
            def resolve_tensor(self, read_item):
                self.resolved += 1
                if self.resolved == 2:  # the first item is in; the file is mapped or open
                    os.truncate(shard, 4096)
                return super().resolve_tensor(read_item)

        targets = {{f"w{{i}}": torch.zeros(1 << 18) for i in range(4)}}
        try:
            dcp.load({{"model": targets}}, storage_reader=reader_for(resolve(folder)),
                     planner=AnotherProcessTruncates(), no_dist=True)
        except BaseException as err:
            print("raised", type(err).__name__, err)
        else:
            print("loaded")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the process died (exit {result.returncode}): {result.stderr[-2000:]}"
    assert result.stdout.startswith("raised"), result.stdout
    assert (
        "__0_0.distcp" in result.stdout
        and "model.w1" in result.stdout
        and "changed while it was being loaded" in result.stdout
    )


def test_targets_the_bytes_cannot_be_read_into_directly_get_the_same_values(tmp_path):
    """A non-contiguous target, or one of another dtype, is filled through a buffer of the item: same values as
    DCP's reader puts there."""
    written = {"w_rows": torch.randn(6, 8), "w_cast": torch.randn(5, 3)}
    dcp.save({"model": written}, checkpoint_id=str(tmp_path / "bare"), no_dist=True)

    def targets() -> dict[str, torch.Tensor]:
        return {"w_rows": torch.zeros(8, 6).t(), "w_cast": torch.zeros(5, 3, dtype=torch.float64)}

    by_dcp, ours = targets(), targets()
    dcp.load({"model": by_dcp}, storage_reader=dcp.FileSystemReader(str(tmp_path / "bare")), no_dist=True)
    dcp.load({"model": ours}, storage_reader=reader_for(resolve(str(tmp_path / "bare"))), no_dist=True)
    assert not ours["w_rows"].is_contiguous() and ours["w_cast"].dtype == torch.float64
    for name in written:
        assert bitwise_equal(ours[name], by_dcp[name]), name
    assert torch.equal(ours["w_rows"], written["w_rows"])
