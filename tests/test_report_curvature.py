"""The curvature report: probes at checkpoints of one run, rendered by papermill with overridden parameters."""

import math

import papermill
import pytest
from reporting import render_with_store

from qnwb.reports import render_report
from qnwb.runs import Runner

SMALL = {
    "problem_options": {"T": 10, "hidden": 8},
    "budget": 4,
    "checkpoints": [4, 0, 2, 2],
    "evaluate_every": 2,
    "spectrum_iterations": 20,
    "cg_iterations": 15,
    "sequences": 3,
}


@pytest.fixture(scope="module")
def hf_report(tmp_path_factory):
    return render_with_store("curvature", SMALL, tmp_path_factory.mktemp("curvature"))


def test_every_checkpoint_is_probed_once_in_order_and_the_run_is_stored(hf_report):
    report, results, store = hf_report
    rows = results["checkpoints"]
    assert results["parameters"]["checkpoints"] == [0, 2, 4] and [r["step"] for r in rows] == [
        0,
        2,
        4,
    ]
    (run,) = store.runs()
    assert run["id"] == results["run"]["run_id"] and (
        run["status"],
        run["steps"],
        run["optimizer"],
    ) == ("finished", 4, "hessian_free")
    evaluations = {row["step"]: row for row in store.evaluations(run["id"])}
    assert set(evaluations) == {0, 2, 4}
    for r in rows:  # each row's held-out error is the store's evaluation at that step
        assert r["validation_error"] == evaluations[r["step"]]["validation_error"]
    assert report.html.stat().st_size > 1_000_000


def test_the_probes_report_sane_numbers(hf_report):
    _, results, _ = hf_report
    for r in results["checkpoints"]:
        values = r["eigenvalues"]
        assert (
            len(values) == 5
            and all(v > 0 for v in values)
            and values == sorted(values, reverse=True)
        )  # GGN: PSD, largest first
        low, high = r["top_eigenvalue_range"]
        assert low <= r["top_eigenvalue"] <= high
        assert 1 <= r["cg_iterations"] <= 15 and 1 <= r["chosen_iterate"] <= r["cg_iterations"]
        assert (
            r["model_change"] < 0
        )  # CG from zero or a warm start lowers the quadratic model below f(θ)
        assert math.isclose(r["rho"], r["objective_change"] / r["model_change"])
        assert 0.0 <= r["max_saturation"] <= 1.0 and r["error_growth"] > 0
    assert (
        results["checkpoints"][0]["damping"] == 1.0
    )  # HF's initial λ; later rows carry the λ the LM rule chose
    assert all(r["damping"] > 0 for r in results["checkpoints"])


def test_the_probes_do_not_move_the_run(hf_report):
    # the same configuration trained without probes, in one go, reaches bit for bit the same evaluations
    _, results, store = hf_report
    run_id = results["run"]["run_id"]
    config = store.run(run_id)["config"]
    plain = Runner(config, store=False, progress=False)
    plain.run()
    probed = {row["step"]: row["validation_loss"] for row in store.evaluations(run_id)}
    unprobed = {row["step"]: row["validation_loss"] for row in plain.history["evaluations"]}
    assert probed == unprobed


@pytest.mark.browser
def test_the_html_draws_every_figure_offline_in_chromium(hf_report):
    from browser import drawn_plots, open_in_chromium, script_errors

    report, _, _ = hf_report
    dom, console = open_in_chromium(report.html)
    # learning curve, eigenvalues across checkpoints, first and last spectra, ρ along CG, 3 CG runs, error norms, first vs last
    assert drawn_plots(dom) == 10, console
    assert script_errors(console) == []


def test_another_optimizer_gets_a_cg_probe_with_the_given_damping(tmp_path):
    parameters = SMALL | {
        "optimizer": "adam",
        "budget": 3,
        "checkpoints": [0, 3],
        "cg_damping": 0.5,
    }
    report, results, store = render_with_store("curvature", parameters, tmp_path)
    assert [r["step"] for r in results["checkpoints"]] == [0, 3]
    assert [r["damping"] for r in results["checkpoints"]] == [0.5, 0.5]
    assert results["run"]["steps"] == 3 and results["run"]["status"] == "finished"


def test_checkpoints_outside_the_budget_are_refused(tmp_path):
    with pytest.raises(
        papermill.PapermillExecutionError,
        match=r"checkpoints: need step counts in \[0, budget = 3\]",
    ):
        render_report(
            "curvature",
            SMALL | {"budget": 3, "checkpoints": [0, 5], "store": str(tmp_path / "r.sqlite")},
            out=tmp_path / "reports",
            progress=False,
        )
