"""Turning ``Fabric(accelerator=..., strategy=..., devices=...)`` arguments into a :class:`Strategy`."""

from __future__ import annotations

from typing import Any

import torch

from fabric_ckpt.strategies.base import Strategy
from fabric_ckpt.strategies.ddp import DDPStrategy
from fabric_ckpt.strategies.fsdp import FSDPStrategy
from fabric_ckpt.strategies.launcher import detect_environment
from fabric_ckpt.strategies.parallel import ParallelStrategy
from fabric_ckpt.strategies.single import SingleDeviceStrategy

__all__ = ["STRATEGY_NAMES", "resolve_accelerator", "resolve_devices", "select_strategy"]

# Lightning's names of its DDP variants that run on CPUs. Each is our DDPStrategy: processes are always started by
# re-running the program (Lightning's "popen"), so spawn/fork-only restrictions do not apply.
_DDP_ALIASES: dict[str, dict[str, Any]] = {
    "ddp_spawn": {},
    "ddp_fork": {},
    "ddp_notebook": {},
    "ddp_find_unused_parameters_true": {"find_unused_parameters": True},
}
STRATEGY_NAMES = ("auto", "single", "ddp", "fsdp", *_DDP_ALIASES)
_ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def resolve_accelerator(accelerator: str) -> str:
    """``"auto"`` picks CUDA when available, else CPU; ``"gpu"`` means CUDA."""
    if not isinstance(accelerator, str) or accelerator.lower() not in _ACCELERATORS:
        raise ValueError(f"Unknown accelerator {accelerator!r}; choose one of {list(_ACCELERATORS)}")
    name = accelerator.lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu":
        name = "cuda"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("accelerator='cuda' was requested, but CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("accelerator='mps' was requested, but MPS is not available on this machine")
    return name


def resolve_devices(devices: int | str | list[int], accelerator: str) -> list[int]:
    """The device indices to use on this node: ``1``, ``"auto"``, ``[0, 2]`` or ``"0,2"``."""
    available = torch.cuda.device_count() if accelerator == "cuda" else 1
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return list(range(available))
        if "," in text:
            devices = [int(part) for part in text.split(",") if part.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            raise ValueError(f"devices={devices!r} is not a count, an index list or 'auto'")
    if isinstance(devices, bool) or not isinstance(devices, (int, list, tuple)):
        raise TypeError(f"devices must be an int, a list of ints or 'auto', got {type(devices).__name__}")
    if isinstance(devices, int):
        if devices == -1:
            return list(range(available))
        if devices < 1:
            raise ValueError(f"devices={devices} must be at least 1 (or -1/'auto' for all)")
        if accelerator == "cuda" and devices > available:
            raise ValueError(f"devices={devices} but only {available} CUDA device(s) are visible")
        return list(range(devices))
    indices = [int(i) for i in devices]
    if not indices or len(set(indices)) != len(indices):
        raise ValueError(f"devices={devices!r} must list distinct device indices")
    return indices


def select_strategy(
    strategy: str | Strategy, accelerator: str, devices: int | str | list[int], num_nodes: int
) -> Strategy:
    """Build the strategy ``Fabric`` runs with.

    Example:
        >>> select_strategy("auto", "cpu", 1, 1)
        SingleDeviceStrategy(device='cpu')
    """
    if isinstance(strategy, Strategy):
        _configure_instance(strategy, accelerator, devices, num_nodes)
        return strategy
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes!r} must be a positive int")
    name = strategy.lower() if isinstance(strategy, str) else strategy
    if name not in STRATEGY_NAMES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {list(STRATEGY_NAMES)} or pass a Strategy")
    kind = resolve_accelerator(accelerator)
    indices = resolve_devices(devices, kind)
    processes = len(indices) * num_nodes
    launched = detect_environment()
    if name == "auto":
        name = "ddp" if processes > 1 or (launched is not None and launched.world_size > 1) else "single"
    if name == "single":
        if processes != 1:
            raise ValueError(
                f"strategy={strategy!r} with devices={devices!r} and num_nodes={num_nodes} asks for "
                f"{processes} processes; the single-device strategy runs exactly one"
            )
        device = torch.device(kind, indices[0]) if kind == "cuda" else torch.device(kind)
        return SingleDeviceStrategy(device=device)
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"strategy={strategy!r} runs on 'cpu' or 'cuda', not {kind!r}")
    # Under torchrun the launcher decides how many processes there are.
    num_processes = None if launched is not None and devices in (1, "auto") else len(indices)
    if name == "ddp" or name in _DDP_ALIASES:
        return DDPStrategy(
            accelerator=kind, num_processes=num_processes, num_nodes=num_nodes, **_DDP_ALIASES.get(name, {})
        )
    return FSDPStrategy(accelerator=kind, num_processes=num_processes, num_nodes=num_nodes)


def _configure_instance(strategy: Strategy, accelerator: str, devices: int | str | list[int], num_nodes: int) -> None:
    """Give a strategy passed as an instance what it was built without; refuse arguments that contradict it."""
    explicit = isinstance(accelerator, str) and accelerator.lower() != "auto"
    if isinstance(strategy, ParallelStrategy):
        kind = resolve_accelerator(accelerator)
        if not explicit and strategy._accelerator is not None:
            kind = strategy._accelerator
        launched = detect_environment()
        processes = None if launched is not None and devices in (1, "auto") else len(resolve_devices(devices, kind))
        strategy.configure(kind, processes, num_nodes)
    elif isinstance(strategy, SingleDeviceStrategy):
        if explicit and resolve_accelerator(accelerator) != strategy.root_device.type:
            raise ValueError(f"Fabric(accelerator={accelerator!r}) contradicts {strategy!r}; pass one of them")
        if devices not in (1, "1", "auto") or num_nodes != 1:
            raise ValueError(f"{strategy!r} runs exactly one process, but devices={devices!r}, num_nodes={num_nodes}")
