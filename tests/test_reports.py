"""Report machinery: parameters read from the template, checked before running, real papermill execution and HTML."""

import json
import math
import re

import pytest

from qnwb.reports import (
    check_parameters,
    parse_value,
    render_report,
    report_names,
    template_parameters,
    template_path,
)


def _template(folder, parameters: str, body: list[str]):
    cells = [
        {
            "cell_type": "code",
            "metadata": {"tags": ["parameters"]},
            "source": parameters,
            "outputs": [],
            "execution_count": None,
        }
    ]
    cells += [
        {"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
        for src in body
    ]
    nb = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (folder / "demo.ipynb").write_text(json.dumps(nb))
    return folder / "demo.ipynb"


FIGURES = [
    "from qnwb.reports import use_static_figures, report_results\nuse_static_figures()\nimport plotly.graph_objects as go",
    "go.Figure(go.Scatter(y=list(range(steps)), name='line'), layout=dict(title=title))",
    "go.Figure(go.Bar(y=[1, 2, 3], name='bars'))",
    "report_results({'steps': steps, 'title': title})",
]


@pytest.fixture
def templates(tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    folder.mkdir()
    _template(folder, "steps = 3\ntitle = 'demo'\nrate = 0.5", FIGURES)
    monkeypatch.setenv("QNWB_REPORTS", str(folder))
    return folder


def test_parameters_are_read_without_running_the_template(templates):
    assert report_names() == ["demo"]
    assert template_parameters(template_path("demo")) == {"steps": 3, "title": "demo", "rate": 0.5}


def test_a_parameters_cell_with_code_is_refused(tmp_path):
    path = _template(tmp_path, "steps = 3\nimport os", [])
    with pytest.raises(ValueError, match="may only assign literals"):
        template_parameters(path)
    path = _template(tmp_path, "steps = len('abc')", [])
    with pytest.raises(ValueError, match="steps is not a literal"):
        template_parameters(path)


def test_unknown_report_and_bad_names(templates):
    with pytest.raises(ValueError, match="unknown report 'nope'; available: demo"):
        template_path("nope")
    with pytest.raises(ValueError, match="a name is letters"):
        template_path("../demo")


def test_parameter_checks():
    defaults = {"steps": 10, "rate": 0.1, "names": ["a"], "seed": None, "flag": False}
    assert check_parameters(defaults, {"rate": 1, "names": ("b",), "seed": 3, "flag": True}) == {
        "steps": 10,
        "rate": 1,
        "names": ["b"],
        "seed": 3,
        "flag": True,
    }
    for given, message in [
        ({"step": 1}, "unknown step"),
        ({"steps": 2.5}, "steps must be a int"),
        ({"steps": True}, "steps must be a int"),
        ({"rate": "fast"}, "rate must be a float"),
        ({"flag": 1}, "flag must be a bool"),
        ({"names": "a"}, "names must be a list"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_parameters(defaults, given)
    assert [parse_value(s) for s in ["3", "-0.5", "[1, 2]", "True", "None", "adam", "1e-3"]] == [
        3,
        -0.5,
        [1, 2],
        True,
        None,
        "adam",
        1e-3,
    ]


def test_render_runs_papermill_with_the_given_parameters(templates, tmp_path):
    report = render_report("demo", {"steps": 5}, out=tmp_path / "out", progress=False)
    assert report.parameters == {"steps": 5, "title": "demo", "rate": 0.5}
    assert json.loads(report.results.read_text()) == {"steps": 5, "title": "demo"}
    html = report.html.read_text()
    assert (
        re.findall(r"<script[^>]*\ssrc=", html) == []
    )  # nothing loaded from elsewhere: not a CDN, not an empty src
    assert len(re.findall(r"plotly\.js v\d", html)) == 1  # plotly.js inlined once for both figures
    assert (
        html.count("Plotly.newPlot") >= 2
        and report.html.stem == report.notebook.stem == report.results.stem
    )
    assert (
        "PosixPath" not in html and str(report.results) not in html
    )  # it ends on its results, not a path


def test_bad_parameters_fail_before_anything_is_written(templates, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown colour"):
        render_report("demo", {"colour": "red"}, out=out, progress=False)
    with pytest.raises(ValueError, match="steps must be a int"):
        render_report("demo", {"steps": "many"}, out=out, progress=False)
    assert not out.exists()


def test_an_unwritable_report_folder_is_a_clear_error(templates, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot create the report folder"):
        render_report("demo", out=blocker / "reports", progress=False)


def test_a_failing_template_raises_and_keeps_the_executed_notebook(tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    folder.mkdir()
    _template(folder, "steps = 3", ["raise RuntimeError('template broke at step ' + str(steps))"])
    monkeypatch.setenv("QNWB_REPORTS", str(folder))
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="template broke at step 3"):
        render_report("demo", out=tmp_path / "out", progress=False)
    assert list((tmp_path / "out").glob("demo-*.ipynb"))


@pytest.mark.browser
def test_rendered_html_draws_every_figure_offline_in_chromium(templates, tmp_path):
    from browser import drawn_plots, open_in_chromium, script_errors

    report = render_report("demo", out=tmp_path / "out", progress=False)
    dom, console = open_in_chromium(report.html)
    assert drawn_plots(dom) == 2, console
    assert script_errors(console) == []


@pytest.fixture(scope="module")
def small_tour(tmp_path_factory):
    "The tour rendered once at a small budget for the tests that read it: (report, its folder)."
    folder = tmp_path_factory.mktemp("tour")
    parameters = {
        "budget": 300,
        "evaluate_every": 100,
        "optimizers": ["hessian_free", "nag"],
        "store": str(folder / "tour.sqlite"),
    }
    return render_report("tour", parameters, out=folder / "reports", progress=False), folder


def test_the_tour_runs_with_overridden_parameters_and_writes_store_json_and_html(small_tour):
    from qnwb.store import RunStore

    report, tmp_path = small_tour
    results = json.loads(report.results.read_text())
    assert results["parameters"]["budget"] == 300 and sorted(results["runs"]) == [
        "hessian_free seed 1",
        "nag seed 1",
    ]
    assert [row["label"] for row in results["summary"]] == ["hessian_free", "nag"]
    # the tuning protocol: NAG's 4 rates × 2 values of μ₀ on seed 0, the winner on seed 1; HF has nothing to tune
    nag = results["tuning"]["nag"]
    assert nag["seed"] == 0 and len(nag["points"]) == 8
    (chosen,) = [p for p in nag["points"] if p["chosen"]]
    assert {k: chosen[k] for k in ("lr", "momentum")} == {
        k: results["hyperparameters"]["nag"][k] for k in ("lr", "momentum")
    }
    assert chosen["validation_loss"] == min(p["validation_loss"] for p in nag["points"])
    assert len(results["tuning"]["hessian_free"]["points"]) == 1
    from qnwb.tasks import input_independent_error, make_task

    assert results["input_independent"]["validation_error"] == input_independent_error(
        make_task("addition", 20)
    )
    for optimizer, standing in results["standing"].items():
        final = results["runs"][f"{optimizer} seed 1"]["last_evaluation"]
        assert standing["worst_loss"] == final["validation_loss"]
        assert standing["below_loss"] == (
            final["validation_loss"] < results["input_independent"]["validation_loss"]
        )
    runs = RunStore(tmp_path / "tour.sqlite").runs()
    tuning_runs = [r for r in runs if r["name"].startswith("tune ")]
    assert len(tuning_runs) == 8 and {r["optimizer"] for r in tuning_runs} == {"nag"}
    assert [(r["optimizer"], r["status"]) for r in runs if r not in tuning_runs] == [
        ("hessian_free", "finished"),
        ("nag", "finished"),
    ]
    assert all(r["steps"] > 0 for r in runs)
    assert (
        report.html.name.startswith("tour-") and report.html.stat().st_size > 1_000_000
    )  # plotly.js inlined


@pytest.mark.browser
def test_the_tour_html_draws_every_figure_offline_in_chromium(small_tour):
    from browser import drawn_plots, open_in_chromium, script_errors

    report, _ = small_tour
    dom, console = open_in_chromium(report.html)
    assert drawn_plots(dom) == 5, (
        console
    )  # two learning curves, the spectrum, the CG run, CM vs NAG
    assert script_errors(console) == []


def test_tables_and_curves_take_diverged_runs_whose_metrics_the_store_kept_as_null():
    from qnwb.reports import learning_curves_figure, summary_table

    rows = lambda errors: [
        {"gradient_evaluations": 10 * k, "curvature_products": 0, "validation_error": e}
        for k, e in enumerate(errors)
    ]
    curves = {"diverged": [rows([0.9, None])], "fine": [rows([0.9, 0.2])]}
    table = summary_table(curves, target=0.5)
    assert (
        math.isnan(table.rows[0]["final"])
        and table.rows[0]["best"] == 0.9
        and table.rows[0]["reached"] == 0
    )
    assert table.rows[1]["speed"] == 10.0
    figure = learning_curves_figure(curves)
    assert math.isnan(figure.data[0].y[1]) and list(figure.data[1].y) == [0.9, 0.2]


def test_two_renderings_in_one_second_do_not_overwrite_each_other(templates, tmp_path, monkeypatch):
    import datetime

    import qnwb.reports

    class Frozen(datetime.datetime):  # the clock stands still: both renderings get the same second
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 22, 12, 0, 0)

    monkeypatch.setattr(qnwb.reports._dt, "datetime", Frozen)
    first = render_report("demo", out=tmp_path / "out", progress=False)
    second = render_report("demo", out=tmp_path / "out", progress=False)
    assert (
        first.html.name == "demo-20261122-120000.html"
        and second.html.name == "demo-20261122-120000-2.html"
    )
    assert json.loads(first.results.read_text()) == json.loads(second.results.read_text())


def test_outside_render_report_a_templates_outputs_go_to_a_temporary_folder_not_the_working_one(
    tmp_path, monkeypatch
):
    from qnwb.reports import report_output

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QNWB_REPORT_DIR", raising=False)
    ledger = report_output("figure3-runs.jsonl").resolve()
    assert not ledger.is_relative_to(tmp_path.resolve())
    assert ledger.parent.is_dir() and report_output("other.json").resolve().parent == ledger.parent
    monkeypatch.setenv("QNWB_REPORT_DIR", str(tmp_path / "rendered"))
    assert report_output("x.json") == tmp_path / "rendered" / "x.json"


def test_static_figures_leave_plotly_json_to_a_page_that_asks_for_it(monkeypatch):
    import plotly.io as pio

    from qnwb.reports import use_static_figures

    before = pio.renderers.default
    try:
        monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")
        pio.renderers.default = "plotly_mimetype"
        use_static_figures()
        assert pio.renderers.default == "plotly_mimetype"
        monkeypatch.setenv(
            "PLOTLY_RENDERER", "browser"
        )  # would open tabs and leave the report without figures
        use_static_figures()
        assert pio.renderers.default == "notebook"
        pio.renderers.default = "plotly_mimetype"
        monkeypatch.delenv("PLOTLY_RENDERER")
        use_static_figures()
        assert pio.renderers.default == "notebook"
    finally:
        pio.renderers.default = before
