"""Test-suite settings.

With ``METERLINK_NO_SKIP=1`` (``.ci/run`` sets it) a skipped test fails instead: CI has the
broker, PostgreSQL, mosquitto and the test extras, so a skip there means a test did not run
that should have (a service that did not start, a missing dependency). A test marked
``allow_skip`` may still skip: it needs something outside the repository that a clean clone
elsewhere cannot have (the shared reference text).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

NO_SKIP = os.environ.get("METERLINK_NO_SKIP") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    allowed = item.get_closest_marker("allow_skip") is not None
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail") and not allowed:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but METERLINK_NO_SKIP=1 (CI) forbids skips: {reason}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_skip: may skip even with METERLINK_NO_SKIP=1 (it needs files outside the repository)"
    )
