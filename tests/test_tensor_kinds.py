"""Tensors whose values are not just their bytes: conjugate and negative views, quantized tensors.

A conjugate (``x.conj()``, ``x.mH``) or negative (``x.conj().imag``, ``torch._neg_view``) view shares its base's
memory and applies the sign when read. Every path that rebuilds a tensor from raw memory (load, the async snapshot,
the file writer, convert) must produce the values, never the base's bytes: checked bitwise on each path. The module
fixture counts the examples for ``make reliability`` (docs/reliability.md).
"""

from __future__ import annotations

import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fabric_ckpt import CheckpointError, Fabric, convert, diff
from tests.conftest import bitwise_equal
from tests.reliability_figures import record

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    for kind, count in sorted(COUNTS.items()):
        record("values", kind, inputs=count)


def _complex(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed))


def _real(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


VIEWS: dict[str, Callable[[], torch.Tensor]] = {
    "conj": lambda: _complex(1, 3, 2).conj(),
    "mH": lambda: _complex(2, 3, 2).mH,
    "conj of a slice": lambda: _complex(3, 4, 3)[1:, ::2].conj(),
    "negative imag": lambda: _complex(4, 3, 2).conj().imag,
    "negative view": lambda: torch._neg_view(_real(5, 5)),
    "negative conj": lambda: torch._neg_view(_complex(6, 2, 2)).conj(),
}


def _views() -> dict[str, torch.Tensor]:
    views = {name: make() for name, make in VIEWS.items()}
    assert all(v.is_conj() or v.is_neg() for v in views.values())
    return views


def _assert_values(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        COUNTS["conjugate and negative views"] += 1
        assert bitwise_equal(loaded[name], value), name
        assert not loaded[name].is_conj() and not loaded[name].is_neg(), name


def _stored_values(path) -> dict[str, torch.Tensor]:
    """What a reader of the raw records sees: each loaded tensor rebuilt from its storage bytes alone."""
    loaded = torch.load(path, weights_only=True)["views"]
    rebuilt = {}
    for name, tensor in loaded.items():
        plain = torch.empty((0,), dtype=tensor.dtype)
        plain.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
        rebuilt[name] = plain
    return rebuilt


def test_views_round_trip_through_save_and_load(tmp_path, fabric):
    views = _views()
    fabric.save(tmp_path / "v.ckpt", {"views": views})
    _assert_values(fabric.load(tmp_path / "v.ckpt")["views"], views)
    _assert_values(_stored_values(tmp_path / "v.ckpt"), views)  # the file holds the values, not the base's bytes


def test_views_round_trip_through_save_async(tmp_path, fabric):
    views = _views()
    fabric.save_async(tmp_path / "v.ckpt", {"views": views}).wait()
    _assert_values(torch.load(tmp_path / "v.ckpt", weights_only=True)["views"], views)
    _assert_values(fabric.load(tmp_path / "v.ckpt")["views"], views)


def test_views_in_a_torch_save_file_load_as_torch_loads_them(tmp_path, fabric):
    views = _views()
    torch.save({"views": views}, tmp_path / "torch.pt")  # torch keeps the bits as tensor metadata
    _assert_values(fabric.load(tmp_path / "torch.pt")["views"], views)
    state = {"views": None}
    fabric.load(tmp_path / "torch.pt", state)
    _assert_values(state["views"], views)


class _ComplexModule(nn.Module):
    def __init__(self, buffer: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("spectrum", buffer)
        self.weight = nn.Parameter(torch.zeros(3, 2, dtype=torch.complex64))


def test_views_load_into_live_modules_and_optimizers(tmp_path, fabric):
    source = _ComplexModule(_complex(7, 3, 2).conj())
    with torch.no_grad():
        source.weight.copy_(_complex(8, 3, 2))
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source.weight.grad = _complex(9, 3, 2)
    optimizer.step()
    momentum = optimizer.state[source.weight]["momentum_buffer"]
    optimizer.state[source.weight]["momentum_buffer"] = momentum.conj().resolve_conj().conj()  # same values, a view
    torch.save({"model": source.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt")

    target = _ComplexModule(torch.zeros(3, 2, dtype=torch.complex64))
    target_optimizer = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    fabric.load(tmp_path / "c.pt", {"model": target, "optimizer": target_optimizer})
    expected = {"spectrum": source.spectrum, "weight": source.weight.detach(), "momentum": momentum}
    loaded = {
        "spectrum": target.spectrum,
        "weight": target.weight.detach(),
        "momentum": target_optimizer.state[target.weight]["momentum_buffer"],
    }
    _assert_values(loaded, expected)


@pytest.mark.parametrize("source_kind", ["ours", "torch.save"])
def test_views_convert_to_safetensors_with_their_values(tmp_path, source_kind):
    views = {k: v for k, v in _views().items()}
    source = tmp_path / "v.ckpt"
    if source_kind == "ours":
        Fabric(accelerator="cpu").save(source, views)
    else:
        torch.save(views, source)
    convert(source, tmp_path / "v.safetensors")
    _assert_values(load_file(tmp_path / "v.safetensors"), views)


def test_views_convert_to_a_torch_file_and_a_sharded_folder(tmp_path, fabric):
    views = _views()
    torch.save({"views": views}, tmp_path / "torch.pt")
    convert(tmp_path / "torch.pt", tmp_path / "ours.ckpt")
    _assert_values(_stored_values(tmp_path / "ours.ckpt"), views)
    convert(tmp_path / "torch.pt", f"{tmp_path}/folder/")
    assert (tmp_path / "folder" / "fabric_ckpt.json").is_file()
    _assert_values(fabric.load(tmp_path / "folder")["views"], views)


def test_diff_compares_views_by_value(tmp_path):
    views = _views()
    torch.save(views, tmp_path / "views.pt")
    torch.save({name: view.resolve_conj().resolve_neg() for name, view in views.items()}, tmp_path / "values.pt")
    COUNTS["conjugate and negative views"] += len(views)
    assert diff(tmp_path / "views.pt", tmp_path / "values.pt").equal


# ---------------------------------------------------------------------------------------------- quantized tensors
def _quantized() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # torch deprecates creating quantized tensors; checkpoints still hold them
        warnings.simplefilter("ignore", UserWarning)
        return {
            "per tensor": torch.quantize_per_tensor(_real(10, 4, 3), 0.05, 3, torch.qint8),
            "per channel": torch.quantize_per_channel(
                _real(11, 4, 3),
                torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
                torch.tensor([0, 1, 2, 3]),
                0,
                torch.quint8,
            ),
            "qint32 slice": torch.quantize_per_tensor(_real(12, 6), 0.01, 0, torch.qint32)[1:5],
        }


def _assert_quantized(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        COUNTS["quantized tensors"] += 1
        got = loaded[name]
        assert got.is_quantized and got.qscheme() == value.qscheme() and got.dtype == value.dtype, name
        if value.qscheme() == torch.per_tensor_affine:
            assert (got.q_scale(), got.q_zero_point()) == (value.q_scale(), value.q_zero_point()), name
        else:
            assert torch.equal(got.q_per_channel_scales(), value.q_per_channel_scales()), name
            assert torch.equal(got.q_per_channel_zero_points(), value.q_per_channel_zero_points()), name
            assert got.q_per_channel_axis() == value.q_per_channel_axis(), name
        assert torch.equal(got.int_repr(), value.int_repr()), name


def test_quantized_tensors_round_trip_through_save_and_load(tmp_path, fabric):
    values = _quantized()
    fabric.save(tmp_path / "q.ckpt", {"q": values})
    _assert_quantized(fabric.load(tmp_path / "q.ckpt")["q"], values)
    _assert_quantized(torch.load(tmp_path / "q.ckpt", weights_only=True)["q"], values)
    state = {"q": None}
    fabric.load(tmp_path / "q.ckpt", state)
    _assert_quantized(state["q"], values)


def test_quantized_tensors_round_trip_through_save_async(tmp_path, fabric):
    values = _quantized()
    fabric.save_async(tmp_path / "q.ckpt", {"q": values}).wait()
    _assert_quantized(fabric.load(tmp_path / "q.ckpt")["q"], values)


def _quantized_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    float_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)


def _quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}": model[i].weight() for i in (0, 2)}


@pytest.mark.parametrize("save", ["save", "save_async"])
def test_a_quantized_model_round_trips(tmp_path, fabric, save):
    model = _quantized_model(seed=1)
    handle = getattr(fabric, save)(tmp_path / "m.ckpt", {"model": model, "step": 4})
    if handle is not None:
        handle.wait()
    target = _quantized_model(seed=2)
    assert fabric.load(tmp_path / "m.ckpt", {"model": target}) == {"step": 4}
    _assert_quantized(_quantized_weights(target), _quantized_weights(model))
    for i in (0, 2):
        assert torch.equal(target[i].bias(), model[i].bias())
    fabric.save(tmp_path / "next.ckpt", {"step": 5})  # nothing left over poisons the next save
    assert fabric.load(tmp_path / "next.ckpt") == {"step": 5}


def test_a_sharded_folder_refuses_quantized_tensors_before_writing(tmp_path, fabric):
    values = _quantized()
    fabric.save(tmp_path / "q.ckpt", {"q": values, "step": 1})
    with pytest.raises(CheckpointError, match=r"entry 'q/per tensor' is a quantized tensor"):
        convert(tmp_path / "q.ckpt", f"{tmp_path}/folder/")
    COUNTS["quantized tensors"] += 1
    assert not (tmp_path / "folder").exists()


def _pickle_record(path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def _every_kind_of_tensor() -> dict[str, object]:
    """Tensors of every kind torch's reduction tells apart, including the ones our faster reduction leaves to it."""
    base = _real(9, 6, 4)
    with_attribute = _real(10, 3)
    with_attribute.note = "kept"  # Python state: torch pickles it through _rebuild_from_type_v2
    leaf = _real(11, 2).requires_grad_()
    marked: OrderedDict[str, int] = OrderedDict()
    marked.mark = 1  # type: ignore[attr-defined]
    kinds: dict[str, object] = {
        "float32": _real(12, 3, 5),
        "slice (offset, strided)": base[1:, ::2],
        "transposed view of the same storage": base.t(),
        "bfloat16": _real(13, 4).bfloat16(),
        "float16": _real(14, 4).half(),
        "float64": _real(15, 2).double(),
        "int64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "complex64": _complex(16, 3),
        "uint16 (torch's v3 layout)": torch.arange(4).to(torch.uint16),
        "float8": _real(17, 4).to(torch.float8_e4m3fn),
        "zero-size": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "requires grad": leaf,
        "parameter": nn.Parameter(_real(18, 2)),
        "Python attribute": with_attribute,
        "sparse": _real(19, 3, 3).relu().to_sparse(),
        "meta": torch.empty(2, 2, device="meta"),
        "quantized": torch.quantize_per_tensor(_real(20, 4), 0.1, 0, torch.qint8),
        "nested": torch.nested.nested_tensor([_real(21, 2), _real(22, 3)]),
        "the same tensor twice": [base, base],
        "plain values": {"step": 3, "name": "x", "shape": torch.Size([2, 3]), "dtype": torch.bfloat16},
        "empty OrderedDict": OrderedDict(),
        "empty OrderedDict with an attribute": marked,
        "OrderedDict": OrderedDict(a=torch.ones(2), b=1),
    }
    return kinds


def test_the_pickled_structure_is_byte_for_byte_what_torch_save_writes(tmp_path, fabric):
    """Our writer reduces plain CPU tensors itself (faster than torch's generic path) and must change nothing.

    The object part of a checkpoint (``data.pkl``) is compared with ``torch.save``'s for the same object, kind by
    kind, so that any tensor our reduction handles differently from torch's shows up by name.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors warn that they are a prototype
        kinds = _every_kind_of_tensor()
    for name, value in kinds.items():
        state = {"value": value}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(state, tmp_path / "torch.pt")
            fabric.save(tmp_path / "ours.ckpt", state)
        assert _pickle_record(tmp_path / "ours.ckpt") == _pickle_record(tmp_path / "torch.pt"), name
    # All of them in one object as well: the storage keys and the memo run across the whole structure.
    torch.save(kinds, tmp_path / "torch.pt")
    fabric.save(tmp_path / "ours.ckpt", kinds)
    assert _pickle_record(tmp_path / "ours.ckpt") == _pickle_record(tmp_path / "torch.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors rebuild through the deprecated TypedStorage
        loaded = torch.load(tmp_path / "ours.ckpt", weights_only=False)
    assert bitwise_equal(loaded["slice (offset, strided)"], kinds["slice (offset, strided)"])
    assert loaded["Python attribute"].note == "kept"
    assert loaded["requires grad"].requires_grad and not loaded["float32"].requires_grad


def test_a_tensor_with_hooks_warns_as_torch_save_does(tmp_path, fabric):
    tensor = _real(23, 3).requires_grad_()
    tensor.register_hook(lambda grad: grad)
    with pytest.warns(UserWarning, match="backward hook .* will not be serialized"):
        fabric.save(tmp_path / "hooked.ckpt", {"t": tensor})
    assert bitwise_equal(fabric.load(tmp_path / "hooked.ckpt")["t"], tensor.detach())
