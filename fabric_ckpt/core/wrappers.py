"""What ``fabric.setup`` returns: modules and optimizers that behave exactly like the user's own.

:class:`FabricModule` forwards through the strategy's wrapper (e.g. ``DistributedDataParallel``) but exposes the
original module's attributes and state-dict keys, so code written for one device keeps working. Where the strategy
wrapped the module, the step methods a LightningModule-style loop calls (``training_step`` & co) run through that
wrapper too, as Lightning Fabric does. Optimizers are returned as instances of a subclass of their own class that
share the original's ``__dict__``: ``isinstance`` checks, schedulers, hooks and state all see one and the same
optimizer.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from types import MethodType
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.precision import Precision
from fabric_ckpt.core.snapshot import wait_for_snapshots

__all__ = [
    "STEP_METHODS",
    "FabricModule",
    "FabricOptimizer",
    "is_compiled",
    "lazily_copyable_storages",
    "unwrap_module",
    "unwrap_optimizer",
    "wrap_optimizer",
]

# Methods that run through the strategy's wrapper without being marked (Lightning's LightningModule step methods).
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_ABSENT = object()
# The user's optimizers that fabric.setup wrapped: their step waits for lazy snapshots (see wrap_optimizer).
_SET_UP_OPTIMIZERS: weakref.WeakSet[Optimizer] = weakref.WeakSet()


class FabricModule(nn.Module):
    """A set-up module: ``forward`` goes through the strategy's wrapper, everything else reaches the original.

    Args:
        forward_module: what ``forward`` calls: the strategy's wrapper (e.g. DDP), or the module itself.
        original_module: the user's module, as passed to ``fabric.setup``.
        precision: what every forward runs under: inputs converted, the call in its forward context (autocast),
            outputs converted back.
        redirect_methods: the strategy wrapped the module or hooked its forward (DDP, FSDP): step methods and
            methods marked with :meth:`mark_forward_method` then run through ``forward_module``, and other methods
            that run a submodule are refused, since they would bypass the strategy.

    Example:
        >>> model = fabric.setup(MyModel())
        >>> model.state_dict().keys()  # the original keys, no "module." prefix
    """

    def __init__(
        self,
        forward_module: nn.Module,
        original_module: nn.Module,
        precision: Precision | None = None,
        *,
        redirect_methods: bool = False,
    ) -> None:
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module
        self._fabric_precision = precision if precision is not None else Precision()
        self._fabric_redirects = redirect_methods
        self._fabric_forward_methods = set(STEP_METHODS)
        self._fabric_module_initialized = True

    @property
    def module(self) -> nn.Module:
        """The user's own module (as passed to ``setup``, possibly ``torch.compile``-d)."""
        return self._original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        precision = self._fabric_precision
        args, kwargs = precision.convert_input((args, kwargs))
        with precision.forward_context():
            output = self._forward_module(*args, **kwargs)
        return precision.convert_output(output)

    def mark_forward_method(self, method: MethodType | str) -> None:
        """Run the module's method ``method`` (a name or the bound method) through the strategy's wrapper, as
        ``forward`` is; ``training_step``, ``validation_step``, ``test_step`` and ``predict_step`` are by default.

        Raises:
            TypeError: ``method`` is neither a name nor a method.
            ValueError: ``method`` is ``forward`` itself.
            AttributeError: the module has no method of that name.

        Example:
            >>> model = fabric.setup(model)
            >>> model.mark_forward_method("generate")
            >>> tokens = model.generate(prompt)  # under DDP/FSDP, runs through the wrapper's forward
        """
        method = getattr(method, "__wrapped__", method)  # the method as this wrapper hands it out
        if not isinstance(method, (MethodType, str)):
            raise TypeError(f"mark_forward_method expects a method or a method's name, got {type(method).__name__}")
        name = method if isinstance(method, str) else method.__name__
        if name == "forward":
            raise ValueError("'forward' always runs through the strategy's wrapper; mark the other methods you call")
        target = self._user_module
        if not isinstance(getattr(target, name, None), MethodType):
            raise AttributeError(
                f"mark_forward_method({name!r}): {_class_name(target)}.{name} does not exist or is not a method"
            )
        self._fabric_forward_methods.add(name)

    @property
    def _user_module(self) -> nn.Module:
        """The user's module without a ``torch.compile`` wrapper: where methods live and ``forward`` is looked up."""
        original = self._original_module
        return cast(nn.Module, original._orig_mod) if is_compiled(original) else original

    def _through_forward(self, name: str) -> Callable[..., Any]:
        """``name`` called with its arguments passed through :meth:`forward`, and so through the strategy's wrapper.

        The wrapper (DDP's ``forward``, or FSDP's hooks around the root module's ``__call__``) ends by calling the
        user's ``forward``; for the duration of one call that is replaced by the method, which is what runs.
        """
        target = self._user_module

        def call(*args: Any, **kwargs: Any) -> Any:
            previous = target.__dict__.get("forward", _ABSENT)

            def restore() -> None:
                if previous is _ABSENT:
                    target.__dict__.pop("forward", None)
                else:
                    target.__dict__["forward"] = previous

            def run_method(*inner_args: Any, **inner_kwargs: Any) -> Any:
                restore()  # the method may call the real forward itself
                return getattr(target, name)(*inner_args, **inner_kwargs)

            target.__dict__["forward"] = run_method
            try:
                return self.forward(*args, **kwargs)
            finally:
                restore()

        return call

    def _refusing_submodule_calls(self, method: Callable[..., Any], name: str) -> Callable[..., Any]:
        """``method``, refused as soon as it runs a submodule (that would bypass the strategy's wrapper)."""
        target = self._user_module

        def refuse(*_: Any, **__: Any) -> None:
            raise RuntimeError(
                f"{_class_name(target)}.{name}() runs the model's submodules outside the strategy's wrapper, so "
                f"the strategy's work (gradient synchronisation, unsharding) would be skipped. Call it through the "
                f"wrapper: model.mark_forward_method({name!r}) after fabric.setup()"
            )

        @functools.wraps(method)
        def checked(*args: Any, **kwargs: Any) -> Any:
            # Pre-hooks (prepended) fire before the submodule, and before any strategy hook on it, does any work.
            handles = [module.register_forward_pre_hook(refuse, prepend=True) for module in target.modules()]
            try:
                return method(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()

        return checked

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
        redirects = self.__dict__.get("_fabric_redirects", False)
        marked = name in self.__dict__.get("_fabric_forward_methods", ())
        if redirects and marked and isinstance(getattr(self._user_module, name, None), MethodType):
            return self._through_forward(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = super().__getattr__("_original_module")
            attribute = getattr(original, name)
            if redirects and isinstance(attribute, MethodType):
                return self._refusing_submodule_calls(attribute, name)
            return attribute

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


def _class_name(module: nn.Module) -> str:
    """The user's class name, not that of a class a strategy derived from it (FSDP2's ``FSDP<name>``)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed."):
            return cls.__name__
    return type(module).__name__


class FabricOptimizer:
    """Base of the optimizer classes ``fabric.setup`` creates; see :func:`wrap_optimizer`."""

    _fabric_original: Optimizer
    _fabric_precision: Precision
    _fabric_after_step: Callable[[Optimizer], None] | None
    _fabric_in_step = False

    @property
    def optimizer(self) -> Optimizer:
        """The user's own optimizer object."""
        return type(self)._fabric_original


def wrap_optimizer(
    optimizer: Optimizer,
    precision: Precision | None = None,
    after_step: Callable[[Optimizer], None] | None = None,
) -> Optimizer:
    """Return an optimizer of a subclass of ``type(optimizer)`` that shares all of its state.

    Sharing ``__dict__`` (not copying it) keeps both handles identical through ``load_state_dict``, LR-scheduler
    patches and hooks, which replace attributes rather than mutate them. ``step`` goes through ``precision`` (its
    gradient scaler, for ``"16-mixed"``), then calls ``after_step(optimizer)`` with the user's optimizer (Fabric's
    ``on_after_optimizer_step`` callbacks).

    Example:
        >>> optimizer = wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), after_step=print)
    """
    if isinstance(optimizer, FabricOptimizer):
        return optimizer
    if optimizer not in _SET_UP_OPTIMIZERS:
        # Before any step changes parameters or state, copies of a lazy snapshot still running must finish. A step
        # pre-hook runs on every path to the step (LR schedulers' wrappers, gradient scalers, the user's original
        # optimizer object, which shares the hooks).
        optimizer.register_step_pre_hook(_wait_for_lazy_snapshots)
        _SET_UP_OPTIMIZERS.add(optimizer)
    namespace: dict[str, Any] = {
        "_fabric_original": optimizer,
        "_fabric_precision": precision if precision is not None else Precision(),
        "_fabric_after_step": after_step,
        "step": _StepThroughFabric(),
        "__module__": __name__,
    }
    cls = type(f"Fabric{type(optimizer).__name__}", (FabricOptimizer, type(optimizer)), namespace)
    wrapped: Optimizer = object.__new__(cls)
    wrapped.__dict__ = optimizer.__dict__
    return wrapped


def _wait_for_lazy_snapshots(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    wait_for_snapshots()


def lazily_copyable_storages() -> set[int]:
    """Addresses of the storages that only set-up optimizers' steps change: their parameters and their state.

    A lazy snapshot copies these in the background (every step waits for it); any other tensor of a checkpoint is
    copied before ``save_async`` returns.

    Example:
        >>> model, optimizer = fabric.setup(model, optimizer)
        >>> model.weight.untyped_storage().data_ptr() in lazily_copyable_storages()
        True
    """
    addresses: set[int] = set()
    for optimizer in list(_SET_UP_OPTIMIZERS):
        tensors: list[Any] = [p for group in optimizer.param_groups for p in group["params"]]
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if isinstance(local, torch.Tensor) and local.layout == torch.strided and not local.is_meta:
                addresses.add(local.untyped_storage().data_ptr())
    return addresses


def _step_through_fabric(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """The set-up optimizer's step: the precision's (a gradient scaler's, which calls the optimizer's own step), then
    the after-step callback."""
    cls = type(optimizer)
    original = cls._fabric_original
    if cls._fabric_in_step:  # called back by the precision (through an LR scheduler's wrapper): the real step
        return type(original).step(original, *args, **kwargs)
    cls._fabric_in_step = True
    try:
        result = cls._fabric_precision.optimizer_step(original, *args, **kwargs)
    finally:
        cls._fabric_in_step = False
    if cls._fabric_after_step is not None:
        cls._fabric_after_step(original)
    return result


class _StepThroughFabric:
    """``step`` of a set-up optimizer.

    An LR scheduler replaces ``optimizer.step`` on the instance with a wrapper that records the call, and the set-up
    optimizer shares the instance ``__dict__`` with the user's. A data descriptor on the class still wins over that
    instance attribute, so the precision and the callbacks are never bypassed; the scheduler's wrapper is kept, and
    runs when the precision calls the user's optimizer's ``step``.
    """

    # torch's Optimizer.__setstate__ (run by load_state_dict) wraps the class's step for the profiler unless it is
    # marked as wrapped; the user's own step, which this one calls, is wrapped already.
    hooked = True

    def __get__(self, optimizer: Any, owner: type | None = None) -> Any:
        return self if optimizer is None else _BoundStep(optimizer)

    def __set__(self, optimizer: Any, value: Any) -> None:
        optimizer.__dict__["step"] = value

    def __delete__(self, optimizer: Any) -> None:
        optimizer.__dict__.pop("step", None)


class _BoundStep:
    """A bound ``step`` that LR schedulers can inspect and wrap as they do a method (``__func__``, ``__self__``)."""

    __func__ = staticmethod(_step_through_fabric)

    def __init__(self, optimizer: Any) -> None:
        self.__self__ = optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _step_through_fabric(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # The marker an LR scheduler checks to know it already wrapped this optimizer's step.
        patched = self.__self__.__dict__.get("step")
        if name == "_wrapped_by_lr_sched" and patched is not None:
            return getattr(patched, name)
        raise AttributeError(name)


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
