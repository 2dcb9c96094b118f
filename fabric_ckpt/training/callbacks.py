"""Callbacks as Lightning Fabric calls them, and set-up LightningModules, which Lightning makes callbacks too.

A hook gets the positional arguments ``fabric.call`` was given and, of its keyword arguments, those it names (all of
them if it takes ``**kwargs``), so one call serves hooks written with fewer parameters. A LightningModule set up by a
Fabric logs through it (``self.log``), finds its set-up optimizers (``self.optimizers()``) and has its hooks called by
``fabric.call``, as Lightning does for any module with a ``_fabric`` attribute.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["attach_lightning_module", "call_hooks", "keyword_arguments_for"]


def call_hooks(
    callbacks: Sequence[Any], hook_name: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, warn: bool = True
) -> None:
    """Call ``hook_name`` on every callback that defines it, each with the keyword arguments it takes.

    Skips a callback whose attribute of that name is not callable, with Lightning's warning when ``warn`` (rank 0).

    Example:
        >>> call_hooks([EpochPrinter()], "on_train_epoch_end", (), {"epoch": 3, "loss": 0.5})
    """
    for callback in callbacks:
        method = getattr(callback, hook_name, None)
        if method is None:
            continue
        if not callable(method):
            if warn:
                warnings.warn(
                    f"Skipping the callback `{type(callback).__name__}.{hook_name}` because it is not callable.",
                    UserWarning,
                    stacklevel=3,
                )
            continue
        method(*args, **keyword_arguments_for(method, kwargs))


def keyword_arguments_for(method: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``kwargs`` that ``method`` names as parameters, or all of them if it takes ``**kwargs``.

    Example:
        >>> keyword_arguments_for(lambda epoch: None, {"epoch": 1, "loss": 0.5})
        {'epoch': 1}
    """
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass everything
        return dict(kwargs)
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return dict(kwargs)
    names = {parameter.name for parameter in parameters}
    return {name: value for name, value in kwargs.items() if name in names}


def attach_lightning_module(
    module: nn.Module, fabric: Any, callbacks: list[Any], optimizers: Sequence[Any] | None = None
) -> bool:
    """Connect a LightningModule (any module with a ``_fabric`` attribute, Lightning's own test) to ``fabric``.

    Its ``self.log``/``self.log_dict`` then go to the Fabric's loggers, ``self.optimizers()`` returns ``optimizers``
    (when given: ``fabric.setup`` with optimizers), and ``fabric.call`` reaches its hooks: it is appended to
    ``callbacks`` unless there already. Other modules are left alone. Returns whether it was appended.

    Example:
        >>> attach_lightning_module(lightning_module, fabric, fabric._callbacks, [optimizer])
        True
    """
    if not hasattr(module, "_fabric"):
        return False
    # Lightning sets these attributes directly (the `fabric` property would store a weak proxy instead).
    vars(module)["_fabric"] = fabric
    if optimizers is not None:
        vars(module)["_fabric_optimizers"] = list(optimizers)
    if any(callback is module for callback in callbacks):
        return False
    callbacks.append(module)
    return True
