"""Counts the reliability tests record (kills, corruptions, fuzzed inputs, faults), and their summary table.

The tests call :func:`record`; it appends one JSON line to the file ``$FABRIC_CKPT_FIGURES`` names and does
nothing when the variable is unset (the ordinary test run). ``make reliability`` sets it, then prints the table:

    python -m tests.reliability_figures build/reliability-figures.jsonl
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any

ENV = "FABRIC_CKPT_FIGURES"


def full_campaign() -> bool:
    """Whether this run is the full campaign (``FABRIC_CKPT_CAMPAIGN=full``, as ``make reliability`` sets)."""
    return os.environ.get("FABRIC_CKPT_CAMPAIGN") == "full"


def record(area: str, name: str, **counts: Any) -> None:
    """Append ``counts`` for ``area`` (e.g. ``"crash"``) and ``name`` (e.g. the scenario) to the figures file."""
    path = os.environ.get(ENV)
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = {"area": area, "name": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **counts}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def summarize(path: str) -> str:
    """A plain-text table of everything recorded in ``path``."""
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    out = []
    totals: Counter[str] = Counter()
    for line in lines:
        counts = {k: v for k, v in line.items() if k not in ("area", "name", "time") and v not in ({}, None)}
        out.append(f"{line['area']:10s} {line['name']:28s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for key in ("kills", "lost", "corruptions", "inputs", "faults", "violations"):
            if isinstance(line.get(key), int):
                totals[key] += line[key]
    out.append("total: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
