"""Functions the parity tests run on every rank of a WorkerGroup (they must be importable)."""

from __future__ import annotations

import os
from typing import Any

import torch

from fabric_ckpt import UnpicklableStateError
from tests import dist_cases as cases
from tests.sharded_files import tree_bytes


def load_per_rank_path(kind: str, template: str) -> dict[str, Any]:
    """Each rank loads the file its own rank names in ``template`` (``{rank}``), and a raw state dict likewise."""
    fabric = cases.make_fabric(kind)
    loaded = fabric.load(template)
    model = torch.nn.Linear(2, 2)
    fabric.load_raw(template.replace(".ckpt", "-weights.pt"), model)
    return {"rank": fabric.global_rank, "owner": loaded["owner"], "weight": model.weight.detach().clone()}


def save_unpicklable(kind: str, path: str) -> dict[str, Any]:
    """A good save, then one holding a lambda: the second must fail on every rank and change nothing."""
    fabric = cases.make_fabric(kind)
    model, optimizer = cases.build(fabric)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    before = _contents(path) if fabric.is_global_zero else None
    try:
        fabric.save(path, {"model": model, "optimizer": optimizer, "hparams": {"fn": lambda x: x}})
    except UnpicklableStateError as err:
        error = str(err)
    else:
        error = None
    fabric.barrier()
    after = _contents(path) if fabric.is_global_zero else None
    return {"error": error, "unchanged": before == after, "entries": sorted(os.listdir(os.path.dirname(path)))}


def _contents(path: str) -> Any:
    return tree_bytes(path) if os.path.isdir(path) else open(path, "rb").read()
