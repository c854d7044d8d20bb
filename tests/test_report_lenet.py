"""The L-SR1 (LeNet) report: quasi-Newton and first-order methods with the paper's minibatches, Table 1's study, the claims."""

import math

import pytest
from reporting import render_with_store

from qnwb.reports import CLAIM_STATUSES

TINY = {
    "train": 60,
    "test": 30,
    "epochs": 2,
    "batch_norms": [False, True],
    "optimizers": ["lsr1", "lbfgs", "nag"],
    "second_order_batch": 20,
    "first_order_batch": 10,
    "batch_sizes": [10, 30],
    "size_study": ["lsr1", "nag"],
    "seeds": [1],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return render_with_store("lenet", TINY, tmp_path_factory.mktemp("lenet"))


def test_the_runs_use_the_papers_settings_and_the_tuned_step_sizes(report):
    _, results, store = report
    reported = [r for r in store.runs() if not r["name"].startswith("tune ")]
    by = {
        (
            r["optimizer"],
            r["config"]["problem_options"]["batch_norm"],
            r["config"]["problem_options"]["batch_size"],
        ): r
        for r in reported
    }
    for bn in (False, True):
        assert by["lsr1", bn, 20]["config"]["hyperparameters"]["memory"] == 5
        lbfgs = by["lbfgs", bn, 20]["config"]["hyperparameters"]
        assert lbfgs["memory"] == 5 and lbfgs["forget_every"] == 5
        assert lbfgs["lr"] == results["chosen"][f"lbfgs bn {bn}"]["lr"]
        nag = by["nag", bn, 10]["config"]["hyperparameters"]
        assert {k: nag[k] for k in ("lr", "momentum")} == results["chosen"][f"nag bn {bn}"]
        (best,) = [p for p in results["tuning"][f"nag bn {bn}"] if p["chosen"]]
        assert best["validation_error"] == min(
            p["validation_error"] for p in results["tuning"][f"nag bn {bn}"]
        )
    assert "lsr1 bn True" not in results["tuning"]  # L-SR1 runs at its defaults
    for run in reported:
        assert [row["epoch"] for row in store.evaluations(run["id"])][-1] >= 2


def test_table_1_counts_epochs_to_the_target_and_the_claims_have_a_status(report):
    _, results, store = report
    for optimizer, size in [("lsr1", 10), ("lsr1", 30), ("nag", 10), ("nag", 30)]:
        named = f"lsr1 {optimizer} bn True batch {size} seed 1"
        run = [r for r in store.runs() if r["name"] == named][
            -1
        ]  # the study's run (the last of that name)
        hits = [
            row["epoch"] for row in store.evaluations(run["id"]) if row["validation_error"] <= 0.05
        ]
        expected = hits[0] if hits else math.inf
        assert float(results["epochs_to_target"][f"{optimizer} batch {size}"]) == expected
    assert all(0.0 <= share <= 1.0 for share in results["skipped_share"].values())
    assert len(results["claims"]) >= 5
    assert all(c["status"] in CLAIM_STATUSES and c["reason"] for c in results["claims"])
