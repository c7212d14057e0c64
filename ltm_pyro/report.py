"""Tables and result files for the experiment scripts.

Every benchmark writes the same pair: a JSON with the rows and a Markdown page that starts with
the exact command, the date and the device, so any committed figure can be re-run.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from .files import write_json, write_text

REPO = Path(__file__).resolve().parent.parent


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub Markdown table of ``columns`` from each row (missing cells left blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def device_description(device: torch.device | str) -> str:
    """The GPU's name, or the CPU with its thread count (timings depend on both)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, threads: {torch.get_num_threads()}"


def provenance(device: torch.device | str) -> dict[str, str]:
    """The command that reproduces this process's results, when and where it ran."""
    script = Path(sys.argv[0]).resolve()
    repo = REPO
    # A script of this repository by its path in it; any other by its folder and name.
    script = script.relative_to(repo) if script.is_relative_to(repo) else Path(
        script.parent.name, script.name)
    return {
        "command": f"python {script} " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "torch": torch.__version__,
    }


def portable(value: Any, root: Path = REPO) -> Any:
    """``value`` (JSON-ready data) with every absolute path into the repository, or into the
    corpora folder beside it (``../shared``, docs/data.md), written relative to the
    repository root: a run folder records its corpus path absolute (so it loads from
    anywhere), but a committed result must not carry this machine's folders
    (``tests/test_no_machine_paths.py``). Other paths are left as they are."""
    if isinstance(value, dict):
        return {key: portable(item, root) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [portable(item, root) for item in value]
    if isinstance(value, str):
        return value.replace(f"{root}/", "").replace(f"{root.parent}/shared/", "../shared/")
    return value


def write_results(json_path: Path, title: str, device: torch.device | str,
                  payload: dict[str, Any], page: str) -> dict[str, str]:
    """Write ``payload`` to ``json_path`` and ``page`` (Markdown) beside it as ``.md``.

    Both begin with the provenance, which is returned for the caller's own use.
    """
    meta = provenance(device)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, portable({**meta, **payload}))
    write_text(json_path.with_suffix(".md"),
               f"# {title}\n\nCommand (run {meta['date']}, {meta['device']}, "
               f"torch {meta['torch']}):\n\n```\n{meta['command']}\n```\n\n{page.rstrip()}\n")
    return meta
