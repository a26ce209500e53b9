"""A test may skip only for a machine that lacks what it needs; any other skip (a kill that came too late, a
race lost) fails the run, so a hole never looks green. The allowed reasons, in one place:"""

import pytest

ALLOWED_SKIPS = (
    "needs a CUDA GPU",  # the GPU tests on a CPU machine
    "needs two GPUs",
    "this machine has a GPU",  # a CPU-only check on a GPU machine
    "small tmpfs",
    "timm",  # timm needs torchvision, which cannot load beside the CPU build of torch on the test machines
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (f"skipped for a reason outside tests/skip_policy.py's ALLOWED_SKIPS: {reason}; a test "
                               "that cannot reach its point fails")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped while it is collected (pytest.importorskip at its top) falls under the same rule."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped while collected, for a reason outside ALLOWED_SKIPS: {reason}"
