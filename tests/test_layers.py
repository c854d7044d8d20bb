"""The house's layering, read from the exported library: every import of a qnwb module points to a notebook with a
lower number (notebooks are numbered by layer, and a notebook's number is above those of all it imports)."""

import ast
import re
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "qnwb"


def notebook_numbers() -> dict[str, int]:
    "module name (qnwb.x.y) ↦ the number of the notebook that exports it."
    numbers = {}
    for path in LIBRARY.rglob("*.py"):
        match = re.search(r"File to edit: [./]*nbs/(\d+)_", path.read_text()[:400])
        if match:
            module = ".".join(
                ("qnwb",) + path.relative_to(LIBRARY).with_suffix("").parts
            ).removesuffix(".__init__")
            numbers[module] = int(match.group(1))
    return numbers


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    "The qnwb modules `module` imports anywhere in its file (module level or inside functions)."
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != module}
    return found


def test_every_import_points_down_the_layers():
    numbers = notebook_numbers()
    assert len(numbers) >= 30
    upward = []
    for path in LIBRARY.rglob("*.py"):
        module = ".".join(("qnwb",) + path.relative_to(LIBRARY).with_suffix("").parts).removesuffix(
            ".__init__"
        )
        if module not in numbers:
            continue
        for imported in imported_modules(path, module, set(numbers)):
            package_init = module.startswith(
                imported + "."
            )  # a package's own __init__ may be imported by its modules' package
            if numbers[imported] >= numbers[module] and not (
                package_init or imported.startswith(module + ".")
            ):
                upward.append(
                    f"{module} ({numbers[module]}) imports {imported} ({numbers[imported]})"
                )
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(upward))


def test_the_layer_check_sees_a_function_level_import(tmp_path):
    source = "def f():\n    from qnwb.cli import main\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    assert imported_modules(path, "qnwb.core", {"qnwb.cli", "qnwb.core"}) == {"qnwb.cli"}
