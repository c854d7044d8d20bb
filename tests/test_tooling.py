"""The project's own plumbing: the notebook/library/README sync check, and the Jupyter kernel of `make lab`."""

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_nbsync():
    spec = importlib.util.spec_from_file_location("nbsync", ROOT / "tools" / "nbsync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path):
    """A copy of the project's sources, to break on purpose."""
    for name in ("settings.ini", "README.md"):
        shutil.copy2(ROOT / name, tmp_path)
    for name in ("nbs", "qnwb", "tools"):
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"),
        )
    return tmp_path


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/nbsync.py", "check"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def edit_notebook(path: Path, edit) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    edit(nb["cells"])
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def test_sync_check_passes_on_an_untouched_copy(project):
    done = check(project)
    assert done.returncode == 0, done.stderr
    assert "in sync" in done.stdout


def test_sync_check_names_every_kind_of_drift_and_changes_nothing(project):
    def edit_exported_cell(cells):
        cell = next(c for c in cells if "def flat_params" in "".join(c["source"]))
        cell["source"] = [
            line.replace("one detached 1-D tensor", "ONE detached 1-D tensor")
            for line in cell["source"]
        ]
        next(c for c in cells if c["cell_type"] == "code")["execution_count"] = (
            7  # an unclean notebook too
        )

    edit_notebook(project / "nbs" / "00_core.ipynb", edit_exported_cell)
    (project / "qnwb" / "stale.py").write_text("x = 1\n")
    with (project / "README.md").open("a") as readme:
        readme.write("hand edit\n")
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}

    done = check(project)
    assert done.returncode == 1
    assert "qnwb/core.py: differs" in done.stderr and "library is out of sync" in done.stderr
    assert "ONE detached" in done.stderr  # the diff shows what the notebook now says
    assert "qnwb/stale.py: no notebook exports it" in done.stderr
    assert "nbs/00_core.ipynb: differs" in done.stderr and "not clean" in done.stderr
    assert "README.md is out of date" in done.stderr
    assert before == {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}


def test_readme_keeps_markdown_and_visible_code_and_drops_hidden_cells(tmp_path):
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Title\n", "\n", "Text."]},
        {
            "cell_type": "code",
            "metadata": {},
            "outputs": [],
            "execution_count": None,
            "source": ["#| hide\n", "secret = 1"],
        },
        {
            "cell_type": "code",
            "metadata": {},
            "execution_count": None,
            "source": ["#| eval: false\n", "print(2)"],
            "outputs": [{"output_type": "stream", "name": "stdout", "text": ["2\n"]}],
        },
    ]
    notebook = tmp_path / "index.ipynb"
    notebook.write_text(
        json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    )
    readme = load_nbsync().render_readme(notebook)
    assert "# Title\n\nText." in readme
    assert "secret" not in readme and "#|" not in readme
    assert "```python\nprint(2)\n```\n\n```\n2\n```\n" in readme


def test_the_lab_kernel_imports_qnwb():
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    assert "qnwb" in KernelSpecManager().find_kernel_specs(), "no 'qnwb' kernel: run make setup"
    manager, client = start_new_kernel(kernel_name="qnwb", startup_timeout=120)
    try:
        outputs = []
        client.execute_interactive(
            "import qnwb, qnwb.core; print(qnwb.__file__)",
            timeout=120,
            output_hook=lambda msg: outputs.append(msg["content"].get("text", "")),
        )
        assert str(ROOT / "qnwb" / "__init__.py") in "".join(outputs)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def write_notebook(path: Path, *cells: tuple[str, str]) -> None:
    "A notebook of (cell type, source) pairs."
    made = [
        {
            "cell_type": kind,
            "metadata": {},
            "source": source.splitlines(keepends=True),
            **({"outputs": [], "execution_count": None} if kind == "code" else {}),
        }
        for kind, source in cells
    ]
    path.write_text(
        json.dumps({"cells": made, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}),
        encoding="utf-8",
    )


def tiny_project(root: Path, first_cell: str) -> Path:
    "A project of one notebook exporting `qnwb.tiny` under `first_cell`, and a README notebook, put in sync by `nbsync.py fix`."
    root.mkdir()
    shutil.copy2(ROOT / "settings.ini", root)
    shutil.copytree(ROOT / "tools", root / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "nbs").mkdir()
    (root / "qnwb").mkdir()
    write_notebook(root / "nbs" / "index.ipynb", ("markdown", "# Tiny project\n\nText."))
    write_notebook(
        root / "nbs" / "01_tiny.ipynb",
        ("markdown", first_cell),
        ("code", "#| default_exp tiny"),
        ("code", "#| export\ndef one(x):\n    return x + 1"),
    )
    done = subprocess.run(
        [sys.executable, "tools/nbsync.py", "fix"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return root


def test_sync_check_refuses_a_summary_wrapped_over_several_lines(tmp_path):
    wrapped = tiny_project(
        tmp_path / "wrapped",
        "# Tiny\n\n> Adds one to a number, the smallest step there is,\n> and nothing else.",
    )
    assert (
        (wrapped / "qnwb" / "tiny.py")
        .read_text()
        .startswith('"""Adds one to a number, the smallest step there is,"""')
    )
    done = check(wrapped)
    assert done.returncode == 1
    problems = [line for line in done.stderr.splitlines() if line.strip()][
        :-1
    ]  # the last line counts them
    assert len(problems) == 1  # one line, naming the notebook: everything else is in sync
    assert problems[0].startswith("nbs/01_tiny.ipynb: the summary is wrapped over 2 `> ` lines")

    whole = tiny_project(
        tmp_path / "whole",
        "# Tiny\n\n> Adds one to a number, the smallest step there is.\n\nAnd nothing else.",
    )
    done = check(whole)
    assert done.returncode == 0, done.stderr
    assert "in sync" in done.stdout


@pytest.mark.parametrize(
    "first_cell, complaint",
    [
        ("# Tiny\n\n> Adds one to a number.", None),
        ("# Tiny\n\n> Does it add one?", None),
        ("# Tiny\n\n> Adds one (see `one`.)", None),
        ("# Tiny\n\n> Adds one: `x + 1.`", None),
        ("# Tiny\n\n> Adds one to a number and", "does not end a sentence"),
        ("# Tiny\n\n> Adds one (see `one`)", "does not end a sentence"),
        ("# Tiny\n\nAdds one to a number.", "no summary"),
        ("Adds one to a number.", "no summary"),
        ("# Tiny\n\n> Adds one\n>\n> to a number.", "wrapped over 3"),
        (
            "# Tiny\n\n> Adds one to a number.\n\nLater, a quotation:\n\n> quoted\n> over two lines",
            None,
        ),
    ],
    ids=[
        "period",
        "question",
        "period-in-parentheses",
        "period-in-code",
        "mid-sentence",
        "no-punctuation",
        "no-quote",
        "no-title",
        "wrapped",
        "a-later-quotation",
    ],
)
def test_the_summary_must_be_one_quoted_line_that_ends_a_sentence(tmp_path, first_cell, complaint):
    "What the sync check asks of the first cell of an exporting notebook, on the notebook and the module nbdev makes from it."
    (tmp_path / "nbs").mkdir()
    (tmp_path / "qnwb").mkdir()
    write_notebook(
        tmp_path / "nbs" / "01_tiny.ipynb",
        ("markdown", first_cell),
        ("code", "#|  default_exp tiny"),
    )
    write_notebook(
        tmp_path / "nbs" / "index.ipynb", ("markdown", "# Not exported\n\n> wrapped\n> summary")
    )
    summary = (
        next((line[2:] for line in first_cell.splitlines() if line.startswith("> ")), "")
        if first_cell.startswith("# ")
        else ""
    )
    (tmp_path / "qnwb" / "tiny.py").write_text(
        (f'"""{summary}"""\n\n' if summary else "") + "x = 1\n", encoding="utf-8"
    )
    problems = load_nbsync().summary_problems(tmp_path, "qnwb", "nbs")
    if complaint is None:
        assert problems == []
    else:
        assert (
            len(problems) == 1
            and problems[0].startswith("nbs/01_tiny.ipynb: ")
            and complaint in problems[0]
        )
        assert "\n" not in problems[0]


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    "(line, top-level module name) of every import statement in `tree`, nested ones included; `from . import x` gives x."
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.lineno, node.module.split(".")[0]))
            if node.level or not node.module:  # relative: the names may be modules of the folder
                found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_no_test_file_imports_conftest_or_another_test_file():
    """Shared code lives in plain helper modules (references, resizing, roundoff, browser, reporting, ...): a test file
    importing another runs that file's module-level code and couples two suites; conftest is for hooks and fixtures."""
    files = sorted((ROOT / "tests").glob("*.py"))
    assert len([f for f in files if f.name.startswith("test_")]) >= 30  # the glob found the suite
    offences = []
    for path in files:
        if path.name == "conftest.py":
            continue
        for line, module in imported_modules(
            ast.parse(path.read_text(encoding="utf-8"), str(path))
        ):
            if module == "conftest" or module.startswith("test_"):
                offences.append(f"tests/{path.name}:{line} imports {module}")
    assert not offences, "\n".join(offences)
