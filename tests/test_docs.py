"""The documentation cannot drift: every example in README.md and docs/*.md runs, and the site builds strictly.

How the pages' fenced blocks are treated:

- ```` ```python ````: each page's blocks run in order, in one fresh namespace, in a temporary working directory
  (the environment is restored afterwards). A page whose Python mentions ``s3://BUCKET`` runs against a local S3
  server (moto's) with those buckets created, as its readers' code would run against theirs.
- ```` ```console ````: every ``$ fabric-ckpt ...`` line runs (in this process, through
  ``fabric_ckpt.tools.cli.main``) in the page's directory, after the page's Python blocks above it; the lines below
  it are the expected output
  (``...`` matches anything, whitespace runs compare equal) and ``# exit code N`` on the command is its exit code
  (0 otherwise). A console block holds ``fabric-ckpt`` commands only.
- ```` ```bash ````: not run, but every ``fabric-ckpt`` command in one must be accepted by the CLI's parser.
- An HTML comment on the line right before a block changes how it is run:
  ``<!-- docs-test: script -->`` runs a Python block as a program of its own (``python block.py`` in the page's
  directory), for examples that start processes with ``fabric.launch()``;
  ``<!-- docs-test: skip REASON -->`` does not run it (for what needs hardware or services a test cannot have;
  use sparingly: the number of skips is capped below).

The CLI reference (docs/cli.md) is generated from the argparse parser between two markers; after changing the CLI,
regenerate it with ``python -m tests.test_docs --write-cli-reference``.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import fabric_ckpt
from fabric_ckpt.tools import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CLI_PAGE = DOCS / "cli.md"
CLI_START = "<!-- cli-reference:start (generated from fabric_ckpt.tools.cli.build_parser by tests/test_docs.py) -->"
CLI_END = "<!-- cli-reference:end -->"
MAX_SKIPPED = 3
SCRIPT_TIMEOUT_S = 240

_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>\S+)\s*(?P<reason>.*?)\s*-->$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])")
_EXIT_CODE = re.compile(r"#\s*exit code (\d+)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced block of a page: its language, text, first line of text (1-based) and directive."""

    page: Path
    lang: str
    code: str
    line: int
    directive: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, with the ``docs-test`` directive of the line before it (if any)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence, lang = opening["indent"], opening["fence"], opening["lang"].lower()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not _closes(lines[end], fence):
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        previous = lines[index - 1].strip() if index else ""
        directive = _DIRECTIVE.match(previous)
        blocks.append(
            Block(
                page,
                lang,
                "\n".join(body) + "\n",
                index + 2,
                directive["kind"] if directive else None,
                directive["reason"] if directive else "",
            )
        )
        index = end + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    text = line.strip()
    return text.startswith(fence) and not text.strip(fence[0])


ALL_BLOCKS = [block for page in PAGES for block in parse_blocks(page)]
RUNNABLE_PAGES = [page for page in PAGES if any(b.lang in ("python", "console") for b in parse_blocks(page))]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------- running the pages
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=_page_id)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> None:
    blocks = [b for b in parse_blocks(page) if b.lang in ("python", "console") and b.directive != "skip"]
    buckets = sorted({name for b in blocks if b.lang == "python" for name in _BUCKET.findall(b.code)})
    if buckets:
        request.getfixturevalue("s3_endpoint")
        import s3fs

        store = s3fs.S3FileSystem(skip_instance_cache=True)
        for name in buckets:
            if not store.exists(name):
                store.mkdir(name)
    monkeypatch.chdir(tmp_path)
    environment = dict(os.environ)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    try:
        for block in blocks:
            if block.lang == "console":
                _run_console(block)
            elif block.directive == "script":
                _run_script(block, tmp_path)
            else:
                # Leading newlines make tracebacks name the line of the page itself.
                exec(compile("\n" * (block.line - 1) + block.code, str(block.page), "exec"), namespace)
    finally:
        os.environ.clear()
        os.environ.update(environment)
        if buckets:
            import fsspec

            fsspec.filesystem("s3").invalidate_cache()


def _run_script(block: Block, folder: Path) -> None:
    script = folder / f"docs_example_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, f"{block.where}: the script failed\n{result.stdout}\n{result.stderr}"


def console_commands(block: Block) -> list[tuple[str, str]]:
    """``(command, expected output)`` for each ``$`` line of a console block."""
    commands: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:].strip(), []))
        elif commands:
            commands[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"{block.where}: output before the first '$ ' command")
    return [(command, "\n".join(output).strip()) for command, output in commands]


def _run_console(block: Block) -> None:
    checker = doctest.OutputChecker()
    for command, expected in console_commands(block):
        words = shlex.split(command, comments=True)
        assert words[0] == "fabric-ckpt", f"{block.where}: a console block runs fabric-ckpt only, got {command!r}"
        wanted_code = int(match[1]) if (match := _EXIT_CODE.search(command)) else 0
        code, output = run_cli(words[1:])
        assert code == wanted_code, f"{block.where}: `{command}` exited {code}, not {wanted_code}:\n{output}"
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        if not checker.check_output(expected + "\n", output, flags):
            raise AssertionError(f"{block.where}: `{command}` printed\n{output}\nbut the page shows\n{expected}")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Run ``fabric-ckpt ARGV`` in this process: its exit code and what it printed (stdout, then stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse: --help, --version, usage errors
            code = int(exit_.code or 0)
    return code, out.getvalue() + err.getvalue()


# ---------------------------------------------------------------------------------------------- rules for the pages
def test_directives_are_known_and_skips_are_few_and_explained() -> None:
    directives = [block for block in ALL_BLOCKS if block.directive is not None]
    for block in directives:
        assert block.directive in ("skip", "script"), f"{block.where}: unknown docs-test directive {block.directive!r}"
        assert block.lang == "python", f"{block.where}: docs-test directives apply to Python blocks"
    skipped = [block for block in directives if block.directive == "skip"]
    for block in skipped:
        assert len(block.reason) > 10, f"{block.where}: say why the example cannot run"
    assert len(skipped) <= MAX_SKIPPED, [block.where for block in skipped]


def test_blocks_name_a_known_language() -> None:
    """A misspelt or missing language (```pyton, ```) would silently keep an example out of the checks above."""
    known = {"python", "console", "bash", "sh", "shell", "text", "diff", "json", "toml", "yaml"}
    for block in ALL_BLOCKS:
        assert block.lang in known, f"{block.where}: fenced block with language {block.lang!r}; use one of {known}"


def test_shell_examples_use_real_cli_options() -> None:
    """``fabric-ckpt`` commands shown in bash blocks (and the CLI's own help texts) parse."""
    parser = cli.build_parser()
    commands = [
        (block.where, command)
        for block in ALL_BLOCKS
        if block.lang in ("bash", "sh", "shell")
        for command in _shell_commands(block.code)
        if command.startswith("fabric-ckpt ")
    ]
    assert commands, "no fabric-ckpt command found in the pages' bash blocks"
    for where, command in commands:
        try:
            parser.parse_args(shlex.split(command, comments=True)[1:])
        except SystemExit as exit_:
            assert exit_.code == 0, f"{where}: `{command}` is not a valid fabric-ckpt command line"


def _shell_commands(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    return [line.strip().removeprefix("$ ") for line in joined.splitlines() if line.strip()]


def test_console_blocks_cover_every_cli_command() -> None:
    run = {
        shlex.split(command, comments=True)[1]
        for block in ALL_BLOCKS
        if block.lang == "console"
        for command, _ in console_commands(block)
    }
    assert set(_subcommands(cli.build_parser())) <= run


def test_readme_opens_with_the_two_make_commands() -> None:
    opening = "# fabric_ckpt\n\n```bash\nmake demo   # sets up .venv, trains, saves, resumes, and shows the resumed"
    text = README.read_text(encoding="utf-8")
    assert text.startswith(opening)
    assert text.splitlines()[4].startswith("make test   # sets up .venv and runs the test suite")


def test_readme_links_point_at_existing_files() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local, "README.md links to no docs page"
    for target in local:
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_api_reference_documents_every_public_name() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: fabric_ckpt\.(\w+)\s*$", text, re.MULTILINE))
    public = set(fabric_ckpt.__all__) - {"__version__"}
    assert not public - documented, f"docs/api.md misses {sorted(public - documented)}"


def test_docs_site_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")  # the `docs` extra (part of `dev`) brings the theme and mkdocstrings with it
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "api" / "index.html").is_file()


# ---------------------------------------------------------------------------------------------- the CLI reference
_EXIT_CODES = {
    "EXIT_OK": "success; `verify`: the checkpoint is intact; `diff`: the checkpoints are equal",
    "EXIT_DIFFERENT": "`verify` found damage, or `diff` found differences",
    "EXIT_ERROR": "an error (a missing path, a file that is not a checkpoint, a refused file, a bad option), "
    "printed as one line `fabric-ckpt: error: ...`",
    "EXIT_INTERRUPTED": "interrupted (Ctrl-C)",
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _usage_part(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    option = max(action.option_strings, key=len)
    if action.nargs == 0:
        return f"[{option}]"
    value = "{" + ",".join(map(str, action.choices)) + "}" if action.choices else (action.metavar or action.dest)
    return f"[{option} {str(value).upper() if not action.choices else value}]"


def _argument_row(action: argparse.Action) -> str:
    if not action.option_strings:
        names = f"`{action.metavar or action.dest}`"
    elif action.nargs == 0 or action.choices:
        names = ", ".join(f"`{name}`" for name in action.option_strings)
    else:
        value = str(action.metavar or action.dest).upper()
        names = ", ".join(f"`{name} {value}`" for name in action.option_strings)
    meaning = (action.help or "").replace("|", "\\|")
    if action.choices:
        meaning += "; one of " + ", ".join(f"`{choice}`" for choice in action.choices)
    return f"| {names} | {meaning} |"


def render_cli_reference() -> str:
    """The generated part of docs/cli.md: usage, arguments and examples of every command, and the exit codes."""
    parser = cli.build_parser()
    lines = [
        CLI_START,
        "",
        "```text",
        f"{parser.prog} [--version] [--help] COMMAND ...",
        "```",
        "",
        f"{parser.description}",
        "",
        "| exit code | meaning |",
        "|---|---|",
    ]
    codes = {name: getattr(cli, name) for name in dir(cli) if name.startswith("EXIT_")}
    for name, code in sorted(codes.items(), key=lambda item: item[1]):
        lines.append(f"| {code} | {_EXIT_CODES[name]} |")
    for name, sub in _subcommands(parser).items():
        summary, _, details = (sub.description or "").partition("\n\n")
        details, _, example_text = details.partition("example:\n")
        arguments = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        optionals = [a for a in arguments if a.option_strings]
        positionals = [a for a in arguments if not a.option_strings]
        usage = " ".join([parser.prog, name, *map(_usage_part, optionals), *map(_usage_part, positionals)])
        lines += ["", f"### `{parser.prog} {name}`", "", summary.strip(), ""]
        if details.strip():
            lines += [" ".join(details.split()), ""]
        lines += ["```text", usage, "```", "", "| argument | meaning |", "|---|---|"]
        lines += [_argument_row(action) for action in positionals + optionals]
        examples = [line.strip() for line in example_text.splitlines() if line.strip()]
        if examples:
            lines += ["", "```bash", *examples, "```"]
    lines += ["", CLI_END]
    return "\n".join(lines)


def _generated_region(text: str) -> str:
    start, end = text.index(CLI_START), text.index(CLI_END) + len(CLI_END)
    return text[start:end]


def test_cli_reference_is_generated_from_the_parser() -> None:
    current = _generated_region(CLI_PAGE.read_text(encoding="utf-8"))
    assert current == render_cli_reference(), (
        "docs/cli.md is out of date with fabric_ckpt/cli.py: run `python -m tests.test_docs --write-cli-reference`"
    )


def write_cli_reference() -> None:
    text = CLI_PAGE.read_text(encoding="utf-8")
    CLI_PAGE.write_text(text.replace(_generated_region(text), render_cli_reference()), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-cli-reference"]:
        sys.exit("usage: python -m tests.test_docs --write-cli-reference")
    write_cli_reference()
