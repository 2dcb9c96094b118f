"""Hostile objects and the rank functions that write or read them (importable, so worker processes can run them).

Each payload's ``__reduce__`` would create ``marker`` when unpickled: the file existing afterwards is proof that code
from a checkpoint ran.
"""

from __future__ import annotations

import os
from typing import Any

from tests import dist_cases as cases


class OpenPayload:
    """Unpickling calls ``open(marker, "w")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class SystemPayload(OpenPayload):
    """Unpickling calls ``os.system("touch marker")``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload(OpenPayload):
    """Unpickling calls ``exec`` on source that creates the marker."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


PAYLOADS = (OpenPayload, SystemPayload, ExecPayload)


def save_with_payload(kind: str, path: str, payload: str, marker: str) -> None:
    """Save a trained model and optimizer plus the entry ``"evil"``: the named payload class, built here (sending
    it to this process would have unpickled it on arrival)."""
    fabric = cases.make_fabric(kind)
    model, optimizer = cases.build(fabric, 0)
    cases.train(fabric, model, optimizer, 0, 2)
    evil = {cls.__name__: cls for cls in PAYLOADS}[payload](marker)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2, "evil": evil})


def load_into_fresh(kind: str, path: str, keys: list[str], weights_only: bool = True) -> dict[str, Any]:
    """Load ``path`` into fresh objects (plus the plain ``keys``) on every rank; the error, and whether the
    model and optimizer are exactly as they were before the attempt."""
    fabric = cases.make_fabric(kind)
    model, optimizer = cases.build(fabric, 8)
    cases.train(fabric, model, optimizer, 0, 1)
    before = cases.full_state(model, optimizer)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, **dict.fromkeys(keys)}
    error = None
    try:
        fabric.load(path, state, weights_only=weights_only)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is not an Exception; report it all the same
        error = {"type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__], "message": str(err)}
    after = cases.full_state(model, optimizer)
    return {"error": error, "before": before, "after": after}


def try_save(kind: str, path: str, seed: int) -> dict[str, Any]:
    """Save a model trained from ``seed``; its full state, or the error (of any type) the save raised."""
    fabric = cases.make_fabric(kind)
    model, optimizer = cases.build(fabric, seed)
    cases.train(fabric, model, optimizer, 0, 1)
    try:
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": seed})
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # report it whatever it is: the test asserts on the type
        chain, cause = [], err
        while cause is not None:
            chain.append(type(cause).__name__)
            cause = cause.__cause__
        return {
            "error": type(err).__name__,
            "is_oserror": isinstance(err, OSError),
            "chain": chain,
            "message": str(err),
        }
    return {"error": None, "model": cases.full(model.state_dict())}
