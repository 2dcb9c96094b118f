"""Lightning Fabric's behaviours that a user switching by import relies on (issue 17): errors catchable as
Lightning's, ``fabric.call`` and the hooks Fabric calls itself, strategies' call forms, ``CheckpointIO`` plugins."""

from __future__ import annotations

import pytest

from fabric_ckpt import AttributeDict, CheckpointError, FolderNotACheckpointError, FSDPStrategy
from tests.conftest import make_net


class TestErrorsCatchableAsLightnings:
    def test_a_folder_that_is_not_a_checkpoint_is_an_is_a_directory_error(self, tmp_path, fabric):
        (tmp_path / "notes.txt").write_text("not a checkpoint")
        for load in (lambda: fabric.load(tmp_path), lambda: fabric.load(tmp_path, {"model": make_net()})):
            with pytest.raises(IsADirectoryError, match="does not point to a valid checkpoint") as info:
                load()
            assert isinstance(info.value, CheckpointError) and isinstance(info.value, FolderNotACheckpointError)
            assert str(tmp_path) in str(info.value)
        with pytest.raises(IsADirectoryError):
            fabric.load_raw(tmp_path, make_net())

    def test_under_fsdp_the_same_error_is_a_value_error(self, tmp_path):
        with pytest.raises(ValueError, match="does not point to a valid checkpoint") as info:
            FSDPStrategy().load_checkpoint(tmp_path, {"step": 0})  # Lightning's FSDP raises ValueError here
        assert isinstance(info.value, CheckpointError)

    def test_deleting_a_missing_key_of_attribute_dict_is_a_key_error_and_an_attribute_error(self):
        state = AttributeDict(step=1)
        with pytest.raises(KeyError, match="no attribute 'epoch'"):
            del state.epoch
        with pytest.raises(AttributeError, match="no attribute 'epoch'"):
            del state.epoch
        del state.step
        assert state == {}
