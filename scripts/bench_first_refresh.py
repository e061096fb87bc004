"""A low-rank side's first refresh: randomized subspace iteration against a full ``eigh``.

For each width ``n`` a covariance-like factor ``F = X Xᵀ / m`` (``X`` Gaussian ``n × 2n``
with columns scaled by ``0.99^i``, so the spectrum decays) is decomposed by
``torch.linalg.eigh`` and by :func:`kfrob.structure.randomized_eigenpairs` (rank 32, what
:func:`kfrob.structure.leading_eigenpairs` uses for sides at least 512 wide), round-robin
after a warm-up, order swapped every round; the table gives the medians, their ratio, and
the largest relative error of the 32 leading eigenvalues found.

    python scripts/bench_first_refresh.py          # writes results/first_refresh.md
    python scripts/bench_first_refresh.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import add_device_argument, provenance, sync, write_report

from kfrob.structure import randomized_eigenpairs

RANK = 32


def factor(n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 2 * n, generator=g) * 0.99 ** torch.arange(2 * n)
    return (x @ x.T / (2 * n)).unsqueeze(0).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="256,512,1024,2048")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="results")
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    lines = [
        "# First refresh of a low-rank side: randomized subspace iteration against `eigh`",
        "",
        f"{provenance(device)} Rank {RANK}; medians over {args.rounds} round-robin rounds "
        "after one warm-up call each.",
        "",
        "| width | eigh ms | randomized ms | randomized / eigh | largest relative error of "
        f"the {RANK} leading eigenvalues |",
        "|---|---|---|---|---|",
    ]
    for n in (int(w) for w in args.widths.split(",")):
        m = factor(n, device)
        trace = m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
        contenders = {
            "eigh": lambda m=m: torch.linalg.eigh(m),
            "randomized": lambda m=m, t=trace: randomized_eigenpairs(m, RANK, t),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for f in contenders.values():
            f()
        for r in range(args.rounds):
            for name in list(contenders)[:: 1 if r % 2 == 0 else -1]:
                sync(device)
                start = time.perf_counter()
                contenders[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
        exact = torch.linalg.eigvalsh(m)[0, -RANK:]
        side = randomized_eigenpairs(m, RANK, trace)
        assert side is not None
        error = float(((side.eigenvalues[0] - exact).abs() / exact).max())
        eigh, randomized = (statistics.median(times[k]) for k in ("eigh", "randomized"))
        lines.append(
            f"| {n} | {1e3 * eigh:.1f} | {1e3 * randomized:.1f} | {randomized / eigh:.2f} "
            f"| {error:.1e} |"
        )
        print(lines[-1], flush=True)
    write_report(args.out, "first_refresh.md", lines)


if __name__ == "__main__":
    main()
