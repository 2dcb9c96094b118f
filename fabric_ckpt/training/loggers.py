"""Feeding metrics to the loggers given to ``Fabric(loggers=...)``: Lightning's logger objects, or any object with
``log_metrics(metrics, step)``.

Lightning's loggers (``CSVLogger``, ``TensorBoardLogger``, ...) write on global rank 0 only, deciding by the rank
their ``rank_zero_only`` knows; :func:`tell_lightning_the_rank` keeps that in step with Fabric's rank.
Like Lightning's Fabric, ours does not finalise loggers: call ``fabric.logger.finalize("success")`` at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from fabric_ckpt.training.collectives import map_collection

__all__ = ["tell_lightning_the_rank", "to_scalars"]

# Where Lightning (and its standalone ``lightning_fabric``/``pytorch_lightning`` packages) keeps the rank that its
# ``rank_zero_only`` decorators compare against; one shared object.
_LIGHTNING_RANK_MODULE = "lightning_utilities.core.rank_zero"


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with every one-element tensor (also in nested collections) made a Python number.

    Raises:
        ValueError: a tensor holds more than one element; the message names its metric.

    Example:
        >>> to_scalars({"loss": torch.tensor(0.25), "lr": 1e-3})
        {'loss': 0.25, 'lr': 0.001}
    """

    def scalar_of(name: str) -> Any:
        def convert(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r} is a tensor of shape {tuple(value.shape)}; loggers take one number per metric"
                )
            return value.item()

        return convert

    return {name: map_collection(value, scalar_of(name)) for name, value in metrics.items()}


def tell_lightning_the_rank(rank: int) -> None:
    """Set the rank Lightning's ``rank_zero_only`` utilities use, if Lightning has been imported.

    Lightning reads it from the environment at import, which our launcher, ``torchrun`` and SLURM set; this covers
    processes started some other way (e.g. ``torch.multiprocessing.spawn``) once Fabric knows its rank.

    Example:
        >>> tell_lightning_the_rank(fabric.global_rank)  # fabric.launch() does this
    """
    module = sys.modules.get(_LIGHTNING_RANK_MODULE)
    if module is not None:
        module.rank_zero_only.rank = rank
