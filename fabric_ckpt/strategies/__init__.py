"""Strategies: one class per checkpoint layout, chosen by name or passed as an instance."""

from __future__ import annotations

from fabric_ckpt.strategies.base import Strategy
from fabric_ckpt.strategies.ddp import DDPStrategy
from fabric_ckpt.strategies.fsdp import FSDPStrategy
from fabric_ckpt.strategies.parallel import ParallelStrategy
from fabric_ckpt.strategies.registry import STRATEGY_NAMES, select_strategy
from fabric_ckpt.strategies.single import SingleDeviceStrategy

__all__ = [
    "STRATEGY_NAMES",
    "DDPStrategy",
    "FSDPStrategy",
    "ParallelStrategy",
    "SingleDeviceStrategy",
    "Strategy",
    "select_strategy",
]
