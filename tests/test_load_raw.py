"""fabric.load_raw: plain state-dict files from anyone's torch.save (or safetensors) into modules and optimizers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file as save_safetensors
from torch import nn

from fabric_ckpt import CheckpointMismatchError
from tests.conftest import assert_same_state, make_net, snapshot, trained


def test_module_from_plain_torch_save(tmp_path, fabric):
    source = make_net(1)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target = make_net(2)
    fabric.load_raw(tmp_path / "model.pt", target)
    assert_same_state(snapshot(target), snapshot(source))


def test_into_a_setup_module(tmp_path, fabric):
    source = make_net(1)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target = fabric.setup(make_net(2))
    fabric.load_raw(tmp_path / "model.pt", target)
    assert_same_state(snapshot(target), snapshot(source))


def test_optimizer_from_plain_torch_save(tmp_path, fabric):
    _model, optimizer = trained(seed=1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    target_optimizer = torch.optim.Adam(make_net(5).parameters())
    fabric.load_raw(tmp_path / "optimizer.pt", fabric.setup_optimizers(target_optimizer))
    assert_same_state(snapshot(target_optimizer), snapshot(optimizer))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_from_ddp_or_compile_are_stripped(tmp_path, fabric, prefix):
    source = make_net(1)
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "model.pt")
    target = make_net(2)
    fabric.load_raw(tmp_path / "model.pt", target)
    assert_same_state(snapshot(target), snapshot(source))


def test_prefix_is_kept_when_the_module_itself_uses_it(tmp_path, fabric):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    source = Holder()
    torch.save(source.state_dict(), tmp_path / "holder.pt")
    target = Holder()
    fabric.load_raw(tmp_path / "holder.pt", target)
    assert torch.equal(target.module.weight, source.module.weight)


def test_strict_and_non_strict(tmp_path, fabric):
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"State dict file '.*linear.pt' does not match .*"
        r"unexpected keys \['bias'\]",
    ):
        fabric.load_raw(tmp_path / "linear.pt", nn.Linear(3, 3, bias=False))
    target = nn.Linear(3, 3, bias=False)
    fabric.load_raw(tmp_path / "linear.pt", target, strict=False)
    assert torch.equal(target.weight, torch.load(tmp_path / "linear.pt")["weight"])


def test_safetensors_file(tmp_path, fabric):
    source = make_net(1)
    save_safetensors({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    target = make_net(2)
    fabric.load_raw(tmp_path / "model.safetensors", target)
    assert_same_state(snapshot(target), snapshot(source))


def test_shape_mismatch_leaves_the_module_untouched(tmp_path, fabric):
    torch.save(make_net(1, width=8).state_dict(), tmp_path / "model.pt")
    target = make_net(2, width=6)
    before = snapshot(target)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape mismatch for 'fc1.weight': the checkpoint has \[8, 4\], "
        r"the module has \[6, 4\]",
    ):
        fabric.load_raw(tmp_path / "model.pt", target)
    assert_same_state(snapshot(target), before)


def test_legacy_non_zip_torch_files_load(tmp_path, fabric):
    source = make_net(1)
    torch.save(source.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    target = make_net(2)
    fabric.load_raw(tmp_path / "legacy.pt", target)
    assert_same_state(snapshot(target), snapshot(source))
