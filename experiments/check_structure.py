"""The size and layering targets of the library (issue 12), measured: `make lint` prints them.

    python experiments/check_structure.py        # exit 1 when a target is missed

Longest function and largest class in ltm_pyro/ and its sub-packages (lines, docstrings
included), and whether the fast loop (inference.py) imports the distributed module. Targets:
functions <= 60 lines, classes <= 150, no such import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ltm_pyro"
MAX_FUNCTION, MAX_CLASS = 60, 150


def spans(kind: type) -> list[tuple[int, str]]:
    """(lines, module:name) of every ``kind`` node in the package, longest first."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):  # sub-packages (commands, studies) included
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                found.append((node.end_lineno - node.lineno + 1, f"{module}:{node.name}"))
    return sorted(found, reverse=True)


def imports_distributed(module: str) -> bool:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return any(isinstance(n, ast.ImportFrom) and (n.module or "").endswith("distributed")
               for n in ast.walk(tree))


def main() -> int:
    functions = spans((ast.FunctionDef, ast.AsyncFunctionDef))
    classes = spans(ast.ClassDef)
    checks = [
        (f"longest function {functions[0][1]}: {functions[0][0]} lines",
         functions[0][0] <= MAX_FUNCTION, f"<= {MAX_FUNCTION}"),
        (f"largest class {classes[0][1]}: {classes[0][0]} lines", classes[0][0] <= MAX_CLASS,
         f"<= {MAX_CLASS}"),
        ("inference.py imports distributed: "
         f"{'yes' if imports_distributed('inference') else 'no'}",
         not imports_distributed("inference"), "no"),
    ]
    for text, met, target in checks:
        print(f"{'met   ' if met else 'MISSED'}  {text} (target {target})")
    over = [f"{name} ({lines})" for lines, name in functions if lines > MAX_FUNCTION]
    if over:
        print("functions over the target: " + ", ".join(over))
    return 0 if all(met for _, met, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
