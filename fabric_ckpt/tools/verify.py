"""Checking a checkpoint's integrity without loading it into a model.

:func:`verify` asks the checkpoint's format (:mod:`fabric_ckpt.formats.registry`) for every problem, not only the
first: single files are checked record by record against their CRC-32s and our manifest, sharded folders file by
file and chunk by chunk against ``fabric_ckpt.json``. Formats without checksums (safetensors, bare DCP folders,
``torch.save`` files written without CRCs) are checked for structure, and the report says what could not be checked.
"""

from __future__ import annotations

from fabric_ckpt.formats.registry import verify_checkpoint
from fabric_ckpt.formats.reports import VerifyReport
from fabric_ckpt.storage import PathLike

__all__ = ["VerifyReport", "verify"]


def verify(path: PathLike, *, progress: bool | None = None) -> VerifyReport:
    """Check the checkpoint at ``path`` (file, sharded folder, Hugging Face index; local or any fsspec URL).

    Damage is reported, not raised: the report's ``ok`` is ``False`` and ``problems`` names each damaged file or
    record and the checkpoint entry it holds.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        CheckpointError: what is there is not a checkpoint (the message names the path).

    Example:
        >>> report = verify("s3://bucket/run/step-1000")
        >>> if not report.ok:
        ...     print("\\n".join(report.problems))
    """
    return verify_checkpoint(path, progress=progress)
