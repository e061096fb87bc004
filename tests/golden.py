"""Golden trajectories: the parameters after a few steps of fixed optimizer configurations.

``tests/data/golden.pt`` holds what kfrob 0.1 (before the core redesign) computed for each
configuration below, together with a saved ``state_dict`` of that version, so that a
restructured core can be checked to take the very same steps and to load old checkpoints.
Record anew only when a change of the math is intended, only the configurations it changes:

    python -m tests.golden NAME ...   # re-records these trajectories in tests/data/golden.pt
    python -m tests.golden            # rewrites the whole file
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from tests.reference import UnregisteredLayerNorm

PATH = Path(__file__).parent / "data" / "golden.pt"
STEPS = 12  # on one intra-op thread, as the spawned ranks run
#: kfrob 0.1 had dense factors only: every configuration replays with dense sides
DENSE = {"domain_structure": "dense", "codomain_structure": "dense"}

CONFIGS: dict[str, dict[str, Any]] = {
    "defaults-mc": {"lr": 0.2, "loss": "cross_entropy"},
    "momentum-empirical": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "exact": {"lr": 0.2, "damping_method": "exact", "inverse_update_freq": 3},
    "exact-subspace-stagger": {
        "lr": 0.2,
        "damping_method": "exact",
        "eigenbasis_refresh": "subspace",
        "stagger_refreshes": True,
        "inverse_update_freq": 3,
    },
    "ekfac": {
        "lr": 0.2,
        "damping_method": "exact",
        "eigenvalue_correction": True,
        "inverse_update_freq": 3,
        "loss": "cross_entropy",
    },
    "lm-damping": {"lr": 0.2, "adaptive_damping": True, "damping_adaptation_interval": 2},
    "root-diagonal": {
        "lr": 0.1,
        "exponent": 0.5,
        "domain": "diagonal",
        "nesterov": True,
        "momentum": 0.5,
        "factor_update_freq": 2,
        "kl_clip": None,
    },
    "reduce-warmup-powers": {
        "lr": 0.2,
        "weight_sharing": "reduce",
        "factor_decay_warmup": True,
        "exponent": 0.75,
        "codomain": "identity",
    },
    # the Adam rules, recorded before the step rules moved into kfrob.rules
    "eigenbasis-adam": {
        "step_rule": "eigenbasis_adam", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-2,
        "factor_update_freq": 2, "inverse_update_freq": 4,
    },
    "eigenbasis-adam-low-rank": {
        "step_rule": "eigenbasis_adam", "lr": 0.01, "rank": 2, "domain_structure": "low_rank",
        "factor_update_freq": 1, "inverse_update_freq": 3,
    },
    "adam-grafted": {
        "step_rule": "adam_grafted", "lr": 0.01, "weight_decay": 1e-2, "betas": (0.8, 0.9),
        "inverse_update_freq": 3,
    },
}  # fmt: skip

# data-parallel configurations, run on 2 gloo ranks by tests/distributed_harness.py
DISTRIBUTED: dict[str, dict[str, Any]] = {
    "ranks2-replicated": DENSE,
    "ranks2-owner-exact": {**DENSE, "inverse_placement": "owner", "damping_method": "exact"},
    "ranks2-eigenbasis-adam": {**DENSE, "step_rule": "eigenbasis_adam", "lr": 0.01},
    "ranks2-adam-grafted-owner": {
        **DENSE, "step_rule": "adam_grafted", "lr": 0.01, "inverse_placement": "owner",
    },
}  # fmt: skip


#: the configurations whose saved states are Adam rules' (each also has a saved state)
ADAM = ("eigenbasis-adam", "eigenbasis-adam-low-rank", "adam-grafted")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 8),
        UnregisteredLayerNorm(8),  # plain SGD
        nn.Tanh(),
        nn.Linear(8, 4),
    )


def data() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(10, 2, 5, 5, generator=gen), torch.randint(0, 4, (10,), generator=gen))
        for _ in range(STEPS)
    ]


def run(
    options: dict[str, Any], steps: int = STEPS, start: dict[str, Any] | None = None
) -> tuple[dict[str, Tensor], Any]:
    """The parameters after steps ``first .. steps - 1`` of one configuration, and its
    optimizer; ``start`` (a saved ``{"model", "optimizer"}`` state) resumes at its step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same rounding whatever the machine or an earlier test set
    try:
        return _run(options, steps, start)
    finally:
        torch.set_num_threads(threads)


def _run(
    options: dict[str, Any], steps: int, start: dict[str, Any] | None
) -> tuple[dict[str, Tensor], Any]:
    net = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FrobPreconditionedSGD(
            net,
            generator=torch.Generator().manual_seed(5),
            **{"step_rule": "preconditioned_sgd", **DENSE, **options},
        )
        first = 0
        if start is not None:
            net.load_state_dict(start["model"])
            opt.load_state_dict(start["optimizer"])
            saved = start["optimizer"]["kfrob"]  # kfrob 0.1 kept the engine's entries here
            first = saved.get("engine", saved)["steps"]
        for x, y in data()[first:steps]:

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, opt


def record() -> None:
    from tests.distributed_harness import run_ranks, train

    results: dict[str, Any] = {}
    for name, options in CONFIGS.items():
        results[name], _ = run(options)
    states = {}
    for name in ("defaults-mc", "exact", "ekfac", *ADAM):
        params, opt = run(CONFIGS[name], steps=STEPS // 2)
        states[name] = {"model": params, "optimizer": opt.state_dict()}
    distributed = {}
    for name, options in DISTRIBUTED.items():
        out = run_ranks(2, train, Path("/tmp/kfrob-golden") / name, options)
        distributed[name] = [r["params"] for r in out]
    PATH.parent.mkdir(exist_ok=True)
    torch.save(
        {
            "version": torch.__version__,
            "trajectories": results,
            "states": states,
            "distributed": distributed,
        },
        PATH,
    )


def rerecord(names: list[str]) -> None:
    """Replace the stored trajectories of ``names`` only (the rest, the saved states and the
    distributed runs keep what they hold). A configuration with a saved state also records
    where resuming from that old state now leads (``"resumed"``): the old checkpoint must
    still load, while the steps after it follow the changed math."""
    from tests.distributed_harness import run_ranks, train

    golden = torch.load(PATH, weights_only=False)
    for name in names:
        if name in DISTRIBUTED:
            out = run_ranks(2, train, Path("/tmp/kfrob-golden") / name, DISTRIBUTED[name])
            golden["distributed"][name] = [r["params"] for r in out]
            continue
        golden["trajectories"][name], _ = run(CONFIGS[name])
        if name in golden["states"]:  # the old checkpoint stays; what it resumes to changes
            resumed, _ = run(CONFIGS[name], start=golden["states"][name])
            golden.setdefault("resumed", {})[name] = resumed
    torch.save(golden, PATH)


if __name__ == "__main__":
    import sys

    if sys.argv[1:]:
        rerecord(sys.argv[1:])
    else:
        record()
    print(f"wrote {PATH}")
