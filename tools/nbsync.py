"""Keep the notebooks, the exported library and README.md in step.

    python tools/nbsync.py check    # exit 1, with a diff, if nbdev_export / nbdev_clean / readme would change anything
    python tools/nbsync.py readme   # write README.md from nbs/index.ipynb
    python tools/nbsync.py fix      # nbdev_export, nbdev_clean and readme in place

`check` never touches the working tree: it copies the notebooks into a temporary project,
exports the library there from scratch (only `qnwb/__init__.py` is carried over, so a module
that no notebook makes any more is reported too), cleans the notebooks, renders the README,
and compares the result with the tree.
"""
import difflib
import json
import shutil
import subprocess
import sys
import tempfile
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IGNORE = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pyc")
GENERATED_NOTE = "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->"


def settings(root: Path) -> dict:
    cfg = ConfigParser(delimiters=["="])
    cfg.read(root / "settings.ini", encoding="utf-8")
    return dict(cfg["DEFAULT"])


def _is_hidden(source: str) -> bool:
    return any(line.replace(" ", "") in ("#|hide", "#|include:false") for line in source.splitlines())


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
            code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#|"))
            parts.append(_code_block(code, "python"))
            outputs = "".join(_output_text(o) for o in cell.get("outputs", []))
            if outputs.strip():
                parts.append(_code_block(outputs))
    return "\n\n".join(parts) + "\n"


def write_readme(root: Path) -> None:
    cfg = settings(root)
    (root / "README.md").write_text(render_readme(root / cfg["nbs_path"] / cfg["readme_nb"]), encoding="utf-8")


def run_nbdev(root: Path, *commands: str) -> None:
    for command in commands:
        done = subprocess.run([str(BIN / command)], cwd=root, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{command} failed in {root}:\n{done.stdout}{done.stderr}")


def files_under(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): f.read_text(encoding="utf-8")
        for f in sorted(folder.rglob(pattern))
        if f.is_file() and not any(part in ("__pycache__", ".ipynb_checkpoints") for part in f.parts)
    }


def compare(label: str, ours: dict[str, str], made: dict[str, str], remedy: str) -> list[str]:
    problems = []
    for name in sorted(set(ours) | set(made)):
        if name not in made:
            problems.append(f"{label}/{name}: no notebook exports it any more ({remedy}, then delete it)")
        elif name not in ours:
            problems.append(f"{label}/{name}: missing; the notebooks export it ({remedy})")
        elif ours[name] != made[name]:
            diff = difflib.unified_diff(
                ours[name].splitlines(), made[name].splitlines(), f"{label}/{name} (tree)", f"{label}/{name} (expected)", lineterm="", n=1
            )
            shown = "\n".join(list(diff)[:40])
            problems.append(f"{label}/{name}: differs from what the notebooks give ({remedy})\n{shown}")
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
            compare(lib, files_under(root / lib, "*.py"), files_under(work / lib, "*.py"),
                    "the library is out of sync with the notebooks: run `make sync` or `nbdev_export`")
            + compare(nbs, files_under(root / nbs, "*.ipynb"), files_under(work / nbs, "*.ipynb"),
                      "the notebook is not clean: run `make sync` or `nbdev_clean`")
            + compare(".", {"README.md": (root / "README.md").read_text(encoding="utf-8")},
                      {"README.md": (work / "README.md").read_text(encoding="utf-8")},
                      "README.md is out of date with nbs/index.ipynb: run `make sync` or `make readme`")
        )
    for problem in problems:
        print(problem, end="\n\n", file=sys.stderr)
    if problems:
        print(f"nbsync: {len(problems)} file(s) out of sync; nothing in the tree was changed.", file=sys.stderr)
        return 1
    print("nbsync: library, notebooks and README.md are in sync.")
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
