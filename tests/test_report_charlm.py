"""The character-model report: adaQN, Adagrad and Adam under one budget, rendered by papermill with overridden parameters."""

import math

import papermill
import pytest
from reporting import render_with_store

from qnwb.reports import render_report

SMALL = {
    "hidden": 8,
    "length": 10,
    "batch_size": 8,
    "budget": 60,
    "evaluate_every": 20,
    "average_every": 20,
    "L": 3,
    "optimizers": ["adaqn", "adagrad", "adam"],
    "target_bpc": 6.0,
    "seeds": [0],
    "tune_step_sizes": False,  # the given learning rates (the tuned path: below)
    "init_std": 0.01,  # the std reading: a network this small still starts at the uniform prediction
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return render_with_store("charlm", SMALL, tmp_path_factory.mktemp("charlm"))


def test_each_optimizer_runs_the_same_budget_through_the_store(report):
    rendered, results, store = report
    assert sorted(results["runs"]) == ["adagrad seed 0", "adam seed 0", "adaqn seed 0"]
    runs = store.runs()
    assert [(r["optimizer"], r["problem"], r["status"]) for r in runs] == [
        (o, "char_lm", "finished") for o in SMALL["optimizers"]
    ]
    for run in runs:
        assert run["summary"]["gradient_evaluations"] == 60 and run["steps"] == 60
        assert run["config"]["problem_options"] == {
            "hidden": 8,
            "layers": 1,
            "length": 10,
            "batch_size": 8,
            "init_std": 0.01,
        }
    assert runs[0]["config"]["hyperparameters"] == {
        "lr": 0.1,
        "L": 3,
        "restore_accumulator_on_reject": False,
    }  # adaQN: Adagrad's step size, the given L, Algorithm 1 as written
    assert (
        results["runs"]["adaqn seed 0"]["loss_evaluations"]
        > 0
        == results["runs"]["adam seed 0"]["loss_evaluations"]
    )
    assert rendered.html.stat().st_size > 1_000_000


def test_the_table_is_in_bits_per_character_of_the_stored_evaluations(report):
    _, results, store = report
    by_label = {row["label"]: row for row in results["summary"]}
    assert list(by_label) == SMALL["optimizers"]
    for run in store.runs():
        rows = store.evaluations(run["id"])
        assert [r["gradient_evaluations"] for r in rows] == [0, 20, 40, 60]
        bits = [r["validation_loss"] / (10 * math.log(2)) for r in rows]
        row = by_label[run["optimizer"]]
        assert math.isclose(row["final"], bits[-1]) and math.isclose(row["best"], min(bits))
        reached = [r["gradient_evaluations"] for r, b in zip(rows, bits) if b <= 6.0]
        assert row["speed"] == (reached[0] if reached else None)
    initial = [
        store.evaluations(run["id"])[0]["validation_loss"] / (10 * math.log(2))
        for run in store.runs()
    ]
    assert all(
        math.isclose(b, math.log2(103), rel_tol=1e-3) for b in initial
    )  # N(0, 0.01²) weights: uniform over 103 characters


def test_the_memory_numbers_are_adaqns_stored_statistics(report):
    _, results, store = report
    memory = results["memory"]["adaqn seed 0"]
    adaqn = next(run for run in store.runs() if run["optimizer"] == "adaqn")
    steps = store.steps(adaqn["id"])
    last = steps[-1]["stats"]
    assert memory["steps"] == len(steps) == 60 and memory["capacity"] == 10
    assert (memory["pairs_stored"], memory["pairs_skipped"], memory["rejections"]) == (
        last["pairs_stored"],
        last["pairs_skipped"],
        last["rejections"],
    )
    assert (
        memory["pairs_stored"] + memory["pairs_skipped"] + memory["rejections"] == 60 // 3 - 1
    )  # one test per cycle after the first
    assert len(memory["average_memory"]) == 3  # 60 steps in windows of 20
    used = [0] + [
        int(row["stats"]["memory_size"]) for row in steps[:-1]
    ]  # pairs held before each step (no forgetting)
    assert memory["average_memory"] == pytest.approx(
        [sum(used[i : i + 20]) / 20 for i in (0, 20, 40)]
    )
    assert memory["steps_with_pairs"] == sum(u > 0 for u in used)


@pytest.mark.browser
def test_the_html_draws_every_figure_offline_in_chromium(report):
    from browser import drawn_plots, open_in_chromium, script_errors

    rendered, _, _ = report
    dom, console = open_in_chromium(rendered.html)
    assert drawn_plots(dom) == 4, console  # two learning curves, adaQN's memory, its average memory
    assert script_errors(console) == []


def test_an_optimizer_without_a_step_size_is_refused(tmp_path):
    with pytest.raises(
        papermill.PapermillExecutionError, match=r"learning_rates: no step size for \['sgd'\]"
    ):
        render_report(
            "charlm",
            SMALL | {"optimizers": ["sgd"], "store": str(tmp_path / "r.sqlite")},
            out=tmp_path / "reports",
            progress=False,
        )


def test_tuned_step_sizes_come_from_the_grid_on_the_tuning_seed_and_the_claims_have_a_status(
    tmp_path,
):
    from qnwb.optim import tuning_grid
    from qnwb.reports import CLAIM_STATUSES

    _, results, store = render_with_store(
        "charlm",
        SMALL
        | {
            "tune_step_sizes": True,
            "seeds": [1],
            "budget": 30,
            "evaluate_every": 10,
            "average_every": 0,
        },
        tmp_path,
    )
    for optimizer in SMALL["optimizers"]:
        tuning = results["tuning"][optimizer]
        assert (
            tuning["seed"] == 0
            and tuple(p["lr"] for p in tuning["points"]) == tuning_grid(optimizer)["lr"]
        )  # each optimizer's own documented grid
        (chosen,) = [p for p in tuning["points"] if p["chosen"]]
        assert results["step_sizes"][optimizer] == chosen["lr"]
        assert chosen["validation_loss"] == min(p["validation_loss"] for p in tuning["points"])
    reported = [r for r in store.runs() if not r["name"].startswith("tune ")]
    assert sorted((r["optimizer"], r["seed"]) for r in reported) == [
        ("adagrad", 1),
        ("adam", 1),
        ("adaqn", 1),
    ]
    assert len(store.runs()) == 3 + 5 + 5 + 4  # Adam's grid has four step sizes
    assert results["runs"]["adaqn seed 1"]["epochs"] < 1
    assert (
        len(results["memory"]["adaqn seed 1"]["average_memory"]) == 1
    )  # average_every 0: windows of one epoch, and 30 steps lie within the first
    assert [c["claim"][:12] for c in results["claims"]] == ["adaQN improv", "adaQN's step"]
    assert all(c["status"] in CLAIM_STATUSES and c["reason"] for c in results["claims"])
