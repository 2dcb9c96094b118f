"""Turning measured rows (their JSON form) into ratios and a Markdown report.

Everything here reads the JSON written by a run, so a report can be re-rendered from a file:
``python -m benchmarks.report bench-results.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["markdown", "ratios", "sweep"]

MIB = 1 << 20
GIB = 1 << 30
Row = dict[str, Any]


@dataclass(frozen=True)
class _Target:
    name: str
    unit: str
    goal: str
    meets: Callable[[float], bool]


def _find(rows: list[Row], group: str, library: str, op: str, cache: str = "") -> Row | None:
    for row in rows:
        if (row["group"], row["library"], row["op"], row["requested_cache"]) == (group, library, op, cache):
            return row if row["seconds"] and not row["error"] else None
    return None


def _median(row: Row | None, metric: str = "seconds") -> float | None:
    return None if row is None or row[metric] is None else float(row[metric]["median"])


def _speedup(peer: Row | None, ours: Row | None) -> float | None:
    """How many times faster ours is: the peer's time over ours (same bytes, so also the bandwidth ratio)."""
    theirs, mine = _median(peer), _median(ours)
    return None if theirs is None or mine is None else theirs / mine


def sweep(rows: list[Row], library: str = "fabric_ckpt") -> list[dict[str, Any]]:
    """Seconds per GiB of ``library``'s save and load at every size measured (sweep rows plus the headline)."""
    points: dict[int, dict[str, Any]] = {}
    # The sweep's loads are cold when the run measured cold loads at all (as the plan does), else warm.
    cold = any(r["library"] == library and r["op"] == "load" and r["requested_cache"] == "cold" for r in rows)
    load_cache = "cold" if cold else "warm"
    for row in rows:
        if row["library"] != library or row["group"] not in ("sweep", "headline") or row["error"]:
            continue
        if row["op"] == "load" and row["requested_cache"] != load_cache:
            continue
        point = points.setdefault(row["bytes"], {"gib": row["bytes"] / GIB, "cache": row["cache"]})
        if row["op"] == "load":
            point["cache"] = row["cache"]
        point[f"{row['op']}_s_per_gib"] = row["seconds"]["median"] / (row["bytes"] / GIB)
    return [points[size] for size in sorted(points)]


def _flatness(points: list[dict[str, Any]], op: str) -> float | None:
    values = [p[f"{op}_s_per_gib"] for p in points if f"{op}_s_per_gib" in p]
    return max(values) / min(values) - 1 if len(values) >= 2 else None


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """The figures fabric_ckpt is optimised towards, each with its target and whether this run meets it."""

    def headline(library: str, op: str, cache: str = "") -> Row | None:
        return _find(rows, "headline", library, op, cache)

    def small(library: str, op: str) -> Row | None:
        return _find(rows, "small tensors", library, op, "warm" if op == "load" else "")

    ours_save = headline("fabric_ckpt", "save")
    ours_cold = headline("fabric_ckpt", "load", "cold")
    ours_warm = headline("fabric_ckpt", "load", "warm")
    warm_seconds = _median(ours_warm)
    warm_gbps = None if ours_warm is None or warm_seconds is None else ours_warm["bytes"] / 1e9 / warm_seconds
    save_extra = _median(ours_save, "extra_anon_bytes")
    load_extra = [
        100 * extra / row["bytes"]
        for row in (ours_cold, ours_warm)
        if row is not None and (extra := _median(row, "extra_anon_bytes")) is not None
    ]

    def remote(library: str, op: str) -> Row | None:
        return _find(rows, "object store", library, op)

    remote_extra = [
        extra / (64 * MIB)
        for op in ("save", "load")
        if (extra := _median(remote("fabric_ckpt", op), "extra_anon_bytes")) is not None
    ]

    def group(name: str, library: str) -> Row | None:
        return _find(rows, name, library, "save")

    memcpy = group("async", "memcpy")
    ideal_warm = headline("torch_mmap", "load", "warm")
    disk_cold = headline("disk", "load", "cold")
    # What an all-or-nothing load can reach: every byte read once (checked), then copied once into the model.
    limit_seconds = (
        None if _median(disk_cold) is None or _median(memcpy) is None else _median(disk_cold) + _median(memcpy)
    )
    plain = group("training", "train_plain")
    points = sweep(rows)
    values: list[tuple[_Target, float | None, Row | None]] = [
        (
            _at_least("fabric_ckpt save vs disk write bandwidth", 0.9),
            _speedup(headline("disk", "save"), ours_save),
            None,
        ),
        (
            _at_least("fabric_ckpt save speed vs torch.save + fsync (never slower)", 1),
            _speedup(headline("torch", "save"), ours_save),
            None,
        ),
        (
            _at_least("fabric_ckpt cold load vs disk cold read bandwidth", 0.85),
            _speedup(disk_cold, ours_cold),
            ours_cold,
        ),
        (
            _at_least("fabric_ckpt cold load vs the all-or-nothing limit (disk cold read + one memory copy)", 0.85),
            None if limit_seconds is None or _median(ours_cold) is None else limit_seconds / _median(ours_cold),
            ours_cold,
        ),
        (
            _at_most("fabric_ckpt warm load time vs the ideal in-place load (torch.load mmap + copy)", 1.1, "x"),
            _fraction(ours_warm, ideal_warm),
            None,
        ),
        (_info("fabric_ckpt warm load bandwidth", "GB/s"), warm_gbps, None),
        (
            _at_most("fabric_ckpt extra RssAnon during save", 64, "MiB"),
            None if save_extra is None else save_extra / MIB,
            None,
        ),
        (_at_most("fabric_ckpt extra RssAnon during load", 5, "% of checkpoint"), max(load_extra, default=None), None),
        (
            _at_least("20k small tensors: save speed-up vs torch.save", 1),
            _speedup(small("torch", "save"), small("fabric_ckpt", "save")),
            None,
        ),
        (
            _at_least("20k small tensors: load speed-up vs torch.load", 1),
            _speedup(small("torch", "load"), small("fabric_ckpt", "load")),
            None,
        ),
        (
            _at_most("async save (eager): caller blocked vs one memory copy of the state", 1.2, "x"),
            _fraction(group("async", "fabric_ckpt_async"), memcpy),
            None,
        ),
        (
            _at_most("async save (eager): until complete vs the synchronous save", 1.2, "x"),
            _fraction(group("async", "fabric_ckpt_async_total"), ours_save),
            None,
        ),
        (
            _at_most("async save (lazy): caller blocked, % of one memory copy of the state", 2, "%"),
            _percent(_fraction(group("async", "fabric_ckpt_lazy"), memcpy)),
            None,
        ),
        (
            _at_most("async save (lazy): until complete vs the synchronous save", 1.2, "x"),
            _fraction(group("async", "fabric_ckpt_lazy_total"), ours_save),
            None,
        ),
        (
            _at_least("training loop with an eager async checkpoint every K steps: steps/s vs none", 0.95),
            _speedup(plain, group("training", "train_eager")),  # steps/s ratio: plain time over checkpointing time
            None,
        ),
        (
            _at_least("training loop with a lazy async checkpoint every K steps: steps/s vs none", 0.95),
            _speedup(plain, group("training", "train_lazy")),
            None,
        ),
        (
            _info("speed-up vs torch_checkpointing: sync save (durable)"),
            _speedup(headline("torch_checkpointing", "save"), ours_save),
            None,
        ),
        (
            _info("speed-up vs torch_checkpointing: async save until durable"),
            _speedup(group("async", "torch_checkpointing_async_total"), group("async", "fabric_ckpt_async_total")),
            None,
        ),
        (
            _info("speed-up vs torch_checkpointing: warm in-place load"),
            _speedup(headline("torch_checkpointing", "load", "warm"), ours_warm),
            None,
        ),
        (
            _at_least("sharded save (FSDP2, 2 ranks) vs disk write bandwidth", 0.9),
            _speedup(headline("disk", "save"), headline("fabric_ckpt_fsdp", "save")),
            None,
        ),
        (
            _at_least("sharded cold load (FSDP2, 2 ranks) vs disk cold read bandwidth", 0.8),
            _speedup(disk_cold, headline("fabric_ckpt_fsdp", "load", "cold")),
            headline("fabric_ckpt_fsdp", "load", "cold"),
        ),
        (
            _at_most("sharded save (FSDP2, 2 ranks) time vs DCP's defaults (never slower)", 1, "x"),
            _fraction(headline("fabric_ckpt_fsdp", "save"), headline("dcp", "save")),
            None,
        ),
        (
            _at_most("sharded cold load (FSDP2, 2 ranks) time vs DCP's defaults (never slower)", 1, "x"),
            _fraction(headline("fabric_ckpt_fsdp", "load", "cold"), headline("dcp", "load", "cold")),
            headline("fabric_ckpt_fsdp", "load", "cold"),
        ),
        (
            _at_least("object store: fabric_ckpt upload speed vs s3fs raw", 0.9),
            _speedup(remote("s3fs", "save"), remote("fabric_ckpt", "save")),
            None,
        ),
        (
            _at_least("object store: fabric_ckpt download + load speed vs s3fs raw download", 0.95),
            _speedup(remote("s3fs", "load"), remote("fabric_ckpt", "load")),
            None,
        ),
        (
            _at_most("object store: fabric_ckpt extra RssAnon (save or load)", 4, "parts of 64 MiB"),
            max(remote_extra, default=None),
            None,
        ),
        (
            _at_most("scale sweep flatness, save (max/min s per GiB - 1)", 15, "%"),
            _percent(_flatness(points, "save")),
            None,
        ),
        (
            _at_most("scale sweep flatness, load (max/min s per GiB - 1)", 15, "%"),
            _percent(_flatness(points, "load")),
            None,
        ),
    ]
    return [_ratio(target, value, cold_row) for target, value, cold_row in values]


def _fraction(part: Row | None, whole: Row | None) -> float | None:
    """Median seconds of ``part`` over median seconds of ``whole``."""
    part_s, whole_s = _median(part), _median(whole)
    return None if part_s is None or not whole_s else part_s / whole_s


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _at_least(name: str, goal: float, unit: str = "x") -> _Target:
    return _Target(name, unit, f">= {goal:g} {unit}", lambda v: v >= goal)


def _info(name: str, unit: str = "x") -> _Target:
    """A figure reported for comparison, with no target."""
    return _Target(name, unit, "-", lambda v: None)  # type: ignore[arg-type,return-value]


def _at_most(name: str, goal: float, unit: str) -> _Target:
    return _Target(name, unit, f"<= {goal:g} {unit}", lambda v: v <= goal)


def _ratio(target: _Target, value: float | None, cold_row: Row | None) -> dict[str, Any]:
    name = target.name
    if cold_row is not None and cold_row["cache"] != "cold":
        name += " (warm only: the page cache could not be dropped)"
    return {
        "name": name,
        "value": value,
        "unit": target.unit,
        "target": target.goal,
        "meets": None if value is None else target.meets(value),
    }


# ---------------------------------------------------------------------------------------------------- Markdown


def _fmt_spread(spread: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if spread is None:
        return "-"
    median, low, high = (spread[k] / scale for k in ("median", "min", "max"))
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def _row_line(row: Row) -> str:
    if row["error"]:
        return f"| {row['label']} | {row['cache'] or '-'} | FAILED: {row['error'].splitlines()[0][:100]} | | | |"
    verified = {True: "yes", False: "NO", None: "-"}[row["verified"]]
    return (
        f"| {row['label']} | {row['cache'] or '-'} | {_fmt_spread(row['seconds'])} | "
        f"{row['mb_per_s']['median']:.0f} | {_fmt_spread(row['extra_anon_bytes'], MIB, 1)} | {verified} |"
    )


def _rows_table(rows: list[Row]) -> list[str]:
    lines = [
        "| operation | page cache | seconds: median [min-max] | MB/s | extra RssAnon MiB [min-max] | verified |",
        "|---|---|---|---|---|---|",
    ]
    return lines + [_row_line(row) for row in rows]


def _sweep_table(points: list[dict[str, Any]]) -> list[str]:
    lines = ["| checkpoint GiB | save s/GiB | load s/GiB | load page cache |", "|---|---|---|---|"]
    for p in points:
        save, load = p.get("save_s_per_gib"), p.get("load_s_per_gib")
        lines.append(
            f"| {p['gib']:.3f} | {'-' if save is None else f'{save:.3f}'} | "
            f"{'-' if load is None else f'{load:.3f}'} | {p['cache']} |"
        )
    return lines


def _stage_table(rows: list[Row]) -> list[str]:
    lines = ["| operation | page cache | stages: busy seconds (GB/s) |", "|---|---|---|"]
    for row in rows:
        parts = []
        for name, stats in row["stages"].items():
            text = f"{name} {stats['seconds']:.3f}"
            if stats["bytes"] and stats["seconds"] > 0:
                text += f" ({stats['bytes'] / 1e9 / stats['seconds']:.1f})"
            parts.append(text)
        lines.append(f"| {row['group']}: {row['label']} | {row['cache'] or '-'} | {'; '.join(parts)} |")
    return lines


def _ratio_table(items: list[dict[str, Any]]) -> list[str]:
    lines = ["| figure | value | target | meets target |", "|---|---|---|---|"]
    for item in items:
        value = "n/a" if item["value"] is None else f"{item['value']:.2f} {item['unit']}"
        meets = {True: "yes", False: "no", None: "-"}[item["meets"]]
        lines.append(f"| {item['name']} | {value} | {item['target']} | {meets} |")
    return lines


def _cold_note(run: dict[str, Any]) -> str:
    if run["cold_cache"]:
        return "yes (sync; echo 3 > /proc/sys/vm/drop_caches before each cold run)"
    if run["plan"]["cold"]:
        return "not permitted here, so rows marked 'warm only' ran with a warm cache"
    return "not measured (--no-cold)"


def markdown(results: dict[str, Any]) -> str:
    """The whole report: machine, method summary, one table per group, the sweep and the ratios."""
    rows: list[Row] = results["rows"]
    machine = results["machine"]
    run = results["run"]
    intervals = [r["sample_interval_ms"] for row in rows for r in row["runs"]]
    out = [
        f"## Checkpoint benchmark: {run['size_gib']:g} GiB checkpoint, {results['created']}, code {run.get('code')}",
        "",
        f"Machine: {machine['cpu']['model']} ({machine['cpu']['cores']} cores), "
        f"{machine['memory_gib']:.0f} GiB RAM, kernel {machine['kernel']}, disk {machine['disk']['summary']}.",
        f"Each figure: median [min-max] of {run['reps']} run(s), each in fresh processes. MB/s = 10^6 bytes of "
        f"tensor payload per second. Extra RssAnon = peak minus baseline, sampled every "
        f"{statistics.median(intervals) if intervals else float('nan'):.2f} ms (median). "
        f"Cold page cache: {_cold_note(run)}.",
    ]
    groups = list(dict.fromkeys(row["group"] for row in rows if row["group"] != "sweep"))
    for group in groups:
        members = [row for row in rows if row["group"] == group]
        out += ["", f"### {group}: {members[0]['workload']}", "", *_rows_table(members)]
    points = sweep(rows)
    if points:
        out += ["", "### scale sweep: fabric_ckpt, seconds per GiB (lower is better)", "", *_sweep_table(points)]
    staged = [row for row in rows if row.get("stages") and not row["error"]]
    if staged:
        out += [
            "",
            "### fabric_ckpt stages (its telemetry; median busy seconds over the runs)",
            "",
            *_stage_table(staged),
        ]
    out += ["", "### ratios (targets are goals, not assertions)", "", *_ratio_table(results["ratios"])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print the Markdown report of a results file."""
    args = sys.argv[1:] if argv is None else argv
    with open(args[0] if args else "bench-results.json") as f:
        print(markdown(json.load(f)), end="")


if __name__ == "__main__":
    main()
