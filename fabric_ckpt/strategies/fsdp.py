"""Fully sharded data parallel (FSDP2 ``fully_shard``): each rank holds a shard of every parameter and its state.

Checkpoints are sharded folders written by ``torch.distributed.checkpoint`` (DCP), every rank writing its own shard
files in parallel, no rank ever holding the full model (``state_dict_type="sharded"``, the default); or, with
``state_dict_type="full"``, the single-device file gathered on rank 0. Either layout loads at any world size: DCP
reshards folders, and a full file is cut into each rank's shards.

Optimizer state is saved by parameter name (DCP's convention), built from ``optimizer.state_dict()`` directly:
DCP's ``get_optimizer_state_dict`` would take a zero-lr step on an optimizer without state, a side effect of saving.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer
from torch.utils.serialization import config as serialization_config

from fabric_ckpt.core.restore import load_optimizer_state
from fabric_ckpt.core.staging import Stager
from fabric_ckpt.core.state import (
    find_owner_module,
    optimizer_state_to_fqn,
    refuse_unshardable,
)
from fabric_ckpt.core.wrappers import is_compiled
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats import dcp as dcp_format
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import Location, PathLike
from fabric_ckpt.storage.pointers import follow_pointer
from fabric_ckpt.strategies.base import LoadOptions, SaveOptions, WriteJob
from fabric_ckpt.strategies.checkpoint_io import is_ours
from fabric_ckpt.strategies.checkpoints import stage_snapshot
from fabric_ckpt.strategies.fsdp_load import ShardedLoading, reshard
from fabric_ckpt.strategies.fsdp_options import WrapPolicy, build_mesh, check_policy, parse_fsdp_options, shard
from fabric_ckpt.strategies.module_init import has_meta_tensors, materialize_meta
from fabric_ckpt.strategies.parallel import DEFAULT_TIMEOUT

__all__ = ["FSDPStrategy"]


class FSDPStrategy(ShardedLoading):
    """FSDP2 across processes, with sharded (default) or full checkpoints.

    Takes Lightning's arguments, mapped onto FSDP2 (see :mod:`~fabric_ckpt.strategies.fsdp_options`); one with no
    FSDP2 equivalent is refused here, naming the FSDP2 way.

    Args:
        state_dict_type: ``"sharded"`` (a folder, every rank writes its shard) or ``"full"`` (one file from rank 0).
        auto_wrap_policy: which submodules become their own FSDP unit: a set of module classes, a predicate, or a
            ``ModuleWrapPolicy``; the root is always sharded.
        writer_threads: threads per rank that write a sharded checkpoint (DCP's ``thread_count``), each into a
            file of its own; ``None`` (default) takes ``StorageOptions.writer_threads``.
        sharding_strategy: ``"FULL_SHARD"`` (default), ``"SHARD_GRAD_OP"``, ``"HYBRID_SHARD"``,
            ``"_HYBRID_SHARD_ZERO2"`` or ``"NO_SHARD"`` (or torch's ``ShardingStrategy``).
        device_mesh: ``(replicas, shard_size)`` or a ``DeviceMesh``, for hybrid sharding.
        cpu_offload: keep parameters (and gradients, optimizer state) on the CPU: ``True`` or FSDP1's ``CPUOffload``.
        mixed_precision: FSDP1's ``MixedPrecision`` (mapped onto FSDP2's ``MixedPrecisionPolicy``).
        activation_checkpointing_policy: which submodules recompute their activations in backward (a set of module
            classes, a predicate, or a ``ModuleWrapPolicy``); parameter names do not change.
        **kwargs: FSDP2's ``reshard_after_forward``, ``mp_policy``, ``offload_policy``, ``shard_placement_fn``,
            ``ignored_params``; FSDP1's ``use_orig_params=True``, ``limit_all_gathers`` (FSDP2 behaves so).

    Example:
        >>> fabric = Fabric(strategy=FSDPStrategy(num_processes=2, auto_wrap_policy={Block}))
    """

    def __init__(
        self,
        accelerator: str | None = None,
        num_processes: int | None = None,
        num_nodes: int | None = None,
        state_dict_type: str = "sharded",
        auto_wrap_policy: WrapPolicy = None,
        process_group_backend: str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        writer_threads: int | None = None,
        *,
        sharding_strategy: Any = None,
        device_mesh: tuple[int, int] | Any | None = None,
        cpu_offload: Any = None,
        mixed_precision: Any = None,
        activation_checkpointing: Any = None,
        activation_checkpointing_policy: WrapPolicy = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(accelerator, num_processes, num_nodes, process_group_backend, timeout)
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(f"state_dict_type={state_dict_type!r}; choose 'sharded' or 'full'")
        check_policy(auto_wrap_policy, "auto_wrap_policy")
        self.options = parse_fsdp_options(
            sharding_strategy,
            device_mesh,
            cpu_offload,
            mixed_precision,
            activation_checkpointing,
            activation_checkpointing_policy,
            kwargs,
        )
        self.state_dict_type = state_dict_type
        self._wrap_policy = auto_wrap_policy
        if writer_threads is not None and (
            isinstance(writer_threads, bool) or not isinstance(writer_threads, int) or writer_threads < 1
        ):
            raise ValueError(f"FSDPStrategy(writer_threads={writer_threads!r}) must be a positive int or None")
        self._writer_threads = writer_threads
        self._mesh: Any = None
        self._modules: list[nn.Module] = []

    # ------------------------------------------------------------------ setup
    @property
    def wraps_modules(self) -> bool:
        """True: ``fully_shard`` returns the module itself, but its forward hooks unshard the parameters."""
        return True

    @contextmanager
    def module_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """With ``empty_init=True`` modules are created on the meta device (no memory); :meth:`setup_module`
        allocates each rank's shards and initialises them with ``reset_parameters()``.

        Example:
            >>> with fabric.init_module(empty_init=True):
            ...     model = Transformer()  # no memory allocated yet
        """
        with torch.device("meta") if empty_init else self.root_device, self.precision.module_init_context():
            yield

    def module_to_device(self, module: nn.Module) -> None:
        if not has_meta_tensors(module):  # a meta module is materialised shard by shard in setup_module
            super().module_to_device(module)

    @property
    def device_mesh(self) -> Any:
        """The ``DeviceMesh`` modules are sharded over: 1-D, or 2-D ``(replicate, shard)`` for hybrid sharding.

        Example:
            >>> fabric.strategy.device_mesh.shape  # (2, 4) with HYBRID_SHARD on 2 nodes of 4 processes
        """
        if self._mesh is None:
            self._mesh = build_mesh(self.options, self.root_device.type, self.world_size, self.num_nodes)
        return self._mesh

    @property
    def unsupported_precisions(self) -> Mapping[str, str]:
        """``"16-mixed"`` and ``"64-true"``, as Lightning's FSDP2 strategy (``ModelParallelStrategy``) refuses them."""
        return {
            "16-mixed": (
                "a gradient scaler sees only this rank's gradient shards, so it could skip a step on some ranks "
                "only; use 'bf16-mixed'"
            ),
            "64-true": "Lightning's FSDP strategies do not run float64",
        }

    def setup_module(self, module: nn.Module) -> nn.Module:
        target = cast(nn.Module, module._orig_mod) if is_compiled(module) else module
        if not isinstance(target, FSDPModule):
            shard(target, self.options, self._wrap_policy, self.device_mesh, on_cuda=self.root_device.type == "cuda")
        materialize_meta(target, self.root_device)
        self._modules.append(target)
        return module

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: Sequence[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        """Shard ``module`` and re-point optimizers created before sharding at the sharded parameters.

        Example:
            >>> optimizer = torch.optim.AdamW(model.parameters())  # created before sharding
            >>> sharded, [optimizer] = strategy.setup_module_and_optimizers(model, [optimizer])
        """
        names = {id(p): name for name, p in module.named_parameters()}
        for optimizer in optimizers:
            if optimizer.state:
                raise ValueError("Set up optimizers with FSDP before they take a step: their state cannot be resharded")
        sharded_module = self.setup_module(module)
        current = dict(sharded_module.named_parameters())
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                try:
                    group["params"] = [current[names[id(p)]] for p in group["params"]]
                except KeyError:
                    raise ValueError(
                        "The optimizer holds parameters that are not in the module set up with it"
                    ) from None
        return sharded_module, [self.setup_optimizer(optimizer) for optimizer in optimizers]

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        target = getattr(module, "_forward_module", module)
        if not enabled or not isinstance(target, FSDPModule):
            yield
            return
        target.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            target.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------ state dicts
    def _owner(self, optimizer: Optimizer, objects: Mapping[str, Any] | None = None) -> nn.Module:
        owner = find_owner_module(optimizer, objects or {}) or find_owner_module(
            optimizer, {str(i): m for i, m in enumerate(self._modules)}
        )
        if owner is None:
            raise CheckpointError(
                "FSDP saves optimizer state by parameter name: set up the optimizer's module with fabric.setup() "
                "(or put it in the same state dict)"
            )
        return owner

    def module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        reshard(module)
        state_dict = module.state_dict()
        return self._gather_full(state_dict) if self.state_dict_type == "full" else state_dict

    def optimizer_state_dict(self, optimizer: Optimizer) -> dict[str, Any]:
        state_dict = optimizer.state_dict()
        if self.state_dict_type == "full":
            return self._gather_full(state_dict)
        return optimizer_state_to_fqn(state_dict, optimizer, self._owner(optimizer))

    def _gather_full(self, obj: Any) -> Any:
        """Every DTensor gathered to a full CPU tensor on rank 0 (other ranks keep a meta placeholder)."""
        if isinstance(obj, DTensor):
            full = obj.full_tensor()
            return full.cpu() if self.is_global_zero else torch.empty_like(full, device="meta")
        if isinstance(obj, dict):
            gathered = type(obj)() if type(obj) is not dict else {}
            for key, value in obj.items():
                gathered[key] = self._gather_full(value)
            if hasattr(obj, "_metadata"):
                gathered._metadata = obj._metadata  # type: ignore[attr-defined]
            return gathered
        if isinstance(obj, list):
            return [self._gather_full(value) for value in obj]
        return obj

    def load_module_state_dict(self, module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load full tensors (a single-file checkpoint) into the module: each rank keeps only its shard.

        Example:
            >>> strategy.load_module_state_dict(model, torch.load("full.ckpt")["model"], strict=True)
        """
        reshard(module)
        targets = module.state_dict()
        sharded_state = {
            key: _shard_like(value, targets[key]) if isinstance(targets.get(key), DTensor) else value
            for key, value in state_dict.items()
        }
        module.load_state_dict(sharded_state, strict=strict)

    def load_optimizer_state_dict(self, optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
        """Load a full (index-keyed) optimizer state: tensors shaped like their parameter are cut into shards.

        Example:
            >>> strategy.load_optimizer_state_dict(optimizer, torch.load("full.ckpt")["optimizer"])
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [i for group in state_dict["param_groups"] for i in group["params"]]
        param_of = dict(zip(saved, params, strict=True))
        state = {}
        for index, param_state in state_dict.get("state", {}).items():
            param = param_of.get(index)
            state[index] = {
                key: _shard_like(value, param)
                if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape
                else value
                for key, value in param_state.items()
            }
        load_optimizer_state(optimizer, {"state": state, "param_groups": state_dict["param_groups"]})

    def _check_checkpoint_io(self, io: Any) -> None:
        if self.state_dict_type == "sharded" and not is_ours(io):
            raise ValueError(
                f"{type(self).__name__}(state_dict_type='sharded') writes folders, every rank its own shards, which a "
                f"CheckpointIO ({type(io).__name__}) cannot write: it writes single files. Use "
                "state_dict_type='full' (one file, from rank 0) to save through it"
            )

    # ------------------------------------------------------------------ sharded save
    def _save_checkpoint(self, path: PathLike | Location, state: Mapping[str, Any], options: SaveOptions) -> None:
        if self.state_dict_type == "full":
            super()._save_checkpoint(path, state, options)
            return
        location = self._location(path, options.storage_options)
        description = f"Saving '{location.original}'"
        checkpoint = self.agree(lambda: self._build_sharded_checkpoint(state, options, description), description)
        temporary = self._staging_folder(location, description)
        self._write_sharded(checkpoint, temporary, location, description, group=None)

    def stage_checkpoint(
        self, path: PathLike | Location, state: Mapping[str, Any], options: SaveOptions, stager: Stager
    ) -> WriteJob | None:
        """Snapshot every rank's shards; the job writes them over a process group of their own (every rank writes).

        Example:
            >>> write = strategy.stage_checkpoint("checkpoints/step-100", state, SaveOptions(), Stager())
        """
        if self.state_dict_type == "full":
            return super().stage_checkpoint(path, state, options, stager)
        options = self._hooked_save(options, state)
        location = self._location(path, options.storage_options)
        description = f"Saving '{location.original}'"
        checkpoint = self.agree(lambda: self._build_sharded_checkpoint(state, options, description), description)
        snapshot = stage_snapshot(stager, checkpoint, options)
        del checkpoint
        temporary = self._staging_folder(location, description)
        group = self.background_group()

        def write() -> None:
            snapshot.wait_copied()  # DCP plans every item up front: a lazy snapshot is written once complete
            self._write_sharded(snapshot.checkpoint, temporary, location, description, group=group)

        return write

    def _build_sharded_checkpoint(
        self, state: Mapping[str, Any], options: SaveOptions, description: str
    ) -> dict[str, Any]:
        checkpoint = self._build_checkpoint(state, options)
        refuse_unshardable(checkpoint, description)  # before anything is written
        return checkpoint

    def _staging_folder(self, location: Location, description: str) -> Location:
        """The new generation this save writes into: created by rank 0, reached by name on the others."""
        name = self.agree(lambda: sharded.new_generation(location).name if self.is_global_zero else None, description)
        return location.child(self.broadcast(name))

    def _write_sharded(
        self, checkpoint: dict[str, Any], temporary: Location, location: Location, description: str, group: Any
    ) -> None:
        """DCP writes every rank's shards into ``temporary``; rank 0 adds the manifest and commits."""
        try:
            try:
                threads = self._writer_threads or temporary.storage.options.writer_threads
                writer = dcp_format.writer_for(temporary, thread_count=threads)
                # Our manifest checksums every item; torch's own per-item CRC (which it never checks) is extra
                # work. The switch is process-wide, so it is flipped only while the caller waits (not in the
                # background, where user code keeps running).
                with _torch_item_crc(enabled=group is not None):
                    metadata = dcp.save(checkpoint, storage_writer=writer, process_group=group)
            except CheckpointException as err:
                raise dcp_format.translate_dcp_error(err, f"{description} while writing the shards") from err
            written = dcp_format.written_files(writer)
            records = self.agree(lambda: self._checksum_own_files(temporary, metadata, written), description, group)
            every_record = [record for per_rank in self.gather_objects(records, group) for record in per_rank]
            self.agree(
                lambda: self._commit(temporary, location, every_record) if self.is_global_zero else None,
                description,
                group,
            )
        except BaseException:
            if self.is_global_zero:
                sharded.discard(temporary, location)
            raise

    def _checksum_own_files(
        self, temporary: Location, metadata: Any, written: Mapping[str, dcp_format.WrittenFile]
    ) -> list[sharded.FileRecord]:
        """The manifest records of this rank's files: from the CRC-32s kept while they were written, read back only
        where those are incomplete."""
        names = sharded.own_files(temporary, self.global_rank)
        if self.is_global_zero:
            names.append(dcp_format.METADATA_NAME)
        if not isinstance(metadata, Metadata):
            metadata = dcp_format.read_metadata(temporary)
        return sharded.file_checksums(temporary, names, metadata, written)

    def _commit(self, temporary: Location, location: Location, records: list[sharded.FileRecord]) -> None:
        sharded.commit(temporary, location, records, self.world_size)

    # ------------------------------------------------------------------ loading
    def _load_checkpoint(
        self, path: PathLike | Location, state: dict[str, Any] | None, options: LoadOptions
    ) -> dict[str, Any]:
        if self._user_checkpoint_io() is None:
            progress = None if options.progress is None else self.storage_options.replace(progress=options.progress)
            location = self._location(path, progress)
            if location.exists():
                location = follow_pointer(location)  # a manager's `latest` on an object store
            if location.isdir() and sharded.is_sharded(location):
                return self._load_sharded(location, state, options)
        return super()._load_checkpoint(path, state, options)

    def __repr__(self) -> str:
        return f"FSDPStrategy(state_dict_type={self.state_dict_type!r}, world_size={self.world_size})"


@contextmanager
def _torch_item_crc(*, enabled: bool) -> Iterator[None]:
    previous = serialization_config.save.compute_crc32
    serialization_config.save.compute_crc32 = enabled and previous
    try:
        yield
    finally:
        serialization_config.save.compute_crc32 = previous


def _shard_like(full: torch.Tensor, target: DTensor) -> DTensor:
    """This rank's shard of ``full``, placed like ``target``, cut locally (every rank holds ``full``)."""
    full = full.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
