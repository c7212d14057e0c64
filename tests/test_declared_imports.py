"""Every package the code imports is declared in pyproject.toml, where its users install it from.

Each import statement in ``ltm_pyro/``, ``experiments/``, ``tests/`` and the code cells of
``notebooks/*.ipynb`` (read with ``ast``; IPython's ``%`` and ``!`` lines dropped) names a
top-level module. The standard library and the project's own modules are left out; the rest
map to distribution names and must be declared: ``ltm_pyro/`` and ``experiments/`` in the
core ``dependencies``, the notebooks there or in the ``notebooks`` extra, the tests there or in
the ``dev`` extra. An import whose distribution is named otherwise (``sklearn`` is
scikit-learn) needs a line in ``DISTRIBUTION``. Static text only: nothing is imported.
"""

import ast
import json
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Import names whose distribution is named otherwise; any other maps to itself.
DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "pyro": "pyro-ppl",
    "IPython": "ipython",
    "cv2": "opencv-python",
    "skimage": "scikit-image",
    "bs4": "beautifulsoup4",
    "dateutil": "python-dateutil",
}

# Which tables of pyproject.toml may declare an import, by the folder that holds it.
ALLOWED = {
    "ltm_pyro": ("dependencies",),
    "experiments": ("dependencies",),
    "tests": ("dependencies", "dev"),
    "notebooks": ("dependencies", "notebooks"),
}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(module: str) -> str:
    return normalise(DISTRIBUTION.get(module, module))


def imported_modules(source: str) -> set[str]:
    """The top-level module of every absolute import in ``source``, anywhere in it (inside
    functions and ``try`` blocks too); relative imports are the package's own."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def notebook_source(text: str) -> str:
    """The code cells of a notebook's JSON as one Python source, without IPython's magics
    (``%``) and shell lines (``!``)."""
    cells = json.loads(text)["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        source = "".join(source) if isinstance(source, list) else source
        lines += [line for line in source.splitlines()
                  if not line.lstrip().startswith(("%", "!"))]
        lines.append("")
    return "\n".join(lines)


def declared(pyproject: dict) -> dict[str, set[str]]:
    """The normalised distribution names in ``dependencies`` and in each extra."""
    project = pyproject["project"]
    tables = {"dependencies": project.get("dependencies", []),
              **project.get("optional-dependencies", {})}
    return {table: {normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()).group())
                    for req in reqs}
            for table, reqs in tables.items()}


def local_modules(repo: Path) -> set[str]:
    """The project's own top-level names: its packages and folders, and every module in
    experiments/ and tests/ (scripts import their neighbours, tests import scripts). Modules
    inside ltm_pyro/ are not among them: there ``import tokenizers`` is the HF package."""
    names = {"ltm_pyro", "experiments", "tests"}
    for folder in ("experiments", "tests"):
        names.update(path.stem for path in (repo / folder).rglob("*.py"))
    return names


@cache
def imports(repo: Path, folder: str) -> list[tuple[Path, set[str]]]:
    """Each file of ``folder`` (for notebooks/ also its notebooks) with the modules it imports;
    a script in notebooks/ (e.g. ``execute.py``) serves them and may use their extra."""
    found = [(path, imported_modules(path.read_text()))
             for path in sorted((repo / folder).rglob("*.py"))]
    if folder == "notebooks":
        found += [(path, imported_modules(notebook_source(path.read_text())))
                  for path in sorted((repo / folder).glob("*.ipynb"))]
    return found


def undeclared(repo: Path, folder: str, pyproject: dict) -> dict[str, list[str]]:
    """Distribution -> the files in ``folder`` that import it without its being declared in
    the tables ``ALLOWED[folder]``."""
    tables = declared(pyproject)
    allowed = set().union(*(tables.get(table, set()) for table in ALLOWED[folder]))
    own = local_modules(repo)
    missing: dict[str, list[str]] = {}
    for path, modules in imports(repo, folder):
        for module in sorted(modules):
            if module in sys.stdlib_module_names or module in own:
                continue
            if distribution(module) not in allowed:
                missing.setdefault(distribution(module), []).append(
                    str(path.relative_to(repo)))
    return missing


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_every_import_is_declared(folder: str, pyproject: dict) -> None:
    assert imports(REPO, folder), f"no sources found in {folder}/"
    missing = undeclared(REPO, folder, pyproject)
    assert not missing, (
        f"imported in {folder}/ but not declared in pyproject.toml "
        f"({' or '.join(ALLOWED[folder])}); if the import name differs from the "
        f"distribution's, add it to DISTRIBUTION: {missing}")


def test_the_scan_sees_the_imports_it_must_check(pyproject: dict) -> None:
    """The scan is not vacuous: known third-party imports are found and mapped."""
    library = set().union(*(modules for _, modules in imports(REPO, "ltm_pyro")))
    assert {"torch", "pyro", "numpy", "tokenizers"} <= library
    notebooks = set().union(*(modules for _, modules in imports(REPO, "notebooks")))
    assert {"torch", "pandas", "sklearn"} <= notebooks
    assert {"torch", "pyro-ppl", "scikit-learn", "pandas"} <= declared(pyproject)["dependencies"]


def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


PYPROJECT = {"project": {"dependencies": ["torch>=2.4", "pyro-ppl>=1.9", "scikit-learn"],
                         "optional-dependencies": {"dev": ["pytest>=8"],
                                                   "notebooks": ["Pandas_Extra.Name==1"]}}}


@pytest.mark.parametrize(("folder", "name", "text", "expected"), [
    ("ltm_pyro", "ltm_pyro/a.py", "import torch\nfrom pyro.infer import SVI\n", {}),
    ("ltm_pyro", "ltm_pyro/a.py", "import pandas as pd\n", {"pandas": ["ltm_pyro/a.py"]}),
    ("ltm_pyro", "ltm_pyro/a.py", "def f():\n    import yaml\n", {"pyyaml": ["ltm_pyro/a.py"]}),
    ("ltm_pyro", "ltm_pyro/a.py", "import os, json\nfrom . import b\nfrom ltm_pyro import c\n", {}),
    ("ltm_pyro", "ltm_pyro/a.py", "from sklearn.decomposition import PCA\n", {}),
    ("experiments", "experiments/s.py", "import bench_speed\nimport pytest\n",
     {"pytest": ["experiments/s.py"]}),
    ("tests", "tests/test_a.py", "import pytest\nfrom experiments import s\n", {}),
    ("notebooks", "notebooks/n.ipynb",
     json.dumps({"cells": [{"cell_type": "code", "source": ["%matplotlib inline\n",
                                                             "!pip install foo\n",
                                                             "import pandas_extra_name\n"]},
                           {"cell_type": "markdown", "source": "import seaborn"}]}), {}),
    ("notebooks", "notebooks/n.ipynb",
     json.dumps({"cells": [{"cell_type": "code", "source": "import torch\nimport seaborn\n"}]}),
     {"seaborn": ["notebooks/n.ipynb"]}),
])
def test_undeclared_finds_what_is_missing(tmp_path: Path, folder: str, name: str, text: str,
                                          expected: dict) -> None:
    repo = _repo(tmp_path, {name: text, "experiments/bench_speed.py": ""})
    assert undeclared(repo, folder, PYPROJECT) == expected
