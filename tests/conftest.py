"""Shared fixtures: a CPU Fabric, small models, and a clean in-memory fsspec store per test."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch
from torch import nn

from fabric_ckpt import Fabric


@pytest.fixture
def fabric() -> Fabric:
    return Fabric(accelerator="cpu")


@pytest.fixture(autouse=True)
def _seed_environment_restored():
    """seed_everything writes these variables (Lightning's); no test's seed reaches the tests after it."""
    names = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _clean_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield
    fs.store.clear()


class Net(nn.Module):
    """Parameters, a persistent buffer, a non-persistent buffer and BatchNorm's running stats."""

    def __init__(self, width: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, width, bias=bias)
        self.norm = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 2, bias=bias)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) * self.scale


def make_net(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def trained(seed: int = 0, steps: int = 3, optimizer_cls=torch.optim.Adam) -> tuple[Net, torch.optim.Optimizer]:
    """A model and an optimizer that has state (a few real steps taken)."""
    model = make_net(seed)
    optimizer = optimizer_cls(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(6, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def snapshot(obj) -> dict:
    """A deep copy of a module's or optimizer's state, to compare against later."""
    state = obj.state_dict()
    if isinstance(obj, nn.Module):
        return {k: v.clone() for k, v in state.items()}
    return {
        "state": {
            k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": [dict(g) for g in state["param_groups"]],
    }


def assert_same_state(a: dict, b: dict) -> None:
    """Bitwise equality of two module or optimizer snapshots."""
    if "state" in a and "param_groups" in a:
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for key in a["state"]:
            assert a["state"][key].keys() == b["state"][key].keys()
            for name, value in a["state"][key].items():
                other = b["state"][key][name]
                if isinstance(value, torch.Tensor):
                    assert bitwise_equal(value, other), (key, name)
                else:
                    assert value == other
        return
    assert a.keys() == b.keys()
    for key in a:
        assert bitwise_equal(a[key], b[key]), key


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(_bytes_of(a), _bytes_of(b))


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype)
    flat.copy_(tensor.detach().reshape(-1))
    return flat.view(torch.uint8)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server on 127.0.0.1 for the whole session; the environment points botocore at it."""
    from tests.s3 import s3_environment, s3_server

    with s3_server() as endpoint, s3_environment(endpoint):
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket on the local S3 server; its ``s3://`` URL."""
    import fsspec

    from tests.s3 import new_bucket

    name = new_bucket()
    yield f"s3://{name}"
    fsspec.filesystem("s3").invalidate_cache()


@pytest.fixture(scope="session")
def gcs_endpoint():
    """The GCS emulator for the whole session; STORAGE_EMULATOR_HOST points gcsfs at it."""
    from tests.servers import environment, gcs_json_api_client, gcs_server

    with gcs_server() as settings, environment(settings), gcs_json_api_client():
        yield settings["STORAGE_EMULATOR_HOST"]


@pytest.fixture(scope="session")
def azurite_endpoint():
    """Azurite's blob service for the whole session; AZURE_STORAGE_CONNECTION_STRING points adlfs at it."""
    from tests.servers import azurite_available, azurite_server, environment

    if not azurite_available():
        message = "Azurite is not installed: `make test` installs it (npm ci in tests/azurite)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs `make test`, which installs it: a skip there would hide a broken step
        pytest.skip(message)
    with azurite_server() as settings, environment(settings):
        yield settings["AZURE_STORAGE_CONNECTION_STRING"]


@pytest.fixture(params=["s3", "gs", "az"])
def store(request):
    """A fresh bucket (container) on each object store's local server; its URL, e.g. ``gs://test-1a2b``."""
    from tests import servers
    from tests.s3 import new_bucket

    kind = request.param
    if kind == "s3":
        request.getfixturevalue("s3_endpoint")
        name = new_bucket()
    elif kind == "gs":
        request.getfixturevalue("gcs_endpoint")
        name = servers.new_gcs_bucket()
    else:
        request.getfixturevalue("azurite_endpoint")
        name = servers.new_azure_container()
    yield f"{kind}://{name}"
    fsspec.filesystem(kind).invalidate_cache()
