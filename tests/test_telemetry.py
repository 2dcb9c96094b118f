"""Every save and load records its stages (time, bytes): on the Fabric, on async handles, for callbacks, in logs."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch

from fabric_ckpt import Fabric
from fabric_ckpt.core.telemetry import CheckpointTelemetry, recording, stage
from tests.conftest import trained


class Collect:
    """A Fabric callback that keeps every telemetry it is given."""

    def __init__(self) -> None:
        self.seen: list[CheckpointTelemetry] = []

    def on_checkpoint_telemetry(self, telemetry: CheckpointTelemetry) -> None:
        self.seen.append(telemetry)


def _payload_bytes(model, optimizer) -> int:
    tensors = [*model.state_dict().values(), *(v for s in optimizer.state.values() for v in s.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_save_records_each_stage_and_the_bytes_it_wrote(tmp_path):
    fabric = Fabric(accelerator="cpu")
    model, optimizer = trained()
    fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
    telemetry = fabric.last_save_telemetry
    assert telemetry.operation == "save" and telemetry.path.endswith("c.ckpt") and telemetry.error is None
    assert list(telemetry.stages) == ["snapshot", "serialise", "write", "checksum", "fsync", "commit"]
    size = os.path.getsize(tmp_path / "c.ckpt")
    assert telemetry.stages["write"].bytes == size == telemetry.bytes
    assert _payload_bytes(model, optimizer) <= telemetry.stages["checksum"].bytes < size
    assert telemetry.seconds >= max(s.wall_seconds for s in telemetry.stages.values())
    assert telemetry.summary().startswith(f"save '{telemetry.path}': ")
    assert telemetry.as_dict()["stages"]["write"]["bytes"] == size


def test_a_load_records_unpickling_checks_validation_and_the_copy(tmp_path):
    fabric = Fabric(accelerator="cpu")
    model, optimizer = trained()
    fabric.save(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
    fabric.load(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
    telemetry = fabric.last_load_telemetry
    assert telemetry.operation == "load"
    assert set(telemetry.stages) == {"unpickle", "verify", "validate", "copy"}
    assert _payload_bytes(model, optimizer) < telemetry.stages["verify"].bytes < os.path.getsize(tmp_path / "c.ckpt")
    fabric.load(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer}, verify=False)
    assert "verify" not in fabric.last_load_telemetry.stages


def test_an_async_save_has_its_telemetry_on_its_handle(tmp_path):
    fabric = Fabric(accelerator="cpu")
    model, optimizer = trained()
    handle = fabric.save_async(tmp_path / "c.ckpt", {"model": model, "optimizer": optimizer})
    handle.wait()
    stages = handle.telemetry.stages
    assert handle.telemetry.operation == "save_async"
    assert stages["stage"].bytes == _payload_bytes(model, optimizer)
    assert {"snapshot", "blocked", "write", "fsync", "commit"} <= set(stages)
    assert stages["blocked"].seconds <= handle.telemetry.seconds
    assert fabric.last_save_telemetry is None  # the handle has it; the Fabric keeps its synchronous saves'


def test_callbacks_and_the_debug_log_get_every_save_and_load(tmp_path, caplog):
    collect = Collect()
    fabric = Fabric(accelerator="cpu", callbacks=[collect])
    state = {"w": torch.ones(3)}
    with caplog.at_level(logging.DEBUG, logger="fabric_ckpt.telemetry"):
        fabric.save(tmp_path / "a.ckpt", state)
        fabric.save_async(tmp_path / "b.ckpt", state).wait()
        fabric.load(tmp_path / "a.ckpt")
    assert [t.operation for t in collect.seen] == ["save", "save_async", "load"]
    assert collect.seen[0] is fabric.last_save_telemetry and collect.seen[2] is fabric.last_load_telemetry
    lines = [record.getMessage() for record in caplog.records if record.name == "fabric_ckpt.telemetry"]
    assert len(lines) == 3 and lines[0].startswith("[rank 0] save '") and " | write " in lines[0]


def test_a_failed_save_keeps_its_telemetry_with_the_error(tmp_path):
    fabric = Fabric(accelerator="cpu")
    (tmp_path / "blocked.ckpt").mkdir()
    with pytest.raises(IsADirectoryError):
        fabric.save(tmp_path / "blocked.ckpt", {"step": 1})
    assert "IsADirectoryError" in fabric.last_save_telemetry.error
    handle = fabric.save_async(tmp_path / "blocked.ckpt", {"step": 1})
    with pytest.raises(IsADirectoryError):
        handle.wait()
    assert "IsADirectoryError" in handle.telemetry.error
    fabric.wait_for_saves()  # the error was reported by handle.wait(): it is not raised a second time


def test_stages_outside_an_operation_record_nothing_and_threads_record_through_their_recorder():
    with stage("write", nbytes=10):  # no operation running: nothing to record into
        pass

    def write_five() -> None:
        with stage("write", nbytes=5):
            pass

    with recording("save", "x") as recorder:
        write_five()
        thread = threading.Thread(target=recorder.bind(write_five))  # a thread records where it is told to
        thread.start()
        thread.join()
        threading.Thread(target=write_five).start()  # an unbound thread records nothing
    stats = recorder.telemetry.stages["write"]
    assert (stats.bytes, stats.calls) == (10, 2)
    assert recorder.telemetry.seconds > 0 and recorder.telemetry.bytes == 10
