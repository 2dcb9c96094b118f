"""``python -m benchmarks``: run the suite, print the Markdown report, write the JSON results."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from benchmarks.report import markdown, ratios
from benchmarks.runner import RunOptions, run
from benchmarks.scenarios import HEADLINE_LIBRARIES, PlanOptions
from benchmarks.system import code_version, machine_info

__all__ = ["benchmark", "main"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    default_size = float(os.environ.get("BENCH_GIB", "1"))
    parser.add_argument(
        "--size-gib", type=float, default=default_size, help="checkpoint size (model + Adam); 3 = headline"
    )
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (the median is reported)")
    parser.add_argument("--no-cold", action="store_true", help="skip cold-cache rows (no drop_caches)")
    parser.add_argument(
        "--libraries", default=",".join(HEADLINE_LIBRARIES), help=f"headline rows, from {','.join(HEADLINE_LIBRARIES)}"
    )
    parser.add_argument("--small-count", type=int, default=20_000, help="tensors in the small-tensors scenario")
    parser.add_argument("--small-numel", type=int, default=256, help="float32 elements per small tensor")
    parser.add_argument("--sweep-gib", type=_floats, default=None, help="comma-separated sizes (default 0.25,0.5,..)")
    parser.add_argument(
        "--s3-gib",
        type=float,
        default=0.5,
        help="checkpoint size for the rows on a local S3 server (moto, started here); 0 leaves them out",
    )
    parser.add_argument("--train-steps", type=int, default=30, help="training-loop rows: steps per run (0: none)")
    parser.add_argument("--train-every", type=int, default=10, help="training-loop rows: steps between checkpoints")
    parser.add_argument("--figures", default=None, help="folder for the report's figures (PNG, needs matplotlib)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--block", type=int, default=1024, help="context length (position embeddings)")
    parser.add_argument("--workdir", default=None, help="folder on the disk to measure (default: the temp folder)")
    parser.add_argument("--output", default="bench-results.json", help="JSON results file")
    parser.add_argument("--sample-ms", type=float, default=0.5, help="RssAnon sampling interval in milliseconds")
    parser.add_argument("--no-prime-memory", action="store_true", help="skip touching memory once before measuring")
    return parser


def benchmark(options: RunOptions) -> dict[str, Any]:
    """Run the suite and return the results as written to JSON (rows, ratios, machine, run facts)."""
    if options.reps < 1:
        raise ValueError("--reps must be at least 1")
    started = datetime.datetime.now(datetime.timezone.utc)
    rows, facts = run(options)
    row_json = [row.to_json() for row in rows]
    return {
        "schema": 1,
        "created": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(options.workdir or os.path.dirname(facts["workdir"])),
        "run": {
            "size_gib": options.plan.size_gib,
            "code": code_version(),
            "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
            **facts,
            "plan": asdict(options.plan),
        },
        "rows": row_json,
        "ratios": ratios(row_json),
    }


def _failed(rows: list[dict[str, Any]]) -> list[str]:
    return [row["key"] for row in rows if row["error"] or row["verified"] is False]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = PlanOptions(
        size_gib=args.size_gib,
        layers=args.layers,
        vocab=args.vocab,
        block=args.block,
        cold=not args.no_cold,
        libraries=tuple(name for name in args.libraries.split(",") if name),
        small_count=args.small_count,
        small_numel=args.small_numel,
        sweep_gib=args.sweep_gib,
        object_store_gib=args.s3_gib,
        train_steps=args.train_steps,
        train_every=args.train_every,
    )
    options = RunOptions(
        plan=plan,
        reps=args.reps,
        workdir=args.workdir,
        prime_memory=not args.no_prime_memory,
        sample_interval_s=args.sample_ms / 1000,
    )
    results = benchmark(options)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print(markdown(results), end="")
    if args.figures:
        from benchmarks.figures import draw  # matplotlib: the bench extra

        for path in draw(results, args.figures):
            print(f"figure written to {path}", file=sys.stderr)
    failed = _failed(results["rows"])
    if failed:
        print(f"\n{len(failed)} row(s) failed or did not verify: {', '.join(failed)}", file=sys.stderr)
    print(f"results written to {args.output}", file=sys.stderr)
    return 1 if failed else 0
