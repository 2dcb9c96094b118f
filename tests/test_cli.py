"""The fabric-ckpt command: inspect, verify, diff, convert, consolidate; exact exit codes and one-line errors."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import load_file as load_safetensors

from fabric_ckpt.formats import save_file
from fabric_ckpt.tools.cli import main
from tests.conftest import assert_same_state, bitwise_equal, make_net, snapshot, trained
from tests.sharded_files import shard_files

BIN = Path(sys.executable).parent


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def saved(tmp_path, fabric):
    model, optimizer = trained()
    path = tmp_path / "c.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    return path, model, optimizer


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_a_tree_with_totals(capsys, saved):
    path, _, _ = saved
    code, out, err = run(capsys, "inspect", path)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{path}  [fabric_ckpt]  28 tensors, 246 elements, 988 B, {_kib(path)} on storage"
    assert "├── model/  (10 tensors, 372 B)" in lines
    assert any(line.split() == ["│", "├──", "fc1.weight", "float32", "[8,", "4]", "128", "B"] for line in lines)
    assert lines[-1] == "└── step  = 3"


def _kib(path) -> str:
    return f"{os.path.getsize(path) / 1024:.1f} KiB"


def test_inspect_json_matches_the_tensors(capsys, saved):
    path, _, _ = saved
    code, out, _ = run(capsys, "inspect", "--json", path)
    report = json.loads(out)
    loaded = torch.load(path, weights_only=True)
    tensors = {e["path"]: e for e in report["entries"] if e["kind"] == "tensor"}
    assert code == 0 and report["format"] == "fabric_ckpt" and report["tensors"] == len(tensors) == 28
    for name, tensor in loaded["model"].items():
        entry = tensors[f"model/{name}"]
        assert entry["shape"] == list(tensor.shape)
        assert entry["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert entry["bytes"] == tensor.numel() * tensor.element_size()
    assert {"path": "step", "kind": "value", "type": "int", "value": 3} in report["entries"]


class CountingMemoryFileSystem(MemoryFileSystem):
    """A memory filesystem that counts the bytes read from it (a remote store's traffic)."""

    protocol = "countmem"
    root_marker = "/"
    bytes_read = 0

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            return super()._open(path, mode, **kwargs)
        data = self.cat_file(path)
        owner = type(self)

        class Counting(io.BytesIO):
            def read(self, size=-1):
                chunk = super().read(size)
                owner.bytes_read += len(chunk)
                return chunk

        return Counting(data)


def test_inspect_of_a_remote_file_reads_no_tensor_data(capsys, tmp_path):
    fsspec.register_implementation("countmem", CountingMemoryFileSystem, clobber=True)
    state = {"model": {"big": torch.zeros(1024, 1024), "small": torch.ones(3)}, "step": 1}
    save_file("countmem://store/big.ckpt", state)  # 4 MiB of tensor data
    CountingMemoryFileSystem.bytes_read = 0
    code, out, _ = run(capsys, "inspect", "countmem://store/big.ckpt")
    assert code == 0 and "big    float32   [1024, 1024]   4.0 MiB" in out
    # The zip directory, data.pkl and the archive's last 64 KiB (where zipfile looks for the end record): no tensors.
    assert CountingMemoryFileSystem.bytes_read < 160 << 10


def test_inspect_sharded_folder_and_trusted_files(capsys, tmp_path, saved):
    path, _, _ = saved
    assert run(capsys, "convert", "--quiet", path, f"{tmp_path}/sharded/")[0] == 0
    code, out, _ = run(capsys, "inspect", tmp_path / "sharded")
    assert code == 0 and out.startswith(f"{tmp_path / 'sharded'}  [sharded]  28 tensors, 246 elements, 988 B")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(2), "when": __import__("datetime").timedelta(seconds=3)}, unsafe)
    code, out, err = run(capsys, "inspect", unsafe)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"fabric-ckpt: error: Checkpoint '{unsafe}' holds objects that only arbitrary unpickling")
    assert err.endswith("pass weights_only=False. (with this command: rerun with --trust)\n")
    code, out, _ = run(capsys, "inspect", "--trust", unsafe)
    assert code == 0 and "when  = datetime.timedelta(seconds=3)" in out


def test_inspect_other_formats(capsys, tmp_path, fabric):
    from safetensors.torch import save_file as save_safetensors

    model = make_net()
    save_safetensors(model.state_dict(), str(tmp_path / "m.safetensors"))
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    fabric.save(tmp_path / "m.tar.xz", {"model": model})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path / "bare", no_dist=True)
    expected = {
        "m.safetensors": "safetensors",
        "legacy.pt": "torch-legacy",
        "m.tar.xz": "fabric_ckpt (xz)",
        "bare": "dcp",
    }
    for name, fmt in expected.items():
        code, out, _ = run(capsys, "inspect", "--json", tmp_path / name)
        report = json.loads(out)
        assert (code, report["format"], report["tensors"], report["bytes"]) == (0, fmt, 10, 372), name


# ---------------------------------------------------------------------------------------------- verify
def test_verify_exit_codes_and_report(capsys, saved):
    path, _, _ = saved
    code, out, _ = run(capsys, "verify", path)
    assert code == 0 and out.splitlines()[0] == f"{path}: OK"
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("archive/.data/fabric_ckpt.json"))
        record = next(r for r, entry in manifest["tensors"].items() if entry == "model/fc2.weight")
        info = archive.getinfo(f"archive/{record}")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF  # the record's first data byte
    path.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", path)
    assert code == 1
    assert out.splitlines()[0] == f"{path}: DAMAGED (1 problem)"
    assert out.splitlines()[2].startswith(f"  problem: record '{record}' (entry 'model/fc2.weight'): bytes damaged")
    code, out, _ = run(capsys, "verify", "--json", path)
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and len(report["problems"]) == 1


# ---------------------------------------------------------------------------------------------- diff
def test_diff_equal_changed_added_removed(capsys, tmp_path, saved, fabric):
    path, model, optimizer = saved
    assert run(capsys, "diff", path, path) == (
        0,
        f"{path} vs {path}: equal (0 changed, 0 added, 0 removed, 41 unchanged)\n",
        "",
    )
    with torch.no_grad():
        model.fc1.weight[0, 0] += 0.5
    model.fc2.bias.data = model.fc2.bias.data.double()
    fabric.save(tmp_path / "other.ckpt", {"model": model, "optimizer": optimizer, "step": 4, "extra": 1})
    code, out, _ = run(capsys, "diff", path, tmp_path / "other.ckpt")
    lines = out.splitlines()
    assert code == 1
    assert lines[0].endswith("different (3 changed, 1 added, 0 removed, 38 unchanged)")
    assert lines[1].split() == ["changed", "model/fc1.weight", "max", "abs", "diff", "0.5"]
    assert lines[2].split() == ["changed", "model/fc2.bias", "dtype", "float32", "->", "float64"]
    assert lines[3].split() == ["changed", "step", "3", "->", "4"]
    assert lines[4].split() == ["added", "extra"]
    code, out, _ = run(capsys, "diff", "--json", tmp_path / "other.ckpt", path)
    result = json.loads(out)
    assert (
        code == 1
        and result["removed"] == ["extra"]
        and result["changed"][0]["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    )


def test_diff_across_layouts_and_locations(capsys, tmp_path, saved):
    path, _, _ = saved
    run(capsys, "convert", "-q", path, f"{tmp_path}/sharded/")
    run(capsys, "convert", "-q", path, "memory://remote/c.ckpt")
    assert run(capsys, "diff", path, tmp_path / "sharded")[0] == 0
    assert run(capsys, "diff", tmp_path / "sharded", "memory://remote/c.ckpt")[0] == 0


# ---------------------------------------------------------------------------------------------- convert
def test_convert_to_safetensors_picks_the_module_entry(capsys, tmp_path, saved):
    path, model, _ = saved
    code, out, _ = run(capsys, "convert", path, tmp_path / "model.safetensors")
    assert code == 0 and out == f"wrote {tmp_path / 'model.safetensors'} (safetensors: 10 tensors, 372 B)\n"
    assert_same_state(load_safetensors(str(tmp_path / "model.safetensors")), snapshot(model))
    save_file(tmp_path / "two.ckpt", {"a": make_net(1).state_dict(), "b": make_net(2).state_dict()})
    code, out, err = run(capsys, "convert", tmp_path / "two.ckpt", tmp_path / "w.safetensors")
    assert code == 2 and out == ""
    assert err == (
        f"fabric-ckpt: error: safetensors holds one module's weights, so pick the entry of '{tmp_path / 'two.ckpt'}' "
        "to write with --entry (entry=...): it has 2: ['a', 'b']\n"
    )
    assert run(capsys, "convert", "--entry", "b", tmp_path / "two.ckpt", tmp_path / "w.safetensors")[0] == 0
    assert_same_state(load_safetensors(str(tmp_path / "w.safetensors")), snapshot(make_net(2)))


def test_convert_to_sharded_and_back(capsys, tmp_path, saved, fabric):
    path, model, optimizer = saved
    assert run(capsys, "convert", "-q", path, f"{tmp_path}/sharded/") == (0, "", "")
    names = sorted(os.listdir(tmp_path / "sharded"))
    assert len(names) == 2 and names[0].startswith(".gen-") and names[1] == "fabric_ckpt.json"
    assert shard_files(tmp_path / "sharded") == [".metadata", "__0_0.distcp"]
    target = make_net(9)
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    remainder = fabric.load(tmp_path / "sharded", {"model": target, "optimizer": target_optimizer})
    assert remainder == {"step": 3}
    assert_same_state(snapshot(target), snapshot(model))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))
    assert run(capsys, "consolidate", "-q", tmp_path / "sharded", tmp_path / "back.ckpt") == (0, "", "")
    assert run(capsys, "diff", path, tmp_path / "back.ckpt")[0] == 0
    assert run(capsys, "convert", "--format", "sharded", "-q", path, tmp_path / "named")[0] == 0
    assert (tmp_path / "named" / "fabric_ckpt.json").is_file()


@pytest.mark.parametrize("name", ["c.tar.gz", "c.tgz", "c.tar.bz2", "c.tar.xz", "c.zst"])
def test_convert_to_compressed_files(capsys, tmp_path, saved, fabric, name):
    if name.endswith(".zst"):
        pytest.importorskip("zstandard")
    path, model, _ = saved
    assert run(capsys, "convert", "-q", path, tmp_path / name) == (0, "", "")
    target = make_net(9)
    assert fabric.load(tmp_path / name, {"model": target}, strict=False)["step"] == 3
    assert_same_state(snapshot(target), snapshot(model))
    assert run(capsys, "verify", tmp_path / name)[0] == 0


def test_convert_format_must_match_a_compressed_name(capsys, tmp_path, saved):
    path, _, _ = saved
    code, out, err = run(capsys, "convert", "--format", "tar.gz", path, tmp_path / "out.ckpt")
    assert (code, out) == (2, "")
    assert err == (
        "fabric-ckpt: error: format 'tar.gz' needs an output name with the matching extension, "
        f"got '{tmp_path / 'out.ckpt'}'\n"
    )
    with pytest.raises(SystemExit) as usage:
        main(["convert", "--format", "pickle", str(path), str(tmp_path / "x")])
    assert usage.value.code == 2
    assert "invalid choice: 'pickle'" in capsys.readouterr().err


def test_converted_files_keep_every_dtype_bitwise(capsys, tmp_path):
    state = {"model": {"bf16": torch.randn(4, 3).bfloat16(), "i8": torch.arange(-3, 3, dtype=torch.int8)}}
    save_file(tmp_path / "in.pt", state)
    run(capsys, "convert", "-q", tmp_path / "in.pt", tmp_path / "out.safetensors")
    loaded = load_safetensors(str(tmp_path / "out.safetensors"))
    assert all(bitwise_equal(loaded[key], value) for key, value in state["model"].items())


# ---------------------------------------------------------------------------------------------- errors and help
def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    missing = tmp_path / "missing.ckpt"
    for command in (["inspect"], ["verify"], ["diff", missing], ["convert", "-q"]):
        extra = [tmp_path / "out.ckpt"] if command[0] == "convert" else []
        assert run(capsys, *command, missing, *extra) == (
            2,
            "",
            f"fabric-ckpt: error: Checkpoint not found: '{missing}'\n",
        )
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a checkpoint at all")
    code, _, err = run(capsys, "inspect", garbage)
    assert code == 2 and err.startswith(f"fabric-ckpt: error: '{garbage}' is not a checkpoint") and err.count("\n") == 1
    code, _, err = run(capsys, "consolidate", tmp_path, tmp_path / "out.ckpt")
    assert (code, err) == (2, f"fabric-ckpt: error: '{tmp_path}' is not a sharded checkpoint folder\n")


def test_every_subcommand_has_help(capsys):
    for command in ("inspect", "verify", "diff", "convert", "consolidate"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: fabric-ckpt {command}") and "example:" in out


def test_console_script_and_module_entry_point(tmp_path, saved):
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "fabric-ckpt"]
    assert script.value == "fabric_ckpt.tools.cli:main" and (BIN / "fabric-ckpt").is_file()
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    module = subprocess.run(
        [sys.executable, "-m", "fabric_ckpt", "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert module.returncode == 1 and "DAMAGED" in module.stdout and "Traceback" not in module.stderr
