"""Two "nodes" on one machine: two ``torchrun --nnodes 2 --node_rank {0,1}`` launches of 2
processes each, with a localhost rendezvous, train the distributed example exactly like one
node of 4 processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"
STEPS = ["--epochs", "1", "--max-steps", "3", "--batch-size", "16"]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options, str(EXAMPLE), *STEPS]


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    return out


def test_two_nodes_equal_one_node_of_four(tmp_path: Path) -> None:
    one_node = tmp_path / "one.pt"
    single = subprocess.Popen(
        [*torchrun("--standalone", "--nproc_per_node=4"), "--save", str(one_node)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert "(3 steps on 4 ranks)" in finish(single)
    port = free_port()
    two_nodes = tmp_path / "two.pt"

    def node(rank: int) -> subprocess.Popen:
        static = [f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        command = torchrun("--nnodes=2", "--nproc_per_node=2", *static)
        return subprocess.Popen(
            [*command, "--save", str(two_nodes)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    nodes = [node(0), node(1)]
    outputs = [finish(node) for node in nodes]
    assert "(3 steps on 4 ranks)" in outputs[0]
    want, got = torch.load(one_node), torch.load(two_nodes)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
