"""Two-tier checkpoints: a fast local folder, and a durable remote one that uploads reach in the background.

:mod:`~fabric_ckpt.tiers.folder` is one tier's folder (names, ``latest``, retention), :mod:`~fabric_ckpt.tiers.transfer`
copies a committed checkpoint between storages with the target's commit, :mod:`~fabric_ckpt.tiers.uploads` runs the
uploads on a background thread, and :mod:`~fabric_ckpt.tiers.remote` ties them into the remote tier a
:class:`~fabric_ckpt.CheckpointManager` with ``remote_folder=`` uses. See docs/two-tier.md.
"""

from __future__ import annotations

from fabric_ckpt.tiers.folder import CheckpointFolder
from fabric_ckpt.tiers.remote import LOCAL, REMOTE, LocalTier, RemoteTier, check_keep, remote_tier
from fabric_ckpt.tiers.uploads import Upload, UploadQueue

__all__ = [
    "LOCAL",
    "REMOTE",
    "CheckpointFolder",
    "LocalTier",
    "RemoteTier",
    "Upload",
    "UploadQueue",
    "check_keep",
    "remote_tier",
]
