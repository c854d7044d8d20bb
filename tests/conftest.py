"""Shared pytest set-up: the `slow`, `cuda` and `browser` markers, a `device` fixture, hypothesis settings."""
import shutil

import pytest
import torch
from hypothesis import settings

# Machines here are shared and noisy: no wall-clock deadline on property tests.
settings.register_profile("qnwb", deadline=None, max_examples=60, print_blob=True)
settings.load_profile("qnwb")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    skip_browser = pytest.mark.skip(reason="needs headless Chromium (Debian's chromium package; .ci/run installs it)")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "browser" in item.keywords and chromium() is None:
            item.add_marker(skip_browser)


def chromium() -> str | None:
    """The headless Chromium on this machine, if any."""
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Run a test once per device: always on the CPU, and on CUDA where a GPU is present."""
    return torch.device(request.param)


def render_with_store(name: str, parameters: dict, folder):
    """Render report `name` with `parameters` into `folder`, its runs in a store of their own there: (report, results, store)."""
    import json

    from qnwb.reports import render_report
    from qnwb.store import RunStore

    store = folder / f"{name}.sqlite"
    report = render_report(name, {**parameters, "store": str(store)}, out=folder / "reports", progress=False)
    return report, json.loads(report.results.read_text()), RunStore(store)
