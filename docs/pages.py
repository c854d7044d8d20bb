"""The pages of qnwb's documentation site, made from its nbdev notebooks: each notebook becomes a page that myst-nb
executes during the build (nbdev's directives read as myst-nb's tags, the API of an exported cell as autodoc), and
each report template a gallery page rendered at small parameters."""

import ast
import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
NBS = REPO / "nbs"
DOCS = REPO / "docs"
MANIFEST = ".qnwb-pages"  # in the site's source folder: the pages the last build wrote

# nbdev's tst_flags: cells that nbdev_test runs only when asked (`make test-slow`, a GPU); the site never runs them.
SKIPPED_FLAGS = {"slow", "cuda", "notest"}

# The gallery renders each report at parameters small enough for a CPU build (a few minutes for all), in a store
# of the build's own; the committed CPU-scale results stay in each template's prose.
GALLERY = {
    "tour": {"budget": 300, "evaluate_every": 100, "tune_step_sizes": False},
    "curvature": {
        "problem_options": {"T": 10, "hidden": 8},
        "budget": 4,
        "checkpoints": [0, 2, 4],
        "evaluate_every": 2,
        "spectrum_iterations": 20,
        "cg_iterations": 15,
        "sequences": 3,
    },
    "pathological": {
        "T": 10,
        "budget": 1500,
        "evaluate_every": 100,
        "seeds": [0],
        "optimizers": ["hessian_free", "adam"],
    },
    "figure3": {
        "problems": ["addition_hs", "xor"],
        "T_values": [20],
        "seeds": [0, 1],
        "hidden": 6,
        "batch": 50,
        "budget_minibatches": 40.0,
        "hf_options": {"cg_max_iterations": 20},
    },
    "table5": {
        "problems": {"addition_hs": 20, "memorization_5bit": 5},
        "hidden": 4,
        "updates": 20,
        "switch": 5,
        "learning_rates": [0.01, 0.001],
        "seeds": [1, 2],
        "held_out": 50,
        "evaluate_every": 10,
    },
    "autoencoder": {
        "budget": 300,
        "evaluate_every": 100,
        "optimizers": ["hessian_free", "nag"],
        "reconstructions": 3,
        "target_error": 12.0,
    },
    "charlm": {
        "hidden": 8,
        "length": 10,
        "batch_size": 8,
        "budget": 60,
        "evaluate_every": 20,
        "average_every": 20,
        "L": 3,
        "optimizers": ["adaqn", "adagrad", "adam"],
    },
    "lenet": {
        "train": 60,
        "test": 30,
        "epochs": 2,
        "batch_norms": [False, True],
        "optimizers": ["lsr1", "lbfgs", "nag"],
        "second_order_batch": 20,
        "first_order_batch": 10,
        "batch_sizes": [10, 30],
    },
    "summary": {},
}


def directives(source: str) -> tuple[dict[str, str], str]:
    """nbdev's `#| name [value]` lines at the top of a cell's source, as {name: value}, and the source without them."""
    lines, found = source.splitlines(), {}
    while lines and (
        not lines[0].strip() or (match := re.match(r"#\|\s*([\w-]+):?\s*(.*)$", lines[0].strip()))
    ):
        if lines.pop(0).strip():  # nbdev allows blank lines among them
            found[match[1]] = match[2].strip()
    return found, "\n".join(lines)


def _bound(target) -> list[str]:
    "The names an assignment target binds: `a`, `a, (b, c)`; none for `obj.attribute` or `table[key]`."
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in _bound(element)]
    return []


def exported_names(source: str, module) -> list[str]:
    "The public names (those in the module's `__all__`) that an exported cell defines, in the cell's order."
    public = set(getattr(module, "__all__", ()))
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [name for target in targets for name in _bound(target)]
    return [name for name in dict.fromkeys(names) if name in public]


def autodoc(module, names: list[str]) -> str:
    "A markdown cell's text that documents `names` of `module` with Sphinx's autodoc (signature, docstring, members)."
    blocks = []
    for name in names:
        target = f"{module.__name__}.{name}"
        value = getattr(module, name)
        if inspect.isclass(value):
            blocks.append(f".. autoclass:: {target}\n   :members:")
        elif callable(value):
            blocks.append(f".. autofunction:: {target}")
        else:
            blocks.append(f".. autodata:: {target}\n   :no-value:")
    return "```{eval-rst}\n" + "\n\n".join(blocks) + "\n```"


def _tagged(cell, *tags: str):
    cell.metadata.setdefault("tags", [])
    cell.metadata["tags"] += [tag for tag in tags if tag not in cell.metadata["tags"]]
    return cell


def page_cells(cell, module=None) -> list:
    """The page's cells for one notebook cell: nbdev's directives become myst-nb's tags (`hide`, `default_exp` →
    remove-cell; `slow`, `cuda`, `notest`, `eval: false` → skip-execution), and an exported cell shows the API it
    defines (autodoc) instead of its source."""
    if cell.cell_type == "raw":
        return []  # nbdev's front matter (skip_exec and the like)
    if cell.cell_type != "code":
        return [cell]
    found, source = directives(cell.source)
    cell.source = source
    if "default_exp" in found or "hide" in found or found.get("include") == "false":
        _tagged(cell, "remove-cell")
    if SKIPPED_FLAGS & found.keys() or found.get("eval") == "false":
        _tagged(cell, "skip-execution")
    if found.get("echo") == "false":
        _tagged(cell, "remove-input")
    if found.get("output") == "false":
        _tagged(cell, "remove-output")
    if found.keys() & {"export", "exporti", "exports"} and module is not None:
        names = exported_names(source, module)
        _tagged(cell, "remove-input")
        api = nbformat.v4.new_markdown_cell(
            autodoc(module, names), id=f"{cell.get('id', 'cell')}-api"
        )
        return [cell] + ([api] if names else [])
    return [cell]


def module_of(notebook) -> str | None:
    "The module a notebook exports to (its `#| default_exp`), if any."
    for cell in notebook.cells:
        if cell.cell_type == "code" and "default_exp" in (found := directives(cell.source)[0]):
            module = found["default_exp"].split()[0]
            return module.removesuffix(".__init__")  # a package's own module is the package
    return None


def library_digest() -> str:
    "A digest of the library's sources: jupyter-cache keys a page on its own code, and every page runs qnwb."
    digest = hashlib.sha256()
    for path in sorted((REPO / "qnwb").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def setup_cell(folder: Path):
    """A hidden first cell: the kernel works in `folder`, as nbdev_test and `qnwb report` run it; it names the
    library's digest, so that a change to qnwb runs every page again instead of showing outputs of the old code."""
    source = f"# qnwb {library_digest()}\nimport os\nos.chdir({str(folder)!r})"
    return _tagged(nbformat.v4.new_code_cell(source, id="qnwb-setup"), "remove-cell")


def page(notebook, workdir: Path):
    """The page for a notebook: its cells read through `page_cells`, a hidden first cell that enters `workdir`, the
    module's name under the title of a notebook that exports one."""
    name = module_of(notebook)
    module = importlib.import_module(f"qnwb.{name}") if name else None
    cells = [setup_cell(workdir)]
    for cell in notebook.cells:
        cells += page_cells(cell, module)
    if name:
        title = next(i for i, cell in enumerate(cells) if cell.cell_type == "markdown")
        cells.insert(
            title + 1, nbformat.v4.new_markdown_cell(f"Module `qnwb.{name}`.", id="qnwb-module")
        )
    notebook.cells = cells
    return nbformat.from_dict(json.loads(json.dumps(notebook)))


def read(source: Path):
    return nbformat.read(source, as_version=4)


def report_page(name: str, parameters: dict, workdir: Path):
    "The gallery page of report `name`: its template with `parameters` injected as `qnwb report` injects them."
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from qnwb.reports import check_parameters, reports_dir, template_parameters

    path = reports_dir() / f"{name}.ipynb"
    check_parameters(
        template_parameters(path), parameters
    )  # a misspelled key would leave the default scale
    template = load_notebook_node(str(path))
    notebook = parameterize_notebook(template, parameters) if parameters else template
    for cell in notebook.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill draws a new id each time: the page would never be unchanged
    return page(notebook, workdir)


def title_of(notebook) -> str:
    "The text of a notebook's first heading."
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and (match := re.search(r"^#\s+(.+)$", cell.source, re.M)):
            return match[1].strip()
    return "untitled"


def write_if_changed(path: Path, text: str) -> None:
    "Write `text` to `path` unless it holds it already (Sphinx re-reads, and myst-nb re-executes, only what changed)."
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _toctree(entries: list[str], hidden: bool = False) -> str:
    options = ":hidden:\n" if hidden else ":maxdepth: 1\n"
    return "```{toctree}\n" + options + "\n" + "\n".join(entries) + "\n```\n"


def _listing(heading: str, intro: str, rows: list[tuple[str, str, str]]) -> str:
    "An index page: a table of (page, title, what it is) and the hidden toctree Sphinx needs."
    table = "| page | what it is |\n|---|---|\n" + "".join(
        f"| [{title}]({page}.ipynb) | {about} |\n" for page, title, about in rows
    )
    return f"# {heading}\n\n{intro}\n\n{table}\n" + _toctree(
        [page for page, _, _ in rows], hidden=True
    )


def _summary_line(notebook) -> str:
    "A notebook's one-line summary: the first paragraph under its title, cut at a word near 200 characters."
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"^#.*$", "", cell.source, flags=re.M).strip()
        if text:
            first = text.split("\n\n")[0].lstrip("> ").replace("\n", " ").replace("|", "\\|")
            return first if len(first) <= 200 else first[: first.rfind(" ", 0, 200) % 200] + " …"
    return ""


def selected(stem: str, only: set[str] | None) -> bool:
    return only is None or stem in only


def prepare(source: Path, only: set[str] | None = None) -> list[str]:
    """Write the site's pages into the folder `source`: the landing page, the getting-started page, the API pages,
    the tutorials, the report gallery and their index pages; `only`, if given, keeps just those notebooks (by file
    stem) of the API, tutorials and gallery. Pages an earlier build wrote (its manifest) that are no longer made are
    removed; nothing else is. `source` may not lie in the notebooks' folder, nor hold it or docs/.
    Returns the pages written (relative to `source`)."""
    source = Path(source).resolve()
    if source.is_relative_to(NBS) or any(folder.is_relative_to(source) for folder in (NBS, DOCS)):
        raise ValueError(
            f"{source}: the site's pages go to a folder of their own (make docs: docs/_build/source)"
        )
    pages = {"getting_started.md": (DOCS / "getting_started.md").read_text()}
    landing = page(read(NBS / "index.ipynb"), NBS)
    landing.cells.append(
        nbformat.v4.new_markdown_cell(
            _toctree(
                ["getting_started", "tutorials/index", "api/index", "reports/index"], hidden=True
            ),
            id="qnwb-contents",
        )
    )
    pages["index.ipynb"] = landing

    modules = []
    for path in sorted(NBS.glob("[0-9]*.ipynb")):
        if not selected(path.stem, only):
            continue
        notebook = read(path)
        name = module_of(notebook)
        notebook = page(notebook, NBS)
        stem = name or path.stem
        pages[f"api/{stem}.ipynb"] = notebook
        modules.append(
            (stem, f"`qnwb.{name}`" if name else title_of(notebook), _summary_line(notebook))
        )
    pages["api/index.md"] = _listing(
        "API",
        "One page per module of qnwb, made from the notebook that exports it: the prose and the papers' equations, "
        "each exported definition's signature and docstring, and the notebook's demonstrations run during the build.",
        modules,
    )

    tutorials = []
    for path in sorted((NBS / "tutorials").glob("*.ipynb")):
        if selected(path.stem, only):
            notebook = page(read(path), path.parent)
            pages[f"tutorials/{path.stem}.ipynb"] = notebook
            tutorials.append((path.stem, title_of(notebook), _summary_line(notebook)))
    pages["tutorials/index.md"] = _listing(
        "Tutorials",
        "Walkthroughs that run qnwb end to end; each is a notebook you can open with `make lab`.",
        tutorials,
    )

    reports = []
    for name, parameters in GALLERY.items():
        if selected(name, only):
            notebook = report_page(name, parameters, REPO)
            pages[f"reports/{name}.ipynb"] = notebook
            reports.append((name, title_of(notebook), _summary_line(notebook)))
    pages["reports/index.md"] = _listing(
        "Report gallery",
        "Each report template of `nbs/reports`, rendered during the build at small parameters (shown in each "
        "page's *Parameters* cell) so that the whole gallery builds on a CPU in minutes. The results measured at "
        "the papers' or CPU scale are tables in each report's prose; render one yourself with "
        "`qnwb report NAME -p key value`.",
        reports,
    )

    for relative, content in pages.items():
        text = content if isinstance(content, str) else nbformat.writes(content) + "\n"
        write_if_changed(source / relative, text)
    manifest = source / MANIFEST  # what the last build wrote: only those pages may be removed
    for stale in set(manifest.read_text().splitlines() if manifest.exists() else []) - set(pages):
        path = (source / stale).resolve()
        if path.is_relative_to(source) and path.suffix in (".ipynb", ".md"):
            path.unlink(missing_ok=True)
    manifest.write_text("\n".join(pages) + "\n")
    return list(pages)
