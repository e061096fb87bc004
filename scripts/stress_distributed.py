"""Repeat the distributed equality cases many times and count the runs that disagree.

The cases are those of ``tests/test_distributed.py::test_ranks_agree_and_equal_the_global_
batch_run``: 2 and 3 gloo ranks in both placements, packed triangles, accumulation under
``no_sync()``, an explicit group, staggered refreshes. Each case spawns its ranks once and
trains ``--repeats`` times; a run fails if two ranks' parameters differ in any bit, or if rank
0's differ from the single-process run on the global batch by more than the test's tolerance
(``rtol=1e-4, atol=1e-5``). The single-process reference is computed once per case with the
ranks' thread count. ``--load N`` keeps N busy processes running meanwhile (a saturated CPU);
``--threads`` sets the ranks' intra-op threads. The largest deviation from the reference over
all runs is reported too, so a drift that stays inside the tolerance is still visible.

    python scripts/stress_distributed.py --repeats 40                # results/stress.md
    python scripts/stress_distributed.py --repeats 40 --load 2 --threads 2 --name stress_load
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import provenance, write_report

from tests.distributed_harness import repeat_train, run_ranks, train

CASES: dict[str, tuple[int, dict, dict]] = {
    "2-ranks": (2, {}, {}),
    "3-ranks-packed-triangles": (3, {}, {"pack_triangles": True}),
    "2-ranks-factored": (2, {"damping_method": "factored"}, {}),
    "3-ranks-owner": (3, {"inverse_placement": "owner"}, {}),
    "2-ranks-no_sync-accumulation": (2, {}, {"accumulate": 2}),
    "2-ranks-explicit-group": (2, {}, {"subgroup": True}),
    "2-ranks-staggered": (2, {"stagger_refreshes": True, "damping_method": "exact"}, {}),
    "3-ranks-staggered-owner": (3, {"stagger_refreshes": True, "inverse_placement": "owner"}, {}),
}
RTOL, ATOL = 1e-4, 1e-5


def busy(stop: float) -> None:
    x = 0.0
    while time.time() < stop:
        x = x * 0.5 + 1.0


def deviation(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest ``|got - want| / (atol + rtol |want|)`` (> 1 fails the test)."""
    return max(
        float(((got[k] - want[k]).abs() / (ATOL + RTOL * want[k].abs())).max()) for k in want
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load", type=int, default=0, help="busy processes meanwhile")
    parser.add_argument("--name", default="stress")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = [
        multiprocessing.Process(target=busy, args=(time.time() + 3600,), daemon=True)
        for _ in range(args.load)
    ]
    for process in load:
        process.start()
    rows, total_runs, total_failures, started = [], 0, 0, time.time()
    try:
        for name in args.cases.split(","):
            world_size, options, extra = CASES[name]
            reference = train(0, 1, options)["params"]
            with tempfile.TemporaryDirectory() as tmp:
                ranks = run_ranks(
                    world_size, repeat_train, Path(tmp), options, extra, args.repeats,
                    timeout=60.0 + 10.0 * args.repeats, threads=args.threads,
                )  # fmt: skip
            failures, worst = 0, 0.0
            for run in range(args.repeats):
                params = [r[run] for r in ranks]
                agree = all(
                    torch.equal(params[0][k], other[k]) for other in params[1:] for k in params[0]
                )
                dev = deviation(params[0], reference)
                worst = max(worst, dev)
                failures += int(not agree or dev > 1.0)
            rows.append(f"| {name} | {args.repeats} | {failures} | {worst:.3g} |")
            total_runs += args.repeats
            total_failures += failures
            print(rows[-1], flush=True)
    finally:
        for process in load:
            process.terminate()
    lines = [
        f"# Distributed equality under repetition ({args.name})",
        "",
        provenance(),
        "",
        f"Ranks with {args.threads} intra-op thread(s) each, {args.load} busy process(es) "
        f"meanwhile; {time.time() - started:.0f} s in all. A run fails if the ranks' parameters "
        "differ in any bit or rank 0's differ from the single-process run beyond "
        f"rtol={RTOL}, atol={ATOL}; 'worst' is the largest deviation in units of that "
        "tolerance (1 = the limit).",
        "",
        "| case | runs | failures | worst deviation |",
        "|---|---|---|---|",
        *rows,
        "",
        f"**{total_failures} failures in {total_runs} runs.**",
    ]
    write_report(args.out, f"{args.name}.md", lines)


if __name__ == "__main__":
    main()
