"""The Table 5 report: NAG and CM per μ₀ with tuned learning rates, the paper's numbers beside qnwb's, and the claims."""

import pytest
from reporting import render_with_store

from qnwb.reports import CLAIM_STATUSES
from qnwb.tasks import input_independent_error, make_task

TINY = {
    "problems": {"addition_hs": 20, "memorization_5bit": 5},
    "hidden": 4,
    "updates": 20,
    "switch": 5,
    "learning_rates": [0.01, 0.001],
    "seeds": [1, 2],
    "held_out": 50,
    "evaluate_every": 10,
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return render_with_store("table5", TINY, tmp_path_factory.mktemp("table5"))


def test_each_column_is_tuned_on_seed_0_and_run_on_the_other_seeds(report):
    _, results, store = report
    columns = ["0.9N", "0.995N", "0.9M", "0.995M"]
    assert sorted(results["errors"]) == sorted(
        f"{t} {c}" for t in TINY["problems"] for c in columns
    )
    runs = store.runs()
    for key, tuning in results["tuning"].items():
        (chosen,) = [p for p in tuning if p["chosen"]]
        assert chosen["lr"] == results["learning_rate"][key]
        assert chosen["validation_error"] == min(p["validation_error"] for p in tuning)
        task, column = key.split()
        reported = [r for r in runs if r["name"].startswith(f"table5 {task} {column} seed")]
        assert sorted(r["seed"] for r in reported) == [1, 2]
        assert all(r["config"]["hyperparameters"]["lr"] == chosen["lr"] for r in reported)
        finals = {r["seed"]: store.evaluations(r["id"])[-1]["validation_error"] for r in reported}
        assert results["errors"][key] == [finals[1], finals[2]]
    assert (
        len([r for r in runs if r["name"].startswith("tune ")]) == 2 * 4 * 2
    )  # problems × columns × rates


def test_the_biases_level_and_the_claims(report):
    _, results, _ = report
    for task, T in TINY["problems"].items():
        assert results["biases"][task] == input_independent_error(make_task(task, T), held_out=50)
    assert results["paper"]["add"]["0.995N"] == 0.00025
    assert len(results["claims"]) == 3 * len(TINY["problems"])
    assert all(
        c["status"] in CLAIM_STATUSES and c["reason"] and c["paper"] for c in results["claims"]
    )
