"""Numeric precision, as Lightning Fabric's ``precision=`` names it: what forward passes, inputs and modules become.

``Fabric(precision=...)`` picks one of these objects; it is ``fabric.strategy.precision``. Every forward of a set-up
module runs as Lightning's does: inputs converted (:meth:`Precision.convert_input`), the call inside
:meth:`Precision.forward_context` (autocast for ``"-mixed"``, the default dtype for ``"-true"``), outputs converted
back to the default dtype. ``"16-mixed"`` on CUDA scales the loss with a ``GradScaler``; on the CPU, as in
Lightning, it becomes ``"bf16-mixed"`` with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.optim import LBFGS, Optimizer

from fabric_ckpt.core.collections import apply_to_tensors

__all__ = [
    "PRECISION_CHOICES",
    "PRECISION_NAMES",
    "MixedPrecision",
    "Precision",
    "TruePrecision",
    "precision_name",
    "select_precision",
]

PRECISION_NAMES = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
# Lightning's older spellings; None means the default.
_ALIASES: dict[Any, str] = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
PRECISION_CHOICES = (*PRECISION_NAMES, "32", "64", "16", "bf16", 32, 64, 16, None)
_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16, "64": torch.float64, "32": torch.float32}


def precision_name(precision: str | int | None) -> str:
    """The canonical name of a ``precision=`` value (``32`` -> ``"32-true"``, ``None`` -> ``"32-true"``).

    Raises:
        ValueError: not a precision Lightning names, or one this library does not run (``"transformer-engine"``).

    Example:
        >>> precision_name("bf16")
        'bf16-mixed'
    """
    if precision is None:
        return "32-true"
    if isinstance(precision, bool) or not isinstance(precision, (str, int)):
        raise ValueError(_refusal(precision, "it is not a precision name"))
    name = _ALIASES.get(str(precision), str(precision))
    if name in PRECISION_NAMES:
        return name
    if name.startswith("transformer-engine"):
        raise ValueError(_refusal(precision, "TransformerEngine's FP8 precision needs Lightning's own plugin"))
    raise ValueError(_refusal(precision, "it is not a precision name"))


def _refusal(precision: Any, reason: str, choices: tuple[Any, ...] = PRECISION_CHOICES) -> str:
    return f"precision={precision!r} is not supported ({reason}); choose one of {list(choices)}"


def select_precision(
    precision: str | int | None, device: torch.device, unsupported: Mapping[str, str] | None = None
) -> Precision:
    """The :class:`Precision` for ``Fabric(precision=...)`` on ``device``, as Lightning's connector chooses it.

    Args:
        precision: a name (``"bf16-mixed"``), an alias (``"bf16"``, ``16``, ``32``, ``64``), or ``None`` (32-true).
        device: the device the strategy computes on.
        unsupported: names the strategy cannot run, each with the reason (FSDP: ``"16-mixed"``, ``"64-true"``).

    Raises:
        ValueError: the precision is unknown, the strategy cannot run it, or torch does not support it on ``device``.

    Example:
        >>> select_precision("bf16", torch.device("cpu"))
        MixedPrecision('bf16-mixed')
    """
    name = precision_name(precision)
    if unsupported and name in unsupported:
        allowed = tuple(choice for choice in PRECISION_NAMES if choice not in unsupported)
        raise ValueError(_refusal(precision, unsupported[name], allowed))
    kind = device.type
    if name == "16-mixed" and kind == "cpu":
        warnings.warn(
            "precision='16-mixed' on the CPU: float16 autocast is not used on the CPU (as in Lightning); "
            "running precision='bf16-mixed' instead",
            stacklevel=3,
        )
        name = "bf16-mixed"
    dtype = _DTYPES[name.split("-")[0]]
    if dtype is torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(_refusal(precision, "this CUDA device does not support bfloat16"))
    if dtype is torch.float64 and kind == "mps":
        raise ValueError(_refusal(precision, "MPS has no float64"))
    if name == "32-true":
        return Precision()
    if name.endswith("-mixed"):
        autocast_device = kind if kind in ("cpu", "mps") else "cuda"
        if not torch.amp.autocast_mode.is_autocast_available(autocast_device):
            raise ValueError(_refusal(precision, f"torch has no autocast on {autocast_device!r}"))
        return MixedPrecision(name, autocast_device)
    return TruePrecision(name)


class Precision:
    """Full precision (``"32-true"``), and the interface every precision implements (Lightning's ``Precision``).

    Example:
        >>> precision = fabric.strategy.precision
        >>> with precision.forward_context():
        ...     output = precision.convert_output(module(*precision.convert_input((inputs,))))
    """

    precision: str = "32-true"

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert ``module``'s parameters and buffers to this precision, in place (``fabric.setup`` calls this).

        Example:
            >>> model = precision.convert_module(model)
        """
        return module

    def tensor_init_context(self) -> AbstractContextManager[Any]:
        """Tensors created in this context get this precision's dtype.

        Example:
            >>> with precision.tensor_init_context():
            ...     weights = torch.empty(4, 4)
        """
        return nullcontext()

    def module_init_context(self) -> AbstractContextManager[Any]:
        """Modules created in this context get this precision's dtype (``fabric.init_module`` enters it).

        Example:
            >>> with precision.module_init_context():
            ...     model = torch.nn.Linear(4, 2)
        """
        return nullcontext()

    def forward_context(self) -> AbstractContextManager[Any]:
        """The context every forward of a set-up module (and ``fabric.autocast()``) runs in.

        Example:
            >>> with precision.forward_context():
            ...     output = module(inputs)
        """
        return nullcontext()

    def convert_input(self, data: Any) -> Any:
        """``data`` with its floating-point tensors in this precision's dtype (nested collections too).

        Example:
            >>> args, kwargs = precision.convert_input((args, kwargs))
        """
        return data

    def convert_output(self, data: Any) -> Any:
        """``data`` with its floating-point tensors back in the default dtype.

        Example:
            >>> output = precision.convert_output(output)
        """
        return data

    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """Back-propagate from ``tensor`` (scaled first where a gradient scaler is used).

        Example:
            >>> precision.backward(loss, model)
        """
        tensor.backward(*args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Take ``optimizer``'s step (through the gradient scaler, which skips steps with non-finite gradients).

        Example:
            >>> precision.optimizer_step(optimizer)
        """
        return optimizer.step(*args, **kwargs)

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Undo loss scaling on ``optimizer``'s gradients before they are inspected (``fabric.clip_gradients``).

        Example:
            >>> precision.unscale_gradients(optimizer)
        """

    def state_dict(self) -> dict[str, Any]:
        """The precision's own state (a gradient scaler's scale), empty where it has none.

        Example:
            >>> fabric.save("ckpt.pt", {"model": model, "scaler": fabric.strategy.precision})
        """
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Example:
            >>> fabric.strategy.precision.load_state_dict(checkpoint["scaler"])
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.precision!r})"


class MixedPrecision(Precision):
    """``"bf16-mixed"`` / ``"16-mixed"``: forward passes under ``torch.autocast``, float inputs in that dtype.

    Args:
        precision: ``"bf16-mixed"`` or ``"16-mixed"``.
        device: the device type autocast runs on (``"cuda"``, ``"cpu"``, ``"mps"``).
        scaler: a ``torch.amp.GradScaler`` for ``"16-mixed"`` (one is made by default); none for ``"bf16-mixed"``.

    Example:
        >>> fabric = Fabric(accelerator="cuda", precision="16-mixed")
        >>> fabric.strategy.precision.scaler.get_scale()
        65536.0
    """

    def __init__(self, precision: str, device: str, scaler: torch.amp.GradScaler | None = None) -> None:
        if precision not in ("16-mixed", "bf16-mixed"):
            raise ValueError(f"MixedPrecision(precision={precision!r}): choose '16-mixed' or 'bf16-mixed'")
        if precision == "bf16-mixed" and scaler is not None:
            raise ValueError("precision='bf16-mixed' needs no gradient scaler (bfloat16 has float32's range)")
        if precision == "16-mixed" and scaler is None:
            scaler = torch.amp.GradScaler(device=device)
        self.precision = precision
        self.device = device
        self.scaler = scaler
        self.dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16

    def forward_context(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device, dtype=self.dtype)

    def convert_input(self, data: Any) -> Any:
        return _convert_floats(data, self.dtype)

    def convert_output(self, data: Any) -> Any:
        return _convert_floats(data, torch.get_default_dtype())

    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        tensor.backward(*args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
        if self.scaler is None:
            return optimizer.step(*args, **kwargs)
        if isinstance(optimizer, LBFGS):
            raise TypeError("precision='16-mixed' (gradient scaling) cannot step LBFGS, whose closure re-evaluates")
        result = self.scaler.step(optimizer, *args, **kwargs)
        self.scaler.update()
        return result

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        if self.scaler is None:
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            raise NotImplementedError(
                f"{type(optimizer).__name__} unscales its gradients inside step(); they cannot be clipped before it"
            )
        self.scaler.unscale_(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(dict(state_dict))


class TruePrecision(Precision):
    """``"bf16-true"``, ``"16-true"``, ``"64-true"``: the module's weights, its inputs and the tensors created in its
    forward are all in that dtype.

    Example:
        >>> fabric = Fabric(precision="bf16-true")
        >>> fabric.setup(torch.nn.Linear(4, 2)).weight.dtype
        torch.bfloat16
    """

    def __init__(self, precision: str) -> None:
        if precision not in ("16-true", "bf16-true", "64-true"):
            raise ValueError(f"TruePrecision(precision={precision!r}): choose '16-true', 'bf16-true' or '64-true'")
        self.precision = precision
        self.dtype = _DTYPES[precision.split("-")[0]]

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.dtype)

    def tensor_init_context(self) -> AbstractContextManager[Any]:
        return _default_dtype(self.dtype)

    def module_init_context(self) -> AbstractContextManager[Any]:
        return _default_dtype(self.dtype)

    def forward_context(self) -> AbstractContextManager[Any]:
        return _default_dtype(self.dtype)

    def convert_input(self, data: Any) -> Any:
        return _convert_floats(data, self.dtype)

    def convert_output(self, data: Any) -> Any:
        return _convert_floats(data, torch.get_default_dtype())


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _convert_floats(data: Any, dtype: torch.dtype) -> Any:
    return apply_to_tensors(data, lambda tensor: tensor.to(dtype) if torch.is_floating_point(tensor) else tensor)
