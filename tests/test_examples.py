"""Every example runs (on a slice of the embedded data, for speed)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["mlp", "autoencoder", "cnn"])
def test_workload_example_runs(name: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [name, "--subset", "256", "--epochs", "2"])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "epoch 2:" in out
    if name == "cnn":
        assert "resumed from cnn.pt at step 2" in out
