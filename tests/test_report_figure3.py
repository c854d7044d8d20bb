"""The Figure 3 report: its summary is the runs' own numbers, a rerun reuses finished runs, refusals come first."""

import json
import statistics

import pytest

from qnwb.reports import render_report

SMALL = {
    "problems": ["addition_hs", "xor"],
    "T_values": [20],
    "seeds": [0, 1],
    "hidden": 6,
    "batch": 50,
    "budget_minibatches": 40.0,
    "hf_options": {"cg_max_iterations": 20},
}


def test_summary_means_and_failure_rates_are_those_of_the_runs_and_a_rerun_reuses_them(tmp_path):
    report = render_report("figure3", SMALL, out=tmp_path, progress=False)
    results = json.loads(report.results.read_text())
    runs = results["runs"]
    assert len(runs) == 2 * 1 * 2 * 2  # problems × T × seeds × {Tikhonov, structural}
    assert {r["variant"] for r in runs} == {"Tikhonov", "structural"}
    assert all(r["threads"] == 1 and r["options"] == {"cg_max_iterations": 20} for r in runs)
    assert {r["structural_damping"] for r in runs if r["variant"] == "Tikhonov"} == {0.0}
    for cell in results["summary"]:
        mine = [
            r
            for r in runs
            if (r["task"], r["T"], r["variant"]) == (cell["problem"], cell["T"], cell["damping"])
        ]
        for criterion in ("strict", "loose"):
            work = [r[criterion]["minibatches"] for r in mine if r[criterion] is not None]
            summary = cell[criterion]
            assert summary["successes"] == len(work) and summary["runs"] == len(mine) == 2
            assert summary["failure_rate"] == pytest.approx(1 - len(work) / 2)
            assert summary["mean"] == (statistics.mean(work) if work else None)
            assert summary["failed_seeds"] == [r["seed"] for r in mine if r[criterion] is None]
            for r in mine:  # a failure spent the budget; a success stopped at it
                if r["strict"] is None:
                    assert r["minibatches"] >= SMALL["budget_minibatches"]
    html = report.html.read_text()
    assert "Plotly.newPlot" in html and "minibatches to success" in html
    from qnwb.reports import CLAIM_STATUSES

    solved = [c for c in results["claims"] if "solves it" in c["claim"]]
    assert len(solved) == len(SMALL["problems"]) * len(SMALL["T_values"])
    for c in (
        solved
    ):  # "reproduced" exactly when every seed of the structural cell met the strict criterion
        problem = c["claim"].split(",")[0]
        (cell,) = [
            s for s in results["summary"] if (s["problem"], s["damping"]) == (problem, "structural")
        ]
        every = cell["strict"]["successes"] == cell["strict"]["runs"]
        assert c["status"] == ("reproduced" if every else "not reproduced")
    assert all(c["status"] in CLAIM_STATUSES and c["reason"] for c in results["claims"])
    ledger = tmp_path / "figure3-runs.jsonl"
    assert len(ledger.read_text().splitlines()) == 8
    again = render_report("figure3", SMALL, out=tmp_path, progress=False)
    rerun = json.loads(again.results.read_text())["runs"]
    assert [r["seconds"] for r in rerun] == [r["seconds"] for r in runs]  # reused, not rerun
    assert len(ledger.read_text().splitlines()) == 8


def test_a_T_a_problem_cannot_take_is_refused_before_any_run(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="needs T ≥ 20"):
        render_report("figure3", {**SMALL, "T_values": [10]}, out=tmp_path, progress=False)
    assert not (tmp_path / "figure3-runs.jsonl").exists()
