"""Shared by the benchmark scripts: where a result came from, and writing it down."""

from __future__ import annotations

import platform
import sys
from datetime import date
from pathlib import Path

import torch


def provenance() -> str:
    """The exact command, the date and the machine, for the first line of a results file."""
    return (
        f"`python {' '.join(sys.argv)}` on {date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}."
    )


def write_report(out_dir: str, name: str, lines: list[str]) -> None:
    """Print the Markdown report and write it to ``out_dir/name``."""
    report = "\n".join(lines)
    print(report)
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    (out / name).write_text(report + "\n")
