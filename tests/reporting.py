"""Rendering a report for its tests: its runs in a store of their own, and the results it wrote."""

import json

from qnwb.reports import render_report
from qnwb.store import RunStore


def render_with_store(name: str, parameters: dict, folder):
    """Render report `name` with `parameters` into `folder`, its runs in a store of their own there: (report, results, store)."""
    store = folder / f"{name}.sqlite"
    report = render_report(
        name, {**parameters, "store": str(store)}, out=folder / "reports", progress=False
    )
    return report, json.loads(report.results.read_text()), RunStore(store)
