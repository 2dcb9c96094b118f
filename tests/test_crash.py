"""Crash safety under SIGKILL: real writer processes killed at random moments and at chosen lines, many times.

The campaign (tests/crash_campaign.py) runs once per module in a fresh interpreter. Every scenario is killed 12
times at random, then every kill point once: single file, DDP on 2 ranks, sharded FSDP
on 2 ranks and a CheckpointManager keeping 2 on the local disk; single file, sharded FSDP and the manager on a local
S3 server; a two-tier manager (a local folder, uploads to the S3 server in the background). Each test below asserts
on one part of the result. ``FABRIC_CKPT_CAMPAIGN=full`` (as ``make reliability`` sets) raises the kills to 100 per
local scenario and 40 per S3 one.
"""

from __future__ import annotations

import importlib

import pytest

from tests.crash_campaign import KILL_POINTS, SCENARIOS, default_kills, group, run_subprocess
from tests.reliability_figures import full_campaign, record

TIMEOUT_S = 3600 if full_campaign() else 900

# Kill points with a test of their own below (they were bugs once).
BUGGY_POINTS = {"manager/before-latest", "manager/latest-temporary"}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("crash")
    args = ["--scenario", "all", "--points", "all", "--root", str(root)]
    figures = run_subprocess(args, timeout=TIMEOUT_S)
    print(figures["stdout"])
    results = {r["scenario"]: r for r in figures["results"]}
    for name, r in results.items():
        record(
            "crash",
            name,
            kills=r["kills"],
            kills_mid_save=r["kills_mid_save"],
            uploads_left_incomplete=r["uploads_left_incomplete"],
            uploads_aborted=r["uploads_aborted"],
            saves=r["saves_journalled"],
            checkpoints_verified=r["checkpoints_verified"],
            partial_refused=r["partial_refused"],
            temporaries_cleaned=r["temporaries_cleaned"],
            complete_temporaries=r["complete_temporaries"],
            kill_modes=r["kill_modes"],
            kills_before_ready=r["kills_before_ready"],
            survivor_stopped_alone=r["survivor_stopped_alone"],
            known_bugs=r["known_bugs"],
            port_clashes=r["port_clashes"],
            lost=r["lost"],
            violations=len(r["violations"]),
            seconds=r["seconds"],
            seed=figures["seed"],
        )
    return results


def _clean(result: dict) -> None:
    assert result["violations"] == [], "\n".join(result["violations"])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_random_sigkills_never_lose_or_corrupt_a_checkpoint(campaign, scenario):
    result = campaign[scenario]
    kills = default_kills(SCENARIOS[scenario].remote)
    _clean(result)
    assert result["kills"] == kills and result["lost"] == 0
    if full_campaign():
        assert result["kills_mid_save"] >= 1, "no kill landed inside a save: the campaign tested nothing"
    else:
        # 12 random kills of a fast save (a 25 MB file on an idle machine) may all land between saves; the smoke run
        # asks that the kills of each storage (local disk, S3) landed inside saves, the full campaign each scenario's.
        group_scenarios = [name for name in SCENARIOS if group(name) == group(scenario)]
        landed = sum(campaign[name]["kills_mid_save"] for name in group_scenarios)
        assert landed >= 1, f"no kill of {group_scenarios} landed inside a save: the campaign tested nothing"
    assert result["saves_journalled"] >= 3 and result["checkpoints_verified"] >= kills // 2
    assert result["clean_rounds"] == 2


@pytest.mark.parametrize("point", [p.name for p in KILL_POINTS if p.name not in BUGGY_POINTS])
def test_a_kill_at_a_chosen_point_is_survived(campaign, point):
    result = campaign[point]
    _clean(result)
    assert result["kills"] == 1 and result["clean_rounds"] == 2


def test_a_run_killed_before_latest_moved_resumes_and_saves_again(campaign):
    _clean(campaign["manager/before-latest"])


def test_the_latest_temporary_of_a_killed_save_is_removed(campaign):
    _clean(campaign["manager/latest-temporary"])


def test_s3_manager_retention_stays_within_its_bound(campaign):
    """Once a known bug: runs killed between a commit and its pruning each left one checkpoint more (S3's slower
    commit made the window wide); a resumed run now prunes before its first commit, so at most 2 + 2 remain."""
    result = campaign["s3-manager"]
    assert not [v for v in result["violations"] if "retention kept" in v]
    assert "s3 retention exceeded" not in result["known_bugs"]


def test_s3_two_tier_remote_retention_stays_within_its_bound(campaign):
    """Once a known bug: runs killed between an upload and its pruning each left one checkpoint more in the bucket;
    the remote tier now prunes once before a run's first upload, so at most 2 + 2 remain."""
    result = campaign["s3-twotier"]
    assert not [v for v in result["violations"] if "retention kept" in v]
    assert result["known_bugs"] == {}


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: p.name)
def test_every_kill_point_names_a_function_that_exists(point):
    """A refactor that renames a seam must fail here, not silently disarm its kill point."""
    module_name, _, attr_path = point.target.partition(":")
    owner = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        owner = getattr(owner, attr)
    assert callable(owner), point.target
