"""Imported once by the runner's forkserver, so that every forked worker starts with the libraries loaded.

``gc.freeze()`` moves everything imported so far out of the collector's reach: a worker's ``gc.collect()`` then
takes milliseconds instead of ~0.2 s, and does not copy the server's pages by touching every object.
"""

import gc
import importlib
from contextlib import suppress

import benchmarks.worker  # noqa: F401  (torch and the adapters)

# A peer that fails to import here fails its own rows, with the import error, when they run.
for _optional in ("fabric_ckpt", "lightning.fabric", "torch.distributed.checkpoint", "torch.distributed.fsdp"):
    with suppress(ImportError):
        importlib.import_module(_optional)

gc.freeze()
