"""No absolute path of one particular machine in the repository's text files (issue 40).

A results page that records where a file lay on the machine that wrote it, or a doc whose
example points into that machine's home or scratch folders, reads wrong on any other
checkout. Paths are written relative to the repository root (``runs/NAME``,
``../shared/data/ptb``, ``experiments/results/...``). This test reads every text file git
knows about (tracked, and untracked files that are not ignored, so a new file is checked
before it is committed) and fails naming each file, line and path it finds.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".md", ".json", ".py", ".ipynb", ".yml", ".yaml", ".toml", ".txt", ".cfg", ".ini",
            ".sh"}
NAMES = {"Makefile"}

# An absolute path into a top-level folder that holds one machine's homes, scratch space or
# work trees. The slash must start the path: not inside a URL or a relative path (no letter,
# digit, ".", "/", "~" or "-" just before it), except after a JSON-escaped newline or tab.
MACHINE_PATH = re.compile(
    r"(?:(?<![\w.~/-])|(?<=\\[nt]))"
    r"/(?:work|tmp|root|home|opt|Users|mnt|scratch)/[^\s\"'`)\],;\\]*"
)

# This file names the patterns it looks for.
SELF = "tests/test_no_machine_paths.py"

# (file glob, path prefix): why it may stay. Each entry must still match something, so a
# fixed file makes its entry fail until the entry is removed.
ALLOWED = {
    ("experiments/gpu_checks.sh", "/tmp/ltm-site"):
        "a scratch folder the script creates at run time on the GPU machine for the wheels it "
        "installs there: a path it chooses on any machine, not one this machine had",
}

def text_files() -> list[str]:
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree: nothing to list the repository's files with")
    return sorted(name for name in listing.split("\0")
                  if name and name != SELF and (ROOT / name).is_file()
                  and (Path(name).suffix in SUFFIXES or Path(name).name in NAMES))


def notebook_lines(path: Path) -> list[tuple[str, str]]:
    """(where, text) of a notebook's sources and text outputs; images are left out (base64
    holds slashes and letters that can spell a path by chance)."""
    lines = []
    for number, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        texts = [cell.get("source", [])]
        for output in cell.get("outputs", []):
            texts.append(output.get("text", []))
            texts.append(output.get("traceback", []))
            texts += [value for kind, value in output.get("data", {}).items()
                      if not kind.startswith("image/")]
        for text in texts:
            text = "".join(text) if isinstance(text, list) else str(text)
            lines += [(f"cell {number}", line) for line in text.splitlines()]
    return lines


def file_lines(name: str) -> list[tuple[str, str]]:
    path = ROOT / name
    if path.suffix == ".ipynb":
        return notebook_lines(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    return [(f"line {number}", line) for number, line in enumerate(text.splitlines(), 1)]


def exemption(name: str, found: str) -> tuple[str, str] | None:
    for key in ALLOWED:
        pattern, prefix = key
        if fnmatch.fnmatch(name, pattern) and found.startswith(prefix):
            return key
    return None


def test_no_text_file_holds_an_absolute_path_of_this_machine():
    """Catches: a results page or JSON recording where its files lay on the machine that ran
    it, a doc example pointing into one machine's home or scratch folder, a committed notebook
    output or traceback naming its interpreter's absolute path."""
    problems, used = [], set()
    for name in text_files():
        for where, line in file_lines(name):
            for match in MACHINE_PATH.finditer(line):
                key = exemption(name, match.group())
                if key:
                    used.add(key)
                else:
                    problems.append(f"{name}, {where}: {match.group()}")
    assert not problems, (
        "absolute paths of one machine; write them relative to the repository root:\n"
        + "\n".join(problems))
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"exemptions that no longer match anything; remove them: {stale}"


@pytest.mark.parametrize("line, found", [
    ("python run.py --out /tmp/run-a", ["/tmp/run-a"]),
    ('  "command": "cd /work/main && make"', ["/work/main"]),
    ('"notes": "run it\\n/home/someone/x.txt"', ["/home/someone/x.txt"]),
    ("see https://example.org/tmp/page and runs/tmp/x", []),
    ("../shared/data/ptb and experiments/results/mutation/", []),
])
def test_the_pattern_finds_absolute_paths_and_not_urls_or_relative_ones(line, found):
    assert [match.group() for match in MACHINE_PATH.finditer(line)] == found
