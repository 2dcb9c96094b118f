"""The demo's scenarios run in the suite, so `make demo` cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import resume_single_device


def test_single_device_resume_matches_uninterrupted_run(tmp_path, capsys):
    assert resume_single_device.run(tmp_path) is True
    assert "losses identical: True" in capsys.readouterr().out
