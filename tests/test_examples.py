"""Every example runs (on a slice of the embedded data, for speed)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    """Examples run in this process may set torch's thread count; later tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["mlp", "autoencoder", "cnn"])
def test_workload_example_runs(name: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [name, "--subset", "256", "--epochs", "2"])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "epoch 2:" in out
    if name == "cnn":
        assert "resumed from cnn.pt at step 2" in out


def test_distributed_example_runs_under_torchrun() -> None:
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(EXAMPLES / "distributed.py")]
    command += ["--epochs", "1", "--max-steps", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(3 steps on 2 ranks)" in done.stdout


@pytest.mark.parametrize(
    ("name", "argv", "expect"),
    [
        ("regularization_matrix_completion", ["--steps", "200"], "nuclear/Frobenius: relative"),
        ("regularization_deep_factorization", ["--max-steps", "50"], "λ=0.01: 49 steps"),
        ("regularization_mlp", ["--subset", "256", "--epochs", "2"], "epoch 2:"),
    ],
)
def test_regularization_example_runs(
    name: str, argv: list[str], expect: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert expect in capsys.readouterr().out
