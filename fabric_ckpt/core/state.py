"""Objects <-> checkpoint dicts: unwrapping, filters, strict key checks, and copies that own their memory.

Nothing here knows about files: strategies call these rules and hand the result to ``fabric_ckpt.io``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.collections import rebuild
from fabric_ckpt.core.wrappers import unwrap_module, unwrap_optimizer
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError
from fabric_ckpt.types import AttributeDict

__all__ = [
    "FilterFn",
    "find_owner_module",
    "is_fqn_keyed",
    "optimizer_state_to_fqn",
    "optimizer_state_to_index",
    "IgnoreKeys",
    "apply_ignore_keys",
    "apply_filter",
    "check_strict_keys",
    "is_stateful",
    "materialize",
    "refuse_unshardable",
    "resolved",
    "to_checkpoint",
    "unwrap_objects",
    "validate_filter",
]

FilterFn = Callable[[str, Any], bool]
IgnoreKeys = Sequence[str] | Callable[[dict[str, Any]], Any] | None


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` is an object with ``state_dict()`` and ``load_state_dict()`` (not a class)."""
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def unwrap_objects(state: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state`` with set-up/compiled/DDP modules and set-up optimizers unwrapped.

    Set-up data loaders stay: they save and restore their position (the wrapper itself is never pickled).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a dict (or AttributeDict), got {type(state).__name__}")
    unwrapped: dict[str, Any] = {}
    for key, obj in state.items():
        if isinstance(obj, nn.Module):
            obj = unwrap_module(obj)
        elif isinstance(obj, Optimizer):
            obj = unwrap_optimizer(obj)
        unwrapped[key] = obj
    return unwrapped


def validate_filter(filter: Mapping[str, FilterFn] | None, state: Mapping[str, Any]) -> None:
    """Reject a ``filter`` that is not a dict of callables keyed by entries of ``state`` (Lightning's messages)."""
    if filter is None:
        return
    if not isinstance(filter, Mapping):
        raise TypeError(
            f"Filter should be a dictionary, given {filter!r}: `filter` maps a key of `state` to a callable "
            "(key, value) -> bool"
        )
    unknown = [key for key in filter if key not in state]
    if unknown:
        raise ValueError(
            f"The filter keys {set(unknown)} are not present in the state keys {set(state)}: `filter` has key(s) "
            f"{unknown} that are not in `state`"
        )
    for key, fn in filter.items():
        if not callable(fn):
            raise TypeError(
                f"Expected `fabric.save(filter=...)` for key {key!r} to be a callable, given {fn!r}: "
                "a callable (key, value) -> bool"
            )


def apply_filter(value: Any, fn: FilterFn) -> Any:
    """The items of the state dict ``value`` that ``fn(item_key, item_value)`` accepts (type preserved).

    A ``value`` that is not a dict is returned as it is (Lightning saves such an entry unfiltered).

    Example:
        >>> apply_filter({"weight": 1, "bias": 2}, lambda key, value: key == "weight")
        {'weight': 1}
    """
    if not isinstance(value, Mapping):
        return value
    kept = [(k, v) for k, v in value.items() if fn(k, v)]
    if isinstance(value, OrderedDict):
        result: Any = OrderedDict(kept)
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            result._metadata = metadata
        return result
    return dict(kept)


def to_checkpoint(
    objects: Mapping[str, Any],
    filter: Mapping[str, FilterFn] | None,
    *,
    module_state: Callable[[nn.Module], Any],
    optimizer_state: Callable[[Optimizer], Any],
) -> dict[str, Any]:
    """Turn unwrapped objects into the checkpoint dict: state dicts for modules/optimizers/stateful objects.

    ``AttributeDict`` (or other ``dict`` subclass) values become plain dicts so the file loads under
    ``weights_only=True``. A ``filter`` keeps the items of a dict entry it accepts; an entry it empties is left out,
    and an entry that is not a dict is saved as it is.
    """
    checkpoint: dict[str, Any] = {}
    for key, obj in objects.items():
        if isinstance(obj, nn.Module):
            value = module_state(obj)
        elif isinstance(obj, Optimizer):
            value = optimizer_state(obj)
        elif is_stateful(obj):
            value = obj.state_dict()
        else:
            value = _plain_containers(obj)
        if filter and key in filter and isinstance(value, Mapping):
            value = apply_filter(value, filter[key])
            if not value:
                continue  # every item filtered out: the entry is left out of the file, as Lightning does
        checkpoint[key] = value
    return checkpoint


def _plain_containers(obj: Any) -> Any:
    if isinstance(obj, AttributeDict):
        return {key: _plain_containers(value) for key, value in obj.items()}
    if type(obj) is dict:
        return {key: _plain_containers(value) for key, value in obj.items()}
    if type(obj) is list:
        return [_plain_containers(value) for value in obj]
    return obj


def check_strict_keys(requested: Mapping[str, Any], checkpoint: Mapping[str, Any], *, strict: bool) -> None:
    """With ``strict``, every key of the requested state must be in the checkpoint (``KeyError`` otherwise).

    A weights-only checkpoint (module weights and nothing else) asked for more says so, and how to load it.
    """
    if not strict:
        return
    missing = [key for key in requested if key not in checkpoint]
    if not missing:
        return
    message = (
        f"The requested state contains a key '{missing[0]}' that does not exist in the loaded checkpoint "
        f"(its keys: {sorted(map(str, checkpoint))})."
    )
    if _is_weights_only(checkpoint) and not any(isinstance(requested[key], nn.Module) for key in missing):
        message += (
            f" The checkpoint is weights-only: it holds module weights ({sorted(map(str, checkpoint))}) and no "
            f"{', '.join(repr(key) for key in missing)}. To restore only the weights, pass `load_weights_only=True`;"
        )
        raise KeyError(message + " to restore what it has and leave the rest as it is, set `strict=False`.")
    raise KeyError(message + " To disable strict loading, set `strict=False`.")


def _is_weights_only(checkpoint: Mapping[str, Any]) -> bool:
    """Whether every entry of ``checkpoint`` is a module's state dict (names to tensors): what a weights-only save
    (Composer's ``save_weights_only``, our manager's) writes."""
    return bool(checkpoint) and all(
        isinstance(entry, Mapping) and entry and all(isinstance(v, torch.Tensor) for v in entry.values())
        for entry in checkpoint.values()
    )


def apply_ignore_keys(checkpoint: dict[str, Any], ignore_keys: IgnoreKeys) -> None:
    """Drop the entries ``ignore_keys`` names from ``checkpoint``, in place (Composer's ``ignore_keys``).

    ``ignore_keys`` is a list of ``/``-separated paths with glob patterns (``"model/layer1.weight"``,
    ``"model/*"``, ``"optimizer/state/*/exp_avg"``, ``"rng"``): a matching path is removed with all its children,
    and a container emptied this way is removed too, so it counts as absent. Composer's own paths work on our files
    too: ``"state/model/..."`` names our ``"model/..."`` (a checkpoint of ours has no ``state`` entry). A pattern
    that matches nothing is reported with a warning naming it, since a misspelt one would silently restore what
    it was meant to drop. Or a callable that edits the checkpoint dict in place.

    Example:
        >>> apply_ignore_keys(checkpoint, ["rng", "model/head.*"])
    """
    if ignore_keys is None:
        return
    if callable(ignore_keys):
        ignore_keys(checkpoint)
        return
    if isinstance(ignore_keys, str) or not all(isinstance(pattern, str) for pattern in ignore_keys):
        raise TypeError(f"`ignore_keys` must be a list of path patterns or a callable, got {ignore_keys!r}")
    patterns = {pattern: _our_path(pattern, checkpoint) for pattern in ignore_keys}
    if not patterns:
        return
    matched: set[str] = set()
    _drop_matching(checkpoint, "", set(patterns.values()), matched)
    unmatched = [pattern for pattern, ours in patterns.items() if ours not in matched]
    if unmatched:
        warnings.warn(
            f"ignore_keys: the pattern(s) {unmatched} match no entry of the checkpoint, so nothing was dropped for "
            f"them; its top-level entries are {sorted(map(str, checkpoint))}",
            UserWarning,
            stacklevel=3,
        )


def _our_path(pattern: str, checkpoint: Mapping[str, Any]) -> str:
    """Composer's ``state/...`` paths name entries of a Composer file; on ours, the same entry without ``state/``."""
    if pattern.startswith("state/") and "state" not in checkpoint:
        return pattern[len("state/") :]
    return pattern


def _drop_matching(node: dict[Any, Any], prefix: str, patterns: set[str], matched: set[str]) -> None:
    for key in list(node):
        path = f"{prefix}{key}"
        hits = {pattern for pattern in patterns if fnmatch.fnmatchcase(path, pattern)}
        if hits:
            # Patterns inside the dropped entry (e.g. "model/fc.weight" next to "model") are satisfied too.
            matched |= hits | {pattern for pattern in patterns if pattern.startswith(path + "/")}
            del node[key]
            continue
        child = node[key]
        if isinstance(child, dict) and child:
            _drop_matching(child, path + "/", patterns, matched)
            if not child:
                del node[key]


def materialize(obj: Any, memo: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """Copy every tensor in ``obj`` into fresh memory, keeping tensors that shared a storage sharing it.

    Checkpoint tensors are views of a memory-mapped file; what is handed back to the user must not be.

    Example:
        >>> owned = materialize(checkpoint["extra"])
    """
    storages = {} if memo is None else memo
    # Iterative, at any depth: torch.load accepts pickles nested deeper than Python's recursion limit.
    return rebuild(obj, lambda value: _copy_tensor(value, storages) if isinstance(value, torch.Tensor) else value)


def resolved(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or its values in memory of their own when it is a conjugate or negative view.

    A view such as ``x.conj()``, ``x.mH`` or ``x.conj().imag`` shares ``x``'s memory and applies the sign only when
    read; anything that rebuilds a tensor from its storage bytes must rebuild it from these values instead.

    Example:
        >>> x = torch.tensor([1 + 2j])
        >>> resolved(x.conj()).is_conj(), resolved(x) is x
        (False, True)
    """
    if not (tensor.is_conj() or tensor.is_neg()):
        return tensor
    with torch.no_grad():
        values = tensor.resolve_conj().resolve_neg()
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(values, requires_grad=tensor.requires_grad)
    return values.requires_grad_(tensor.requires_grad) if tensor.requires_grad else values


def _copy_tensor(tensor: torch.Tensor, memo: dict[int, torch.UntypedStorage]) -> torch.Tensor:
    if _not_plain_memory(tensor):
        if type(tensor) is nn.Parameter:  # e.g. a meta parameter: a parameter again, as torch.load gives it
            with torch.no_grad():
                return nn.Parameter(tensor.clone(), requires_grad=tensor.requires_grad)
        return tensor.clone()  # a quantized tensor's clone keeps its quantizer; a rebuilt view would lose it
    if tensor.is_conj() or tensor.is_neg():
        return resolved(tensor)  # fresh memory already; the bytes under the view are not its values
    storage = tensor.untyped_storage()
    key = storage.data_ptr()
    if key == 0:
        fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    else:
        if key not in memo:
            memo[key] = storage.clone()
        fresh = torch.empty((0,), dtype=tensor.dtype, device=tensor.device)
        fresh.set_(memo[key], tensor.storage_offset(), tensor.size(), tensor.stride())
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(fresh, requires_grad=tensor.requires_grad)
    return fresh.requires_grad_(tensor.requires_grad) if tensor.requires_grad else fresh


def refuse_unshardable(checkpoint: Any, description: str, path: str = "") -> None:
    """Raise :class:`CheckpointError` naming the first entry a sharded checkpoint cannot hold.

    DCP writes a quantized tensor's integers without its quantizer (scale, zero point), so it would load broken;
    a single file keeps it whole, as ``torch.save`` does.

    Example:
        >>> refuse_unshardable({"model": model.state_dict()}, "Saving 'checkpoints/step-10'")
    """
    if isinstance(checkpoint, torch.Tensor):
        if checkpoint.is_quantized:
            raise CheckpointError(
                f"{description}: entry '{path}' is a quantized tensor, which a sharded checkpoint cannot hold "
                "(its quantizer would be lost); save it to a single file (e.g. FSDPStrategy(state_dict_type='full'))"
            )
    elif isinstance(checkpoint, Mapping):
        for key, value in checkpoint.items():
            refuse_unshardable(value, description, f"{path}/{key}" if path else str(key))
    elif isinstance(checkpoint, (list, tuple)):
        for index, value in enumerate(checkpoint):
            refuse_unshardable(value, description, f"{path}/{index}" if path else str(index))


def _not_plain_memory(tensor: torch.Tensor) -> bool:
    """Tensors whose values are not just strided bytes of one storage (or that hold none, such as meta tensors)."""
    return (
        tensor.layout != torch.strided
        or tensor.is_meta
        or tensor.is_quantized
        or type(tensor) not in (torch.Tensor, nn.Parameter)
    )


def find_owner_module(optimizer: Optimizer, objects: Mapping[str, Any]) -> nn.Module | None:
    """The module in ``objects`` that holds every parameter of ``optimizer`` (needed to name its state by FQN)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for obj in objects.values():
        if isinstance(obj, nn.Module):
            module = unwrap_module(obj)
            if params <= {id(p) for p in module.parameters()}:
                return module
    return None


def is_fqn_keyed(optimizer_state: Any) -> bool:
    """Whether an optimizer state dict names parameters by FQN (DCP's form) rather than by index (torch's)."""
    if not isinstance(optimizer_state, Mapping):
        return False
    groups = optimizer_state.get("param_groups") or []
    return any(isinstance(p, str) for group in groups for p in group.get("params", []))


def _parameter_names(module: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}


def optimizer_state_to_fqn(state: Mapping[str, Any], optimizer: Optimizer, module: nn.Module) -> dict[str, Any]:
    """Torch's index-keyed optimizer state dict -> the FQN-keyed form DCP saves (parameters named by ``module``)."""
    names = _parameter_names(module)
    live = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [index for group in state["param_groups"] for index in group["params"]]
    fqn_of = {index: names[id(param)] for index, param in zip(saved, live, strict=True)}
    return {
        "state": {fqn_of.get(k, k): v for k, v in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [fqn_of[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def optimizer_state_to_index(
    state: Mapping[str, Any], optimizer: Optimizer, module: nn.Module, *, label: str
) -> dict[str, Any]:
    """DCP's FQN-keyed optimizer state -> torch's index-keyed form, ordered like ``optimizer``'s own groups.

    Raises:
        CheckpointMismatchError: the groups do not hold the same parameters (by name) as the optimizer's.
    """
    names = _parameter_names(module)
    groups = optimizer.param_groups
    if len(groups) != len(state["param_groups"]):
        raise CheckpointMismatchError(
            f"{label} has {len(state['param_groups'])} parameter group(s), the optimizer has {len(groups)}"
        )
    index_of: dict[str, int] = {}
    new_groups = []
    for number, (group, saved) in enumerate(zip(groups, state["param_groups"], strict=True)):
        live_names = [names.get(id(p), "") for p in group["params"]]
        if sorted(live_names) != sorted(saved["params"]):
            missing = sorted(set(live_names) - set(saved["params"]))
            extra = sorted(set(saved["params"]) - set(live_names))
            raise CheckpointMismatchError(
                f"{label}: parameter group {number} holds other parameters than the optimizer's "
                f"(not in the checkpoint: {missing}; only in the checkpoint: {extra})"
            )
        for name in live_names:
            index_of[name] = len(index_of)
        new_groups.append({**saved, "params": [index_of[name] for name in live_names]})
    return {
        "state": {index_of[name]: value for name, value in state.get("state", {}).items() if name in index_of},
        "param_groups": new_groups,
    }
