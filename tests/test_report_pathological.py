"""The pathological report: success means every held-out sequence right, read from the run store, and counted per optimizer."""

import json
import statistics

import papermill
import pytest

from qnwb.reports import render_report
from qnwb.store import RunStore


def _work(row: dict) -> int:
    return int(row["gradient_evaluations"] + row["curvature_products"])


def _small_pathological(tmp_path, **overrides):
    parameters = {
        "T": 10,
        "budget": 2500,
        "evaluate_every": 100,
        "seeds": [0],
        "optimizers": ["hessian_free", "adam"],
        "store": str(tmp_path / "pathological.sqlite"),
        **overrides,
    }
    return render_report("pathological", parameters, out=tmp_path / "reports", progress=False)


def test_success_rate_and_work_to_success_agree_with_the_stored_runs(tmp_path):
    report = _small_pathological(tmp_path)
    results = json.loads(report.results.read_text())
    assert results["parameters"]["task"] == "addition" and results["parameters"]["held_out"] == 2000
    store = RunStore(tmp_path / "pathological.sqlite")
    runs = {(r["optimizer"], r["seed"]): r for r in store.runs()}
    assert sorted(runs) == [("adam", 0), ("hessian_free", 0)]
    outcomes = set()
    for optimizer in ["hessian_free", "adam"]:
        rows = store.evaluations(runs[optimizer, 0]["id"])
        zero = [row for row in rows if row["validation_error"] == 0]
        success = results["success"][optimizer]
        if (
            zero
        ):  # success: the run stopped at the first evaluation with every held-out sequence right
            assert rows[-1]["step"] == zero[0]["step"]
            assert _work(rows[-2]) < 2500 and rows[-2]["validation_error"] > 0
            assert success["successes"] == 1 and success["rate"] == 1.0
            assert success["evaluations_to_success"] == {"0": _work(zero[0])} and success[
                "median_evaluations_to_success"
            ] == _work(zero[0])
            outcomes.add("solved")
        else:  # failure: the whole budget spent, never error 0
            assert _work(rows[-1]) >= 2500
            assert success == {
                "successes": 0,
                "seeds": 1,
                "rate": 0.0,
                "median_evaluations_to_success": None,
                "evaluations_to_success": {"0": None},
                "best_error": min(r["validation_error"] for r in rows),
            }
            outcomes.add("failed")
        assert results["runs"][f"{optimizer} seed 0"]["reached_target"] == bool(zero)
    assert outcomes == {
        "solved",
        "failed",
    }  # with these settings HF solves T = 10 and Adam does not: both paths are exercised
    table = {row["label"]: row for row in results["summary"]}
    assert {label: row["reached"] for label, row in table.items()} == {
        o: results["success"][o]["successes"] for o in table
    }
    html = report.html.read_text()
    assert (
        html.count("Plotly.newPlot") >= 4
    )  # the task, the error with its band, every run, the loss
    assert "solved addition at T = 10 in 1 of 1 seeds" in html


def test_the_median_is_over_the_seeds_that_succeed(tmp_path):
    report = _small_pathological(tmp_path, seeds=[0, 1], optimizers=["hessian_free"], budget=3000)
    results = json.loads(report.results.read_text())
    store = RunStore(tmp_path / "pathological.sqlite")
    solved = []
    for run in store.runs():
        rows = store.evaluations(run["id"])
        first = next((row for row in rows if row["validation_error"] == 0), None)
        assert results["success"]["hessian_free"]["evaluations_to_success"][str(run["seed"])] == (
            None if first is None else _work(first)
        )
        if first is not None:
            solved.append(_work(first))
    assert solved, "no HF seed solved addition at T = 10 within 3000 evaluations"
    assert results["success"]["hessian_free"]["successes"] == len(solved)
    assert results["success"]["hessian_free"]["median_evaluations_to_success"] == statistics.median(
        solved
    )


def test_a_problem_that_is_not_pathological_is_refused(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="not a pathological problem"):
        _small_pathological(tmp_path, task="curves")
