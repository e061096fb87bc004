"""Golden trajectories: every configuration of ``tests/golden.py`` takes the steps kfrob 0.1
took, on one process and on 2 gloo ranks, and a ``state_dict`` saved by kfrob 0.1 loads and
continues the same trajectory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests import golden
from tests.distributed_harness import run_ranks, train

RECORDED = torch.load(golden.PATH, weights_only=False)
# the same arithmetic in the same order gives the same bits; a tolerance of a few ulps
# leaves room for a re-associated sum, nothing more
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def assert_params_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=key)


def test_trajectories_are_distinct_and_moved() -> None:
    """The recorded runs are not trivial: each moved the parameters, and no two agree."""
    initial = golden.model().state_dict()
    runs = RECORDED["trajectories"]
    for name, params in runs.items():
        assert not torch.allclose(params["3.weight"], initial["3.weight"], **TOLERANCE), name
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(runs[a]["6.weight"], runs[b]["6.weight"], **TOLERANCE)


@pytest.mark.parametrize("name", list(golden.CONFIGS))
def test_same_trajectory(name: str) -> None:
    params, _ = golden.run(golden.CONFIGS[name])
    assert_params_equal(params, RECORDED["trajectories"][name])


@pytest.mark.parametrize("name", sorted(RECORDED["states"]))
def test_old_state_dict_resumes_the_same_trajectory(name: str) -> None:
    params, _ = golden.run(golden.CONFIGS[name], start=RECORDED["states"][name])
    # where the math changed after the state was saved, the resumed run has its own record
    want = RECORDED.get("resumed", {}).get(name, RECORDED["trajectories"][name])
    assert_params_equal(params, want)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
@pytest.mark.parametrize("name", list(golden.DISTRIBUTED))
def test_same_distributed_trajectory(name: str, tmp_path: Path) -> None:
    results = run_ranks(2, train, tmp_path, golden.DISTRIBUTED[name])
    for rank, result in enumerate(results):
        for key, want in RECORDED["distributed"][name][rank].items():
            torch.testing.assert_close(result["params"][key], want, **TOLERANCE, msg=key)
