"""The fast load path: our archives unpickled by the C unpickler (strict allowlist) from one mapping of the file.

It must return exactly what ``torch.load(weights_only=True)`` returns, and hand everything it does not handle to
``torch.load``.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch

from fabric_ckpt import Fabric, UnsafeCheckpointError
from fabric_ckpt.core.unpickling import FastPathUnavailable, unpickle_with_storages
from fabric_ckpt.formats.archive_fast_path import load_mapped_archive
from fabric_ckpt.formats.torch_format import read_archive_info
from fabric_ckpt.storage.mapped_file import map_local_file


@dataclass
class Custom:
    value: int


def _rich_checkpoint() -> dict:
    base = torch.arange(24, dtype=torch.float32)
    metadata_dict = OrderedDict(w=torch.randn(3, 4))
    metadata_dict._metadata = OrderedDict({"": {"version": 1}})  # what module.state_dict() carries
    return {
        "tied_a": base,
        "tied_b": base,  # the same tensor twice: one storage
        "view": base[5:17].view(3, 4),  # a view at an offset into that storage
        "transposed": torch.randn(5, 7).t(),  # not contiguous
        "param": torch.nn.Parameter(torch.randn(4), requires_grad=False),
        "trainable": torch.nn.Parameter(torch.randn(2, 2)),
        "dtypes": [
            torch.ones(3, dtype=dtype)
            for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.bool, torch.complex64)
        ],
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5),
        "state_dict": metadata_dict,
        "plain": {"bytes": b"\x00\xffabc", "set": {1, 2}, "tuple": (1, "x", None), "size": torch.Size([2, 3])},
        "device": torch.device("cpu"),
        "numbers": [1, 2.5, 10**30, -7],
    }


def _assert_identical(fast, slow) -> None:
    assert type(fast) is type(slow)
    if isinstance(slow, torch.Tensor):
        assert fast.dtype == slow.dtype and fast.shape == slow.shape and fast.stride() == slow.stride()
        assert fast.storage_offset() == slow.storage_offset() and fast.requires_grad == slow.requires_grad
        assert torch.equal(fast, slow)
    elif isinstance(slow, dict):
        assert list(fast) == list(slow)
        assert getattr(fast, "_metadata", None) == getattr(slow, "_metadata", None)
        for key in slow:
            _assert_identical(fast[key], slow[key])
    elif isinstance(slow, (list, tuple)):
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow, strict=True):
            _assert_identical(a, b)
    else:
        assert fast == slow


def test_the_fast_path_returns_exactly_what_torch_load_returns(tmp_path):
    path = tmp_path / "rich.ckpt"
    Fabric(accelerator="cpu").save(path, _rich_checkpoint())
    slow = torch.load(path, weights_only=True, mmap=True)
    with map_local_file(str(path)) as mapping:
        fast = load_mapped_archive(mapping, read_archive_info(mapping.buffer))
    _assert_identical(fast, slow)
    # Storages shared in the file are shared after loading, as torch.load shares them.
    assert fast["tied_a"].untyped_storage().data_ptr() == fast["tied_b"].untyped_storage().data_ptr()
    assert fast["view"].untyped_storage().data_ptr() == fast["tied_a"].untyped_storage().data_ptr()


def test_tensors_outlive_the_mapping_block_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "c.ckpt"
    Fabric(accelerator="cpu").save(path, {"w": torch.ones(1000)})
    with map_local_file(str(path)) as mapping:
        loaded = load_mapped_archive(mapping, read_archive_info(mapping.buffer))
    loaded["w"].add_(1)  # a private (copy-on-write) mapping
    assert torch.equal(loaded["w"], torch.full((1000,), 2.0))
    assert torch.equal(torch.load(path)["w"], torch.ones(1000))


def test_anything_outside_the_allowlist_goes_to_torch_load(tmp_path):
    fabric = Fabric(accelerator="cpu")
    path = tmp_path / "custom.ckpt"
    fabric.save(path, {"custom": Custom(3), "w": torch.ones(2)})
    with map_local_file(str(path)) as mapping, pytest.raises(FastPathUnavailable, match="Custom"):
        load_mapped_archive(mapping, read_archive_info(mapping.buffer))
    # The load as a whole behaves as it always did: refused by default, loaded when trusted.
    with pytest.raises(UnsafeCheckpointError):
        fabric.load(path)
    assert fabric.load(path, weights_only=False)["custom"] == Custom(3)


def test_a_map_location_off_the_cpu_goes_to_torch_load(tmp_path):
    path = tmp_path / "c.ckpt"
    Fabric(accelerator="cpu").save(path, {"w": torch.ones(2)})
    with map_local_file(str(path)) as mapping, pytest.raises(FastPathUnavailable, match="meta"):
        load_mapped_archive(mapping, read_archive_info(mapping.buffer), map_location="meta")
    assert Fabric(accelerator="cpu").load(path)["w"].device.type == "cpu"


def test_the_unpickler_refuses_globals_a_weights_only_load_would_refuse():
    hostile = pickle.dumps(eval, protocol=2)  # builtins.eval
    with pytest.raises(FastPathUnavailable, match="eval"):
        unpickle_with_storages(hostile, lambda key, nbytes: torch.UntypedStorage(nbytes))
    reduce_os = b"cos\nsystem\n(S'true'\ntR."  # os.system("true") in protocol 0
    with pytest.raises(FastPathUnavailable, match=r"os\.system"):
        unpickle_with_storages(reduce_os, lambda key, nbytes: torch.UntypedStorage(nbytes))
