"""Whether checkpoint values can be copied into live objects: the checks a restore runs before changing anything.

``load_state_dict`` checks as it copies, so a value it refuses halfway leaves the object half loaded. These checks
look at everything first: tensor layouts (a meta, sparse or quantized value where a plain tensor lives), what a
module's ``load_state_dict`` pre-hooks make of the state dict (rehearsed on a copy, as ``load_state_dict`` will run
them), and whether an optimizer state dict was saved by an optimizer of the same class with the values it steps with
(``__setstate__`` rehearsed on a probe object, as ``Optimizer.load_state_dict`` will run it).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.optim import Optimizer

from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError

__all__ = ["PreHookResult", "check_layout", "check_optimizer_class_and_values", "rehearse_pre_hooks"]

# State values torch.optim keeps without being tensors: SGD's momentum buffer before its first step.
_MAY_BE_NONE = frozenset({"momentum_buffer"})


def _layout_name(tensor: torch.Tensor) -> str:
    if tensor.is_meta:
        return "meta tensor"
    if tensor.is_quantized:
        return "quantized tensor"
    return "tensor" if tensor.layout == torch.strided else f"{str(tensor.layout).removeprefix('torch.')} tensor"


def check_layout(value: torch.Tensor, target: torch.Tensor, where: str, *, meta_placeholders: bool = False) -> None:
    """Raise unless ``value`` can be copied into ``target``: the same layout, quantized or not, and values to copy.

    ``meta_placeholders``: meta values stand for tensors read later (a sharded checkpoint's view); they pass.

    Raises:
        CheckpointError: ``value`` is a meta tensor (it holds no values).
        CheckpointMismatchError: a sparse, quantized or other layout where ``target`` has another.

    Example:
        >>> check_layout(checkpoint["model"]["fc.weight"], model.fc.weight, "Checkpoint entry 'model': 'fc.weight'")
    """
    value_local = value.to_local() if hasattr(value, "to_local") else value
    target_local = target.to_local() if hasattr(target, "to_local") else target
    if value_local.is_meta:
        if meta_placeholders or target_local.is_meta:
            return
        raise CheckpointError(f"{where} is a meta tensor: the checkpoint holds no values for it")
    if value_local.layout != target_local.layout or value_local.is_quantized != target_local.is_quantized:
        raise CheckpointMismatchError(
            f"{where} is a {_layout_name(value_local)} in the checkpoint; it is loaded into a "
            f"{_layout_name(target_local)}"
        )


# ---------------------------------------------------------------------------------------------- modules
class PreHookResult:
    """The state dict as a module's ``load_state_dict`` pre-hooks leave it, and what the hooks reported."""

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self.state_dict = state_dict
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.errors: list[str] = []


def _rehearsable_hooks(module: nn.Module) -> list[Any]:
    """A module's load pre-hooks, but for the lazy modules' own (it allocates parameters: it changes the module)."""
    hooks = []
    for hook in module._load_state_dict_pre_hooks.values():
        inner = getattr(hook, "hook", hook)
        if isinstance(module, LazyModuleMixin) and getattr(inner, "__func__", None) is LazyModuleMixin._lazy_load_hook:
            continue
        hooks.append(hook)
    return hooks


def rehearse_pre_hooks(module: nn.Module, state_dict: Mapping[str, Any]) -> PreHookResult:
    """Run ``module``'s (and its submodules') ``load_state_dict`` pre-hooks on a copy of ``state_dict``.

    Mirrors ``Module.load_state_dict``: each module's hooks see its own part of the dict as its parent's hooks left
    it. Returns the keys each module will then look up, with their values, so the usual checks apply to them. The
    module and ``state_dict`` are not changed (the hooks that would allocate, a lazy module's, are not run).

    Example:
        >>> rehearse_pre_hooks(model, checkpoint["model"]).state_dict.keys()  # e.g. spectral norm's keys
    """
    if not any(_rehearsable_hooks(sub) for sub in module.modules()):
        return PreHookResult(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    seen: dict[str, Any] = OrderedDict()
    result = PreHookResult(seen)

    def visit(sub: nn.Module, local: dict[str, Any], prefix: str) -> None:
        hooks = _rehearsable_hooks(sub)
        if hooks:
            local = dict(local)
            local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
            with torch.no_grad():
                for hook in hooks:
                    # strict=True, as load_state_dict passes it to every module; the caller applies its own strict.
                    hook(local, prefix, local_metadata, True, result.missing, result.unexpected, result.errors)
        children = [prefix + name + "." for name, child in sub._modules.items() if child is not None]
        for key, value in local.items():
            if key.startswith(prefix) and not any(key.startswith(child) for child in children):
                seen[key] = value
        for name, child in sub._modules.items():
            if child is not None:
                child_prefix = prefix + name + "."
                visit(child, {k: v for k, v in local.items() if k.startswith(child_prefix)}, child_prefix)

    visit(module, dict(state_dict), "")
    if metadata is not None:
        seen._metadata = metadata  # type: ignore[attr-defined]
    return result


# ---------------------------------------------------------------------------------------------- optimizers
def check_optimizer_class_and_values(
    optimizer: Optimizer, state_dict: Mapping[str, Any], params: Mapping[Any, torch.Tensor], *, label: str
) -> None:
    """Rehearse loading ``state_dict`` into a probe of ``optimizer``'s class (torch.optim classes only).

    The probe gets the checkpoint's groups and copies of its per-parameter state, then the class's ``__setstate__``
    (which fills hyperparameters newer than the checkpoint and converts old number steps to tensors) runs on it.
    The result must have every hyperparameter the optimizer has, and tensors for its state.

    Raises:
        CheckpointMismatchError: the checkpoint lacks a hyperparameter of this class (another optimizer saved it),
            or holds a non-tensor state value, naming the group, parameter and key.

    Example:
        >>> check_optimizer_class_and_values(optimizer, checkpoint["optimizer"], params, label="entry 'optimizer'")
    """
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim"):
        return
    saved_groups = state_dict["param_groups"]
    groups = [
        {**saved, "params": live["params"]} for saved, live in zip(saved_groups, optimizer.param_groups, strict=True)
    ]
    # First the groups alone (another optimizer's state could trip this class's __setstate__ before they are seen).
    for index, group in enumerate(_rehearse_setstate(optimizer, groups, {}, label).param_groups):
        lacking = [key for key in optimizer.defaults if key not in group]
        if lacking:
            holds = sorted(str(key) for key in saved_groups[index] if key != "params")
            raise CheckpointMismatchError(
                f"{label} was not saved by a {cls.__name__}: its parameter group {index} lacks {lacking} "
                f"(it holds {holds})"
            )
    state = {
        params[param_id]: dict(param_state)
        for param_id, param_state in state_dict.get("state", {}).items()
        if param_id in params and isinstance(param_state, Mapping)
    }
    probe = _rehearse_setstate(optimizer, groups, state, label)
    ids = {id(param): param_id for param_id, param in params.items()}
    for param, param_state in probe.state.items():
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor) and not (value is None and key in _MAY_BE_NONE):
                raise CheckpointMismatchError(
                    f"{label}: state '{key}' of parameter {ids.get(id(param), '?')} is a {type(value).__name__}, "
                    f"the {cls.__name__} needs a tensor"
                )


def _rehearse_setstate(
    optimizer: Optimizer, groups: list[dict[str, Any]], state: dict[Any, Any], label: str
) -> Optimizer:
    probe = object.__new__(type(optimizer))
    everything = {
        "defaults": dict(optimizer.defaults),
        "state": defaultdict(dict, state),
        "param_groups": [dict(group) for group in groups],
    }
    try:
        probe.__setstate__(everything)
    except Exception as err:
        raise CheckpointMismatchError(
            f"{label} does not load into a {type(optimizer).__name__}: {type(err).__name__}: {err}"
        ) from err
    return probe
