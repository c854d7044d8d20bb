"""The autoencoder report: runs of the chosen network in the store, speed to the target from the stored rows, and
reconstruction errors that the saved networks reproduce."""

import json

import torch

from qnwb.problems import make_problem
from qnwb.reports import render_report
from qnwb.store import RunStore

NETWORK = {"size": 10, "sizes": [16, 4], "train": 300, "test": 50}


def _small_autoencoder(tmp_path):
    parameters = {
        **NETWORK,
        "budget": 300,
        "evaluate_every": 100,
        "optimizers": ["hessian_free", "nag"],
        "reconstructions": 3,
        "target_error": 12.0,
        "store": str(tmp_path / "autoencoder.sqlite"),
    }
    return render_report("autoencoder", parameters, out=tmp_path / "reports", progress=False)


def test_the_autoencoder_report_runs_the_given_network_and_its_numbers_come_from_the_store(
    tmp_path,
):
    report = _small_autoencoder(tmp_path)
    results = json.loads(report.results.read_text())
    assert {k: results["network"][k] for k in NETWORK} == NETWORK and results["network"][
        "preset"
    ] is False
    store = RunStore(tmp_path / "autoencoder.sqlite")
    runs = {r["optimizer"]: r for r in store.runs() if not r["name"].startswith("tune ")}
    points = results["tuning"]["nag"][
        "points"
    ]  # Table 1's protocol: the best rate for each μ_max, on seed 0
    assert len(points) == 3 * 2 and results["tuning"]["nag"]["seed"] == 0
    (chosen,) = [p for p in points if p["chosen"]]
    assert chosen["train_error"] == min(p["train_error"] for p in points)
    assert (
        runs["nag"]["config"]["hyperparameters"]["lr"] == chosen["lr"] and runs["nag"]["seed"] == 1
    )
    (hf_over_nag,) = results["claims"]
    assert hf_over_nag["status"] in ("reproduced", "same ordering", "not reproduced")
    assert sorted(runs) == ["hessian_free", "nag"] and all(
        r["status"] == "finished" and r["problem"] == "curves" for r in runs.values()
    )
    for summary, metric in (
        (results["summary_train"], "train_error"),
        (results["summary_held_out"], "validation_error"),
    ):
        assert [row["label"] for row in summary] == ["hessian_free", "nag"]
        for row in summary:
            rows = store.evaluations(runs[row["label"]]["id"])
            assert row["final"] == rows[-1][metric] and row["best"] == min(r[metric] for r in rows)
            reached = [
                r["gradient_evaluations"] + r["curvature_products"]
                for r in rows
                if r[metric] <= 12.0
            ]
            assert row["speed"] == (reached[0] if reached else None)
    assert (
        report.html.read_text().count("Plotly.newPlot") == 3
    )  # training and held-out curves, the reconstructions


def test_reconstruction_errors_are_those_of_the_trained_networks(tmp_path):
    report = _small_autoencoder(tmp_path)
    results = json.loads(report.results.read_text())
    store = RunStore(tmp_path / "autoencoder.sqlite")
    for run in store.runs():
        if run["name"].startswith("tune "):  # the tuning protocol's runs on seed 0
            continue
        saved = torch.load(
            run["checkpoint"], weights_only=False
        )  # the runner's checkpoint after its last step
        problem = make_problem("curves", 0, **NETWORK)
        problem.model.load_state_dict(saved["model"])
        images = problem.held_out[0][:3]
        with torch.no_grad():
            errors = (torch.sigmoid(problem.model(images)) - images).square().sum(-1)
        assert results["reconstruction_errors"][run["optimizer"]] == errors.tolist()
    assert (
        results["reconstruction_errors"]["hessian_free"] != results["reconstruction_errors"]["nag"]
    )
