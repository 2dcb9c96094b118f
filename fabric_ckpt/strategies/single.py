"""One process, one device: the default strategy."""

from __future__ import annotations

import torch

from fabric_ckpt.strategies.base import Strategy

__all__ = ["SingleDeviceStrategy"]


class SingleDeviceStrategy(Strategy):
    """Everything in this process on one device; checkpoints are single files.

    Example:
        >>> fabric = Fabric(strategy=SingleDeviceStrategy(device="cpu"))
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self._device = torch.device(device)

    @property
    def root_device(self) -> torch.device:
        return self._device

    def setup_environment(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)

    def __repr__(self) -> str:
        return f"SingleDeviceStrategy(device={str(self._device)!r})"
