"""Notebooks run in JupyterLab as a developer would (`make lab`), in headless Chromium: widgets must render.

Each check starts the server with `make lab`, opens the notebook, runs all cells and reads the rendered DOM (see
browser.JupyterLab). The notebooks are written under tests/_lab/ (git-ignored): the server's notebook directory is the
repository, and Jupyter does not serve hidden folders."""

import shutil
import uuid

import nbformat
import pytest
from browser import (
    FIGURE,
    FIGURE_WIDGET,
    REPO,
    SLIDER,
    JupyterLab,
    pids_mentioning,
    run_in_jupyterlab,
)
from nbformat.v4 import new_code_cell, new_notebook

pytestmark = pytest.mark.browser

FIGURE_AND_SLIDER = [
    "import ipywidgets as widgets\nimport plotly.graph_objects as go",
    "fig = go.FigureWidget(go.Scatter(y=[1, 3, 2], name='first'), layout=dict(title='before', width=600, height=300))\n"
    "slider = widgets.IntSlider(value=3, min=0, max=10, description='n')\n"
    "widgets.VBox([slider, fig])",
    # updated from Python after it was displayed: a second trace and a new title must reach the drawn figure
    "with fig.batch_update():\n    fig.add_scatter(y=[2, 1, 3], name='second')\n    fig.layout.title.text = 'updated'",
]
TRACES = ".js-plotly-plot .scatterlayer .trace"
TITLES = "[...node.querySelectorAll('.js-plotly-plot .gtitle')].map(e => e.textContent)"


@pytest.fixture
def notebooks():
    "write(cells) -> the path of a notebook with those code cells, under a folder of tests/_lab/ removed afterwards."
    folder = REPO / "tests" / "_lab" / uuid.uuid4().hex[:8]
    folder.mkdir(parents=True)

    def write(cells: list[str], name: str = "check") -> str:
        nb = new_notebook(
            cells=[new_code_cell(source) for source in cells],
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
        )
        nbformat.write(nb, folder / f"{name}.ipynb")
        return folder / f"{name}.ipynb"

    yield write
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # tests/_lab itself, unless another run still uses it
    except OSError:
        pass


def test_a_figure_widget_and_a_slider_render_and_the_figure_follows_python(notebooks, tmp_path):
    result = run_in_jupyterlab(
        notebooks(FIGURE_AND_SLIDER),
        wait_for=FIGURE_WIDGET,
        count=1,
        timeout=180,
        also={FIGURE: 1, SLIDER: 1, TRACES: 2},
        probe=TITLES,
        screenshot=tmp_path / "lab.png",
    )
    print(result.summary())  # the timings, with -s
    assert result.completed and not result.timed_out, result.summary()
    assert result.matches == 1 and result.counts[FIGURE_WIDGET] == result.counts[FIGURE] == 1, (
        result.summary()
    )
    assert (
        result.counts[SLIDER] == 1 and result.counts[TRACES] == 2 and result.probe == ["updated"]
    ), result.summary()
    assert result.errors == result.stderr == result.widget_errors == [], result.summary()
    assert result.exceptions == [] and result.console_errors == [], result.summary()


@pytest.mark.slow  # the checker's own test: it does not change when the notebooks do
def test_the_check_fails_on_a_raising_cell_and_tells_a_static_figure_from_a_widget_and_cleans_up(
    notebooks,
):
    raising = notebooks(
        [
            "import plotly.graph_objects as go\nfig = go.FigureWidget()",
            "raise ValueError('boom in a cell')",
            "fig",
        ],
        name="raising",
    )
    static = notebooks(
        [
            "import sys\nprint('a warning', file=sys.stderr)",
            "import plotly.graph_objects as go\ngo.Figure(go.Scatter(y=[1, 2]))",
        ],
        name="static",
    )
    with JupyterLab() as lab:
        home = lab.home
        # the run stops at the raising cell: the figure is never shown, and the check says so 2 s after the run ended
        failed = lab.run(raising, wait_for=FIGURE_WIDGET, timeout=120, settle=2)
        # a static go.Figure is drawn by JupyterLab's plotly mime renderer, not by a FigureWidget view
        plain = lab.run(static, wait_for=FIGURE, timeout=120, also={FIGURE_WIDGET: 0})
        assert lab.api("/api/kernels") == []  # each run shuts its kernel down
    assert (
        failed.finished and not failed.completed and not failed.timed_out and failed.matches == 0
    ), failed.summary()
    assert (
        len(failed.errors) == 1
        and failed.errors[0].startswith("cell 1: ")
        and "ValueError" in failed.errors[0]
        and "boom in a cell" in failed.errors[0]
    ), failed.summary()
    assert (
        plain.completed
        and plain.matches == 1
        and plain.counts[FIGURE_WIDGET] == 0
        and plain.errors == []
    ), plain.summary()
    assert [text.strip() for text in plain.stderr] == ["cell 0: a warning"], plain.summary()
    # everything started for the check is gone: server (make's process group), kernels, chromium, temp dirs
    assert lab.server.poll() is not None and lab.browser.poll() is not None
    assert not home.exists() and pids_mentioning(str(home)) == []


def test_the_dashboard_tutorial_runs_in_jupyterlab_and_its_live_figures_render(tmp_path):
    """nbs/tutorials/dashboard.ipynb, run cell by cell in the browser: the dashboard's four FigureWidgets are drawn by
    the anywidget front end, training data reached them (drawn lines), its buttons render, and no cell fails."""
    lines = ".js-plotly-plot .scatterlayer .trace path.js-line"
    result = run_in_jupyterlab(
        REPO / "nbs" / "tutorials" / "dashboard.ipynb",
        wait_for=FIGURE_WIDGET,
        count=4,
        timeout=300,
        also={".jupyter-widgets.widget-button": 6, lines: 1},
        screenshot=tmp_path / "dashboard.png",
    )
    print(result.summary())
    assert result.completed and not result.timed_out and result.matches == 4, result.summary()
    assert result.counts[".jupyter-widgets.widget-button"] >= 6 and result.counts[lines] >= 1, (
        result.summary()
    )
    assert result.errors == [] and result.widget_errors == [] and result.exceptions == [], (
        result.summary()
    )
