"""The ``fabric-ckpt`` command: inspect, verify, diff, convert and consolidate checkpoints.

A thin argparse layer over the library (:func:`fabric_ckpt.describe`, :func:`fabric_ckpt.verify`,
:func:`fabric_ckpt.diff`, :func:`fabric_ckpt.convert`, :func:`fabric_ckpt.consolidate`). Paths are local or any
fsspec URL. Exit codes: 0 success (``verify``: intact, ``diff``: equal), 1 ``verify`` found damage or ``diff`` found
differences, 2 an error (printed as one line: ``fabric-ckpt: error: ...``), 130 interrupted.

Example:
    $ fabric-ckpt inspect checkpoints/last.ckpt
    $ fabric-ckpt convert lightning_logs/version_0/checkpoints/last.ckpt model.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fabric_ckpt._version import __version__
from fabric_ckpt.errors import CheckpointError, UnsafeCheckpointError
from fabric_ckpt.tools.consolidate import consolidate
from fabric_ckpt.tools.convert import FORMATS, LAYOUTS, convert
from fabric_ckpt.tools.diff import diff
from fabric_ckpt.tools.inspection import describe, format_bytes
from fabric_ckpt.tools.verify import verify

__all__ = ["EXIT_DIFFERENT", "EXIT_ERROR", "EXIT_OK", "build_parser", "main"]

PROG = "fabric-ckpt"
EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def _progress(args: argparse.Namespace) -> bool | None:
    """``--quiet`` turns bars off; otherwise they show for large work (and ``FABRIC_CKPT_PROGRESS=0`` hides them)."""
    return False if getattr(args, "quiet", False) else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _inspect(args: argparse.Namespace) -> int:
    description = describe(args.path, weights_only=not args.trust)
    if args.json:
        _print_json(description.to_json())
    else:
        print(description.render())
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.path, progress=_progress(args))
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.render())
    return EXIT_OK if report.ok else EXIT_DIFFERENT


def _diff(args: argparse.Namespace) -> int:
    result = diff(args.a, args.b, weights_only=not args.trust, verify=not args.no_verify, progress=_progress(args))
    if args.json:
        _print_json(result.to_json())
    else:
        print(result.render())
    return EXIT_OK if result.equal else EXIT_DIFFERENT


def _convert(args: argparse.Namespace) -> int:
    result = convert(
        args.input,
        args.output,
        format=args.format,
        entry=args.entry,
        to=args.to,
        weights_only=not args.trust,
        verify=not args.no_verify,
        progress=_progress(args),
    )
    if not args.quiet:
        print(f"wrote {result.path} ({result.format}: {result.tensors} tensors, {format_bytes(result.bytes)})")
    return EXIT_OK


def _consolidate(args: argparse.Namespace) -> int:
    consolidate(
        args.sharded, args.output, weights_only=not args.trust, verify=not args.no_verify, progress=_progress(args)
    )
    if not args.quiet:
        print(f"wrote {args.output}")
    return EXIT_OK


def _add_common(
    parser: argparse.ArgumentParser, *, quiet: bool = True, trust: bool = True, json_: bool = False
) -> None:
    if json_:
        parser.add_argument("--json", action="store_true", help="print JSON for machines instead of text")
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (and no summary line)")
    if trust:
        parser.add_argument(
            "--trust",
            action="store_true",
            help="the file is trusted: allow arbitrary unpickling (weights_only=False); never for files from others",
        )


def _subcommand(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], summary: str, details: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{details}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fabric-ckpt`` (one sub-parser per command).

    Example:
        >>> build_parser().parse_args(["verify", "last.ckpt"]).path
        'last.ckpt'
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, verify, compare and convert PyTorch checkpoints (local paths or fsspec URLs).",
        epilog="Exit codes: 0 success, 1 damage (verify) or differences (diff), 2 error. "
        "Run 'fabric-ckpt COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect_parser = _subcommand(
        commands,
        "inspect",
        _inspect,
        "Show a checkpoint's entries with shapes, dtypes and sizes, without loading tensor data.",
        "Works on single files (ours, torch.save, Lightning, Composer, safetensors, compressed), sharded folders and\n"
        "Hugging Face indexes.\n\nexample:\n  fabric-ckpt inspect checkpoints/last.ckpt\n"
        "  fabric-ckpt inspect --json s3://bucket/run/step-1000",
    )
    inspect_parser.add_argument("path", help="checkpoint file, sharded folder or index (path or URL)")
    _add_common(inspect_parser, quiet=False, json_=True)

    verify_parser = _subcommand(
        commands,
        "verify",
        _verify,
        "Check a checkpoint's integrity (every CRC-32, size and record) without loading it.",
        "Lists every damaged file or record with the entry it holds; exit code 1 when anything is damaged.\n\n"
        "example:\n  fabric-ckpt verify checkpoints/step-1000",
    )
    verify_parser.add_argument("path", help="checkpoint file, sharded folder or index (path or URL)")
    _add_common(verify_parser, trust=False, json_=True)

    diff_parser = _subcommand(
        commands,
        "diff",
        _diff,
        "Compare two checkpoints: entries added, removed or changed (max abs difference per tensor).",
        "Works across layouts (a file against a sharded folder). Exit code 0 only if they are equal.\n\n"
        "example:\n  fabric-ckpt diff run/step-100.ckpt run/step-200.ckpt",
    )
    diff_parser.add_argument("a", help="the first checkpoint")
    diff_parser.add_argument("b", help="the second checkpoint")
    diff_parser.add_argument("--no-verify", action="store_true", help="skip checking checksums before comparing")
    _add_common(diff_parser, json_=True)

    convert_parser = _subcommand(
        commands,
        "convert",
        _convert,
        "Convert a checkpoint between formats: our file, safetensors, sharded folder, compressed file.",
        "The output format follows the output's name (.safetensors, a trailing '/' for a sharded folder, .tar.gz,\n"
        ".tgz, .tar.bz2, .tar.xz, .tar.lzma, .tar, .zst; anything else: our single file) unless --format says.\n"
        "Lightning Trainer and Composer checkpoints are put in our layout (model, optimizer, scheduler, ...);\n"
        "--to writes another layout: lightning (a sharded folder Lightning's FSDP/ModelParallel strategies load)\n"
        "or composer (a single file {'state': {...}, 'rng': [...]}).\n\n"
        "example:\n  fabric-ckpt convert last.ckpt model.safetensors --entry model\n"
        "  fabric-ckpt convert last.ckpt last-sharded/\n  fabric-ckpt convert ep3.pt ep3.tar.gz\n"
        "  fabric-ckpt convert step-1000/ for-lightning/ --to lightning\n"
        "  fabric-ckpt convert last.ckpt composer.pt --to composer",
    )
    convert_parser.add_argument("input", help="the checkpoint to convert")
    convert_parser.add_argument("output", help="where to write (overwritten atomically)")
    convert_parser.add_argument("--format", choices=FORMATS, help="the output format (default: from the name)")
    convert_parser.add_argument(
        "--entry", help="safetensors: the entry holding the module's weights (default: the single one)"
    )
    convert_parser.add_argument(
        "--to", choices=LAYOUTS, default="fabric", help="the layout inside the output (default: fabric, ours)"
    )
    convert_parser.add_argument("--no-verify", action="store_true", help="skip checking the input's checksums")
    _add_common(convert_parser)

    consolidate_parser = _subcommand(
        commands,
        "consolidate",
        _consolidate,
        "Turn a sharded checkpoint folder into one single-device file, one tensor in memory at a time.",
        "example:\n  fabric-ckpt consolidate checkpoints/step-1000 step-1000.ckpt",
    )
    consolidate_parser.add_argument("sharded", help="the sharded checkpoint folder")
    consolidate_parser.add_argument("output", help="the file to write (overwritten atomically)")
    consolidate_parser.add_argument("--no-verify", action="store_true", help="skip checking the shards' checksums")
    _add_common(consolidate_parser)
    return parser


def _error_message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: '{err.filename}'"
    message = str(err) or type(err).__name__
    if isinstance(err, UnsafeCheckpointError):
        message += " (with this command: rerun with --trust)"
    return message.replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fabric-ckpt`` with ``argv`` (default: the process's arguments); return the exit code.

    Example:
        >>> main(["verify", "checkpoints/last.ckpt"])
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, CheckpointError, ValueError) as err:
        # Expected failures (missing paths, damaged or foreign files, bad options) are one line, not a traceback.
        print(f"{PROG}: error: {_error_message(err)}", file=sys.stderr)
        return EXIT_ERROR
