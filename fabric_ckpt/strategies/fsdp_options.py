"""Lightning's ``FSDPStrategy`` arguments (FSDP1's vocabulary) mapped onto FSDP2's ``fully_shard``, and applied.

Every argument either maps onto an FSDP2 equivalent, is accepted because FSDP2 already behaves that way, or is
refused at construction with a ``ValueError`` that names the FSDP2 way; an argument neither side knows is a
``TypeError``, as for any Python call. Nothing reaches ``fully_shard`` unchecked.

Sharding strategies:

- ``FULL_SHARD``: a 1-D mesh over all ranks, parameters resharded after forward.
- ``SHARD_GRAD_OP``: the same mesh, parameters kept gathered from forward to backward (``reshard_after_forward=False``).
- ``HYBRID_SHARD``: a 2-D mesh ``(replicate, shard)``: shards within each node, replicas across nodes, as FSDP1's hybrid
  sharding does per node (or the ``device_mesh=(replicas, shard_size)`` given); ``_HYBRID_SHARD_ZERO2`` the same with
  ``reshard_after_forward=False``.
- ``NO_SHARD``: a ``(world_size, 1)`` mesh: every rank holds whole parameters and gradients are averaged (DDP's
  semantics), checkpoints keep the sharded layouts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import BackwardPrefetch, CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

__all__ = [
    "FSDPOptions",
    "WrapPolicy",
    "build_mesh",
    "check_policy",
    "parse_fsdp_options",
    "select_modules",
    "shard",
]

WrapPolicy = set[type[nn.Module]] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool] | Any | None

# name -> (layout, reshard_after_forward)
_SHARDING = {
    "FULL_SHARD": ("shard", True),
    "SHARD_GRAD_OP": ("shard", False),
    "HYBRID_SHARD": ("hybrid", True),
    "_HYBRID_SHARD_ZERO2": ("hybrid", False),
    "NO_SHARD": ("replicate", False),
}
# FSDP2 arguments that go to fully_shard as given (the mesh is the strategy's, see device_mesh).
_FULLY_SHARD_ARGUMENTS = ("mp_policy", "offload_policy", "shard_placement_fn", "ignored_params")
# FSDP1 arguments whose FSDP1 meaning is FSDP2's only behaviour, for the values listed (None: any value).
_ALREADY_SO: dict[str, tuple[Any, ...] | None] = {
    "use_orig_params": (True,),  # FSDP2 always trains the original parameters
    "limit_all_gathers": None,  # FSDP2 frees memory deterministically and needs no all-gather rate limiter
    "forward_prefetch": (False,),
    "sync_module_states": (False,),
}
# FSDP1 arguments (or values) with no FSDP2 equivalent here, and what to do instead.
_REFUSED = {
    "process_group": "FSDP2 shards over a device mesh: pass device_mesh=(replicas, shard_size) or a DeviceMesh",
    "mesh": "pass the mesh as device_mesh= (a DeviceMesh, or a (replicas, shard_size) tuple)",
    "param_init_fn": "create the model under fabric.init_module(empty_init=True); fabric.setup() allocates each "
    "rank's shards and calls reset_parameters()",
    "sync_module_states": "FSDP2 does not broadcast rank 0's weights: seed every rank alike (fabric.seed_everything) "
    "before creating the model, or load a checkpoint after fabric.setup()",
    "use_orig_params": "FSDP2 always trains the original parameters (use_orig_params=True is its only mode)",
    "forward_prefetch": "FSDP2 prefetches explicitly: after setup, call set_modules_to_forward_prefetch() on the "
    "FSDP modules",
    "backward_prefetch": "FSDP2 prefetches the next unit before each backward (BACKWARD_PRE); for another order call "
    "set_modules_to_backward_prefetch() on the FSDP modules after setup",
    "ignored_modules": "pass ignored_params={p for m in modules for p in m.parameters()}",
    "device_id": "each rank's device comes from Fabric(accelerator=..., devices=...)",
}


@dataclass
class FSDPOptions:
    """The FSDP2 plan an :class:`~fabric_ckpt.FSDPStrategy` was built with."""

    layout: str = "shard"  # "shard" (1-D mesh), "hybrid" (replicate x shard), "replicate" (shard size 1)
    device_mesh: tuple[int, int] | Any | None = None  # a (replicas, shard_size) tuple or a DeviceMesh
    reshard_after_forward: bool | int = True
    offload_params: bool = False
    fully_shard_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_policy: WrapPolicy = None

    def mesh_shape(self, world_size: int, num_nodes: int) -> tuple[int, ...]:
        """The shape of the mesh to build when no ``DeviceMesh`` was given.

        Example:
            >>> FSDPOptions(layout="hybrid").mesh_shape(world_size=8, num_nodes=2)
            (2, 4)
        """
        if self.layout == "shard":
            return (world_size,)
        if self.layout == "replicate":
            return (world_size, 1)
        if isinstance(self.device_mesh, tuple):
            replicas, shard_size = self.device_mesh
            if replicas * shard_size != world_size:
                raise ValueError(
                    f"device_mesh={self.device_mesh} covers {replicas * shard_size} ranks, but the world size is "
                    f"{world_size}"
                )
            return (replicas, shard_size)
        if world_size % num_nodes:
            raise ValueError(
                f"HYBRID_SHARD shards within each node, but {world_size} ranks do not split evenly over {num_nodes} "
                "nodes; pass device_mesh=(replicas, shard_size)"
            )
        return (num_nodes, world_size // num_nodes)

    def fully_shard_arguments(self, on_cuda: bool) -> dict[str, Any]:
        """The keyword arguments for ``fully_shard`` (less ``mesh``).

        Example:
            >>> FSDPOptions(reshard_after_forward=False).fully_shard_arguments(on_cuda=False)
            {'reshard_after_forward': False}
        """
        arguments: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward, **self.fully_shard_kwargs}
        if self.offload_params:
            arguments["offload_policy"] = CPUOffloadPolicy(pin_memory=on_cuda)  # pinning needs CUDA
        return arguments


def parse_fsdp_options(
    sharding_strategy: Any,
    device_mesh: Any,
    cpu_offload: Any,
    mixed_precision: Any,
    activation_checkpointing: Any,
    activation_checkpointing_policy: WrapPolicy,
    kwargs: Mapping[str, Any],
) -> FSDPOptions:
    """Check and translate Lightning's FSDP arguments (and FSDP2's own) into :class:`FSDPOptions`.

    Raises:
        ValueError: an FSDP1 argument or value with no FSDP2 equivalent (the message says what to do instead), or
            two arguments that contradict each other.
        TypeError: an argument neither Lightning nor FSDP2 has.

    Example:
        >>> parse_fsdp_options("SHARD_GRAD_OP", None, None, None, None, None, {}).reshard_after_forward
        False
    """
    kwargs = dict(kwargs)
    _check_known(kwargs)
    options = FSDPOptions()
    options.layout, default_reshard = _sharding(sharding_strategy, device_mesh)
    options.device_mesh = _device_mesh(device_mesh)
    explicit_reshard = kwargs.pop("reshard_after_forward", None)
    options.reshard_after_forward = _reshard(explicit_reshard, sharding_strategy, default_reshard)
    for name in (*_ALREADY_SO, "backward_prefetch"):  # accepted by _check_known only where FSDP2 already does that
        kwargs.pop(name, None)
    options.offload_params = _offload(cpu_offload, kwargs)
    mp_policy = _mixed_precision(mixed_precision, kwargs)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    options.fully_shard_kwargs = {name: kwargs.pop(name) for name in _FULLY_SHARD_ARGUMENTS if name in kwargs}
    options.checkpoint_policy = _checkpoint_policy(activation_checkpointing, activation_checkpointing_policy)
    return options


def build_mesh(options: FSDPOptions, device_type: str, world_size: int, num_nodes: int) -> Any:
    """The ``DeviceMesh`` to shard over: the one given, or one shaped by :meth:`FSDPOptions.mesh_shape`.

    Example:
        >>> build_mesh(strategy.options, "cuda", world_size=8, num_nodes=2)  # (replicate=2, shard=4) for HYBRID_SHARD
    """

    if isinstance(options.device_mesh, DeviceMesh):
        return options.device_mesh
    shape = options.mesh_shape(world_size, num_nodes)
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard") if len(shape) == 2 else None)


def shard(module: nn.Module, options: FSDPOptions, wrap_policy: WrapPolicy, mesh: Any, on_cuda: bool) -> None:
    """Apply activation checkpointing, then ``fully_shard`` to each unit ``wrap_policy`` selects and to the root.

    Activation checkpointing is torch's composable ``checkpoint``: a hook, not a wrapper, so parameter names (and
    with them checkpoints) are the same with and without it.

    Example:
        >>> shard(model, strategy.options, {Block}, strategy.device_mesh, on_cuda=False)
    """

    for sub in select_modules(module, options.checkpoint_policy):
        checkpoint(sub)
    arguments = options.fully_shard_arguments(on_cuda=on_cuda)
    for sub in select_modules(module, wrap_policy):  # innermost units first, the root last
        if sub is not module:
            fully_shard(sub, mesh=mesh, **arguments)
    fully_shard(module, mesh=mesh, **arguments)


def check_policy(policy: WrapPolicy, argument: str) -> None:
    """Refuse, at construction, a policy :func:`select_modules` cannot apply.

    Example:
        >>> check_policy({torch.nn.Linear}, "auto_wrap_policy")
    """
    if policy is None or hasattr(policy, "_run_policy"):
        return
    if isinstance(policy, (set, frozenset, tuple, list)):
        bad = [item for item in policy if not (isinstance(item, type) and issubclass(item, nn.Module))]
        if bad:
            raise ValueError(f"{argument} holds {bad!r}; a set of policies holds torch.nn.Module subclasses")
        return
    if not callable(policy):
        raise ValueError(f"{argument}={policy!r}: pass a set of module classes or a predicate module -> bool")
    try:
        parameters = inspect.signature(policy).parameters
    except (TypeError, ValueError):
        return
    if "recurse" in parameters:
        raise ValueError(
            f"{argument} is an FSDP1 functional policy (module, recurse, nonwrapped_numel), which FSDP2 does not use; "
            "pass the layer classes as a set (e.g. {Block}), a predicate module -> bool, or a ModuleWrapPolicy"
        )


def select_modules(root: nn.Module, policy: WrapPolicy) -> list[nn.Module]:
    """The submodules of ``root`` (``root`` included) that ``policy`` selects, innermost first.

    ``policy`` is a set (or tuple) of module classes, a predicate ``module -> bool``, or one of torch's FSDP policy
    objects (``ModuleWrapPolicy``, ``CustomPolicy``).

    Example:
        >>> select_modules(model, {Block})  # every Block, deepest first
    """
    if policy is None:
        return []
    if hasattr(policy, "_run_policy"):
        targets = policy._run_policy(root, set(), {})
        chosen: Callable[[nn.Module], bool] = lambda module: module in targets  # noqa: E731
    elif isinstance(policy, (set, frozenset, tuple, list)):
        classes = tuple(policy)
        chosen = lambda module: isinstance(module, classes)  # noqa: E731
    else:
        chosen = policy
    return [module for module in reversed(list(root.modules())) if chosen(module)]


def _check_known(kwargs: Mapping[str, Any]) -> None:

    for name, value in kwargs.items():
        if name in _FULLY_SHARD_ARGUMENTS or name == "reshard_after_forward":
            continue
        if name == "backward_prefetch" and value in (None, BackwardPrefetch.BACKWARD_PRE):
            continue
        if name in _ALREADY_SO:
            allowed = _ALREADY_SO[name]
            if allowed is None or value in allowed:
                continue
        if name in _REFUSED:
            raise ValueError(f"FSDPStrategy({name}={value!r}) has no FSDP2 equivalent: {_REFUSED[name]}")
        known = sorted({*_FULLY_SHARD_ARGUMENTS, "reshard_after_forward", *_ALREADY_SO, "backward_prefetch"})
        raise TypeError(
            f"FSDPStrategy got an unexpected keyword argument {name!r}; besides its named arguments it takes {known}"
        )


def _sharding(sharding_strategy: Any, device_mesh: Any) -> tuple[str, bool]:
    if sharding_strategy is None:
        hybrid_mesh = isinstance(device_mesh, tuple) or getattr(device_mesh, "ndim", 1) == 2
        return ("hybrid", True) if device_mesh is not None and hybrid_mesh else ("shard", True)
    name = sharding_strategy.upper() if isinstance(sharding_strategy, str) else getattr(sharding_strategy, "name", "")
    if name not in _SHARDING:
        raise ValueError(
            f"sharding_strategy={sharding_strategy!r}; choose one of {sorted(_SHARDING)} (or a torch ShardingStrategy)"
        )
    layout, reshard = _SHARDING[name]
    if device_mesh is not None:
        two_dimensional = isinstance(device_mesh, tuple) or getattr(device_mesh, "ndim", 1) == 2
        if layout == "replicate":
            raise ValueError("sharding_strategy='NO_SHARD' replicates over all ranks; it takes no device_mesh")
        if layout == "shard" and two_dimensional:
            raise ValueError(
                f"device_mesh={device_mesh!r} replicates across groups of ranks, which is hybrid sharding: pass "
                "sharding_strategy='HYBRID_SHARD' (or '_HYBRID_SHARD_ZERO2' to keep parameters gathered after forward)"
            )
        if layout == "hybrid" and not two_dimensional:
            raise ValueError(f"sharding_strategy={name!r} needs a 2-D device_mesh (replicas, shard_size)")
    return layout, reshard


def _device_mesh(device_mesh: Any) -> Any:
    if device_mesh is None or not isinstance(device_mesh, (tuple, list)):
        return device_mesh
    if len(device_mesh) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in device_mesh):
        raise ValueError(f"device_mesh={device_mesh!r}; pass (replicas, shard_size), two positive ints")
    return (device_mesh[0], device_mesh[1])


def _reshard(explicit: Any, sharding_strategy: Any, default: bool) -> bool | int:
    if explicit is None:
        return default
    if sharding_strategy is not None and bool(explicit) != default:
        raise ValueError(
            f"reshard_after_forward={explicit!r} contradicts sharding_strategy={sharding_strategy!r} (which means "
            f"reshard_after_forward={default}); pass one of them"
        )
    return explicit


def _offload(cpu_offload: Any, kwargs: Mapping[str, Any]) -> bool:
    if cpu_offload is None or cpu_offload is False:
        return False
    if "offload_policy" in kwargs:
        raise ValueError("pass either cpu_offload (Lightning's) or offload_policy (FSDP2's), not both")
    if cpu_offload is True:
        return True
    if hasattr(cpu_offload, "offload_params"):  # FSDP1's CPUOffload
        return bool(cpu_offload.offload_params)
    raise ValueError(f"cpu_offload={cpu_offload!r}; pass a bool, a CPUOffload, or offload_policy=CPUOffloadPolicy()")


def _mixed_precision(mixed_precision: Any, kwargs: Mapping[str, Any]) -> Any:
    if mixed_precision is None:
        return None

    if "mp_policy" in kwargs:
        raise ValueError("pass either mixed_precision (Lightning's) or mp_policy (FSDP2's), not both")
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    if not hasattr(mixed_precision, "keep_low_precision_grads"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; pass a torch.distributed.fsdp.MixedPrecision")
    if mixed_precision.buffer_dtype is not None:
        raise ValueError(
            "MixedPrecision(buffer_dtype=...) has no FSDP2 equivalent (FSDP2 leaves buffers alone): cast the buffers "
            "with module.to() before setup, or leave buffer_dtype unset"
        )
    if mixed_precision.keep_low_precision_grads:
        raise ValueError(
            "MixedPrecision(keep_low_precision_grads=True) has no FSDP2 equivalent: FSDP2 keeps gradients in the "
            "parameters' dtype; create the model in low precision for low-precision gradients"
        )
    return MixedPrecisionPolicy(
        param_dtype=mixed_precision.param_dtype,
        reduce_dtype=mixed_precision.reduce_dtype,
        cast_forward_inputs=mixed_precision.cast_forward_inputs or mixed_precision.cast_root_forward_inputs,
    )


def _checkpoint_policy(activation_checkpointing: Any, activation_checkpointing_policy: WrapPolicy) -> WrapPolicy:
    if activation_checkpointing is not None and activation_checkpointing_policy is not None:
        raise ValueError(
            "pass activation_checkpointing_policy only (activation_checkpointing is its deprecated older form)"
        )
    if activation_checkpointing is not None:
        classes = activation_checkpointing if isinstance(activation_checkpointing, list) else [activation_checkpointing]
        activation_checkpointing_policy = set(classes)
    check_policy(activation_checkpointing_policy, "activation_checkpointing_policy")
    return activation_checkpointing_policy
