"""Other tools' checkpoint layouts as fabric_ckpt checkpoint dicts: Lightning Trainer, Composer, plain state dicts.

Readers recognise a foreign checkpoint by its structure (never by its file name) and map it onto our layout:
entries ``model``, ``optimizer``, ``scheduler``, ``timestamp`` and ``rng`` beside everything else the tool saved.
:func:`adapt` then gives those entries the names of the objects a ``fabric.load`` asks for, when that mapping is
unambiguous (one module, one optimizer, ...). Everything here is pure: the files are read by the formats.

Lightning Fabric checkpoints are plain dicts and bare DCP folders are read by ``open_checkpoint``; they need nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.rng import RNGState
from fabric_ckpt.core.timestamp import TIMESTAMP_FIELDS, Timestamp

__all__ = [
    "COMPOSER",
    "LIGHTNING_TRAINER",
    "STATE_DICT",
    "adapt",
    "adapt_raw",
    "detect",
    "to_composer",
    "to_fabric",
]

LIGHTNING_TRAINER = "lightning-trainer"
COMPOSER = "composer"
STATE_DICT = "state-dict"
_TRAINER_MARKERS = ("pytorch-lightning_version", "optimizer_states", "global_step", "loops")


# ---------------------------------------------------------------------------------------------- checkpoint dicts
def detect(checkpoint: Any) -> str | None:
    """Which tool wrote ``checkpoint``: :data:`LIGHTNING_TRAINER`, :data:`COMPOSER`, :data:`STATE_DICT` or ``None``.

    Example:
        >>> detect(torch.load("lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True))
        'lightning-trainer'
    """
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        return None
    if isinstance(checkpoint.get("state_dict"), Mapping) and any(key in checkpoint for key in _TRAINER_MARKERS):
        return LIGHTNING_TRAINER
    state = checkpoint.get("state")
    if (
        isinstance(state, Mapping)
        and set(checkpoint) <= {"state", "rng"}
        and ("model" in state or "timestamp" in state)
    ):
        return COMPOSER
    if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return STATE_DICT
    return None


def to_fabric(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A foreign checkpoint in our layout: ``model``, ``optimizer``, ``scheduler``, ``timestamp``, ``rng``, the rest.

    Several optimizers or schedulers become ``optimizer_0``, ``optimizer_1``, ... A checkpoint that is already ours
    (or unknown) is returned as a shallow copy.

    Example:
        >>> to_fabric({"state": {"model": {"w": w}, "timestamp": ...}, "rng": [...]})["model"]
        {'w': ...}
    """
    source = detect(checkpoint)
    if source == LIGHTNING_TRAINER:
        return _from_trainer(checkpoint)
    if source == COMPOSER:
        return _from_composer(checkpoint)
    if source == STATE_DICT:
        return {"model": dict(checkpoint)}
    return dict(checkpoint)


def _numbered(name: str, values: list[Any]) -> dict[str, Any]:
    if len(values) == 1:
        return {name: values[0]}
    return {f"{name}_{index}": value for index, value in enumerate(values)}


def _from_trainer(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    converted: dict[str, Any] = {"model": checkpoint["state_dict"]}
    converted.update(_numbered("optimizer", list(checkpoint.get("optimizer_states") or [])))
    converted.update(_numbered("scheduler", list(checkpoint.get("lr_schedulers") or [])))
    for key, value in checkpoint.items():
        if key not in ("state_dict", "optimizer_states", "lr_schedulers"):
            converted.setdefault(key, value)
    return converted


def _from_composer(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    state = checkpoint["state"]
    converted: dict[str, Any] = {}
    model = state.get("model")
    # ComposerClassifier keeps the network at ``.module``, so every key (and optimizer FQN) starts with "module.".
    prefix = "module." if isinstance(model, Mapping) and model and all(k.startswith("module.") for k in model) else ""
    if model is not None:
        converted["model"] = {key[len(prefix) :]: value for key, value in model.items()} if prefix else model
    optimizers = state.get("optimizers") or {}  # {class name: state dict}, FQN-keyed (DCP's get_optimizer_state_dict)
    converted.update(_numbered("optimizer", [_strip_fqn_prefix(s, prefix) for s in _values(optimizers)]))
    converted.update(_numbered("scheduler", _values(state.get("schedulers") or {})))
    if "timestamp" in state:
        converted["timestamp"] = _composer_timestamp(state["timestamp"])
    for key, value in state.items():
        if key not in ("model", "optimizers", "schedulers", "timestamp"):
            converted.setdefault(key, _plain_strings(value))
    if "rng" in checkpoint:
        converted["rng"] = _composer_rng(checkpoint["rng"])
    return converted


def _plain_strings(value: Any) -> Any:
    """``str`` subclasses (Composer's metadata holds ``torch.__version__``, a ``TorchVersion``) as plain ``str``.

    A converted checkpoint then loads under ``weights_only=True``, which refuses the subclasses' globals.
    """
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_strings(item) for item in value]
    return value


def _values(serialized: Any) -> list[Any]:
    """Composer stores optimizers and schedulers as ``{class name: state dict}``."""
    return list(serialized.values()) if isinstance(serialized, Mapping) else list(serialized)


def _strip_fqn_prefix(optimizer_state: Any, prefix: str) -> Any:
    if not prefix or not isinstance(optimizer_state, Mapping) or "param_groups" not in optimizer_state:
        return optimizer_state

    def strip(name: Any) -> Any:
        return name[len(prefix) :] if isinstance(name, str) and name.startswith(prefix) else name

    return {
        **optimizer_state,
        "state": {strip(k): v for k, v in (optimizer_state.get("state") or {}).items()},
        "param_groups": [
            {**group, "params": [strip(p) for p in group.get("params", [])]}
            for group in optimizer_state["param_groups"]
        ],
    }


def _composer_timestamp(serialized: Any) -> Any:
    """Composer's ``{"Timestamp": {...}}`` (``timedelta`` clocks) as our :class:`Timestamp` state; else unchanged."""
    inner = serialized.get("Timestamp", serialized) if isinstance(serialized, Mapping) else serialized
    counters = [name for name in TIMESTAMP_FIELDS if not name.endswith("_wct")]
    if not isinstance(inner, Mapping) or not all(name in inner for name in counters):
        return serialized
    try:  # wall-clock fields are optional, as in Composer's own loader (files converted by us leave them out)
        return {
            name: float(_seconds(inner.get(name, 0.0))) if name.endswith("_wct") else int(inner[name])
            for name in TIMESTAMP_FIELDS
        }
    except (TypeError, ValueError):
        return serialized


def _seconds(value: Any) -> float:
    return float(value.total_seconds()) if hasattr(value, "total_seconds") else float(value)


def _composer_rng(serialized: Any) -> Any:
    """Composer's per-rank list of ``{python, numpy, torch, cuda}`` as our :class:`RNGState` state; else unchanged."""
    if not isinstance(serialized, list) or not all(isinstance(rank, Mapping) for rank in serialized):
        return serialized
    try:
        return {"per_rank": [_composer_rank_rng(rank) for rank in serialized]}
    except (TypeError, ValueError, AttributeError):
        return serialized


def _composer_rank_rng(rank: Mapping[str, Any]) -> dict[str, Any]:
    converted: dict[str, Any] = {}
    if "python" in rank:
        version, words, gauss_next = rank["python"]
        converted["python"] = {"version": int(version), "state": [int(w) for w in words], "gauss_next": gauss_next}
    if "numpy" in rank:
        bit_generator, keys, pos, has_gauss, cached_gaussian = rank["numpy"]
        converted["numpy"] = {
            "bit_generator": str(bit_generator),
            # A tensor of the key words loads under weights_only=True; a numpy array would not.
            "keys": torch.as_tensor(keys.astype("int64")) if hasattr(keys, "astype") else torch.as_tensor(keys),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    if isinstance(rank.get("torch"), torch.Tensor):
        converted["torch"] = rank["torch"]
    if isinstance(rank.get("cuda"), torch.Tensor):
        converted["cuda"] = [rank["cuda"]]
    return converted


def _kind(obj: Any) -> str | None:
    """The conventional entry name for an object of a ``fabric.load`` state."""
    if isinstance(obj, nn.Module):
        return "model"
    if isinstance(obj, Optimizer):
        return "optimizer"
    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        return "scheduler"
    if isinstance(obj, Timestamp):
        return "timestamp"
    if isinstance(obj, RNGState):
        return "rng"
    return None


def adapt(checkpoint: dict[str, Any], requested: Mapping[str, Any], *, native: bool = False) -> dict[str, Any]:
    """Map a foreign checkpoint onto the entries a ``fabric.load`` state asks for, where that is unambiguous.

    Only when some requested key is missing from ``checkpoint``: a Lightning Trainer or Composer checkpoint is put
    in our layout (:func:`to_fabric`), and the single module (optimizer, scheduler, ``Timestamp``, ``RNGState``) of
    the request takes the ``model`` (``optimizer``, ...) entry under its own key. A plain state dict (e.g. a
    safetensors file) becomes the entry of the request's single module when none of the requested keys is in it.
    Anything else is returned unchanged, so the usual strict-key errors apply.

    A ``native`` checkpoint (one of ours: its file carries our marker) is never taken for another tool's layout,
    whatever its entries are called (``state_dict``, ``global_step``, ``state``).

    Also, in any checkpoint: an optimizer entry whose parameters are indices but whose ``state`` keys are their
    strings (how DCP stores an index-keyed optimizer state) gets its integer keys back.

    Example:
        >>> adapt(trainer_checkpoint, {"net": model, "opt": optimizer})["net"] is trainer_checkpoint["state_dict"]
        True
    """
    checkpoint = _integer_optimizer_keys(checkpoint, requested)
    if all(key in checkpoint for key in requested):
        return checkpoint
    source = detect(checkpoint)
    if native and source in (LIGHTNING_TRAINER, COMPOSER):
        return checkpoint
    if source is None or (source == STATE_DICT and any(key in checkpoint for key in requested)):
        return checkpoint
    converted = to_fabric(checkpoint)
    for kind in ("model", "optimizer", "scheduler", "timestamp", "rng"):
        wanting = [key for key, obj in requested.items() if _kind(obj) == kind and key not in converted]
        if len(wanting) == 1 and kind in converted and kind not in requested:
            converted[wanting[0]] = converted.pop(kind)
    return converted


def _integer_optimizer_keys(checkpoint: dict[str, Any], requested: Mapping[str, Any]) -> dict[str, Any]:
    """Give back integer ``state`` keys to index-keyed optimizer entries that DCP stored with string keys.

    Without this, ``Optimizer.load_state_dict`` would keep the state under the strings, detached from parameters.
    """
    repaired = checkpoint
    for key, obj in requested.items():
        entry = checkpoint.get(key)
        if not isinstance(obj, Optimizer) or not isinstance(entry, Mapping) or not isinstance(entry.get("state"), dict):
            continue
        params = [p for group in entry.get("param_groups") or [] for p in group.get("params", [])]
        keys = list(entry["state"])
        if params and all(isinstance(p, int) for p in params) and keys and all(_is_digits(k) for k in keys):
            if repaired is checkpoint:
                repaired = dict(checkpoint)
            repaired[key] = {**entry, "state": {int(k): v for k, v in entry["state"].items()}}
    return repaired


def _is_digits(key: Any) -> bool:
    return isinstance(key, str) and key.isdigit()


def adapt_raw(loaded: Any, target: nn.Module | Optimizer, *, native: bool = False) -> Any:
    """What ``fabric.load_raw`` should load into ``target`` from a Trainer or Composer checkpoint; else ``loaded``.

    A ``native`` checkpoint (one of ours) is returned as it is.

    Example:
        >>> adapt_raw(trainer_checkpoint, model) is trainer_checkpoint["state_dict"]
        True
    """
    if native or detect(loaded) not in (LIGHTNING_TRAINER, COMPOSER):
        return loaded
    converted = to_fabric(loaded)
    name = "model" if isinstance(target, nn.Module) else "optimizer"
    return converted.get(name, loaded)


# ---------------------------------------------------------------------------------------------- to Composer's layout
def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("state"), Mapping) and "param_groups" in value


def _is_scheduler_state(value: Any) -> bool:
    return isinstance(value, Mapping) and "last_epoch" in value and "base_lrs" in value


def _is_module_state(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(hasattr(v, "shape") for v in value.values())


def to_composer(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint in our layout as Composer writes its files: ``{"state": {...}, "rng": [...]}``.

    ``state["model"]`` is the module's state dict (the ``model`` entry, or the checkpoint's single module state
    dict); optimizers and schedulers go to ``state["optimizers"]``/``state["schedulers"]`` keyed by their entry
    names (Composer keys them by class name, which a state dict does not record); a ``Timestamp`` entry becomes
    Composer's counters (wall-clock fields left out: Composer stores them as ``timedelta``, which
    ``torch.load(weights_only=True)`` refuses); an ``RNGState`` entry becomes Composer's per-rank ``rng`` list.
    Everything else stays in ``state`` under its name. The result loads with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: the checkpoint is not a dict, or no module state dict can be told apart for ``model``.

    Example:
        >>> torch.save(to_composer({"model": model.state_dict(), "step": 3}), "composer.pt")
        >>> torch.load("composer.pt")["state"]["model"]["fc.weight"].shape
        torch.Size([2, 4])
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Composer's layout holds a dict of entries, not a {type(checkpoint).__name__}")
    model_key = "model" if _is_module_state(checkpoint.get("model")) else None
    if model_key is None:
        modules = [key for key, value in checkpoint.items() if _is_module_state(value)]
        if len(modules) != 1:
            raise ValueError(
                f"Composer's layout has one 'model'; the checkpoint has {len(modules)} module state dicts {modules}"
            )
        model_key = modules[0]
    state: dict[str, Any] = {"model": checkpoint[model_key]}
    optimizers: dict[str, Any] = {}
    schedulers: dict[str, Any] = {}
    rng: list[Any] = []
    for key, value in checkpoint.items():
        if key == model_key:
            continue
        if _is_optimizer_state(value):
            optimizers[str(key)] = value
        elif _is_scheduler_state(value):
            schedulers[str(key)] = value
        elif key == "timestamp" and isinstance(value, Mapping) and all(f in value for f in TIMESTAMP_FIELDS):
            state["timestamp"] = {name: int(value[name]) for name in TIMESTAMP_FIELDS if not name.endswith("_wct")}
        elif key == "rng" and isinstance(value, Mapping):
            rng = [_composer_rank_of(rank) for rank in value.get("per_rank", [value])]
        else:
            state[str(key)] = value
    if optimizers:
        state["optimizers"] = optimizers
    if schedulers:
        state["schedulers"] = schedulers
    return {"state": state, "rng": rng}


def _composer_rank_of(rank: Mapping[str, Any]) -> dict[str, Any]:
    """One rank of our :class:`RNGState` state as Composer's ``{python, numpy, torch, cuda}`` (plain types only)."""
    converted: dict[str, Any] = {}
    python = rank.get("python")
    if isinstance(python, Mapping):
        converted["python"] = (int(python["version"]), tuple(int(w) for w in python["state"]), python["gauss_next"])
    numpy_state = rank.get("numpy")
    if isinstance(numpy_state, Mapping):
        keys = numpy_state["keys"]
        converted["numpy"] = (
            str(numpy_state["bit_generator"]),
            [int(word) for word in (keys.tolist() if hasattr(keys, "tolist") else keys)],
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    if isinstance(rank.get("torch"), torch.Tensor):
        converted["torch"] = rank["torch"]
    cuda = rank.get("cuda")
    if isinstance(cuda, list) and cuda and isinstance(cuda[0], torch.Tensor):
        converted["cuda"] = cuda[0]
    return converted
