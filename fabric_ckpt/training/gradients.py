"""The training-loop helpers Lightning Fabric users call: gradient clipping.

``Fabric`` delegates to these, so a loop written for Lightning Fabric keeps working when only the import changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["clip_gradients"]


def clip_gradients(
    module: nn.Module,
    optimizer: Optimizer,
    clip_val: float | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = True,
) -> torch.Tensor | None:
    """Clip the gradients of ``optimizer``'s parameters by value or by total norm; returns the norm before clipping.

    Example:
        >>> clip_gradients(model, optimizer, max_norm=1.0)
    """
    if (clip_val is None) == (max_norm is None):
        raise ValueError("pass exactly one of clip_val (clip by value) and max_norm (clip by norm)")
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip_val is not None:
        torch.nn.utils.clip_grad_value_(parameters, clip_val)
        return None
    assert max_norm is not None
    return torch.nn.utils.clip_grad_norm_(
        parameters, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
    )
