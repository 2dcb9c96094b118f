"""The figures people compare checkpointing libraries by, drawn from a results file (matplotlib, the bench extra).

- ``save.png``: seconds per GiB to save, durably, for every library and the disk's own write (lower is better);
- ``load.png``: seconds per GiB to load, cold and warm, for every library and the disk's own read;
- ``async.png``: asynchronous saves split into the time the caller is blocked and the rest until durable, next to
  one memory copy of the state and fabric_ckpt's synchronous save.

``python -m benchmarks.figures bench-results.json docs/images`` redraws them from an earlier run.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from benchmarks.scenarios import HEADLINE_LIBRARIES

__all__ = ["draw"]

GIB = 1 << 30
Row = dict[str, Any]
_NAMES = {
    "disk": "disk (limit)",
    "torch": "torch.save / torch.load",
    "torch_mmap": "torch.load(mmap) + copy",
    "lightning": "Lightning Fabric",
    "torch_checkpointing": "torch_checkpointing",
    "fabric_ckpt": "fabric_ckpt",
    "dcp": "DCP (FSDP2, 2 ranks)",
    "fabric_ckpt_fsdp": "fabric_ckpt FSDP2 (2 ranks)",
}


def _seconds_per_gib(row: Row | None) -> float | None:
    if row is None or row["error"] or not row["seconds"]:
        return None
    return float(row["seconds"]["median"]) / (row["bytes"] / GIB)


def _row(rows: list[Row], group: str, library: str, op: str, cache: str = "") -> Row | None:
    for row in rows:
        if (row["group"], row["library"], row["op"], row["requested_cache"]) == (group, library, op, cache):
            return row
    return None


def draw(results: dict[str, Any], folder: str) -> list[str]:
    """Draw the figures of ``results`` into ``folder``; returns the files written.

    Example:
        >>> draw(json.load(open("bench-results.json")), "docs/images")
        ['docs/images/save.png', 'docs/images/load.png', 'docs/images/async.png']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    rows: list[Row] = results["rows"]
    title = f"{results['run']['size_gib']:g} GiB checkpoint, {results['created']}"
    written = []

    libraries = [lib for lib in HEADLINE_LIBRARIES if _row(rows, "headline", lib, "save") is not None]
    saves = [(_NAMES[lib], _seconds_per_gib(_row(rows, "headline", lib, "save"))) for lib in libraries]
    saves = [(name, value) for name, value in saves if value is not None]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.barh([name for name, _ in saves], [value for _, value in saves], color="tab:blue")
    axis.set_xlabel("seconds per GiB, until durable (lower is better)")
    axis.set_title(f"Save: {title}")
    axis.invert_yaxis()
    figure.tight_layout()
    written.append(_save(figure, folder, "save.png"))
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4.5))
    names = [_NAMES[lib] for lib in libraries]
    for offset, cache, color in ((-0.2, "cold", "tab:blue"), (0.2, "warm", "tab:orange")):
        values = [_seconds_per_gib(_row(rows, "headline", lib, "load", cache)) or 0.0 for lib in libraries]
        axis.barh([i + offset for i in range(len(names))], values, height=0.4, label=cache, color=color)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("seconds per GiB (lower is better)")
    axis.set_title(f"Load: {title}")
    axis.invert_yaxis()
    axis.legend()
    figure.tight_layout()
    written.append(_save(figure, folder, "load.png"))
    plt.close(figure)

    pairs = [
        ("fabric_ckpt eager", "fabric_ckpt_async", "fabric_ckpt_async_total"),
        ("fabric_ckpt lazy", "fabric_ckpt_lazy", "fabric_ckpt_lazy_total"),
        ("torch_checkpointing", "torch_checkpointing_async", "torch_checkpointing_async_total"),
    ]
    labels, blocked, rest = [], [], []
    for label, blocked_key, total_key in pairs:
        held, total = _row(rows, "async", blocked_key, "save"), _row(rows, "async", total_key, "save")
        if held is None or total is None or held["error"] or total["error"]:
            continue
        labels.append(label)
        blocked.append(held["seconds"]["median"])
        rest.append(max(0.0, total["seconds"]["median"] - held["seconds"]["median"]))
    references = [
        ("one memory copy", _row(rows, "async", "memcpy", "save")),
        ("fabric_ckpt sync save", _row(rows, "headline", "fabric_ckpt", "save")),
    ]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.barh(labels, blocked, color="tab:red", label="caller blocked")
    axis.barh(labels, rest, left=blocked, color="tab:gray", label="in the background, until durable")
    for label, row in references:
        if row is not None and not row["error"] and row["seconds"]:
            axis.barh([label], [row["seconds"]["median"]], color="tab:blue")
    axis.set_xlabel("seconds")
    axis.set_title(f"Asynchronous saves: {title}")
    axis.invert_yaxis()
    axis.legend(loc="lower right")
    figure.tight_layout()
    written.append(_save(figure, folder, "async.png"))
    plt.close(figure)
    return written


def _save(figure: Any, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    """Redraw the figures of a results file: ``python -m benchmarks.figures RESULTS FOLDER``."""
    args = sys.argv[1:] if argv is None else argv
    with open(args[0] if args else "bench-results.json") as f:
        results = json.load(f)
    for path in draw(results, args[1] if len(args) > 1 else "docs/images"):
        print(path)


if __name__ == "__main__":
    main()
