"""Shared pytest set-up: the `slow`, `cuda` and `browser` markers, a `device` fixture, hypothesis settings.

Hooks and fixtures only: what tests import lives in plain helper modules beside this file (browser.py, reporting.py,
references.py, resizing.py, roundoff.py, host_reads.py); tests/test_tooling.py checks that no test file imports this one."""

import pytest
import torch
from browser import chromium
from hypothesis import settings

# Machines here are shared and noisy: no wall-clock deadline on property tests.
settings.register_profile("qnwb", deadline=None, max_examples=60, print_blob=True)
settings.load_profile("qnwb")


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    skip_browser = pytest.mark.skip(
        reason="needs headless Chromium (Debian's chromium package; .ci/run installs it)"
    )
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "browser" in item.keywords and chromium() is None:
            item.add_marker(skip_browser)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Run a test once per device: always on the CPU, and on CUDA where a GPU is present."""
    return torch.device(request.param)
