"""The Fabric object: topology, setup wrappers that behave like the user's objects, launch and helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fabric_ckpt import AttributeDict, Fabric, SingleDeviceStrategy
from fabric_ckpt.core.wrappers import FabricModule, FabricOptimizer
from tests.conftest import Net, make_net


def test_single_device_topology(fabric):
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert (fabric.global_rank, fabric.local_rank, fabric.node_rank, fabric.world_size) == (0, 0, 0, 1)
    assert fabric.is_global_zero and fabric.device == torch.device("cpu")


def test_auto_on_a_cpu_machine_is_single_cpu():
    fabric = Fabric()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert fabric.device.type == expected and isinstance(fabric.strategy, SingleDeviceStrategy)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"strategy": "nonsense"}, ValueError, r"Unknown strategy 'nonsense'; choose one of"),
        ({"accelerator": "tpu"}, ValueError, r"Unknown accelerator 'tpu'"),
        ({"devices": 0}, ValueError, r"devices=0 must be at least 1"),
        ({"devices": "x"}, ValueError, r"devices='x' is not a count"),
        ({"num_nodes": 0}, ValueError, r"num_nodes=0 must be a positive int"),
        (
            {"devices": 2, "strategy": "single"},
            ValueError,
            r"asks for 2 processes; the single-device strategy",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        Fabric(accelerator=kwargs.pop("accelerator", "cpu"), **kwargs)


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Fabric(accelerator="cuda")


def test_strategy_instance_is_used_as_is():
    strategy = SingleDeviceStrategy("cpu")
    assert Fabric(strategy=strategy).strategy is strategy


def test_setup_returns_wrappers_that_act_like_the_originals(fabric):
    model = make_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    wrapped, wrapped_optimizer = fabric.setup(model, optimizer)
    assert isinstance(wrapped, FabricModule) and wrapped.module is model
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert list(dict(wrapped.named_parameters())) == list(dict(model.named_parameters()))
    assert list(dict(wrapped.named_buffers())) == list(dict(model.named_buffers()))
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]
    assert wrapped.fc1 is model.fc1 and isinstance(wrapped, nn.Module)
    wrapped.custom_attribute = 5
    assert model.custom_attribute == 5
    assert isinstance(wrapped_optimizer, torch.optim.Adam) and isinstance(wrapped_optimizer, FabricOptimizer)
    assert wrapped_optimizer.optimizer is optimizer
    assert wrapped_optimizer.param_groups is optimizer.param_groups
    out = wrapped(torch.randn(3, 4))
    fabric.backward(out.sum())
    wrapped_optimizer.step()
    assert optimizer.state is wrapped_optimizer.state and len(optimizer.state) == 6
    wrapped.load_state_dict(make_net(3).state_dict())
    assert torch.equal(model.fc1.weight, make_net(3).fc1.weight)


def test_schedulers_accept_setup_optimizers_and_share_state(fabric):
    model = make_net()
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    assert optimizer.optimizer.param_groups[0]["lr"] == 0.5
    optimizer.load_state_dict(torch.optim.SGD(model.parameters(), lr=3.0).state_dict())
    assert optimizer.optimizer.param_groups[0]["lr"] == 3.0  # both handles see load_state_dict


def test_setup_variants(fabric):
    model = fabric.setup(make_net())
    assert isinstance(model, FabricModule)
    first, second = fabric.setup_optimizers(
        torch.optim.SGD(model.parameters(), lr=1), torch.optim.Adam(model.parameters())
    )
    assert isinstance(first, torch.optim.SGD) and isinstance(second, torch.optim.Adam)
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup(model)
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup_optimizers(first)
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        fabric.setup_module(object())  # type: ignore[arg-type]


def test_launch_runs_the_function_with_fabric_and_returns_its_result(fabric):
    assert fabric.launch(lambda f, x, y=0: (f is fabric, x + y), 1, y=2) == (True, 3)
    assert fabric.launch() is None


def test_call_reaches_callbacks_that_define_the_hook():
    seen = []

    class A:
        def on_train_start(self, value):
            seen.append(("a", value))

    class B:
        pass

    Fabric(accelerator="cpu", callbacks=[A(), B()]).call("on_train_start", 3)
    assert seen == [("a", 3)]


def test_helpers(fabric, capsys):
    assert Fabric.seed_everything(7) == 7
    first = torch.rand(3)
    Fabric.seed_everything(7)
    assert torch.equal(first, torch.rand(3))
    fabric.print("hello")
    assert capsys.readouterr().out == "hello\n"
    batch = fabric.to_device({"x": torch.ones(2), "y": [torch.zeros(1)]})
    assert batch["x"].device == fabric.device
    assert fabric.broadcast(5) == 5 and fabric.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]
    with fabric.init_module():
        created = Net()
    assert created.fc1.weight.device == fabric.device
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(list(range(4)), batch_size=2))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
    with fabric.no_backward_sync(created):
        pass
    fabric.barrier()


def test_attribute_dict():
    state = AttributeDict(a=1)
    state.b = 2
    assert state == {"a": 1, "b": 2} and state.a == 1
    del state.a
    assert "a" not in state
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        state.missing  # noqa: B018
    assert repr(state) == "AttributeDict({'b': 2})"


def test_a_strategy_instance_takes_fabrics_arguments_it_was_built_without():
    from fabric_ckpt import DDPStrategy, FSDPStrategy

    fsdp = FSDPStrategy()
    Fabric(strategy=fsdp, devices=3, num_nodes=1, accelerator="cpu")
    assert (fsdp.accelerator, fsdp.world_size, fsdp.num_nodes) == ("cpu", 3, 1)
    ddp = DDPStrategy(num_processes=2)
    Fabric(strategy=ddp, devices=4)  # what the strategy was built with wins over Fabric's default
    assert ddp.world_size == 2


def test_contradicting_a_strategy_instance_is_an_error():
    from fabric_ckpt import DDPStrategy

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"runs exactly one process, but devices=2"):
        Fabric(strategy=SingleDeviceStrategy("cpu"), devices=2)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Fabric(strategy=DDPStrategy(accelerator="cpu"), accelerator="cuda")


def test_lightning_style_positional_arguments(tmp_path, fabric):
    model = make_net(1)
    fabric.save(tmp_path / "c.ckpt", {"model": model, "step": 1}, {"model": lambda k, v: "weight" in k})
    target = make_net(2)
    assert fabric.load(tmp_path / "c.ckpt", {"model": target}, False) == {"step": 1}  # strict=False
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    fabric.load_raw(tmp_path / "raw.pt", target, True)
    assert torch.equal(target.fc1.weight, model.fc1.weight)


def test_clip_gradients_by_norm_and_value(fabric):
    model = make_net(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    (model(torch.randn(8, 4)) * 1000).sum().backward()
    norm = fabric.clip_gradients(model, optimizer, max_norm=1.0)
    assert norm > 1.0
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total <= 1.0 + 1e-5
    fabric.clip_gradients(model, optimizer, clip_val=0.01)
    assert all(p.grad.abs().max() <= 0.01 for p in model.parameters())
    with pytest.raises(ValueError, match="exactly one of clip_val"):
        fabric.clip_gradients(model, optimizer)


def test_precision_and_autocast():
    fabric = Fabric(accelerator="cpu", precision="bf16-mixed")
    layer = torch.nn.Linear(4, 4)
    with fabric.autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with Fabric(accelerator="cpu").autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"precision='8-mixed' is not supported"):
        Fabric(accelerator="cpu", precision="8-mixed")
    with pytest.raises(ValueError, match=r"takes a CheckpointIO .* got .something."):
        Fabric(accelerator="cpu", plugins=["something"])


def test_log_reaches_loggers():
    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((metrics, step))

    recorder = Recorder()
    fabric = Fabric(accelerator="cpu", loggers=recorder)
    fabric.log("loss", torch.tensor(0.5), step=3)
    fabric.log_dict({"a": 1, "b": 2.0})
    assert recorder.calls == [({"loss": 0.5}, 3), ({"a": 1, "b": 2.0}, None)]


def test_collectives_take_collections(fabric):
    data = {"x": torch.ones(2), "nested": [torch.zeros(1)]}
    assert torch.equal(fabric.all_reduce(data)["x"], torch.ones(2))
    assert torch.equal(fabric.all_gather(data)["nested"][0], torch.zeros(1))
