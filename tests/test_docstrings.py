"""Every public name of the API carries a concise docstring with a short example (our docstring standard).

Checked: every class and function in ``fabric_ckpt.__all__``; the public methods of the classes a training loop
talks to (Fabric, CheckpointManager, SaveHandle, Timestamp, RNGState, the strategies) and of the report types the
tools return; and a docstring (an example is not required) on their public properties. A method that overrides one
without a docstring of its own inherits the overridden method's, as ``help()`` shows it.
"""

from __future__ import annotations

import inspect
import re

import pytest

import fabric_ckpt
from fabric_ckpt import (
    CheckpointManager,
    DDPStrategy,
    Fabric,
    FSDPStrategy,
    RNGState,
    SaveHandle,
    SingleDeviceStrategy,
    Strategy,
    Timestamp,
    VerifyReport,
)
from fabric_ckpt.lightning import (
    FabricCkptFSDPStrategy,
    FabricCkptIO,
    FabricCkptModelParallelStrategy,
    FabricCkptTrainerFSDPStrategy,
    FabricCkptTrainerModelParallelStrategy,
)
from fabric_ckpt.tools.diff import CheckpointDiff
from fabric_ckpt.tools.inspection import Description

EXAMPLE = re.compile(r"^Examples?:\s*$", re.MULTILINE)
CLASSES_WITH_METHODS = [
    Fabric,
    CheckpointManager,
    SaveHandle,
    Timestamp,
    RNGState,
    Strategy,
    SingleDeviceStrategy,
    DDPStrategy,
    FSDPStrategy,
    VerifyReport,
    Description,
    CheckpointDiff,
    FabricCkptIO,
    FabricCkptFSDPStrategy,
    FabricCkptModelParallelStrategy,
    FabricCkptTrainerFSDPStrategy,
    FabricCkptTrainerModelParallelStrategy,
]


def _exported() -> list[tuple[str, object]]:
    return [
        (name, getattr(fabric_ckpt, name))
        for name in fabric_ckpt.__all__
        if inspect.isclass(getattr(fabric_ckpt, name)) or inspect.isfunction(getattr(fabric_ckpt, name))
    ]


def _members(kind: str) -> list[tuple[str, type, str]]:
    """``(label, class, name)`` of the public methods (``kind="method"``) or properties of the classes above."""
    found = []
    for cls in CLASSES_WITH_METHODS:
        for name in dir(cls):
            if name.startswith("_"):
                continue
            owner = next((base for base in cls.__mro__ if name in vars(base)), None)
            if owner is None or not owner.__module__.startswith("fabric_ckpt"):
                continue  # inherited from object, dict, Protocol, ...
            raw = inspect.getattr_static(cls, name)
            is_property = isinstance(raw, property)
            is_method = inspect.isfunction(raw) or isinstance(raw, (staticmethod, classmethod))
            if (kind == "property" and is_property) or (kind == "method" and is_method):
                found.append((f"{cls.__name__}.{name}", cls, name))
    return found


def _doc(cls: type, name: str) -> str:
    """The docstring of ``cls.name``, or of the first base class's ``name`` that has one."""
    for base in cls.__mro__:
        raw = vars(base).get(name)
        raw = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if raw is not None and raw.__doc__:
            return inspect.cleandoc(raw.__doc__)
    return ""


@pytest.mark.parametrize(("name", "obj"), _exported(), ids=[name for name, _ in _exported()])
def test_exported_names_have_an_example(name: str, obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    assert doc, f"fabric_ckpt.{name} has no docstring"
    assert EXAMPLE.search(doc), f"the docstring of fabric_ckpt.{name} has no 'Example:' section"


@pytest.mark.parametrize(("label", "cls", "name"), _members("method"), ids=[m[0] for m in _members("method")])
def test_public_methods_have_an_example(label: str, cls: type, name: str) -> None:
    doc = _doc(cls, name)
    assert doc, f"{label} has no docstring"
    assert EXAMPLE.search(doc), f"the docstring of {label} has no 'Example:' section"


@pytest.mark.parametrize(("label", "cls", "name"), _members("property"), ids=[m[0] for m in _members("property")])
def test_public_properties_have_a_docstring(label: str, cls: type, name: str) -> None:
    assert _doc(cls, name), f"{label} has no docstring"


def test_the_checks_see_the_api() -> None:
    """Guards the checks above against silently checking nothing."""
    methods = {label for label, _, _ in _members("method")}
    assert {"Fabric.save", "Fabric.load", "CheckpointManager.load_latest", "SaveHandle.wait"} <= methods
    assert {"FSDPStrategy.save_checkpoint", "DDPStrategy.barrier", "Timestamp.advance_batch"} <= methods
    assert "Fabric.global_rank" in {label for label, _, _ in _members("property")}
    assert {"FabricCkptIO.load_checkpoint", "FabricCkptTrainerFSDPStrategy.save_checkpoint"} <= methods
    assert len(_exported()) == len(fabric_ckpt.__all__) - 1  # everything but __version__
