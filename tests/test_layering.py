"""docs/design.md §3 stays true: every import inside ``ltm_pyro`` goes to a layer that the
design's layering table allows, and every module of the package is in that table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ltm_pyro"


def layering_table() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(module -> layer, layer -> layers it may import) from the design doc's table."""
    text = (REPO / "docs" / "design.md").read_text()
    table = text.split("<!-- layers: the test parses this table -->")[1].split(
        "<!-- end layers -->")[0]
    layer_of, allowed = {}, {}
    for row in table.strip().splitlines()[2:]:
        layer, modules, may = (cell.strip() for cell in row.strip("|").split("|"))
        for module in re.findall(r"`([a-z_]+)`", modules):
            layer_of[module] = layer
        allowed[layer] = {m.strip() for m in may.split(",")}
    return layer_of, allowed


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Top-level ``ltm_pyro`` modules that ``path`` imports, at any depth of its code."""
    inside = path.relative_to(package).parts[:-1]  # a sub-package's folder, if any
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = [*inside[: len(inside) - node.level + 1], *(node.module or "").split(".")]
                names = [p for p in parts if p] or [a.name for a in node.names]
                found.add(names[0])
            elif (node.module or "").startswith("ltm_pyro."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("ltm_pyro."))
    return found


def module_name(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_import_follows_the_design_docs_layers():
    """Catches: a core or evaluation module importing from runs or interfaces (e.g. the
    model reading files or the command line), and a layer table that has drifted from the
    code (issue 41: two breaks of 'never the reverse' went unnoticed)."""
    layer_of, allowed = layering_table()
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the package's lazy exports name modules of every layer
        mine = layer_of[module_name(path)]
        if "every layer" in allowed[mine]:
            continue
        for target in imported_modules(path) - {module_name(path)}:
            if layer_of[target] not in allowed[mine]:
                broken.append(f"{path.relative_to(REPO)} ({mine}) imports {target} "
                              f"({layer_of[target]})")
    assert not broken, "\n".join(broken)


def test_the_table_names_every_module_once():
    """Catches: a new module left out of the design doc, or one listed in two layers."""
    layer_of, _ = layering_table()
    modules = {module_name(p) for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    assert modules == set(layer_of)
    text = (REPO / "docs" / "design.md").read_text().split("<!-- end layers -->")[0]
    for module in modules:
        assert text.count(f"`{module}`") >= 1


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """Catches: a checker that reads module-level imports only (lazy imports inside
    functions would then break the layers unseen) or misreads ``..`` in sub-packages."""
    path = tmp_path / "studies" / "probe.py"
    path.parent.mkdir()
    path.write_text("def f():\n    from ..runner import train\n    from . import sibling\n")
    assert imported_modules(path, tmp_path) == {"runner", "studies"}


def contract_items() -> list[str]:
    """The items of docs/design.md §4: each bullet and each paragraph that opens in bold."""
    text = (REPO / "docs" / "design.md").read_text()
    section = text[text.index("## 4. Contracts"):text.index("## 5.")]
    return re.split(r"\n(?=- |\*\*)", section)[1:]


def test_every_contract_names_the_test_that_holds_it_and_that_test_exists():
    """Catches: a contract in docs/design.md §4 that no test is named for, and a named test
    that was renamed or deleted (the doc would then point at nothing)."""
    assert all("tests/test_" in item for item in contract_items()), [
        item[:80] for item in contract_items() if "tests/test_" not in item]
    cited = re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", (REPO / "docs" / "design.md")
                       .read_text())
    missing = [f"{path}::{name}" for path, name in cited
               if not (REPO / "tests" / path).exists() or (
                   name and f"def {name}(" not in (REPO / "tests" / path).read_text())]
    assert cited and not missing, missing
