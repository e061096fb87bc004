"""Smoke tests of the benchmark scripts: each runs end to end on a tiny setting and writes
its report (the figures themselves are measured by running the scripts, see README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run(script: str, *args: str, out: Path) -> str:
    command = [sys.executable, str(SCRIPTS / script), *args, "--out", str(out)]
    # this checkout's kfrob, not whichever one is installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    ("rule", "method"),
    [
        ("preconditioned_sgd", "factored"),
        ("preconditioned_sgd", "exact"),
        ("eigenbasis_adam", "exact_where_dense"),
    ],
)
def test_bench_step_reports_ratios_and_a_breakdown(tmp_path: Path, rule: str, method: str) -> None:
    run(
        "bench_step.py",
        *("--workloads", "mlp", "--batch-sizes", "8", "--freqs", "1/2", "--step-rule", rule),
        *("--damping-methods", method, "--rounds", "1", "--steps", "2"),
        out=tmp_path,
    )
    report = (tmp_path / "step_overhead.md").read_text()
    assert f"Step rule: `{rule}`" in report
    row = next(line for line in report.splitlines() if line.startswith("| mlp"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == method
    assert all(float(c) > 0 for c in cells[4:11])  # times and ratios
    shares = [float(c.rstrip("%")) for c in cells[11:]]
    assert abs(sum(shares) - 100) <= len(shares)  # the breakdown covers the step
    assert shares[3] > 0  # the rule's direction is timed as preconditioning


def test_bench_step_measures_kfrobs_own_default_unless_told(tmp_path: Path) -> None:
    run(
        "bench_step.py",
        *("--workloads", "mlp", "--batch-sizes", "8", "--freqs", "1/2"),
        *("--rounds", "1", "--steps", "2"),
        out=tmp_path,
    )
    report = (tmp_path / "step_overhead.md").read_text()
    assert "Step rule: `eigenbasis_adam`" in report
    rows = [line for line in report.splitlines() if line.startswith("| mlp")]
    assert [row.split("|")[4].strip() for row in rows] == ["exact_where_dense"]


def test_bench_refresh_reports_refresh_ratios_and_step_spread(tmp_path: Path) -> None:
    run(
        "bench_refresh.py",
        *("--workloads", "mlp", "--freqs", "1/2", "--warm", "2"),
        *("--rounds", "1", "--cycles", "1"),
        out=tmp_path,
    )
    report = (tmp_path / "refresh.md").read_text()
    refresh, spread = (line for line in report.splitlines() if line.startswith("| mlp"))
    assert len(refresh.strip("|").split("|")) == 6  # bare eigh ms and four refreshes
    assert all(float(c) > 0 for c in refresh.strip("|").split("|")[1:])
    cells = [float(c) for c in spread.strip("|").split("|")[2:]]
    assert len(cells) == 6 and all(c > 0 for c in cells)
    assert cells[0] <= cells[2] and cells[3] <= cells[5]  # median <= slowest


def test_bench_memory_reports_state_and_peaks(tmp_path: Path) -> None:
    run("bench_memory.py", "--workloads", "mlp", "--steps", "2", out=tmp_path)
    report = (tmp_path / "memory.md").read_text()
    state, peak = (line for line in report.splitlines() if line.startswith("| mlp"))
    cells = [float(c) for c in state.strip("|").split("|")[1:]]
    assert cells[0] == pytest.approx(535818 * 4 / 2**20, abs=0.01)  # 784-512-256-10
    assert cells[1] == pytest.approx(1.0)  # SGD's momentum: one copy of the parameters
    assert cells[2] == pytest.approx(2.0)  # AdamW's two moments
    assert cells[6] > 1.0  # dense A and G of the 784-wide input layer exceed its weights
    assert cells[3] < cells[6] / 4  # the defaults hold the wide sides as rank-32 sketches
    assert cells[5] < cells[8] / 4  # and their inverses as rank-32 bases
    assert cells[9] < cells[6] / 4  # blocks of at most 128 hold a quarter of dense or less
    assert all(float(c) > 0 for c in peak.strip("|").split("|")[1:])


def test_bench_first_refresh_reports_ratios_and_errors(tmp_path: Path) -> None:
    run("bench_first_refresh.py", "--widths", "160,200", "--rounds", "1", out=tmp_path)
    rows = [
        line for line in (tmp_path / "first_refresh.md").read_text().splitlines()
        if line.startswith("| 160") or line.startswith("| 200")
    ]  # fmt: skip
    assert len(rows) == 2
    for row in rows:
        cells = [float(c) for c in row.strip("|").split("|")]
        assert cells[1] > 0 and cells[2] > 0 and cells[4] < 0.05  # the pairs are found


def test_time_to_target_writes_its_report(tmp_path: Path) -> None:
    run(
        "time_to_target.py",
        *("--workloads", "mlp", "--optimizers", "kfrob,adamw", "--seeds", "1"),
        *("--max-steps", "30", "--embedded"),
        out=tmp_path,
    )
    results = json.loads((tmp_path / "time_to_target.json").read_text())["results"]["mlp"]
    assert set(results) == {"kfrob", "adamw"}
    assert all(len(row["grid"]) == 3 for row in results.values())  # same grid size for all
    assert (tmp_path / "time_to_target.png").stat().st_size > 0
    assert "## mlp: 88% test accuracy" in (tmp_path / "time_to_target.md").read_text()


def test_time_to_target_takes_an_accuracy_target_and_an_evaluation_interval(
    tmp_path: Path,
) -> None:
    run(
        "time_to_target.py",
        *("--workloads", "mlp", "--optimizers", "adamw", "--seeds", "1"),
        *("--max-steps", "30", "--embedded", "--accuracy-target", "0.3", "--eval-every", "5"),
        out=tmp_path,
    )
    results = json.loads((tmp_path / "time_to_target.json").read_text())["results"]["mlp"]
    steps = [row["steps"] for row in results["adamw"]["grid"] if row["steps"] is not None]
    assert steps and all(s % 5 == 0 and s < 25 for s in steps)  # evaluated every 5 steps
    report = (tmp_path / "time_to_target.md").read_text()
    assert "## mlp: 30% test accuracy" in report and "Evaluated every 5 steps." in report


def test_transformer_time_to_target_writes_its_report(tmp_path: Path) -> None:
    """Two contenders, one learning rate, one seed, a second of training each: the report
    names the learning rate it was given and a row per contender."""
    run(
        "transformer_time_to_target.py",
        *("--contenders", "kfrob,adamw", "--lrs", "0.003", "--seeds", "1"),
        *("--max-seconds", "1", "--name", "tt"),
        out=tmp_path,
    )
    report = (tmp_path / "tt.md").read_text()
    assert "the learning rate 0.003 for every contender" in report
    assert "| kfrob | 0.003 |" in report and "| adamw | 0.003 |" in report
    runs = json.loads((tmp_path / "tt.json").read_text())["runs"]
    for label in ("kfrob", "adamw"):
        assert [r["lr"] for r in runs[label]] == [0.003] and runs[label][0]["steps"] > 0
