"""What ``fabric.setup`` returns: modules and optimizers that behave exactly like the user's own.

:class:`FabricModule` forwards through the strategy's wrapper (e.g. ``DistributedDataParallel``) but exposes the
original module's attributes and state-dict keys, so code written for one device keeps working. Optimizers are
returned as instances of a subclass of their own class that share the original's ``__dict__``: ``isinstance``
checks, schedulers, hooks and state all see one and the same optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import nn
from torch.optim import Optimizer

__all__ = [
    "FabricModule",
    "FabricOptimizer",
    "is_compiled",
    "unwrap_module",
    "unwrap_optimizer",
    "wrap_optimizer",
]


class FabricModule(nn.Module):
    """A set-up module: ``forward`` goes through the strategy's wrapper, everything else reaches the original.

    Example:
        >>> model = fabric.setup(MyModel())
        >>> model.state_dict().keys()  # the original keys, no "module." prefix
    """

    def __init__(self, forward_module: nn.Module, original_module: nn.Module) -> None:
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module
        self._fabric_module_initialized = True

    @property
    def module(self) -> nn.Module:
        """The user's own module (as passed to ``setup``, possibly ``torch.compile``-d)."""
        return self._original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_module(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return unwrap_module(self).state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return unwrap_module(self).load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        """The original module's parameters under their original names (no wrapper prefix)."""
        return unwrap_module(self).named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        return unwrap_module(self).named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = super().__getattr__("_original_module")
            return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not getattr(self, "_fabric_module_initialized", False):
            super().__setattr__(name, value)
            return
        original = self._original_module
        original_has = hasattr(original, name)
        wrapper_has = name in dir(self)
        if original_has or not wrapper_has:
            setattr(original, name, value)
        if wrapper_has:
            super().__setattr__(name, value)


class FabricOptimizer:
    """Base of the optimizer classes ``fabric.setup`` creates; see :func:`wrap_optimizer`."""

    _fabric_original: Optimizer

    @property
    def optimizer(self) -> Optimizer:
        """The user's own optimizer object."""
        return type(self)._fabric_original


def wrap_optimizer(optimizer: Optimizer) -> Optimizer:
    """Return an optimizer of a subclass of ``type(optimizer)`` that shares all of its state.

    Sharing ``__dict__`` (not copying it) keeps both handles identical through ``load_state_dict``, LR-scheduler
    patches and hooks, which replace attributes rather than mutate them.
    """
    if isinstance(optimizer, FabricOptimizer):
        return optimizer
    cls = type(
        f"Fabric{type(optimizer).__name__}",
        (FabricOptimizer, type(optimizer)),
        {"_fabric_original": optimizer, "__module__": __name__},
    )
    wrapped: Optimizer = object.__new__(cls)
    wrapped.__dict__ = optimizer.__dict__
    return wrapped


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile`` returns (checked without importing dynamo)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def unwrap_module(module: nn.Module) -> nn.Module:
    """Peel Fabric, ``torch.compile`` and (Distributed)DataParallel wrappers off ``module``."""
    while True:
        if isinstance(module, FabricModule):
            module = module._original_module
        elif is_compiled(module):
            module = cast(nn.Module, module._orig_mod)
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def unwrap_optimizer(optimizer: Optimizer) -> Optimizer:
    """The user's own optimizer behind one returned by ``fabric.setup``."""
    return type(optimizer)._fabric_original if isinstance(optimizer, FabricOptimizer) else optimizer
