"""Hostile input at the format level (issue 16): records torch reads that nothing checked, forged sharded folders,
paths that are not what they claim, foreign layouts taken for ours, and tiny files claiming gigabytes.

Every class ends in a documented refusal, the same in every reader (load, inspect, verify, diff, convert), with the
target untouched; or loads exactly what was saved. The classes are counted in the reliability figures.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import fabric_ckpt
from fabric_ckpt import CheckpointError, Fabric
from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.formats.zip_archive import read_zip_directory
from fabric_ckpt.tools.cli import main as cli
from tests.conftest import assert_same_state, bitwise_equal, make_net, snapshot
from tests.reliability_figures import record
from tests.sharded_files import live_generation
from tests.test_hostile_input import no_hang

COUNTS: Counter[str] = Counter()  # examples tried, by kind: the figures of docs/reliability.md


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("hostile", kind, inputs=count)


def every_reader_refuses(path: Path, tmp_path: Path, match: str) -> None:
    """load (with and without a state), inspect, verify, diff and convert all refuse ``path``; the model untouched."""
    model = make_net(1)
    before = snapshot(model)
    fabric = Fabric(accelerator="cpu")
    with no_hang():
        with pytest.raises(CheckpointError, match=match):
            fabric.load(path)
        with pytest.raises(CheckpointError, match=match):
            fabric.load(path, {"model": model}, strict=False)
        assert_same_state(snapshot(model), before)
        with pytest.raises(CheckpointError, match=match):
            fabric_ckpt.describe(path)
        try:
            report = fabric_ckpt.verify(path)
        except CheckpointError as err:
            assert err.args and __import__("re").search(match, str(err))
        else:
            assert not report.ok and any(__import__("re").search(match, p) for p in report.problems), report
        with pytest.raises(CheckpointError, match=match):
            fabric_ckpt.diff(path, path)
        with pytest.raises(CheckpointError, match=match):
            fabric_ckpt.convert(path, tmp_path / "converted.ckpt")
    assert not (tmp_path / "converted.ckpt").exists()


# ---------------------------------------------------------------------------------------------- zip records
def central_record(data: bytes, name: str) -> int:
    directory = read_zip_directory(data)
    position = data.find(b"PK\x01\x02" + b"", directory.central_directory_offset)
    while position >= 0:
        name_len = struct.unpack_from("<H", data, position + 28)[0]
        if data[position + 46 : position + 46 + name_len].decode() == name:
            return position
        position = data.find(b"PK\x01\x02", position + 4)
    raise KeyError(name)


def saved_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    state = {"model": make_net(0).state_dict(), "step": 3}
    if kind == "ours":
        Fabric(accelerator="cpu").save(path, state)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["ours", "torch"])
@pytest.mark.parametrize("damage", [True, False], ids=["and-a-damaged-byte", "alone"])
def test_a_record_whose_method_field_says_compressed_is_refused_by_every_reader(tmp_path, kind, damage):
    """torch.load maps a record's raw bytes whatever its method field says; a CRC check skipped for "compressed"
    records let one damaged byte load as a wrong weight while verify said OK."""
    path = saved_file(tmp_path, kind)
    data = bytearray(path.read_bytes())
    entry = next(e for n, e in read_zip_directory(bytes(data)).entries.items() if n.endswith("/data/0"))
    struct.pack_into("<H", data, central_record(bytes(data), entry.name) + 10, 8)  # deflate
    if damage:
        data[entry.data_offset + 3] ^= 0x40
    path.write_bytes(bytes(data))
    every_reader_refuses(path, tmp_path, r"compressed \(method 8;")
    COUNTS["zip method flips"] += 1


def zip_with(path: Path, source: Path, extra_name: str, extra: bytes, *, first: bool) -> None:
    """Rewrite ``source`` with one more record called ``extra_name`` (before or after its namesake)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path, "w") as new, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        for info in old.infolist():
            if first and info.filename.lower() == extra_name.lower():
                new.writestr(extra_name, extra)
            new.writestr(info.filename, old.read(info.filename))
            if not first and info.filename.lower() == extra_name.lower():
                new.writestr(extra_name, extra)
        new.comment = old.comment


@pytest.mark.parametrize("kind", ["ours", "torch"])
@pytest.mark.parametrize(
    "name", ["{prefix}/data/0", "{prefix}/DATA/0", "{prefix}/data.pkl"], ids=["same", "case", "data.pkl"]
)
@pytest.mark.parametrize("first", [True, False], ids=["before", "after"])
def test_two_records_of_one_name_are_refused_by_every_reader(tmp_path, kind, name, first):
    source = saved_file(tmp_path, kind)
    prefix = next(iter(read_zip_directory(source.read_bytes()).entries)).split("/")[0]
    original = zipfile.ZipFile(source).read(f"{prefix}/data/0" if "data/0" in name.lower() else f"{prefix}/data.pkl")
    forged = bytes(reversed(original)) if "pkl" not in name else original
    path = tmp_path / "twice.ckpt"
    zip_with(path, source, name.format(prefix=prefix), forged, first=first)
    every_reader_refuses(path, tmp_path, "two records are named")
    COUNTS["duplicate zip records"] += 1


# ---------------------------------------------------------------------------------------------- marker decides
def test_our_checkpoint_with_trainer_like_entries_is_never_taken_for_a_lightning_trainer_file(tmp_path):
    """Our files carry a marker (the archive comment, the manifest): entry names decide nothing."""
    ours, other = make_net(1), make_net(2)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    state = {"model": ours, "state_dict": other.state_dict(), "global_step": 7}
    Fabric(accelerator="cpu").save(tmp_path / "ours.ckpt", state)
    fabric_ckpt.convert(tmp_path / "ours.ckpt", f"{tmp_path}/sharded/")
    for path in (tmp_path / "ours.ckpt", tmp_path / "sharded"):
        target = make_net(3)
        remainder = Fabric(accelerator="cpu").load(path, {"model": target, "optimizer": optimizer}, strict=False)
        assert_same_state(snapshot(target), snapshot(ours))  # the `model` entry, not the `state_dict` one
        assert remainder["global_step"] == 7 and set(remainder) == {"state_dict", "global_step"}
        raw = make_net(4)
        with pytest.raises(CheckpointError, match="not a plain state dict"):
            Fabric(accelerator="cpu").load_raw(path, raw)  # ours: a whole checkpoint, never mapped
        assert not any("lightning-trainer" in note for note in fabric_ckpt.describe(path).notes)
    fabric_ckpt.convert(tmp_path / "ours.ckpt", tmp_path / "converted.ckpt")
    converted = Fabric(accelerator="cpu").load(tmp_path / "converted.ckpt")
    assert set(converted) == {"model", "state_dict", "global_step"}
    # The control: the same entries in a plain torch.save file are a Trainer checkpoint, mapped as such.
    torch.save({"state_dict": other.state_dict(), "global_step": 7}, tmp_path / "trainer.ckpt")
    target = make_net(3)
    Fabric(accelerator="cpu").load(tmp_path / "trainer.ckpt", {"model": target, "optimizer": optimizer}, strict=False)
    assert_same_state(snapshot(target), snapshot(other))
    COUNTS["foreign-layout names in our files"] += 3


# ---------------------------------------------------------------------------------------------- forged DCP metadata
CHECKPOINT = {"model": {"w": torch.arange(24.0).reshape(6, 4), "b": torch.arange(4.0)}, "step": 3}


def bare_dcp(folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(CHECKPOINT, checkpoint_id=folder, no_dist=True)
    return folder


def forge_metadata(folder: Path, forge: Any) -> None:
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
    forge(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def _drop_chunks(metadata: Any) -> None:
    metadata.state_dict_metadata["model.w"].chunks = []
    for index in [index for index in metadata.storage_data if index.fqn == "model.w"]:
        del metadata.storage_data[index]


def _shrink_chunk(metadata: Any) -> None:
    chunk = metadata.state_dict_metadata["model.w"].chunks[0]
    chunk.sizes = torch.Size([3, 4])  # the chunk covers rows 0-2; rows 3-5 would be whatever memory held


def _overlap(metadata: Any) -> None:
    """Rows 0-2 and 2-4: as many elements as the tensor has, but row 2 twice and row 5 never."""
    md = metadata.state_dict_metadata["model.w"]
    index, info = next((index, info) for index, info in metadata.storage_data.items() if index.fqn == "model.w")
    chunk = type(md.chunks[0])
    md.chunks = [chunk(offsets=torch.Size([0, 0]), sizes=torch.Size([3, 4]))]
    md.chunks.append(chunk(offsets=torch.Size([2, 0]), sizes=torch.Size([3, 4])))
    metadata.storage_data[type(index)(fqn="model.w", offset=torch.Size([2, 0]), index=1)] = info


def _storage_elsewhere(metadata: Any) -> None:
    index = next(index for index in metadata.storage_data if index.fqn == "model.w")
    info = metadata.storage_data.pop(index)
    metadata.storage_data[type(index)(fqn="model.w", offset=torch.Size([3, 0]), index=index.index)] = info


FORGERIES = {
    "no-chunk": (_drop_chunks, "no chunk|cover"),
    "chunk-short-of-the-tensor": (_shrink_chunk, "cover"),
    "overlapping-chunks": (_overlap, "cover|overlap"),
    "storage-of-another-chunk": (_storage_elsewhere, "stored chunks"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
@pytest.mark.parametrize("manifest", [False, True], ids=["bare", "resealed-manifest"])
def test_a_tensor_its_chunks_do_not_cover_is_refused(tmp_path, forgery, manifest):
    """Today's failure: the uncovered part of the tensor came back as uninitialised memory."""
    forge, match = FORGERIES[forgery]
    if manifest:
        Fabric(accelerator="cpu").save(tmp_path / "src.ckpt", CHECKPOINT)
        path = tmp_path / "sharded"
        fabric_ckpt.convert(tmp_path / "src.ckpt", f"{path}/")
        forge_metadata(Path(live_generation(path)), forge)
        reseal(path, ".metadata")
    else:
        path = bare_dcp(tmp_path / "bare")
        forge_metadata(path, forge)
    every_reader_refuses(path, tmp_path, match)
    COUNTS["forged DCP chunks"] += 1


def reseal(path: Path, name: str) -> None:
    """Forge the manifest's size and CRC-32 of file ``name`` to match its current bytes (as an attacker could)."""
    wrapper = json.loads((path / "fabric_ckpt.json").read_text())
    body = wrapper["manifest"]
    data = (Path(live_generation(path)) / name).read_bytes()
    body["files"][name].update(size=len(data), crc32=crc32(data), items=[])
    put_manifest(path, body)


def put_manifest(path: Path, body: Any) -> None:
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"))
    (path / "fabric_ckpt.json").write_text(json.dumps({"manifest": body, "crc32": crc32(encoded.encode())}))


# ---------------------------------------------------------------------------------------------- names and paths
@pytest.fixture
def sharded(tmp_path) -> Path:
    Fabric(accelerator="cpu").save(tmp_path / "src.ckpt", CHECKPOINT)
    path = tmp_path / "run" / "sharded"
    fabric_ckpt.convert(tmp_path / "src.ckpt", f"{path}/")
    return path


def test_a_manifest_naming_the_parent_folder_as_its_generation_is_refused_by_verify_too(sharded, tmp_path):
    generation = Path(live_generation(sharded))
    for name in os.listdir(generation):  # a reader following ".." finds valid files there
        shutil.copy(generation / name, sharded.parent / name)
    body = json.loads((sharded / "fabric_ckpt.json").read_text())["manifest"]
    put_manifest(sharded, {**body, "generation": ".."})
    every_reader_refuses(sharded, tmp_path, "malformed")
    COUNTS["manifest names leaving the folder"] += 1


@pytest.mark.parametrize("what", ["generation", "shard", "metadata"])
def test_a_symlink_out_of_the_folder_is_refused(sharded, tmp_path, what):
    generation = Path(live_generation(sharded))
    outside = tmp_path / "outside"
    if what == "generation":
        shutil.move(generation, outside)  # the bytes are intact: only where they are is wrong
        generation.symlink_to(outside, target_is_directory=True)
    else:
        name = "__0_0.distcp" if what == "shard" else ".metadata"
        outside.mkdir()
        shutil.move(generation / name, outside / name)
        (generation / name).symlink_to(outside / name)
    every_reader_refuses(sharded, tmp_path, "outside the checkpoint folder")
    COUNTS["manifest names leaving the folder"] += 1


def test_a_symlink_inside_the_folder_still_loads(sharded):
    generation = Path(live_generation(sharded))
    shutil.move(generation / "__0_0.distcp", sharded / "moved.distcp")
    (generation / "__0_0.distcp").symlink_to(Path("..") / "moved.distcp")
    assert bitwise_equal(Fabric(accelerator="cpu").load(sharded)["model"]["w"], CHECKPOINT["model"]["w"])


@pytest.mark.parametrize("where", ["file", "bare-metadata", "bare-shard", "sharded-shard"])
def test_a_fifo_is_refused_without_blocking(tmp_path, where):
    if where == "file":
        path = tmp_path / "fifo.ckpt"
        os.mkfifo(path)
    elif where.startswith("bare"):
        path = bare_dcp(tmp_path / "bare")
        fifo = path / (".metadata" if where == "bare-metadata" else "__0_0.distcp")
        fifo.unlink()
        os.mkfifo(fifo)
    else:
        Fabric(accelerator="cpu").save(tmp_path / "src.ckpt", CHECKPOINT)
        path = tmp_path / "sharded"
        fabric_ckpt.convert(tmp_path / "src.ckpt", f"{path}/")
        fifo = Path(live_generation(path)) / "__0_0.distcp"
        fifo.unlink()
        os.mkfifo(fifo)
    every_reader_refuses(path, tmp_path, "not a regular file|FIFO|missing|bytes")
    COUNTS["paths that are not regular files"] += 1


# ---------------------------------------------------------------------------------------------- resource bounds
def run_isolated(code: str, *, file_limit: int | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (optionally unable to write files over ``file_limit`` bytes); it prints
    one JSON line, returned with the process's peak memory in MiB."""
    script = (
        textwrap.dedent(f"""
        import json, resource, signal, sys
        if {file_limit!r} is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, ({file_limit!r}, {file_limit!r}))
        import torch, fabric_ckpt
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        def outcome(fn):
            try:
                return {{"ok": repr(fn())[:300]}}
            except Exception as err:
                return {{"error": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__],
                         "message": str(err)}}
    """)
        + textwrap.dedent(code)
        + textwrap.dedent("""
        result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10) - baseline
        print(json.dumps(result))
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_tiny_tarball_of_a_sparse_member_claiming_hundreds_of_mib_is_refused_before_writing_it(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"w": torch.ones(4)}, work / "checkpoint.pt")
    with open(work / "checkpoint.pt", "r+b") as f:
        f.truncate(300 << 20)  # a zip with 300 MiB of holes appended
    bomb = tmp_path / "bomb.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(bomb), "-C", str(work), "checkpoint.pt"], check=True)
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 4096
    result = run_isolated(
        f"""
        path = {str(tmp_path / "bomb.tar.gz")!r}
        result = {{
            "load": outcome(lambda: fabric_ckpt.Fabric(accelerator="cpu").load(path)),
            "inspect": outcome(lambda: fabric_ckpt.describe(path)),
            "verify": outcome(lambda: fabric_ckpt.verify(path).problems),
        }}
        """,
        file_limit=32 << 20,
    )
    for reader in ("load", "inspect"):
        assert "CheckpointError" in result[reader]["mro"], result
        assert "sparse" in result[reader]["message"], result
    assert "sparse" in result["verify"].get("ok", "") + result["verify"].get("message", ""), result
    COUNTS["sparse tar members"] += 1


def test_a_tensor_with_zero_strides_claiming_a_gib_costs_no_gib(tmp_path, capsys):
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.full((1,), 3.0).expand(1 << 28), "b": torch.ones(2)}, path)  # 1 GiB claimed, 4 B stored
    assert path.stat().st_size < 8192
    assert cli(["inspect", str(path)]) == 0  # reported, exit 0
    out = capsys.readouterr().out
    assert "claims 1.0 GiB of elements over 4 B of storage" in out
    result = run_isolated(
        f"""
        path = {str(path)!r}
        result = {{
            "diff": outcome(lambda: fabric_ckpt.diff(path, path).equal),
            "to-torch": outcome(lambda: fabric_ckpt.convert(path, {str(tmp_path / "copy.ckpt")!r}).bytes),
            "to-safetensors": outcome(lambda: fabric_ckpt.convert(path, {str(tmp_path / "w.safetensors")!r})),
        }}
        """
    )
    assert result["peak_mib"] < 256, result  # a dense copy would take 1024 MiB
    assert result["diff"] == {"ok": "True"}, result
    assert "ok" in result["to-torch"], result
    assert "ValueError" in result["to-safetensors"]["mro"], result
    assert "'w'" in result["to-safetensors"]["message"] and "stride" in result["to-safetensors"]["message"]
    assert "\n" not in result["to-safetensors"]["message"]
    assert (tmp_path / "copy.ckpt").stat().st_size < 16384 and not (tmp_path / "w.safetensors").exists()
    copied = Fabric(accelerator="cpu").load(tmp_path / "copy.ckpt")["w"]
    assert copied.shape == (1 << 28,) and copied.stride() == (0,) and float(copied[12345]) == 3.0
    COUNTS["zero-stride tensors"] += 1


def deep(depth: int) -> Any:
    value: Any = {"leaf": torch.arange(3.0)}
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


def test_a_deeply_nested_pickle_torch_loads_loads_describes_and_verifies(tmp_path, capsys):
    path = tmp_path / "deep.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        torch.save({"deep": deep(5000), "w": torch.ones(2)}, path)  # torch's pickler recurses: ours never does
    finally:
        sys.setrecursionlimit(limit)
    reference = torch.load(path, weights_only=True)
    loaded = Fabric(accelerator="cpu").load(path)
    theirs, ours = reference["deep"], loaded["deep"]
    for _ in range(5000):
        theirs, ours = (theirs[0], ours[0]) if isinstance(theirs, list) else (theirs["x"], ours["x"])
    assert bitwise_equal(ours["leaf"], theirs["leaf"])
    model = nn.Linear(2, 1)
    Fabric(accelerator="cpu").load(path, {"model": model}, strict=False)  # the deep entry is the remainder
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nested" in out and len(out) < 20_000
    assert cli(["inspect", "--json", str(path)]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert [e["path"].count("/") for e in entries if e["path"].endswith("leaf")] == [5001]
    assert fabric_ckpt.verify(path).ok
    assert fabric_ckpt.diff(path, path).equal
    COUNTS["deeply nested pickles"] += 1


def test_shared_references_that_would_be_exponential_stay_linear(tmp_path, capsys):
    """A few hundred bytes: each level holds the next one twice, 2**60 paths in all."""
    value: Any = [torch.ones(1)]
    for _ in range(60):
        value = [value, value]
    path = tmp_path / "dag.pt"
    torch.save({"dag": value}, path)
    assert path.stat().st_size < 4096
    with no_hang(120):
        loaded = Fabric(accelerator="cpu").load(path)  # materialised once per container
        assert loaded["dag"][0] is loaded["dag"][1]
        assert cli(["inspect", str(path)]) == 2  # refused in one line, never enumerated
        assert "nested values" in capsys.readouterr().err
        assert fabric_ckpt.verify(path).ok
    COUNTS["deeply nested pickles"] += 1
