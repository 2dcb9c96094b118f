"""``make demo``: every save-and-resume scenario, each proving the resumed run matches an uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resume_preempted  # noqa: E402
import resume_single_device  # noqa: E402


def distributed(strategy: str, folder: Path) -> bool:
    """Two processes started by ``fabric.launch()``: save, then resume in fresh processes."""
    script = str(HERE / "resume_distributed.py")
    for phase in ("first", "resume"):
        command = [sys.executable, script, "--strategy", strategy, "--phase", phase, "--folder", str(folder)]
        if subprocess.run(command).returncode != 0:
            return False
    return True


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        results["single device"] = resume_single_device.run(root / "single")
        print()
        for strategy in ("ddp", "fsdp"):
            (root / strategy).mkdir()
            results[f"2-process {strategy.upper()}"] = distributed(strategy, root / strategy)
            print()
        object_store = subprocess.run([sys.executable, str(HERE / "resume_object_store.py")])
        results["object store, killed and resumed from latest"] = object_store.returncode == 0
        print()
        preempted = resume_preempted.run(str(root / "preempted"))
        results["2-process DDP, preempted mid-epoch (SIGTERM) and resumed"] = preempted
        print()
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
