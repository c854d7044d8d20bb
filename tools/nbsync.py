"""Keep the notebooks, the exported library and README.md in step.

    python tools/nbsync.py check    # exit 1, with a diff, if nbdev_export / nbdev_clean / readme would change anything
    python tools/nbsync.py readme   # write README.md from nbs/index.ipynb
    python tools/nbsync.py fix      # nbdev_export, nbdev_clean and readme in place

`check` never touches the working tree: it copies the notebooks into a temporary project,
exports the library there from scratch (only `qnwb/__init__.py` is carried over, so a module
that no notebook makes any more is reported too), cleans the notebooks, renders the README,
and compares the result with the tree. It also checks each exporting notebook's summary, the
`> ` line of its first `# Title` markdown cell, which nbdev makes the module's docstring: nbdev
keeps only the first `> ` line, so the summary must be one whole line, and the docstring must end
a sentence.
"""

import ast
import difflib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from configparser import ConfigParser
from itertools import takewhile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IGNORE = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pyc")
GENERATED_NOTE = (
    "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->"
)


def settings(root: Path) -> dict:
    cfg = ConfigParser(delimiters=["="])
    cfg.read(root / "settings.ini", encoding="utf-8")
    return dict(cfg["DEFAULT"])


def _is_hidden(source: str) -> bool:
    return any(
        line.replace(" ", "") in ("#|hide", "#|include:false") for line in source.splitlines()
    )


def _code_block(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def _output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    return "".join(output.get("data", {}).get("text/plain", ""))


def render_readme(notebook: Path) -> str:
    """README markdown from a notebook: markdown cells as they are, visible code cells fenced with their text outputs."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    parts = [GENERATED_NOTE]
    for cell in cells:
        source = "".join(cell["source"])
        if not source.strip() or _is_hidden(source):
            continue
        if cell["cell_type"] == "markdown":
            parts.append(source.strip())
        elif cell["cell_type"] == "code":
            code = "\n".join(
                line for line in source.splitlines() if not line.lstrip().startswith("#|")
            )
            parts.append(_code_block(code, "python"))
            outputs = "".join(_output_text(o) for o in cell.get("outputs", []))
            if outputs.strip():
                parts.append(_code_block(outputs))
    return "\n\n".join(parts) + "\n"


def write_readme(root: Path) -> None:
    cfg = settings(root)
    (root / "README.md").write_text(
        render_readme(root / cfg["nbs_path"] / cfg["readme_nb"]), encoding="utf-8"
    )


def run_nbdev(root: Path, *commands: str) -> None:
    for command in commands:
        done = subprocess.run([str(BIN / command)], cwd=root, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{command} failed in {root}:\n{done.stdout}{done.stderr}")


def files_under(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): f.read_text(encoding="utf-8")
        for f in sorted(folder.rglob(pattern))
        if f.is_file()
        and not any(part in ("__pycache__", ".ipynb_checkpoints") for part in f.parts)
    }


def compare(label: str, ours: dict[str, str], made: dict[str, str], remedy: str) -> list[str]:
    problems = []
    for name in sorted(set(ours) | set(made)):
        if name not in made:
            problems.append(
                f"{label}/{name}: no notebook exports it any more ({remedy}, then delete it)"
            )
        elif name not in ours:
            problems.append(f"{label}/{name}: missing; the notebooks export it ({remedy})")
        elif ours[name] != made[name]:
            diff = difflib.unified_diff(
                ours[name].splitlines(),
                made[name].splitlines(),
                f"{label}/{name} (tree)",
                f"{label}/{name} (expected)",
                lineterm="",
                n=1,
            )
            shown = "\n".join(list(diff)[:40])
            problems.append(
                f"{label}/{name}: differs from what the notebooks give ({remedy})\n{shown}"
            )
    return problems


DEFAULT_EXP = re.compile(r"^\s*#\|\s*default_exp\s+(\S+)", re.MULTILINE)
SENTENCE_END = re.compile(r"[.?!][)`]*$")


def _exporting_notebooks(nbs: Path) -> dict[Path, str]:
    "The notebooks under `nbs` (as nbdev_export finds them) that set `default_exp`, with their module's dotted name."
    found = {}
    for notebook in sorted(nbs.rglob("*.ipynb")):
        if any(part.startswith(("_", ".")) for part in notebook.relative_to(nbs).parts):
            continue
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        names = [
            m.group(1)
            for c in cells
            if c["cell_type"] == "code"
            for m in DEFAULT_EXP.finditer("".join(c["source"]))
        ]
        if names:
            found[notebook] = names[-1]
    return found


def summary_problems(work: Path, lib: str, nbs: str) -> list[str]:
    """One line per exporting notebook whose module docstring is not a whole sentence.

    nbdev makes the docstring from the first `> ` line of the first markdown cell that starts with
    `# `, and drops any further `> ` lines; `work` holds the notebooks and the library exported from them.
    """
    problems = []
    for notebook, module in _exporting_notebooks(work / nbs).items():
        name = f"{nbs}/{notebook.relative_to(work / nbs).as_posix()}"
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        title = next(
            (
                c
                for c in cells
                if c["cell_type"] == "markdown" and "".join(c["source"]).startswith("# ")
            ),
            None,
        )
        lines = "".join(title["source"]).splitlines() if title else []
        start = next((i for i, line in enumerate(lines) if line.startswith(">")), len(lines))
        quoted = list(
            takewhile(lambda line: line.startswith(">"), lines[start:])
        )  # the summary's quote block
        if not quoted:
            problems.append(
                f"{name}: no summary: its first markdown cell needs `# Title` and then one `> ` line, "
                "a whole sentence that nbdev makes the module's docstring"
            )
            continue
        if len(quoted) > 1:
            problems.append(
                f"{name}: the summary is wrapped over {len(quoted)} `> ` lines and nbdev keeps only the first "
                "as the module's docstring: make it one whole `> ` line and move the rest into a paragraph after it"
            )
            continue
        path = work / lib / Path(*module.split(".")).with_suffix(".py")
        docstring = (
            ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            if path.exists()
            else None
        )
        if not docstring or not SENTENCE_END.search(docstring.strip()):
            problems.append(
                f"{name}: the docstring of {lib}/{path.relative_to(work / lib).as_posix()} does not end a sentence "
                f"(with ., ? or !, before any closing ) or `): {docstring!r}"
            )
    return problems


def check(root: Path) -> int:
    cfg = settings(root)
    lib, nbs = cfg["lib_path"], cfg["nbs_path"]
    with tempfile.TemporaryDirectory(prefix="qnwb-sync-") as tmp:
        work = Path(tmp)
        shutil.copy2(root / "settings.ini", work)
        shutil.copytree(root / nbs, work / nbs, ignore=IGNORE)
        (work / lib).mkdir()
        if (root / lib / "__init__.py").exists():
            shutil.copy2(root / lib / "__init__.py", work / lib)
        run_nbdev(work, "nbdev_clean", "nbdev_export")
        write_readme(work)
        problems = (
            compare(
                lib,
                files_under(root / lib, "*.py"),
                files_under(work / lib, "*.py"),
                "the library is out of sync with the notebooks: run `make sync` or `nbdev_export`",
            )
            + compare(
                nbs,
                files_under(root / nbs, "*.ipynb"),
                files_under(work / nbs, "*.ipynb"),
                "the notebook is not clean: run `make sync` or `nbdev_clean`",
            )
            + compare(
                ".",
                {"README.md": (root / "README.md").read_text(encoding="utf-8")},
                {"README.md": (work / "README.md").read_text(encoding="utf-8")},
                "README.md is out of date with nbs/index.ipynb: run `make sync` or `make readme`",
            )
            + summary_problems(work, lib, nbs)
        )
    for problem in problems:
        print(problem, end="\n\n", file=sys.stderr)
    if problems:
        print(
            f"nbsync: {len(problems)} problem(s): files out of sync or summaries that are not one whole line; "
            "nothing in the tree was changed.",
            file=sys.stderr,
        )
        return 1
    print(
        "nbsync: library, notebooks and README.md are in sync, and every module summary is one whole line."
    )
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "check":
        return check(ROOT)
    if command == "readme":
        write_readme(ROOT)
        return 0
    if command == "fix":
        run_nbdev(ROOT, "nbdev_clean", "nbdev_export")
        write_readme(ROOT)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
