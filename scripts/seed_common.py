"""Shared by the seed_*.py reproductions: the provenance header and the result files."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def provenance() -> dict[str, str]:
    """The command, the machine (CPU count, torch version) and the date of this run."""
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{os.cpu_count()} CPUs (nproc), torch {torch.__version__}",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, body: str, data: dict[str, Any], out: Path) -> Path:
    """Write ``out/name.md`` (title, provenance, body) and ``out/name.json``; return the .md."""
    out.mkdir(parents=True, exist_ok=True)
    info = provenance()
    header = "\n".join(
        f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()
    )
    md = out / f"{name}.md"
    md.write_text(f"# {title}\n\n{header}\n\n{body.strip()}\n")
    (out / f"{name}.json").write_text(json.dumps({**info, **data}, indent=1) + "\n")
    return md
