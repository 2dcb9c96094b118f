"""Loading a sharded checkpoint into FSDP2 modules and optimizers: every rank reads its own shards, in place.

The checks of the folder run while the load is planned (:class:`VerificationGate`); modules' shards are read
together with the first sharded optimizer's in one ``dcp.load``; an optimizer saved without FSDP (index-keyed) is
read in full and cut into shards. Nothing changes on any rank unless every rank's checks passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from fabric_ckpt.core.restore import prepare_restore
from fabric_ckpt.core.state import apply_ignore_keys, is_fqn_keyed, optimizer_state_to_index
from fabric_ckpt.core.wrappers import unwrap_module, unwrap_optimizer
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError
from fabric_ckpt.formats import dcp as dcp_format
from fabric_ckpt.formats import sharded
from fabric_ckpt.formats.interop import adapt
from fabric_ckpt.storage import Location
from fabric_ckpt.strategies.base import LoadOptions
from fabric_ckpt.strategies.parallel import ParallelStrategy
from fabric_ckpt.strategies.verification_gate import VerificationGate

__all__ = ["ShardedLoading", "reshard"]


class ShardedLoading(ParallelStrategy):
    """The sharded-folder load of :class:`~fabric_ckpt.strategies.fsdp.FSDPStrategy` (which supplies ``_owner``).

    Example:
        >>> strategy = FSDPStrategy(accelerator="cpu", num_processes=2)  # a ShardedLoading
        >>> strategy.load_checkpoint("sharded.ckpt", {"model": model, "optimizer": optimizer})
    """

    def _owner(self, optimizer: Optimizer, objects: Mapping[str, Any] | None = None) -> nn.Module:
        """The module whose parameters ``optimizer`` updates (the strategy knows how they were set up)."""
        raise NotImplementedError

    def _load_sharded(self, location: Location, state: dict[str, Any] | None, options: LoadOptions) -> dict[str, Any]:
        """Every rank reads the generation rank 0 resolved; if a save replaced it meanwhile, all start over."""
        description = f"Loading '{location.original}'"
        for attempt in range(sharded.READ_ATTEMPTS):
            generation = self.broadcast(self.agree(lambda: self._live_generation(location), description))
            try:
                return self._load_generation(location, generation, state, options)
            except (CheckpointError, OSError):
                live = self.broadcast(self.agree(lambda: self._live_generation(location), description))
                if attempt == sharded.READ_ATTEMPTS - 1 or live == generation:
                    raise
        raise AssertionError("unreachable")

    def _live_generation(self, location: Location) -> str | None:
        if not self.is_global_zero:
            return None
        return (sharded.read_manifest(location) or {}).get("generation")

    def _load_generation(
        self, location: Location, generation: str | None, state: dict[str, Any] | None, options: LoadOptions
    ) -> dict[str, Any]:
        description = f"Loading '{location.original}'"
        folder = self.agree(
            lambda: sharded.open_folder(location, generation, weights_only=options.weights_only), description
        )
        share = (self.global_rank, self.world_size)

        def verify() -> None:
            sharded.verify_folder(folder, checksums=options.verify, share=share)

        if not state:
            self.agree(verify, description)
            checkpoint = self.agree(
                lambda: dcp_format.load_full(folder, weights_only=options.weights_only), description
            )
            if options.on_load is not None:
                options.on_load(checkpoint)
            apply_ignore_keys(checkpoint, options.ignore_keys)
            return checkpoint
        # The checks run while the load is planned (ours, then DCP's); they are agreed before anything changes.
        gate = VerificationGate(verify, self.agree, description)
        try:
            return self._load_into(folder, state, options, description, gate)
        except Exception:  # (raised on every rank: each step is agreed)
            gate.explain()  # a failure before the gate opened: damage, where the checks found any, is the reason
            raise
        finally:
            gate.close()

    def _load_into(
        self,
        folder: dcp_format.ShardedFolder,
        state: dict[str, Any],
        options: LoadOptions,
        description: str,
        gate: VerificationGate,
    ) -> dict[str, Any]:
        heavy = {
            key
            for key, obj in state.items()
            if key in folder.top_level_keys
            and (isinstance(obj, nn.Module) or (isinstance(obj, Optimizer) and not options.load_weights_only))
        }
        light = set(folder.top_level_keys) - heavy

        def read_view() -> dict[str, Any]:
            view = dcp_format.load_full(folder, light, weights_only=options.weights_only)
            view.update(dcp_format.load_full(folder, heavy, weights_only=options.weights_only, tensors="meta"))
            return {key: view[key] for key in folder.top_level_keys if key in view}

        view = self.agree(read_view, description)
        # An optimizer saved without FSDP (index-keyed, e.g. a bare DCP folder) cannot be loaded in place by name:
        # it is read in full and cut into shards like a single-file checkpoint.
        by_index = {key for key in heavy if isinstance(state[key], Optimizer) and not is_fqn_keyed(view.get(key))}
        if by_index:
            view.update(
                self.agree(
                    lambda: dcp_format.load_full(folder, by_index, weights_only=options.weights_only), description
                )
            )
        if options.on_load is not None:
            gate.verified()  # the hooks may act on what they see: only on checked data
            options.on_load(view)
        apply_ignore_keys(view, options.ignore_keys)
        view = adapt(view, state, native=folder.manifest is not None)
        # The modules' shards are read together with the first optimizer's, in one dcp.load: each call costs a
        # planning round of collectives on every rank. What no optimizer took along is read after the optimizers.
        pending: dict[str, Any] = {}
        sharded_loader = self._sharded_optimizer_loader(folder, state, options, pending, gate)

        def load_optimizer(optimizer: Optimizer, entry: Mapping[str, Any]) -> None:
            if _key_of(optimizer, state) in by_index:
                gate.open()
                self.load_optimizer_state_dict(optimizer, entry)
            else:
                sharded_loader(optimizer, entry)

        def prepare() -> Any:
            for key, obj in state.items():
                if isinstance(obj, Optimizer) and key in view and is_fqn_keyed(view[key]):
                    view[key] = optimizer_state_to_index(
                        view[key], obj, self._owner(obj, state), label=f"Checkpoint entry '{key}'"
                    )
            return prepare_restore(
                state,
                view,
                strict=options.strict,
                load_weights_only=options.load_weights_only,
                load_module=self._sharded_module_loader(state, pending),
                load_optimizer=load_optimizer,
                meta_placeholders=True,  # the view's module and optimizer tensors are read in place later
            )

        plan = self.agree(prepare, description)
        # Stateful objects are restored once the checks are agreed: inside the first dcp.load, after DCP planned it
        # and before it copies anything (or here, where nothing is read by DCP).
        gate.then(plan.apply_stateful)
        self.agree(plan.apply_modules, description)  # (registers the modules' targets; nothing is read yet)
        self.agree(plan.apply_optimizers, description)
        if pending:  # the same on every rank: it follows from the state's structure alone
            self.agree(lambda: self._dcp_load(folder, pending, options, gate), description)
        gate.open()
        return self.agree(plan.finish, description)

    def _sharded_module_loader(
        self, state: dict[str, Any], pending: dict[str, Any]
    ) -> Callable[[nn.Module, Mapping[str, Any], bool], None]:
        def load(module: nn.Module, view: Mapping[str, Any], strict: bool) -> None:
            key = _key_of(module, state)
            reshard(module)
            live = module.state_dict()
            targets = {name: live[name] for name in view if name in live and isinstance(live[name], torch.Tensor)}
            pending[key] = targets  # read with the next optimizer's shards (or after the optimizers)

        return load

    def _sharded_optimizer_loader(
        self,
        folder: dcp_format.ShardedFolder,
        state: dict[str, Any],
        options: LoadOptions,
        pending: dict[str, Any],
        gate: VerificationGate,
    ) -> Callable[[Optimizer, Mapping[str, Any]], None]:
        def load(optimizer: Optimizer, view: Mapping[str, Any]) -> None:
            key = _key_of(optimizer, state)
            owner = self._owner(optimizer, state)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            names = {id(p): name for name, p in owner.named_parameters(remove_duplicate=False)}
            targets: dict[int, dict[str, Any]] = {}
            for index, param_state in view.get("state", {}).items():
                param = params[index]
                existing = optimizer.state.get(param, {})
                targets[index] = {
                    name: _target_for(value, existing.get(name), param) if isinstance(value, torch.Tensor) else value
                    for name, value in param_state.items()
                }
            by_name = {
                names[id(params[index])]: {n: t for n, t in s.items() if isinstance(t, torch.Tensor)}
                for index, s in targets.items()
            }
            targets_by_key = {**pending, key: {"state": by_name}}
            pending.clear()
            self._dcp_load(folder, targets_by_key, options, gate)
            optimizer.load_state_dict({"state": targets, "param_groups": view["param_groups"]})

        return load

    def _dcp_load(
        self,
        folder: dcp_format.ShardedFolder,
        targets: dict[str, Any],
        options: LoadOptions,
        gate: VerificationGate,
    ) -> None:
        planner = dcp_format.SafeLoadPlanner(weights_only=options.weights_only, display=folder.location.original)
        reader = dcp_format.reader_for(folder.data, folder.metadata, before_reading=gate.open)
        try:
            dcp.load(targets, storage_reader=reader, planner=planner)
        except CheckpointException as err:
            if gate.failure is not None:  # the checks (or a stateful object) failed inside read_data: that error
                raise gate.failure from None
            # Past the gate the checks had passed and copying had begun: the error says what that leaves behind.
            consequence = PARTLY_LOADED if gate.opened else ""
            description = f"Loading '{folder.location.original}' while reading the shards"
            raise dcp_format.translate_dcp_error(err, description, consequence) from err


PARTLY_LOADED = (
    "; the model, optimizer and stateful objects may be partly loaded: load an intact checkpoint before training on"
)


def _key_of(obj: Any, state: Mapping[str, Any]) -> str:
    for key, value in state.items():
        candidate = unwrap_module(value) if isinstance(value, nn.Module) else value
        candidate = unwrap_optimizer(candidate) if isinstance(candidate, Optimizer) else candidate
        if candidate is obj:
            return key
    raise CheckpointMismatchError("internal error: the object being restored is not in the state")


def reshard(module: nn.Module) -> None:
    """Put every FSDP unit back in its sharded form, so state dicts hold the sharded parameters."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _target_for(view: torch.Tensor, existing: Any, param: torch.Tensor) -> torch.Tensor:
    """Where DCP loads an optimizer state tensor: the optimizer's own tensor if it fits, else a fresh one."""
    if isinstance(existing, torch.Tensor) and existing.shape == view.shape and existing.dtype == view.dtype:
        return existing
    if isinstance(param, DTensor) and view.shape == param.shape:
        return torch.empty_like(param, dtype=view.dtype)
    return torch.empty(view.shape, dtype=view.dtype, device=param.device if view.dim() else "cpu")
