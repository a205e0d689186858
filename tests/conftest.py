"""Suite-wide pytest policy.

- Every test under tests/integration/ carries the `integration` marker, whether or not
  its module says so.
- With CI=true (CI runs as root on Debian, where every prerequisite is installed by
  tools/setup.sh) a *skipped* integration test is reported as a **failure**: a missing
  prerequisite there is a broken CI, not a reason to pass.  The only exceptions are tests
  marked `@pytest.mark.ci_may_skip("why")`, for prerequisites CI machines are known to
  lack (e.g. kernel fs-verity), and expected failures (xfail).  An integration *module*
  skipped at import (importorskip) becomes a collection error, which stops the run.
- SIGINT is handled even when the suite was started with it ignored (see pytest_configure).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
INTEGRATION_DIR = TESTS_DIR / "integration"

# tests/ is not a package: make the shared helpers (imagebuild) importable from any test.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    # Run as a background job of a shell without job control (`cmd &` in a script, as some
    # CI runners start jobs), the suite inherits SIGINT ignored, and so would every pycfs it
    # starts: the tests that interrupt one (a pull, a service) would wait for nothing.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers",
        "ci_may_skip(reason): this integration test may skip on CI (a prerequisite CI "
        "machines lack, e.g. kernel fs-verity); without it a skip under CI=true fails",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _in_integration(item.path):
            item.add_marker(pytest.mark.integration)


def _in_integration(path) -> bool:
    p = Path(str(path)).resolve()
    return p == INTEGRATION_DIR or INTEGRATION_DIR in p.parents


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole integration module skipped at import (module-level pytest.skip or
    importorskip) fails on CI too; pytest then reports it as a collection error."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and on_ci() and isinstance(collector, pytest.Module) and _in_integration(collector.path):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: integration module skipped, which CI counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and on_ci() and item.get_closest_marker("integration")):
        return
    if hasattr(rep, "wasxfail") or item.get_closest_marker("ci_may_skip"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (f"CI=true: integration test skipped, which CI counts as a failure "
                    f"(a prerequisite is missing; fix tools/setup.sh or mark the test "
                    f"ci_may_skip): {reason}")
