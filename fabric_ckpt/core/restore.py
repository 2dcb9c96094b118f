"""Restoring objects in place from a checkpoint, all-or-nothing.

Every entry is validated first (keys under ``strict``, shapes, layouts, what load pre-hooks make of a module's keys,
parameter groups, the optimizer's class and state values, a stateful object's ``check_state_dict``); only when the
whole request fits is anything copied. Module tensors are copied into the existing parameters and buffers by
``load_state_dict``; optimizer state is copied into the optimizer's existing state tensors where they exist, so
loading allocates nothing that training had not already allocated, and nothing stays a view of the checkpoint file.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.checks import check_layout, check_optimizer_class_and_values, rehearse_pre_hooks
from fabric_ckpt.core.state import check_strict_keys, is_stateful, materialize
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError

__all__ = [
    "ModuleLoader",
    "RestorePlan",
    "prepare_restore",
    "load_module_state",
    "load_optimizer_state",
    "prepare_module_state",
    "restore",
    "validate_optimizer_state",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch.optim classes whose every non-scalar state tensor has its parameter's shape.
_FACTORED_OPTIMIZERS = {"LBFGS", "Adafactor"}

ModuleLoader = Callable[[nn.Module, Mapping[str, Any], bool], None]


@dataclass(frozen=True)
class _ExpectedKey:
    module: nn.Module
    tensor: torch.Tensor | None  # None for extra state


def _custom_loading(module: nn.Module) -> bool:
    """Whether ``module`` reads its keys its own way (its load pre-hooks are rehearsed instead: see core.checks)."""
    overridden = type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
    is_batch_norm = isinstance(module, nn.modules.batchnorm._NormBase)
    return overridden and not is_batch_norm


def _expected_keys(module: nn.Module) -> tuple[dict[str, _ExpectedKey], list[str]]:
    """The keys ``load_state_dict`` fills, and the prefixes of submodules that load in their own way."""
    expected: dict[str, _ExpectedKey] = {}
    custom_prefixes: list[str] = []
    for name, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if _custom_loading(sub):
            custom_prefixes.append(prefix)
        for key, param in sub._parameters.items():
            if param is not None:
                expected[prefix + key] = _ExpectedKey(sub, param)
        for key, buffer in sub._buffers.items():
            if buffer is not None and key not in sub._non_persistent_buffers_set:
                expected[prefix + key] = _ExpectedKey(sub, buffer)
        if type(sub).get_extra_state is not nn.Module.get_extra_state:
            expected[prefix + "_extra_state"] = _ExpectedKey(sub, None)
    return expected, custom_prefixes


def _strip_wrapper_prefixes(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop ``module.``/``_orig_mod.`` from every key when all keys carry it and the module's keys do not."""
    while state_dict:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None or any(k.startswith(prefix) for k in expected):
            return state_dict
        stripped: Any = OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items())
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            stripped._metadata = OrderedDict(
                (k[len(prefix) :] if k.startswith(prefix) else ("" if k == prefix[:-1] else k), v)
                for k, v in metadata.items()
            )
        state_dict = stripped
    return state_dict


def _allowed_missing(key: str, expected: _ExpectedKey, state_dict: Mapping[str, Any]) -> bool:
    """BatchNorm fills ``num_batches_tracked`` itself when the checkpoint predates it (version < 2)."""
    if not key.endswith("num_batches_tracked") or not isinstance(expected.module, nn.modules.batchnorm._NormBase):
        return False
    metadata = getattr(state_dict, "_metadata", None) or {}
    version = metadata.get(key.rsplit(".", 1)[0] if "." in key else "", {}).get("version")
    return version is None or version < 2


def prepare_module_state(
    module: nn.Module, state_dict: Any, *, strict: bool, label: str, meta_placeholders: bool = False
) -> Mapping[str, Any]:
    """Validate ``state_dict`` against ``module``; return it ready for ``load_state_dict`` (prefixes fixed).

    Keys are checked as ``load_state_dict`` will see them, after the module's load pre-hooks (e.g. spectral norm's)
    rehearsed on a copy. ``meta_placeholders``: meta values stand for tensors a sharded load reads later.

    Raises:
        CheckpointMismatchError: not a state dict, keys differ under ``strict``, a value is not a tensor, or its
            shape or layout differs. Nothing has been copied when it is raised.
        CheckpointError: a value is a meta tensor (no values to load), under any ``strict``.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointMismatchError(f"{label} is a {type(state_dict).__name__}, not a state dict the module can load")
    expected, custom_prefixes = _expected_keys(module)
    state_dict = _strip_wrapper_prefixes(state_dict, expected)
    hooked = rehearse_pre_hooks(module, state_dict)
    if hooked.errors:
        raise CheckpointMismatchError(f"{label} does not load into the module {type(module).__name__}: {hooked.errors}")
    seen = hooked.state_dict  # what load_state_dict's per-module lookups will find

    def checked_by_us(key: str) -> bool:
        return not any(key.startswith(prefix) for prefix in custom_prefixes)

    if strict:
        missing = [
            k for k, e in expected.items() if k not in seen and checked_by_us(k) and not _allowed_missing(k, e, seen)
        ]
        missing += [k for k in hooked.missing if k not in missing]
        unexpected = [k for k in seen if k not in expected and checked_by_us(k)]
        unexpected += [k for k in hooked.unexpected if k not in unexpected]
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{label} does not match the module {type(module).__name__} (strict loading): "
                f"missing keys {missing}, unexpected keys {unexpected}. "
                "Pass strict=False to load only the keys both have."
            )
    for key, value in seen.items():
        target = expected.get(key)
        if target is None or target.tensor is None or not checked_by_us(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{label}: '{key}' is a {type(value).__name__}, the module expects a tensor")
        check_layout(value, target.tensor, f"{label}: '{key}'", meta_placeholders=meta_placeholders)
        if nn.parameter.is_lazy(target.tensor):
            continue  # its shape comes from the checkpoint
        if value.shape != target.tensor.shape and not (target.tensor.dim() == 0 and value.shape == (1,)):
            raise CheckpointMismatchError(
                f"{label}: shape mismatch for '{key}': the checkpoint has "
                f"{list(value.shape)}, the module has {list(target.tensor.shape)}"
            )
    return state_dict


def load_module_state(module: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    """Copy a validated state dict into ``module``'s existing tensors."""
    module.load_state_dict(state_dict, strict=strict)


def _elementwise(optimizer: Optimizer) -> bool:
    cls = type(optimizer)
    return cls.__module__.startswith("torch.optim") and cls.__name__ not in _FACTORED_OPTIMIZERS


def validate_optimizer_state(
    optimizer: Optimizer, state_dict: Any, *, label: str, meta_placeholders: bool = False
) -> None:
    """Check parameter groups, the optimizer's class, state values and their shapes and layouts before
    ``optimizer.load_state_dict`` touches anything.

    Raises:
        CheckpointMismatchError: naming the group, parameter and state key at fault.
        CheckpointError: a state value is a meta tensor (no values to load).
    """
    # "state" may be missing: DCP drops the empty state dict of an optimizer that has not stepped yet.
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict:
        raise CheckpointMismatchError(f"{label} is not an optimizer state dict (it needs 'state' and 'param_groups')")
    groups, saved = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved):
        raise CheckpointMismatchError(f"{label} has {len(saved)} parameter group(s), the optimizer has {len(groups)}")
    for index, (group, saved_group) in enumerate(zip(groups, saved, strict=False)):
        if len(group["params"]) != len(saved_group["params"]):
            raise CheckpointMismatchError(
                f"{label}: parameter group {index} has {len(saved_group['params'])} parameters "
                f"in the checkpoint, {len(group['params'])} in the optimizer"
            )
    params = dict(
        zip(
            chain.from_iterable(g["params"] for g in saved),
            chain.from_iterable(g["params"] for g in groups),
            strict=False,
        )
    )
    for param_id, param_state in state_dict.get("state", {}).items():
        param = params.get(param_id)
        if param is None or not isinstance(param_state, Mapping):
            continue
        current = optimizer.state.get(param, {})
        for key, value in param_state.items():
            existing = current.get(key)
            where = f"{label}: state '{key}' of parameter {param_id}"
            if not isinstance(value, torch.Tensor):
                if isinstance(existing, torch.Tensor):
                    raise CheckpointMismatchError(f"{where} is a {type(value).__name__}, the optimizer holds a tensor")
                continue
            check_layout(
                value,
                existing if isinstance(existing, torch.Tensor) else param,
                where,
                meta_placeholders=meta_placeholders,
            )
            if isinstance(existing, torch.Tensor):
                want = existing.shape
            elif _elementwise(optimizer) and value.dim() > 0:
                want = param.shape
            else:
                continue
            if value.shape != want:
                raise CheckpointMismatchError(
                    f"{label}: state '{key}' of parameter {param_id} has shape "
                    f"{list(value.shape)} in the checkpoint, the optimizer needs {list(want)}"
                )
    check_optimizer_class_and_values(optimizer, state_dict, params, label=label)


def load_optimizer_state(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Load a validated optimizer state dict, reusing the optimizer's existing state tensors.

    ``Optimizer.load_state_dict`` keeps checkpoint tensors as they are when dtype and device already match, so
    afterwards each one is copied into the tensor it replaces (or cloned) and no state aliases the checkpoint.
    """
    previous = {param: dict(param_state) for param, param_state in optimizer.state.items()}
    checkpoint_addresses = {
        _storage_address(value)
        for param_state in state_dict.get("state", {}).values()
        if isinstance(param_state, Mapping)
        for value in param_state.values()
        if isinstance(value, torch.Tensor)
    }
    checkpoint_addresses.discard(None)
    # A sharded checkpoint saved before the first step has no "state" (DCP drops empty dicts): it is empty.
    optimizer.load_state_dict({"state": {}, **state_dict})
    memo: dict[int, torch.UntypedStorage] = {}
    with torch.no_grad():
        for param, param_state in optimizer.state.items():
            old = previous.get(param, {})
            for key, value in list(param_state.items()):
                if not isinstance(value, torch.Tensor):
                    continue
                reusable = old.get(key)
                if (
                    isinstance(reusable, torch.Tensor)
                    and reusable is not value
                    and reusable.shape == value.shape
                    and reusable.dtype == value.dtype
                    and reusable.device == value.device
                ):
                    reusable.copy_(value)
                    param_state[key] = reusable
                elif _storage_address(value) in checkpoint_addresses:
                    param_state[key] = materialize(value, memo)


@dataclass
class RestorePlan:
    """A validated restore: :meth:`apply` copies the checkpoint into the objects and returns the remainder."""

    objects: dict[str, Any]
    checkpoint: dict[str, Any]
    present: list[str]
    module_states: dict[str, tuple[Mapping[str, Any], bool]]
    load_module: ModuleLoader
    load_optimizer: Callable[[Optimizer, Mapping[str, Any]], None]
    restored_keys: frozenset[str]
    _memo: dict[int, torch.UntypedStorage] = field(default_factory=dict)

    def apply(self) -> dict[str, Any]:
        """Restore everything and return the remainder (all phases below, in order)."""
        self.apply_stateful()
        self.apply_modules()
        self.apply_optimizers()
        return self.finish()

    def apply_stateful(self) -> None:
        """Stateful objects first: their ``load_state_dict`` may still reject the data, before any tensor changed.

        Those without ``check_state_dict`` (nothing checked them) go first; if one refuses its state, the ones
        restored before it get their previous state back. Checked ones (e.g. ``RNGState``) go last.
        """
        keys = [
            key
            for key in self.present
            if is_stateful(self.objects[key]) and not isinstance(self.objects[key], (nn.Module, Optimizer))
        ]
        checked = [key for key in keys if callable(getattr(self.objects[key], "check_state_dict", None))]
        restored: list[tuple[Any, Any]] = []
        try:
            for key in keys:
                if key not in checked:
                    obj = self.objects[key]
                    previous = _state_to_restore(obj)
                    obj.load_state_dict(materialize(self.checkpoint[key], self._memo))
                    restored.append((obj, previous))
        except BaseException:
            for obj, previous in reversed(restored):
                obj.load_state_dict(previous)
            raise
        for key in checked:
            self.objects[key].load_state_dict(materialize(self.checkpoint[key], self._memo))

    def apply_modules(self) -> None:
        for key, (state_dict, module_strict) in self.module_states.items():
            self.load_module(self.objects[key], state_dict, module_strict)

    def apply_optimizers(self) -> None:
        for key in self.present:
            if isinstance(self.objects[key], Optimizer):
                self.load_optimizer(self.objects[key], self.checkpoint[key])

    def finish(self) -> dict[str, Any]:
        """Replace the plain values in ``objects`` and return the entries nobody asked for (owning their memory)."""
        for key in self.present:
            if not is_stateful(self.objects[key]):
                self.objects[key] = materialize(self.checkpoint[key], self._memo)
        return {
            key: materialize(value, self._memo)
            for key, value in self.checkpoint.items()
            if key not in self.restored_keys
        }


def prepare_restore(
    objects: dict[str, Any],
    checkpoint: dict[str, Any],
    *,
    strict: bool,
    load_weights_only: bool = False,
    load_module: ModuleLoader = load_module_state,
    load_optimizer: Callable[[Optimizer, Mapping[str, Any]], None] = load_optimizer_state,
    meta_placeholders: bool = False,
) -> RestorePlan:
    """Validate restoring ``objects`` from ``checkpoint`` without changing anything: modules and optimizers (keys,
    shapes, layouts, groups, class), and stateful objects that have a ``check_state_dict(state_dict)`` method
    (e.g. :class:`~fabric_ckpt.RNGState`).

    With ``load_weights_only`` only the modules in ``objects`` are restored; everything else is left as it is and
    stays in the remainder. ``meta_placeholders``: meta tensors in ``checkpoint`` stand for values read later.

    Raises:
        KeyError: ``strict`` and a key of ``objects`` is not in the checkpoint.
        CheckpointMismatchError: a module or optimizer entry does not fit its object.
        CheckpointError: an entry cannot be loaded at all (a meta tensor, a malformed state), naming it.
    """
    targets = {k: v for k, v in objects.items() if isinstance(v, nn.Module)} if load_weights_only else objects
    check_strict_keys(targets, checkpoint, strict=strict)
    present = [key for key in targets if key in checkpoint]
    module_states: dict[str, tuple[Mapping[str, Any], bool]] = {}
    for key in present:
        obj = objects[key]
        label = f"Checkpoint entry '{key}'"
        if isinstance(obj, nn.Module):
            module_strict = strict and getattr(obj, "strict_loading", True) is not False
            prepared = prepare_module_state(
                obj, checkpoint[key], strict=module_strict, label=label, meta_placeholders=meta_placeholders
            )
            module_states[key] = (prepared, module_strict)
        elif isinstance(obj, Optimizer):
            validate_optimizer_state(obj, checkpoint[key], label=label, meta_placeholders=meta_placeholders)
        elif is_stateful(obj) and callable(getattr(obj, "check_state_dict", None)):
            try:
                obj.check_state_dict(checkpoint[key])
            except (ValueError, TypeError) as err:
                raise CheckpointError(f"{label} cannot be restored into {type(obj).__name__}: {err}") from err
    return RestorePlan(objects, checkpoint, present, module_states, load_module, load_optimizer, frozenset(present))


def _state_to_restore(obj: Any) -> Any:
    """``obj``'s current state, kept to give back if a later object refuses its checkpoint state."""
    state = obj.state_dict()
    try:
        return copy.deepcopy(state)
    except Exception:  # not copyable: its own state dict, which load_state_dict usually does not change
        return state


def _storage_address(tensor: torch.Tensor) -> int | None:
    """Where a tensor's memory starts (a sharded tensor's local shard); ``None`` when it has no plain storage."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if local.layout != torch.strided or local.is_meta:
        return None
    try:
        return int(local.untyped_storage().data_ptr())
    except RuntimeError:
        return None


def restore(
    objects: dict[str, Any],
    checkpoint: dict[str, Any],
    *,
    strict: bool,
    load_weights_only: bool = False,
    load_module: ModuleLoader = load_module_state,
    load_optimizer: Callable[[Optimizer, Mapping[str, Any]], None] = load_optimizer_state,
) -> dict[str, Any]:
    """Restore ``objects`` in place from ``checkpoint`` (validated first); return the entries nobody asked for.

    Example:
        >>> remainder = restore({"model": model, "step": 0}, checkpoint, strict=True)
    """
    plan = prepare_restore(
        objects,
        checkpoint,
        strict=strict,
        load_weights_only=load_weights_only,
        load_module=load_module,
        load_optimizer=load_optimizer,
    )
    return plan.apply()
