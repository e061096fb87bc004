"""The documentation names what the code has: every ``kfrob.…`` name in backticks in the
README and ``docs/`` resolves to a module or an attribute of one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAME = re.compile(r"`(kfrob(?:\.[A-Za-z_]\w*)+)")


def documented() -> list[str]:
    names = {m.group(1) for doc in DOCS for m in NAME.finditer(doc.read_text())}
    return sorted(names)


def resolve(name: str) -> object:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(name)


def test_the_docs_name_something() -> None:
    assert len(documented()) > 20


@pytest.mark.parametrize("name", documented())
def test_a_documented_name_exists(name: str) -> None:
    resolve(name)
