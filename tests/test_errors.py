"""Every documented error: its type, the words it must contain, and the untouched model after a failed load."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from fabric_ckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
)
from fabric_ckpt.formats.zip_archive import read_zip_directory
from tests.conftest import assert_same_state, make_net, snapshot, trained


@pytest.fixture
def checkpoint(tmp_path, fabric):
    model, optimizer = trained(seed=3)
    path = tmp_path / "good.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 5})
    return path


def live_objects():
    model, optimizer = trained(seed=11)
    return model, optimizer, snapshot(model), snapshot(optimizer)


class TestUnreadableFiles:
    def test_missing_file_is_file_not_found_naming_the_path(self, tmp_path, fabric):
        path = tmp_path / "nope.ckpt"
        with pytest.raises(FileNotFoundError, match=r"nope\.ckpt") as info:
            fabric.load(path)
        assert info.value.filename == str(path)
        with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
            fabric.load_raw(path, make_net())

    def test_folder_is_a_checkpoint_error(self, tmp_path, fabric):
        with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint"):
            fabric.load(tmp_path)

    def test_empty_file(self, tmp_path, fabric):
        (tmp_path / "empty.ckpt").write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"empty.ckpt' is empty"):
            fabric.load(tmp_path / "empty.ckpt")

    def test_garbage(self, tmp_path, fabric):
        (tmp_path / "junk.ckpt").write_bytes(os.urandom(5000).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
        with pytest.raises(CheckpointError, match=r"junk.ckpt' is not a checkpoint"):
            fabric.load(tmp_path / "junk.ckpt")

    def test_text_file(self, tmp_path, fabric):
        (tmp_path / "notes.txt").write_text("hello world\n" * 10)
        with pytest.raises(CheckpointError, match=r"notes.txt' is not a checkpoint"):
            fabric.load(tmp_path / "notes.txt")

    @pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.9, 0.999])
    def test_truncated_file_never_gives_a_bare_zip_or_pickle_error(self, checkpoint, fabric, fraction):
        data = checkpoint.read_bytes()
        cut = checkpoint.with_name("cut.ckpt")
        cut.write_bytes(data[: int(len(data) * fraction)])
        model, optimizer, model_before, optimizer_before = live_objects()
        with pytest.raises(CheckpointError, match=r"cut.ckpt"):
            fabric.load(cut, {"model": model, "optimizer": optimizer})
        assert_same_state(snapshot(model), model_before)
        assert_same_state(snapshot(optimizer), optimizer_before)

    def test_zip_that_is_not_a_checkpoint(self, tmp_path, fabric):
        with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
            archive.writestr("readme.txt", "hi")
        with pytest.raises(CheckpointError, match=r"other.zip' is not a checkpoint: it is a zip archive without"):
            fabric.load(tmp_path / "other.zip")


class TestCorruption:
    def flip_byte_in(self, path, record_suffix, offset=3):
        data = bytearray(path.read_bytes())
        entry = next(e for n, e in read_zip_directory(bytes(data)).entries.items() if n.endswith(record_suffix))
        data[entry.data_offset + offset] ^= 0x40
        path.write_bytes(bytes(data))

    def test_flipped_tensor_byte_names_the_file_and_entry(self, checkpoint, fabric):
        with zipfile.ZipFile(checkpoint) as archive:
            manifest = json.loads(archive.read("archive/.data/fabric_ckpt.json"))
        record = next(name for name, entry in manifest["tensors"].items() if entry == "model/fc1.weight")
        self.flip_byte_in(checkpoint, "/" + record)
        model, optimizer, model_before, optimizer_before = live_objects()
        with pytest.raises(
            CheckpointCorruptedError,
            match=rf"good.ckpt' is corrupted: record '{record}' "
            r"\(entry 'model/fc1.weight'\).*CRC-32",
        ):
            fabric.load(checkpoint, {"model": model, "optimizer": optimizer})
        assert_same_state(snapshot(model), model_before)
        assert_same_state(snapshot(optimizer), optimizer_before)

    def test_damaged_manifest_is_detected(self, checkpoint, fabric):
        self.flip_byte_in(checkpoint, "fabric_ckpt.json", offset=10)
        with pytest.raises(CheckpointCorruptedError, match=r"integrity manifest is damaged"):
            fabric.load(checkpoint)

    def test_verification_can_be_turned_off(self, checkpoint, fabric):
        self.flip_byte_in(checkpoint, "/data/0")
        loaded = fabric.load(checkpoint, verify=False)
        assert loaded["step"] == 5

    def test_plain_torch_files_are_checked_against_their_zip_crcs(self, tmp_path, fabric):
        path = tmp_path / "torch.pt"
        torch.save({"w": torch.arange(100.0)}, path)
        self.flip_byte_in(path, "/data/0")
        with pytest.raises(CheckpointCorruptedError, match=r"torch.pt' is corrupted: record 'data/0'"):
            fabric.load(path)


class TestMismatch:
    def test_shape_mismatch_names_key_and_both_shapes_and_changes_nothing(self, tmp_path, fabric):
        fabric.save(tmp_path / "c.ckpt", {"model": make_net(0, width=8), "optimizer": trained(seed=0)[1]})
        model = make_net(1, width=16)
        optimizer = torch.optim.Adam(model.parameters())
        before = snapshot(model)
        with pytest.raises(
            CheckpointMismatchError,
            match=r"Checkpoint entry 'model': shape mismatch for 'fc1.weight': "
            r"the checkpoint has \[8, 4\], the module has \[16, 4\]",
        ):
            fabric.load(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer}, strict=False)
        assert_same_state(snapshot(model), before)

    def test_optimizer_mismatch_leaves_the_model_untouched_too(self, tmp_path, fabric):
        model, optimizer = trained(seed=4)
        fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
        target = make_net(9)
        before = snapshot(target)
        sgd = torch.optim.SGD([{"params": [target.fc1.weight]}, {"params": list(target.fc2.parameters())}], lr=0.1)
        with pytest.raises(
            CheckpointMismatchError,
            match=r"Checkpoint entry 'optimizer' has 1 parameter group\(s\), "
            r"the optimizer has 2",
        ):
            fabric.load(tmp_path / "c.ckpt", {"model": target, "optimizer": sgd})
        assert_same_state(snapshot(target), before)

    def test_optimizer_state_shape_mismatch_is_caught_before_loading(self, tmp_path, fabric):
        _model, optimizer = trained(seed=4)
        fabric.save(tmp_path / "c.ckpt", {"optimizer": optimizer})
        other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
        other_optimizer = torch.optim.Adam(other.parameters(), lr=0.01)
        with pytest.raises(
            CheckpointMismatchError,
            match=r"state 'exp_avg' of parameter 0 has shape \[8, 4\] "
            r"in the checkpoint, the optimizer needs \[3, 4\]",
        ):
            fabric.load(tmp_path / "c.ckpt", {"optimizer": other_optimizer})
        assert other_optimizer.state_dict()["state"] == {}

    def test_a_failing_stateful_object_leaves_model_and_optimizer_untouched(self, tmp_path, fabric):
        class Picky:
            def state_dict(self):
                return {"version": 1}

            def load_state_dict(self, state):
                raise ValueError("unsupported version")

        model, optimizer = trained(seed=4)
        fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer, "picky": Picky()})
        target, target_optimizer, model_before, optimizer_before = live_objects()
        with pytest.raises(ValueError, match="unsupported version"):
            fabric.load(tmp_path / "c.ckpt", {"model": target, "optimizer": target_optimizer, "picky": Picky()})
        assert_same_state(snapshot(target), model_before)
        assert_same_state(snapshot(target_optimizer), optimizer_before)

    def test_module_entry_that_is_not_a_state_dict(self, tmp_path, fabric):
        fabric.save(tmp_path / "c.ckpt", {"model": 3})
        with pytest.raises(CheckpointMismatchError, match=r"Checkpoint entry 'model' is a int, not a state dict"):
            fabric.load(tmp_path / "c.ckpt", {"model": make_net()})

    def test_non_tensor_where_a_tensor_belongs(self, tmp_path, fabric):
        state_dict = dict(make_net().state_dict())
        state_dict["fc1.bias"] = [1, 2]
        fabric.save(tmp_path / "c.ckpt", {"model": state_dict})
        with pytest.raises(CheckpointMismatchError, match=r"'fc1.bias' is a list, the module expects a tensor"):
            fabric.load(tmp_path / "c.ckpt", {"model": make_net()})


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    marker = ""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Harmless:
    def __init__(self):
        self.value = 3


class TestUnsafeCheckpoints:
    def test_malicious_pickle_is_refused_and_never_runs(self, tmp_path, fabric):
        marker = tmp_path / "pwned"
        torch.save({"model": {}, "evil": Payload(str(marker))}, tmp_path / "evil.ckpt")
        marker.unlink(missing_ok=True)  # torch.save does not run it, but be sure
        with pytest.raises(UnsafeCheckpointError, match=r"evil.ckpt' holds objects .* pass weights_only=False"):
            fabric.load(tmp_path / "evil.ckpt")
        with pytest.raises(pickle.UnpicklingError):  # code written for torch.load keeps catching it
            fabric.load_raw(tmp_path / "evil.ckpt", make_net())
        assert not marker.exists()

    def test_trusted_files_load_with_weights_only_false(self, tmp_path, fabric):
        torch.save({"obj": Harmless(), "step": 2}, tmp_path / "custom.ckpt")
        with pytest.raises(UnsafeCheckpointError):
            fabric.load(tmp_path / "custom.ckpt")
        loaded = fabric.load(tmp_path / "custom.ckpt", weights_only=False)
        assert loaded["obj"].value == 3 and loaded["step"] == 2


class TestLoadRawErrors:
    def test_wrong_target_type(self, checkpoint, fabric):
        with pytest.raises(
            TypeError,
            match=r"load_raw loads into a torch.nn.Module or a torch.optim.Optimizer, "
            r"got dict",
        ):
            fabric.load_raw(checkpoint, {"model": make_net()})

    def test_full_checkpoint_given_to_load_raw_says_what_to_do(self, checkpoint, fabric):
        with pytest.raises(
            CheckpointError,
            match=r"holds a checkpoint with entries \['model', 'optimizer', 'step'\]"
            r".*fabric.load\(path, \{'model': module\}\)",
        ):
            fabric.load_raw(checkpoint, make_net())

    def test_optimizer_file_into_module(self, tmp_path, fabric):
        _, optimizer = trained()
        torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
        with pytest.raises(CheckpointError):
            fabric.load_raw(tmp_path / "opt.pt", make_net())


def test_error_messages_work_for_in_memory_buffers_too(fabric):
    buffer = io.BytesIO()
    torch.save({"a": 1}, buffer)
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        fabric.load(buffer)  # type: ignore[arg-type]


def test_unpicklable_state_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path, fabric):
    path = tmp_path / "c.ckpt"
    fabric.save(path, {"step": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        fabric.save(path, {"step": 2, "fn": lambda x: x})
    assert fabric.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]
