"""The format seam: one sample of every registered format goes through every reader (load, load_raw, inspect,
verify, diff, convert, consolidate), and a format added once at runtime works in all of them.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import fabric_ckpt
from fabric_ckpt import CheckpointError, Fabric
from fabric_ckpt.formats import Format, Loaded, Probe, ReadOptions, register_format, unregister_format
from fabric_ckpt.formats.registry import detect_format, registered_formats
from fabric_ckpt.formats.reports import flatten
from fabric_ckpt.formats.safetensors import write_safetensors
from fabric_ckpt.storage import Location, resolve
from tests.conftest import bitwise_equal

WEIGHTS = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bias": torch.tensor([1.0, -2.0, 0.5])}
CHECKPOINT = {"model": WEIGHTS, "step": 3, "meta": {"lr": [0.1, 0.01]}}


def _quiet_dcp_save(state: dict[str, Any], folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)


def _hf_index(folder: Path) -> None:
    folder.mkdir()
    write_safetensors({"weight": WEIGHTS["weight"]}, resolve(str(folder / "model-00001-of-00002.safetensors")))
    write_safetensors({"bias": WEIGHTS["bias"]}, resolve(str(folder / "model-00002-of-00002.safetensors")))
    index = {
        "metadata": {"total_size": 60},
        "weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _lightning_sharded(folder: Path) -> None:
    """Lightning's own layout, as its FSDP strategies write it: DCP files for the module, meta.pt for the rest."""
    _quiet_dcp_save({"model": WEIGHTS}, folder)
    torch.save({"step": 3, "meta": {"lr": [0.1, 0.01]}}, folder / "meta.pt")


# name -> (builder(path), what loading it gives)
SAMPLES: dict[str, tuple[Any, dict[str, Any]]] = {
    "torch-zip": (lambda p: Fabric(accelerator="cpu").save(p / "ours.ckpt", CHECKPOINT), CHECKPOINT),
    "torch-legacy": (
        lambda p: torch.save(CHECKPOINT, p / "legacy.pt", _use_new_zipfile_serialization=False),
        CHECKPOINT,
    ),
    "safetensors": (lambda p: write_safetensors(WEIGHTS, resolve(str(p / "w.safetensors"))), WEIGHTS),
    "hf-safetensors": (lambda p: _hf_index(p / "hf"), WEIGHTS),
    "sharded": (lambda p: fabric_ckpt.convert(p / "src.ckpt", f"{p}/sharded/"), CHECKPOINT),
    "lightning-sharded": (lambda p: _lightning_sharded(p / "lightning"), CHECKPOINT),
    "dcp": (lambda p: _quiet_dcp_save(CHECKPOINT, p / "bare"), CHECKPOINT),
    "compressed": (lambda p: Fabric(accelerator="cpu").save(p / "ours.tar.gz", CHECKPOINT), CHECKPOINT),
}
PATHS = {
    "torch-zip": "ours.ckpt",
    "torch-legacy": "legacy.pt",
    "safetensors": "w.safetensors",
    "hf-safetensors": "hf",
    "sharded": "sharded",
    "lightning-sharded": "lightning",
    "dcp": "bare",
    "compressed": "ours.tar.gz",
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    torch.save(CHECKPOINT, root / "src.ckpt")
    torch.save(WEIGHTS, root / "weights.pt")
    for build, _ in SAMPLES.values():
        build(root)
    return root


def assert_same(actual: Any, expected: Any) -> None:
    left, right = flatten(actual), flatten(expected)
    assert left.keys() == right.keys()
    for key, value in right.items():
        if isinstance(value, torch.Tensor):
            assert bitwise_equal(left[key], value), key
        else:
            assert left[key] == value, key


def test_every_registered_format_has_a_sample():
    assert {fmt.name for fmt in registered_formats()} == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_reader_reads_every_format_alike(samples, tmp_path, name):
    path = samples / PATHS[name]
    expected = SAMPLES[name][1]
    assert detect_format(path).name == name
    fabric = Fabric(accelerator="cpu")
    assert_same(fabric.load(path), expected)  # load
    description = fabric_ckpt.describe(path)  # inspect: the same entries, shapes and dtypes
    entries = description.entries()
    assert entries.keys() == flatten(expected).keys()
    for key, value in flatten(expected).items():
        if isinstance(value, torch.Tensor):
            assert (entries[key].shape, entries[key].dtype) == (tuple(value.shape), value.dtype), key
    assert fabric_ckpt.verify(path).ok  # verify
    assert fabric_ckpt.diff(path, path).equal  # diff, and against the reference written by torch.save
    reference = samples / ("src.ckpt" if expected is CHECKPOINT else "weights.pt")
    assert fabric_ckpt.diff(reference, path).equal
    fabric_ckpt.convert(path, tmp_path / "converted.ckpt")  # convert
    assert_same(fabric.load(tmp_path / "converted.ckpt"), expected)
    model = nn.Linear(4, 3)
    fabric.load_raw(path, model) if expected is WEIGHTS else fabric.load(path, {"model": model}, strict=False)
    assert bitwise_equal(model.weight, WEIGHTS["weight"]) and bitwise_equal(model.bias, WEIGHTS["bias"])
    fabric_ckpt.consolidate(path, tmp_path / "consolidated.ckpt")  # consolidate: one file of ours
    assert_same(fabric.load(tmp_path / "consolidated.ckpt"), expected)


# ---------------------------------------------------------------------------------------------- a format of one's own
class TensorLines(Format):
    """A toy format: a first line ``tensor-lines/1``, then ``name dtype v1 v2 ...`` per 1-d tensor."""

    name = "tensor-lines"
    writes = True

    def sniff(self, probe: Probe) -> bool:
        return not probe.folder and probe.head.startswith(b"tensor-lines/1\n")

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        with location.open() as stream:
            lines = stream.read().decode().splitlines()[1:]
        tensors = {}
        for line in lines:
            key, dtype, *values = line.split()
            tensors[key] = torch.tensor([float(v) for v in values], dtype=getattr(torch, dtype))
        yield Loaded(tensors, self.name)

    def write(self, location: Location, checkpoint: Any, *, on_storage_written: Any = None) -> None:
        with location.atomic_write() as sink:
            sink.write(b"tensor-lines/1\n")
            for key, tensor in checkpoint.items():
                values = " ".join(repr(float(v)) for v in tensor.tolist())
                sink.write(f"{key} {str(tensor.dtype).removeprefix('torch.')} {values}\n".encode())


@pytest.fixture
def tensor_lines():
    fmt = register_format(TensorLines())
    yield fmt
    unregister_format(fmt.name)


def test_a_format_registered_at_runtime_works_in_every_reader(tmp_path, tensor_lines):
    path = tmp_path / "weights.txt"
    tensor_lines.write(resolve(str(path)), {"bias": WEIGHTS["bias"]})
    model = nn.Linear(4, 3)
    fabric = Fabric(accelerator="cpu")
    fabric.load(path, {"model": model}, strict=False)  # a plain state dict maps onto the single module
    assert bitwise_equal(model.bias, WEIGHTS["bias"])
    assert fabric_ckpt.describe(path).format == "tensor-lines"
    report = fabric_ckpt.verify(path)
    assert report.ok and report.unchecked == ["this format carries no checksums: it was checked by loading it"]
    fabric_ckpt.convert(path, tmp_path / "bias.safetensors")
    assert fabric_ckpt.diff(path, tmp_path / "bias.safetensors").equal
    path.write_bytes(b"tensor-lines/1\nbias float32 1.0 oops\n")
    assert not fabric_ckpt.verify(path).ok  # a file its format cannot read is reported, not raised


def test_an_unknown_file_names_the_registered_formats(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"match no known format \(.*safetensors.*compressed\)"):
        Fabric(accelerator="cpu").load(path)


def test_safetensors_are_read_without_the_safetensors_package_and_agree_with_it(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int16), "c": torch.ones(2, dtype=torch.bool)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    ours = Fabric(accelerator="cpu").load(tmp_path / "ref.safetensors")
    theirs = load_file(str(tmp_path / "ref.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(bitwise_equal(ours[key], theirs[key]) for key in theirs)
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    twice = header[:-1] + b', "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(twice)) + twice + b"\x00" * 4)
    with pytest.raises(CheckpointError, match="names 'a' twice"):
        Fabric(accelerator="cpu").load(path)
