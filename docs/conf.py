"""Sphinx configuration of qnwb's documentation site: `make docs` (sphinx-build -c docs SOURCE OUT). The pages are
made from the notebooks into SOURCE when the build starts (docs/pages.py), executed by myst-nb with jupyter-cache
(a notebook re-runs when its code or the library changed), and the build fails when a notebook raises. Everything the site
loads is in it: plotly.js and MathJax are copied from their Python packages, so pages work offline."""

import ast
import inspect
import io
import json
import os
import re
import shutil
import sys
import tokenize
from importlib import metadata
from pathlib import Path

import plotly
from docutils import nodes
from fastcore.docments import docments
from jupyter_cache import get_cache
from myst_nb.core import render
from sphinx.errors import ExtensionError

sys.path.insert(0, str(Path(__file__).parent))
import pages  # noqa: E402

import qnwb  # noqa: E402

project = "qnwb"
author = "qnwb developers"
copyright = "2026 onwards, qnwb developers"
release = version = qnwb.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = f"qnwb {version}"
html_static_path = []  # set when the build starts: SOURCE/_static
exclude_patterns = ["_static"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # torch's docstrings (nn.Module.forward ...) are not qnwb's
default_role = "literal"  # docstrings write `name` for code, as markdown does

# Execution: every notebook runs during the build, cached by jupyter-cache next to the output folder; a cell that
# raises fails the build. Runs go to a store of the build's own (runs.sqlite beside the HTML folder, never the
# developer's); figures come out as plotly's JSON (drawn by the page).
nb_execution_mode = "cache"
nb_execution_timeout = 1800
nb_execution_raise_on_error = False  # reported by name once all notebooks ran: _failed_notebooks
nb_execution_show_tb = True
nb_merge_streams = True
nb_ipywidgets_js = {}  # the widget manager would come from a CDN: a widget's place says where it runs instead
os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"

# MathJax 2 from jupyter-server-mathjax (copied into the site), for the papers' equations.
# myst marks every page "ignore" and each equation "math"; MathJax 2 needs that said in its own configuration (myst's
# is MathJax 3's, so it is turned off).
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax_options = {"async": "async"}
myst_update_mathjax = False
mathjax2_config = {
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processEscapes": True,
        "ignoreClass": "tex2jax_ignore|mathjax_ignore",
        "processClass": "tex2jax_process|mathjax_process|math|output_area",
    },
    "messageStyle": "none",
}

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class FiguresAndWidgets:
    """myst-nb's renderer for plotly's figure JSON (a div that the page's plotly.js draws) and for widget views (a
    line saying that the widget runs in JupyterLab: a static page has no kernel to steer)."""

    mime_priority_overrides = [("html", PLOTLY, 1), ("html", WIDGET, 2)]

    @staticmethod
    def handle_mime(renderer, data, inline):
        if data.mime_type == PLOTLY:
            figure = render.sanitize_script_content(json.dumps(data.content))
            html = (  # drawn once the page is read: the theme loads plotly.js after the body
                '<div class="qnwb-plotly"></div><script>(function () {'
                f"const figure = {figure}, div = document.currentScript.previousElementSibling;"
                'window.addEventListener("DOMContentLoaded", () =>'
                " Plotly.newPlot(div, figure.data, figure.layout, {responsive: true}));})();</script>"
            )
            return [nodes.raw("", html, format="html", classes=["output", "text_html"])]
        if data.mime_type == WIDGET:
            text = "An interactive widget: run this notebook in JupyterLab (make lab) to use it."
            return [nodes.paragraph(text=text, classes=["output", "qnwb-widget"])]
        return None


_plugins = render.load_mime_renders
render.load_mime_renders = lambda: [FiguresAndWidgets, *_plugins()]


def _static(srcdir: Path) -> Path:
    "SOURCE/_static with plotly.js and MathJax, copied again only when their packages changed."
    static = srcdir / "_static"
    static.mkdir(parents=True, exist_ok=True)
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if (
        not (static / "plotly.min.js").exists()
        or (static / "plotly.min.js").read_bytes() != plotly_js.read_bytes()
    ):
        shutil.copy(
            plotly_js, static / "plotly.min.js"
        )  # the plotly.js of the plotly that wrote the figures
    import jupyter_server_mathjax

    done = static / "mathjax" / f".copied-{metadata.version('jupyter-server-mathjax')}"
    if not done.exists():  # a copy cut short, or another version's, is made again
        shutil.rmtree(static / "mathjax", ignore_errors=True)
        shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", static / "mathjax")
        done.touch()
    return static


def _make_pages(app, config) -> None:
    srcdir = Path(app.srcdir)
    only = os.environ.get("QNWB_DOCS_ONLY")
    pages.prepare(srcdir, set(only.split(",")) if only else None)
    # jupyter-cache's database made here, once: two parallel readers would both create its tables and one would fail
    get_cache(Path(app.outdir).parent / ".jupyter_cache").list_cache_records()
    os.environ["QNWB_STORE"] = str(
        Path(app.outdir).parent / "runs.sqlite"
    )  # the kernels inherit it
    config.html_static_path = [str(_static(srcdir))]


def _page_scripts(app, pagename, templatename, context, doctree) -> None:
    """plotly.js only on the pages that draw a figure; no widget state (megabytes of JSON that only a widget manager,
    absent here, would read)."""
    if 'class="qnwb-plotly"' in context.get("body", ""):
        app.add_js_file("plotly.min.js")
    context["script_files"] = [
        script
        for script in context.get("script_files", [])
        if getattr(script, "attributes", {}).get("type") != WIDGET_STATE
    ]


# reST reads these as markup; qnwb's docstrings are markdown-like text, where they are characters.
_MARKUP = re.compile(r"(`[^`]*`)|([|*_\\])")


def _as_text(line: str) -> str:
    "A docstring line with `|`, `*`, `_` and backslashes escaped outside its code spans."
    return _MARKUP.sub(lambda match: match[1] or "\\" + match[2], line)


def _trailing_comment(name: str) -> str | None:
    """The comment on the line of a module constant's assignment (`NAME = value  # what it is`), nbdev's way to
    document one; autodoc would show the docstring of the value's type (a tuple's, a dict's) instead."""
    module, _, attribute = name.rpartition(".")
    try:
        source = inspect.getsource(sys.modules[module])
    except (KeyError, TypeError, OSError):
        return None
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = {
            leaf.id
            for target in targets
            if target
            for leaf in ast.walk(target)
            if isinstance(leaf, ast.Name)
        }
        if isinstance(node, ast.Assign | ast.AnnAssign) and attribute in names:
            line = source.splitlines()[node.lineno - 1]
            comments = []
            try:  # the first line alone: `X = {` ends inside the statement
                for token in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
                    comments += [token.string] if token.type == tokenize.COMMENT else []
            except tokenize.TokenError:
                pass
            return comments[0].lstrip("# ").strip() if comments else None
    return None


def _docstring(app, what, name, obj, options, lines) -> None:
    """A docstring as reST: its markup characters escaped, its indented continuation lines joined, and the comments
    on each parameter (nbdev's docments: `x: int,  # what x is`) as a parameter list."""
    text = [_as_text(line.strip()) if line.strip() else "" for line in lines]
    lines[:] = text
    if what == "data":
        lines[:] = [_as_text(comment), ""] if (comment := _trailing_comment(name)) else []
        value = repr(obj)
        plain = len(value) <= 100 and "`" not in value and " at 0x" not in value
        lines += [f"Value: ``{value}``"] if plain else []
        return
    if what not in ("function", "method", "class"):
        return
    try:
        comments = docments(obj, full=False)
    except (TypeError, ValueError, OSError, SyntaxError):
        return
    described = [(key, comment) for key, comment in comments.items() if comment and key != "self"]
    lines += [""] if described and lines else []
    for key, comment in described:
        lines.append(
            f":returns: {_as_text(comment)}"
            if key == "return"
            else f":param {key}: {_as_text(comment)}"
        )


def _failed_notebooks(app, env) -> None:
    """Stop the build when a notebook raised: its name and error (the traceback is the warning above). myst-nb's own
    stop, raised inside a parallel reader, would print only Sphinx's parallel-build error."""
    failed = [
        f"{docname} ({data['exec_data']['error']})"
        for docname, data in sorted(getattr(env, "nb_metadata", {}).items())
        if data.get("exec_data") and not data["exec_data"]["succeeded"]
    ]
    if failed:
        raise ExtensionError(
            f"{len(failed)} notebook(s) raised while the site was built: {', '.join(failed)}"
        )


def setup(app):
    app.connect("env-updated", _failed_notebooks)
    app.connect("config-inited", _make_pages)
    app.connect("autodoc-process-docstring", _docstring)
    app.connect("html-page-context", _page_scripts)
