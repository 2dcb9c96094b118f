"""Property tests: whatever plain data goes in comes back bitwise identical, with storage sharing intact."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric_ckpt import Fabric
from tests.conftest import bitwise_equal

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float64,
    torch.uint8,
    torch.int32,
]
SHAPES = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple),
)


@st.composite
def base_tensors(draw):
    """Arbitrary bit patterns (NaNs and infinities included) of every dtype; bools stay valid."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(SHAPES)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


@st.composite
def tensors(draw):
    """Plain tensors, plus non-contiguous views: transposes and strided slices."""
    tensor = draw(base_tensors())
    kind = draw(st.sampled_from(["plain", "transpose", "stride", "narrow"]))
    if kind == "transpose" and tensor.dim() >= 2:
        return tensor.transpose(0, 1)
    if kind == "stride" and tensor.dim() >= 1 and tensor.shape[0] > 1:
        return tensor[::2]
    if kind == "narrow" and tensor.dim() >= 1 and tensor.shape[0] > 1:
        return tensor.narrow(0, 1, tensor.shape[0] - 1)
    return tensor


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    # Empty bytes pickle (protocol 2, as torch.save) as a call to bytes(), which weights_only refuses in torch too.
    st.text(max_size=20),
    st.binary(min_size=1, max_size=20),
    st.complex_numbers(allow_nan=False),
)
keys = st.text(min_size=1, max_size=8)
values = st.recursive(
    st.one_of(scalars, tensors()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def assert_same(loaded, original, path="root"):
    assert type(loaded) is type(original), (path, type(loaded), type(original))
    if isinstance(original, torch.Tensor):
        assert loaded.shape == original.shape and loaded.dtype == original.dtype, path
        assert loaded.stride() == original.stride(), path
        assert bitwise_equal(loaded, original), path
    elif isinstance(original, dict):
        assert list(loaded) == list(original), path
        for key in original:
            assert_same(loaded[key], original[key], f"{path}/{key}")
    elif isinstance(original, (list, tuple)):
        assert len(loaded) == len(original), path
        for index, (a, b) in enumerate(zip(loaded, original, strict=False)):
            assert_same(a, b, f"{path}/{index}")
    else:
        assert loaded == original, path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.dictionaries(keys, values, min_size=1, max_size=5))
def test_plain_data_round_trips_bitwise(tmp_path, state):
    fabric = Fabric(accelerator="cpu")
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)
    assert_same(fabric.load(path), state)
    # The file is a normal torch file, readable by torch itself under the safe default.
    assert_same(torch.load(path, weights_only=True), state)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=base_tensors(), data=st.data())
def test_tensors_sharing_a_storage_still_share_it_after_load(tmp_path, base, data):
    flat = base.reshape(-1)
    if flat.numel() < 2:
        flat = torch.zeros(4, dtype=base.dtype)
    start = data.draw(st.integers(0, flat.numel() - 1))
    view = flat[start:]
    fabric = Fabric(accelerator="cpu")
    fabric.save(tmp_path / "shared.ckpt", {"whole": flat, "nested": {"view": view}, "again": [flat]})
    loaded = fabric.load(tmp_path / "shared.ckpt")
    whole, loaded_view, again = loaded["whole"], loaded["nested"]["view"], loaded["again"][0]
    assert bitwise_equal(whole, flat) and bitwise_equal(loaded_view, view)
    assert whole.untyped_storage().data_ptr() == loaded_view.untyped_storage().data_ptr()
    assert again.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    assert loaded_view.storage_offset() == start
    if whole.dtype != torch.bool:
        whole.zero_()
        assert not loaded_view.any()  # a write through one is seen through the other


def test_parameters_and_requires_grad_survive(tmp_path, fabric):
    parameter = torch.nn.Parameter(torch.randn(3))
    frozen = torch.randn(2).requires_grad_(True)
    fabric.save(
        tmp_path / "p.ckpt",
        {
            "p": parameter,
            "t": frozen,
            "size": torch.Size([2, 3]),
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
        },
    )
    loaded = fabric.load(tmp_path / "p.ckpt")
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    assert torch.equal(loaded["p"], parameter)
    assert loaded["t"].requires_grad and torch.equal(loaded["t"], frozen)
    assert loaded["size"] == torch.Size([2, 3]) and loaded["dtype"] is torch.bfloat16
    assert loaded["device"] == torch.device("cpu")
