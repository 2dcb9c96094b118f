"""Small public types: the :class:`AttributeDict` state container and the :class:`Stateful` protocol."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["AttributeDict", "MissingKeyError", "Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: LR schedulers, ``GradScaler``, your own objects.

    Such objects in the state given to ``fabric.save``/``fabric.load`` are saved and restored through these methods.

    Example:
        >>> isinstance(torch.optim.lr_scheduler.StepLR(optimizer, step_size=10), Stateful)
        True
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class MissingKeyError(KeyError, AttributeError):
    """Deleting a key an :class:`AttributeDict` does not have: both a ``KeyError`` and an ``AttributeError``.

    Example:
        >>> try:
        ...     del AttributeDict(step=1).epoch
        ... except KeyError:
        ...     pass
    """


class AttributeDict(dict):
    """A ``dict`` whose keys are also attributes, usable as the ``state`` of ``fabric.save``/``fabric.load``.

    Example:
        >>> state = AttributeDict(model=model, optimizer=optimizer, step=0)
        >>> state.step += 1
        >>> state["step"]
        1
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError:
            # A KeyError, as Lightning's AttributeDict raises (``del d.key`` is ``del d["key"]``), and an
            # AttributeError, as Python's ``del obj.attr`` raises.
            raise MissingKeyError(f"'{type(self).__name__}' object has no attribute '{key}'") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"
