import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("HPT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _shared_fixture_group(item: pytest.Item) -> str | None:
    """Under ``pytest -n N --dist loadgroup`` (pytest-xdist), the tests that share a module-scoped
    fixture (a server, a trained checkpoint, a launch whose results several tests read) run on one
    worker, which builds it once; every other test goes to whichever worker is free."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for defs in info.name2fixturedefs.values():
        if defs and defs[-1].scope in ("module", "class") and defs[-1].baseid:
            return item.nodeid.split("::")[0]
    return None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA} (set HPT_SHARED_DATA)")
    return SHARED_DATA


TIERS = ("sglang", "distributed", "slow", "gpu")  # a test counts in the first tier it is marked
_tier_time: dict[str, list[float]] = {}


def _tier(keywords) -> str:
    return next((t for t in TIERS if t in keywords), "quick")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _tier_time.setdefault(_tier(report.keywords), [0, 0.0])
    entry[1] += report.duration
    if report.when == "call" or (report.when == "setup" and report.skipped):
        entry[0] += 1


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The time of each tier (sglang, distributed, slow, gpu, quick: the rest), summed over its
    tests' set-up, call and tear-down; under ``-n`` the tiers run side by side, so the sums add
    up to more than the wall time."""
    if not _tier_time:
        return
    terminalreporter.section("time per tier (sum of test durations)")
    total = sum(t for _, t in _tier_time.values())
    for tier in (*TIERS, "quick"):
        if tier in _tier_time:
            count, seconds = _tier_time[tier]
            terminalreporter.write_line(
                f"{tier:>12}: {count:4d} tests {seconds:8.1f} s ({seconds / total:5.1%})"
            )
    terminalreporter.write_line(f"{'all':>12}: {total:8.1f} s of test time")
