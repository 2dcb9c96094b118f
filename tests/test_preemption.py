"""Preemption with real processes: SIGTERM sent to one rank at random moments; every run saves, stops and resumes.

tests/preemption_run.py trains (one process, or two started by ``fabric.launch()`` on gloo) with
``save_on_signal=(SIGTERM,)``. A chain of runs shares one folder: each run is sent SIGTERM at a random moment (to a
random rank, after a random batch plus a random fraction of a step, or while it resumes) and must exit 0 within
the grace period, every rank stopped after the same batch, with ``latest`` naming the checkpoint of that batch; the
next run resumes from it. The last run of a chain trains to the end: its parameters must be bitwise those of an
uninterrupted run, and the batches consumed over the whole chain (each rank's item indices) the uninterrupted
run's, one for one. ``FABRIC_CKPT_CAMPAIGN=full`` (``make reliability``) sends many more signals.

A rank that dies, or hangs, must not make the others wait: they exit non-zero with a message, and the last complete
checkpoint stays loadable.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from fabric_ckpt import Fabric
from tests import preemption_run as program
from tests.reliability_figures import full_campaign, record

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "preemption_run.py")
GRACE_S = 60  # a scheduler's grace period: SIGTERM, then SIGKILL this much later
START_TIMEOUT_S = 120  # starting the processes (imports, process group) on two busy cores
KILLS = 16 if full_campaign() else 2  # signals per configuration
KILLS_PER_CHAIN = 4
SEED = random.randrange(1 << 30)
CONFIGS = {
    "1 process": ["--devices", "1"],
    "2-rank DDP": ["--devices", "2"],
    "2-rank DDP, async saves": ["--devices", "2", "--async-save"],
}
_LINE = re.compile(r"^(?P<event>\w+) rank=(?P<rank>\d+) (?P<key>\w+)=(?P<value>\S+)$")


class Run:
    """One run of the program: its output lines as they come (on a thread) and its ranks' pids."""

    def __init__(self, folder: Path, arguments: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, SCRIPT, "--folder", str(folder), *arguments]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def next_event(self, timeout: float) -> tuple[str, int, str] | None:
        """The next ``event rank=R key=value`` line as ``(event, rank, value)``; ``None`` at the end of output."""
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                return None
            self.seen.append(line)
            match = _LINE.match(line)
            if match:
                return match["event"], int(match["rank"]), match["value"]

    def wait_for(self, event: str, rank: int, value: str | None = None) -> None:
        """Until the run printed ``event rank=R`` (with ``value``), now or earlier."""
        for line in self.seen:
            match = _LINE.match(line)
            if match and (match["event"], int(match["rank"])) == (event, rank) and value in (None, match["value"]):
                return
        while True:
            got = self.next_event(START_TIMEOUT_S)
            assert got is not None, f"the run ended before '{event} rank={rank}':\n{self.output()}"
            if got[:2] == (event, rank) and (value is None or got[2] == value):
                return

    def finish(self, timeout: float) -> float:
        """Wait for the end (reading the rest of the output); return the seconds it took."""
        started = time.monotonic()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout} s later:\n{self.output()}") from None
        elapsed = time.monotonic() - started
        # The rest of the output; a rank that outlives the run (a stopped one) keeps the pipe open: stop after a pause.
        with contextlib.suppress(queue.Empty):
            while self.next_event(timeout=5) is not None:
                pass
        return elapsed

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def events(self, event: str) -> dict[int, str]:
        found = {}
        for line in self.seen:
            match = _LINE.match(line)
            if match and match["event"] == event:
                found[int(match["rank"])] = match["value"]
        return found

    def output(self) -> str:
        return "\n".join(self.seen) + "\n--- stderr ---\n" + self.stderr


def world_size(arguments: list[str]) -> int:
    return int(arguments[arguments.index("--devices") + 1])


def total_batches(ranks: int) -> int:
    return program.EPOCHS * program.ITEMS // (program.BATCH_SIZE * ranks)


def latest_batch(folder: Path) -> int:
    """The batch of the checkpoint ``latest`` names, read from the checkpoint itself."""
    target = os.readlink(folder / "latest-rank0")
    checkpoint = Fabric(accelerator="cpu").load(folder / target)
    assert re.fullmatch(r"ep\d+-ba\d+-rank0", target)
    return int(checkpoint["timestamp"]["batch"])


def assert_same_run(folder: Path, reference: Path, ranks: int) -> None:
    for rank in range(ranks):
        final = torch.load(folder / f"final-rank{rank}.pt", weights_only=True)
        expected = torch.load(reference / f"final-rank{rank}.pt", weights_only=True)
        assert final.keys() == expected.keys()
        for name in final:
            assert torch.equal(final[name], expected[name]), f"rank {rank}: {name} differs"
        consumed = (folder / f"consumed-rank{rank}.jsonl").read_text().splitlines()
        assert consumed == (reference / f"consumed-rank{rank}.jsonl").read_text().splitlines(), f"rank {rank}"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run per world size (async saves train the same as synchronous ones)."""
    folders = {}
    for ranks in (1, 2):
        folder = tmp_path_factory.mktemp(f"reference-{ranks}")
        run = Run(folder, ["--devices", str(ranks), "--step-sleep", "0"])
        run.finish(START_TIMEOUT_S)
        assert run.process.returncode == 0, run.output()
        assert set(run.events("finished").values()) == {str(total_batches(ranks))}
        folders[str(ranks)] = folder
    return folders


def preempt(folder: Path, arguments: list[str], rng: random.Random, resume_from: int, kills_left: int) -> dict:
    """One run sent SIGTERM at a random moment: check it stopped and saved right; return what happened."""
    ranks = world_size(arguments)
    run = Run(folder, arguments)
    target = rng.randrange(ranks)
    # After which batch the signal goes (the resumed one: while the run sets up and resumes), leaving batches for
    # the chain's other signals; then a random part of a step later.
    after = resume_from + rng.randint(0, max(0, (total_batches(ranks) - 2 - resume_from) // kills_left))
    delay = rng.uniform(0, 0.03)
    try:
        run.wait_for("ready", target)
        pid = int(run.events("ready")[target])
        if after > resume_from:
            run.wait_for("step", target, str(after))
        time.sleep(delay)
        os.kill(pid, signal.SIGTERM)
        seconds = run.finish(GRACE_S)
    finally:
        run.kill()
    where = f"signal to rank {target} after batch {after} + {delay:.3f} s (seed {SEED})\n{run.output()}"
    assert run.process.returncode == 0, where
    stopped = run.events("stopped")
    assert sorted(stopped) == list(range(ranks)) and len(set(stopped.values())) == 1, where
    batch = int(stopped[0])
    # The first hook after the signal, or the next one; a signal during set-up and resume may be taken at the hook
    # before the first step, which saves the resumed position itself.
    assert batch >= (after if after == resume_from else after + 1), where
    assert all(int(line.split("batch=")[1]) <= batch for line in run.seen if line.startswith("step")), where
    assert run.events("resumed") == dict.fromkeys(range(ranks), str(resume_from)), where
    assert latest_batch(folder) == batch, where
    return {"batch": batch, "seconds": seconds, "during": run.events("signalled")[target]}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sigterm_at_random_moments_saves_stops_and_resumes_bitwise(tmp_path, references, config):
    arguments = [*CONFIGS[config], "--step-sleep", "0.02"]
    ranks = world_size(arguments)
    rng = random.Random(f"{SEED}-{config}")
    phases: Counter[str] = Counter()
    slowest = 0.0
    failed_chains: list[str] = []  # a failed check ends its chain; the figures count it before the test fails
    for chain in range(-(-KILLS // KILLS_PER_CHAIN)):
        folder = tmp_path / f"chain{chain}"
        folder.mkdir()
        resume_from = 0
        kills = min(KILLS_PER_CHAIN, KILLS - chain * KILLS_PER_CHAIN)
        try:
            for kill in range(kills):
                if resume_from >= total_batches(ranks) - 1:
                    break
                outcome = preempt(folder, arguments, rng, resume_from, kills - kill)
                phases[outcome["during"]] += 1
                slowest = max(slowest, outcome["seconds"])
                resume_from = outcome["batch"]
            last = Run(folder, arguments)
            last.finish(START_TIMEOUT_S)
            assert last.process.returncode == 0, last.output()
            assert last.events("resumed") == dict.fromkeys(range(ranks), str(resume_from))
            assert_same_run(folder, references[str(ranks)], ranks)
        except AssertionError as failure:
            failed_chains.append(f"chain {chain}: {failure}")
    kills = sum(phases.values())
    print(f"{config}: {kills} SIGTERMs, landed during {dict(phases)}; slowest exit {slowest:.1f} s (seed {SEED})")
    figures = {"landed": dict(phases), "slowest_exit_s": round(slowest, 1), "seed": SEED}
    record("preemption", config, kills=kills, lost=len(failed_chains), **figures)
    assert not failed_chains, "\n\n".join(failed_chains)


# ---------------------------------------------------------------------------------------------------- lost ranks
def start_two_ranks(folder: Path, *extra: str) -> tuple[Run, dict[int, int]]:
    """Two ranks pausing (for 5 s) in batch 7, after the checkpoint of batch 5 and the batch's collectives: the next
    collective a rank reaches is the manager's agreement in ``on_batch_end``."""
    run = Run(folder, ["--devices", "2", "--step-sleep", "0", "--pause-at", "7", "--pause", "5", *extra])
    for rank in range(2):
        run.wait_for("ready", rank)
        run.wait_for("paused", rank, "7")
    pids = {rank: int(pid) for rank, pid in run.events("ready").items()}
    return run, pids


def test_a_dead_rank_makes_the_signalled_survivor_exit_non_zero_instead_of_hanging(tmp_path):
    run, pids = start_two_ranks(tmp_path)
    try:
        os.kill(pids[1], signal.SIGKILL)
        os.kill(pids[0], signal.SIGTERM)  # what the launcher (or the scheduler) sends the survivors
        run.finish(GRACE_S)
    finally:
        run.kill()
    kept = latest_batch(tmp_path)
    record("preemption", "dead rank", kills=1, lost=int(kept != 5))
    assert kept == 5  # the last complete checkpoint is untouched
    assert run.process.returncode != 0, run.output()
    assert "no collective save can finish" in run.stderr, run.output()
    assert run.events("stopped") == {}


def test_a_stuck_rank_makes_the_signalled_rank_give_up_after_the_signal_timeout(tmp_path):
    run, pids = start_two_ranks(tmp_path, "--signal-timeout", "2")
    try:
        os.kill(pids[1], signal.SIGSTOP)
        os.kill(pids[0], signal.SIGTERM)
        run.finish(GRACE_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[1], signal.SIGKILL)
        run.kill()
    kept = latest_batch(tmp_path)
    record("preemption", "stuck rank", kills=1, lost=int(kept != 5))
    assert kept == 5
    assert run.process.returncode == 128 + signal.SIGTERM, run.output()
    assert "another rank did not reach the same batch end within 2 s" in run.stderr, run.output()
