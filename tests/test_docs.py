"""The documentation site: the pages docs/pages.py makes from the notebooks, and the site `sphinx-build -c docs` builds
from them, opened page by page in headless Chromium (every page loads without console errors, its figures drawn and
its equations typeset, an API page for every public module with every public name, search that finds)."""

import http.server
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import nbformat
import pytest
from browser import chromium, drawn_plots, open_in_chromium, script_errors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import pages  # noqa: E402

# The pages of the site built in `make test`, besides the landing and getting-started pages (equations): an API
# page with figures, one with widgets, a report of the gallery (the slow test builds and opens the whole site).
SAMPLE = ("80_quadratic", "95_widgets", "curvature")


def public_modules() -> list[str]:
    "Every module of qnwb with a public API (its `__all__` not empty), by name under qnwb (`diagnostics.cg`)."
    import qnwb

    names = [info.name for info in pkgutil.walk_packages(qnwb.__path__, "qnwb.")]
    public = [name for name in names if not name.split(".")[-1].startswith("_")]
    return sorted(
        name.removeprefix("qnwb.")
        for name in public
        if getattr(importlib.import_module(name), "__all__", None)
    )


# --- making pages from notebooks ---


def test_directives_are_read_from_the_top_of_a_cell_only():
    found, source = pages.directives("#| export\n#| eval: false\nx = 1\n#| hide\n")
    assert found == {"export": "", "eval": "false"}
    assert source == "x = 1\n#| hide"
    assert pages.directives("#| default_exp core")[0] == {"default_exp": "core"}


def test_exported_names_are_the_public_names_a_cell_binds():
    import qnwb.tasks as tasks

    source = "NOISE, (X_SYMBOL, START) = 1, (2, 3)\nTRIGGER: int = 4\nNOISE.real = 5\nlookup = {}\nlookup[1] = 2\n"
    source += "def make_task(): pass\nclass _Hidden: pass"
    assert pages.exported_names(source, tasks) == [
        "NOISE",
        "X_SYMBOL",
        "START",
        "TRIGGER",
        "make_task",
    ]


def _code(source: str):
    return nbformat.v4.new_code_cell(source)


def test_nbdev_directives_become_tags_and_exported_cells_show_their_api():
    import qnwb.core as core

    hidden, slow, shown = (
        pages.page_cells(_code("#| hide\nx = 1"))[0],
        pages.page_cells(_code("#| slow\nx = 1"))[0],
        pages.page_cells(_code("x = 1"))[0],
    )
    assert hidden.metadata["tags"] == ["remove-cell"] and hidden.source == "x = 1"
    assert slow.metadata["tags"] == ["skip-execution"]
    assert "tags" not in shown.metadata
    cuda = pages.page_cells(_code("#| cuda\nx = 1"))[0]
    assert cuda.metadata["tags"] == ["skip-execution"]
    source = "#| export\ndef default_device(x): pass\ndef _private(): pass\nclass FlatBuffer: pass\nSETTING_BOUNDS = 1"
    code, api = pages.page_cells(_code(source), core)
    assert code.metadata["tags"] == ["remove-input"]
    assert api.cell_type == "markdown"
    assert ".. autofunction:: qnwb.core.default_device" in api.source
    assert ".. autoclass:: qnwb.core.FlatBuffer\n   :members:" in api.source
    assert ".. autodata:: qnwb.core.SETTING_BOUNDS" in api.source
    assert "_private" not in api.source
    assert pages.page_cells(nbformat.v4.new_raw_cell("---\nskip_exec: true\n---")) == []


def test_a_module_page_names_its_module_and_enters_the_notebooks_folder():
    notebook = pages.page(pages.read(pages.NBS / "00_core.ipynb"), pages.NBS)
    setup = notebook.cells[0]
    assert setup.metadata["tags"] == ["remove-cell"] and repr(str(pages.NBS)) in setup.source
    assert any(cell.source == "Module `qnwb.core`." for cell in notebook.cells[:4])
    assert not any(cell.source.lstrip().startswith("#|") for cell in notebook.cells)


def test_prepare_writes_the_selected_pages_and_removes_only_its_own_stale_ones(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "gone.ipynb").write_text("{}")
    (tmp_path / pages.MANIFEST).write_text("api/gone.ipynb\n../outside.md\n")
    (tmp_path.parent / "outside.md").write_text("not the site's")
    written = set(pages.prepare(tmp_path, {"00_core", "distributed", "summary"}))
    assert {
        "index.ipynb",
        "getting_started.md",
        "api/core.ipynb",
        "tutorials/distributed.ipynb",
    } <= written
    assert "reports/summary.ipynb" in written and "api/losses.ipynb" not in written
    assert not (tmp_path / "api" / "gone.ipynb").exists()  # the last build's, not made now
    assert (tmp_path.parent / "outside.md").exists()  # a manifest never reaches outside the folder
    assert "[`qnwb.core`](core.ipynb)" in (tmp_path / "api" / "index.md").read_text()
    os.utime(tmp_path / "api" / "core.ipynb", ns=(1, 1))
    (tmp_path / "mine.md").write_text("a page nobody made")
    pages.prepare(tmp_path, {"00_core"})
    assert (
        tmp_path / "api" / "core.ipynb"
    ).stat().st_mtime_ns == 1  # unchanged pages are not rewritten
    assert not (tmp_path / "tutorials" / "distributed.ipynb").exists()
    assert (tmp_path / "mine.md").exists()  # never written by a build: never removed


def test_prepare_refuses_the_notebooks_or_a_folder_holding_them():
    for folder in (pages.REPO, pages.NBS, pages.NBS / "tutorials", pages.DOCS, pages.REPO.parent):
        with pytest.raises(ValueError, match="a folder of their own"):
            pages.prepare(folder, {"00_core"})
    assert (pages.NBS / "00_core.ipynb").exists() and (pages.REPO / "README.md").exists()


def test_every_report_template_has_a_gallery_entry_with_parameters_it_takes():
    from qnwb.reports import reports_dir

    assert set(pages.GALLERY) == {path.stem for path in reports_dir().glob("*.ipynb")}
    for name, parameters in pages.GALLERY.items():
        pages.report_page(
            name, parameters, pages.REPO
        )  # checks names and types as `qnwb report` does
    with pytest.raises(ValueError, match="budgett"):
        pages.report_page("tour", {"budgett": 10}, pages.REPO)


def test_directives_may_have_blank_lines_among_them():
    found, source = pages.directives("\n#| hide\n\n#| exporti\nx = 1")
    assert found == {"hide": "", "exporti": ""} and source == "x = 1"


# --- the built site, in headless Chromium ---


def sphinx(folder: Path, only: tuple[str, ...] | None) -> subprocess.CompletedProcess:
    "`make docs`'s build into folder/html, its sources in folder/source and its cache beside them; only `only`'s pages."
    (folder / "source").mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "QNWB_DOCS_ONLY"}
    env |= {"QNWB_DOCS_ONLY": ",".join(only)} if only else {}
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-b",
        "html",
        "-j",
        "2",
        "-q",
        "-c",
        str(REPO / "docs"),
    ]
    command += ["-d", str(folder / "doctrees"), str(folder / "source"), str(folder / "html")]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def build_site(folder: Path, only: tuple[str, ...] | None) -> Path:
    "The site built into folder/html (see `sphinx`)."
    result = sphinx(folder, only)
    assert result.returncode == 0, result.stderr[-6000:]
    return folder / "html"


def test_a_notebook_cell_that_raises_stops_the_build(tmp_path):
    broken = (
        tmp_path / "source" / "more" / "pages" / "broken.ipynb"
    )  # a page of the source folder, not of the notebooks
    broken.parent.mkdir(parents=True)
    cells = [
        nbformat.v4.new_markdown_cell("# Broken"),
        nbformat.v4.new_code_cell("raise ValueError('stop the build')"),
    ]
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=kernel), broken)
    result = sphinx(tmp_path, ("no notebook",))
    assert result.returncode != 0
    shown = result.stdout + result.stderr
    assert "stop the build" in shown  # the cell's error, and the notebook named at the end
    assert "notebook(s) raised while the site was built: more/pages/broken" in shown
    assert not (tmp_path / "html" / "index.html").exists()


def site_pages(html: Path) -> list[Path]:
    "The site's content pages (not Sphinx's generated index, search page, highlighted sources)."
    return sorted(
        path
        for path in html.rglob("*.html")
        if path.relative_to(html).parts[0] not in ("_modules", "_sources", "_static")
        and path.name not in ("genindex.html", "search.html")
    )


@contextmanager
def served(html: Path):
    "The site served over HTTP on this machine (as a host serves it: search fetches its result pages), its base URL."

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def check_page(html: Path, base: str, path: Path) -> tuple[list[str], int]:
    """What is wrong with one page as Chromium shows it (console errors, figures not drawn, equations not typeset),
    and how many figures it drew."""
    source = path.read_text()
    dom, console = open_in_chromium(base + path.relative_to(html).as_posix(), wait_ms=20000)
    problems = [f"console: {line}" for line in script_errors(console)]
    if "<article" not in dom:
        problems.append("no article: the page did not load")
    figures = source.count('class="qnwb-plotly"')
    if drawn_plots(dom) != figures:
        problems.append(f"{drawn_plots(dom)} of {figures} figures drawn")
    equations, typeset = (
        source.count('class="math'),
        len(re.findall(r'class="MathJax(?:_Display|_CHTML)?"', dom)),
    )
    if equations and not typeset:
        problems.append(f"{equations} equations, none typeset by MathJax")
    return [f"{path.name}: {problem}" for problem in problems], drawn_plots(dom)


def home_of(module, item: str) -> str:
    "The module that defines public name `item` of `module`: a class's or function's own, a package's submodule."
    value = getattr(module, item)
    if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__.startswith(
        "qnwb."
    ):
        return value.__module__
    for info in pkgutil.iter_modules(getattr(module, "__path__", []), module.__name__ + "."):
        submodule = importlib.import_module(info.name)
        if item in getattr(submodule, "__all__", ()) and getattr(submodule, item) is value:
            return info.name
    return module.__name__


def undocumented(html: Path, name: str) -> list[str]:
    "The public names of module qnwb.`name` that the site does not document on the page of the module defining them."
    module, missing = importlib.import_module(f"qnwb.{name}"), []
    for item in module.__all__:
        value = getattr(module, item)
        if inspect.ismodule(value):
            found = (html / "api" / f"{value.__name__.removeprefix('qnwb.')}.html").exists()
        else:
            home = home_of(module, item)
            page = html / "api" / f"{home.removeprefix('qnwb.')}.html"
            found = page.exists() and f'id="{home}.{item}"' in page.read_text()
        missing += [] if found else [item]
    return missing


def check_site(html: Path, modules: list[str], search: dict[str, str]) -> dict[str, int]:
    "Check every page, the API pages of `modules` and the `search` queries (query → a page among the hits); the figures drawn per page."
    everything = site_pages(html)
    with served(html) as base, ThreadPoolExecutor(2) as pool:
        checked = list(pool.map(partial(check_page, html, base), everything))
        assert [problem for problems, _ in checked for problem in problems] == []
        for query, expected in search.items():  # Sphinx's search, run by the search page's script
            dom, console = open_in_chromium(f"{base}search.html?q={query}", wait_ms=20000)
            found = re.findall(r'<li[^>]*><a href="([^"]+)"', dom.split('id="search-results"')[-1])
            assert any(expected in link for link in found), (query, found[:10])
            assert script_errors(console) == []
    for name in modules:  # an API page per public module, every public name documented
        assert (html / "api" / f"{name}.html").exists(), name
        assert undocumented(html, name) == [], name
    return {
        path.relative_to(html).as_posix(): drawn for path, (_, drawn) in zip(everything, checked)
    }


needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="no headless Chromium (Debian's chromium package)"
)


@needs_chromium
@pytest.mark.browser
def test_a_sample_of_the_site_builds_and_every_page_works_in_chromium(tmp_path):
    html = build_site(tmp_path, SAMPLE)
    names = {path.relative_to(html).as_posix() for path in site_pages(html)}
    assert {
        "index.html",
        "getting_started.html",
        "api/widgets.html",
        "reports/curvature.html",
    } <= names
    assert "api/core.html" not in names
    assert (
        'class="math' in (html / "getting_started.html").read_text()
    )  # MathJax typesets it: check_page
    drawn = check_site(
        html,
        ["quadratic", "widgets"],
        {"eigendirection": "api/quadratic", "checkpoints": "reports/curvature"},
    )
    assert drawn["api/quadratic.html"] >= 3 and drawn["reports/curvature.html"] >= 3, drawn


@needs_chromium
@pytest.mark.browser
@pytest.mark.slow
def test_make_docs_builds_the_whole_site_and_every_page_works_in_chromium(tmp_path):
    html = build_site(tmp_path, None)
    modules = public_modules()
    assert {f"api/{name}.html" for name in modules} <= {
        path.relative_to(html).as_posix() for path in site_pages(html)
    }
    drawn = check_site(
        html,
        modules,
        {
            "conjugate": "api/solvers",
            "structural": "api/curvature",
            "dashboard": "tutorials/dashboard",
        },
    )
    assert all(drawn[f"reports/{name}.html"] >= 1 for name in pages.GALLERY if name != "summary"), (
        drawn
    )
