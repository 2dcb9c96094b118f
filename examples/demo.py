"""``make demo``: every save-and-resume scenario, each proving the resumed run matches an uninterrupted one."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resume_single_device


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["single device"] = resume_single_device.run(Path(folder) / "single")
    print()
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
