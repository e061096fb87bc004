"""Data parallelism on gloo: 2 and 3 ranks spawned on loopback, each run bounded in time.

The reference for every distributed run is the single-process run over the concatenated
global batch (DistributedDataParallel averages the ranks' gradients, which for equal
per-rank batches is the gradient of the global mean loss)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kfrob.distributed import assign_owners
from tests.distributed_harness import (
    STEPS,
    desynchronise,
    reference_uneven,
    refuse_fsdp,
    refuse_mismatch,
    run_ranks,
    train,
    train_join,
    train_rank_dependent,
    train_uneven,
    weighted_average,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = (torch.stack(list(v)) if isinstance(v, tuple) else v for v in (a[key], b[key]))
        if exact:
            assert torch.equal(x, y), key
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=key)


def factors_flat(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        f"{name}/{side}": f for name, (a, g) in factors.items() for side, f in (("A", a), ("G", g))
    }


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """References computed here use one intra-op thread, like every spawned rank, so that a
    comparison never depends on how this process splits its sums among threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single() -> dict:
    """The single-process run over the global batches (with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(0, 1)
    finally:
        torch.set_num_threads(threads)


BLOCKS = {"domain_structure": "block_diagonal", "codomain_structure": "block_diagonal"}
ADAM_GRAFTED = {"step_rule": "adam_grafted", "momentum": 0.9, "lr": 0.01}  # momentum: β₁
#: the default rule (eigenbases where a layer's sides are dense, a low-rank side grafted)
EIGENBASIS_ADAM = {"step_rule": "eigenbasis_adam", "momentum": 0.9, "lr": 0.01, "rank": 8}


@pytest.mark.parametrize(
    ("world_size", "options", "extra"),
    [
        (2, {}, {}),
        (3, {}, {"pack_triangles": True}),
        (2, {"damping_method": "factored"}, {}),
        (3, {"inverse_placement": "owner"}, {}),
        (2, {}, {"accumulate": 2}),
        (2, {}, {"subgroup": True}),
        (2, {"stagger_refreshes": True, "damping_method": "exact"}, {}),
        (3, {"stagger_refreshes": True, "inverse_placement": "owner"}, {}),
        (2, {"rank": 4, "domain_structure": "low_rank"}, {}),
        (2, {"max_block_size": 3, **BLOCKS}, {}),
        (3, {"max_block_size": 3, "inverse_placement": "owner", **BLOCKS}, {}),
        (3, {**ADAM_GRAFTED, "inverse_placement": "owner"}, {}),
        (2, {**EIGENBASIS_ADAM, "domain_structure": "low_rank"}, {}),
    ],
    ids=[
        "2-ranks",
        "3-ranks-packed-triangles",
        "2-ranks-factored",
        "3-ranks-owner",
        "2-ranks-no_sync-accumulation",
        "2-ranks-explicit-group",
        "2-ranks-staggered",
        "3-ranks-staggered-owner",
        "2-ranks-low-rank-sketches",
        "2-ranks-block-diagonal",
        "3-ranks-block-diagonal-owner",
        "3-ranks-adam-grafted-owner",
        "2-ranks-eigenbasis-adam-low-rank",
    ],
)
def test_ranks_agree_and_equal_the_global_batch_run(
    tmp_path: Path, world_size: int, options: dict, extra: dict, single: dict
) -> None:
    reference = single if not options else train(0, 1, options)
    ranks = run_ranks(world_size, train, tmp_path, options, **extra)
    for other in ranks[1:]:  # bit-identical on every rank, the KL clip and diagnostics too
        assert_same(ranks[0]["params"], other["params"], exact=True)
        assert_same(factors_flat(ranks[0]["factors"]), factors_flat(other["factors"]), exact=True)
        assert ranks[0]["diagnostics"] == other["diagnostics"]
    assert "kl_clip_factor" in ranks[0]["diagnostics"]
    assert_same(ranks[0]["params"], reference["params"], exact=False)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(reference["factors"]), exact=False)


def test_subspace_refreshes_agree_across_ranks(tmp_path: Path) -> None:
    """Subspace steps continue from the previous basis, so where eigenvalues (nearly)
    coincide the basis, and with it the inverse, depends on the rounding of the first eigh
    (measured once, not here: on a small MLP a 1e-6 change of the inputs moved the weights by
    ~3e-2 after 12 steps, against 5e-7 with eigh refreshes). The global-batch run is
    therefore no reference here; what must hold is that the ranks, which all use the owner's
    result, agree bit for bit."""
    options = {"eigenbasis_refresh": "subspace", "damping_method": "exact"}
    ranks = run_ranks(2, train, tmp_path, options)
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(ranks[1]["factors"]), exact=True)
    assert ranks[0]["diagnostics"] == ranks[1]["diagnostics"]


@pytest.mark.parametrize("placement", ["replicated", "owner"])
def test_each_decomposition_runs_on_exactly_one_rank(tmp_path: Path, placement: str) -> None:
    ranks = run_ranks(3, train, tmp_path, {"inverse_placement": placement})
    owners = ranks[0]["owners"]
    assert all(r["owners"] == owners for r in ranks)
    assert set(owners.values()) == {0, 1, 2}  # three layers, three ranks: one each
    refreshes = STEPS // 2  # inverse_update_freq=2
    for layer, owner in owners.items():
        per_rank = [r["counts"].get(layer, 0) for r in ranks]
        assert per_rank[owner] == refreshes and sum(per_rank) == refreshes, (layer, per_rank)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_statistics_complete_after_forward_go_before_backward(tmp_path: Path, fisher: str) -> None:
    options = {"fisher": fisher, "loss": "cross_entropy"}
    ranks = run_ranks(2, train, tmp_path, options)
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    traffic, calls = ranks[0]["traffic"], ranks[0]["calls"]
    # one early all-reduce per step, after the forward pass (A, and G for the MC Fisher),
    # and one at step() with the rest and the accept vote
    assert calls["factors (early)"] == calls["factors"] == STEPS
    late_per_step = traffic["factors"] / STEPS
    if fisher == "mc":  # only the weights and the vote are left for step()
        assert late_per_step < 100
    else:
        assert late_per_step > 100  # G waits for the backward pass


def test_an_inner_forward_on_one_rank_neither_hangs_nor_desynchronises(
    tmp_path: Path, single: dict
) -> None:
    # only forwards of the DDP wrapper send early, so rank 0's extra call of the inner
    # model starts no collective; its rows come too late for the window and are left out
    ranks = run_ranks(2, train, tmp_path, None, extra_forward_on=0, timeout=60)
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(ranks[1]["factors"]), exact=True)
    assert_same(ranks[0]["params"], single["params"], exact=False)
    assert [r["warned_late_rows"] for r in ranks] == [True, False]


def test_both_placements_take_the_same_steps(tmp_path: Path) -> None:
    replicated = run_ranks(2, train, tmp_path / "r", {"inverse_placement": "replicated"})
    owner = run_ranks(2, train, tmp_path / "o", {"inverse_placement": "owner"})
    assert_same(replicated[0]["params"], owner[0]["params"], exact=False)
    # the owner placement sends preconditioned gradients every step instead of inverses
    assert "gradients" in owner[0]["traffic"] and "gradients" not in replicated[0]["traffic"]


def test_resume_from_rank0_checkpoint_on_other_world_sizes(tmp_path: Path, single: dict) -> None:
    half = STEPS // 2
    first = run_ranks(2, train, tmp_path / "a", None, last_step=half)
    checkpoint = first[0]["state"]  # rank 0's state_dict alone
    three = run_ranks(3, train, tmp_path / "b", None, first_step=half, checkpoint=checkpoint)
    one = train(0, 1, first_step=half, checkpoint=checkpoint)
    for resumed in (three[0], one):
        assert_same(resumed["params"], single["params"], exact=False)
    # the new world size reassigned the inverse work over its three ranks
    assert set(three[0]["owners"].values()) == {0, 1, 2}


def test_owner_placement_checkpoint_gets_its_missing_inverses_back(tmp_path: Path) -> None:
    owner = {"inverse_placement": "owner", "inverse_update_freq": 3}
    first = run_ranks(2, train, tmp_path / "a", owner, last_step=4)
    checkpoint = first[0]["state"]  # holds rank 0's inverses only
    saved = checkpoint["optimizer"]["kfrob"]["engine"]["layers"]
    assert any(entry["inverse"] is None for entry in saved.values())
    resumed = run_ranks(2, train, tmp_path / "b", owner, first_step=4, checkpoint=checkpoint)
    assert_same(resumed[0]["params"], resumed[1]["params"], exact=True)
    # at the first step after loading, each missing layer was decomposed by its owner
    # (once), then at the scheduled refresh of step 6 (once more)
    missing = [name for name, entry in saved.items() if entry["inverse"] is None]
    for name in missing:
        owner_rank = resumed[0]["owners"][name]
        assert resumed[owner_rank]["counts"][name] == 2, name


def test_rank_local_nan_does_not_desynchronise(tmp_path: Path) -> None:
    ranks = run_ranks(2, train, tmp_path, None, nan_at=(1, 3))
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(ranks[1]["factors"]), exact=True)
    assert all(torch.isfinite(p).all() for p in ranks[0]["params"].values())
    assert [r["skipped"] for r in ranks] == [1, 1]  # both skipped the poisoned window


def test_a_layer_run_on_one_rank_only_neither_hangs_nor_diverges(tmp_path: Path) -> None:
    ranks = run_ranks(2, train_rank_dependent, tmp_path, timeout=60)
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(ranks[1]["factors"]), exact=True)
    assert ranks[0]["disabled"] == ranks[1]["disabled"] == {}


def test_a_rank_local_bad_gradient_vetoes_the_window_everywhere(tmp_path: Path) -> None:
    # no DDP: each rank keeps its own gradients, so only rank 1 sees the NaN; the window
    # is still skipped on both, and their factors stay identical
    ranks = run_ranks(2, train_rank_dependent, tmp_path, nan_grad_at=2, timeout=60)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(ranks[1]["factors"]), exact=True)
    assert [r["skipped"] for r in ranks] == [1, 1]


def test_fsdp_is_refused(tmp_path: Path) -> None:
    messages = run_ranks(2, refuse_fsdp, tmp_path)
    assert all("does not support FSDP" in m for m in messages), messages


def test_owner_assignment_is_greedy_balanced_and_deterministic() -> None:
    costs = {"a": 8.0, "b": 7.0, "c": 4.0, "d": 4.0, "e": 1.0}
    owners = assign_owners(costs, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}  # loads 12 and 12
    assert assign_owners(dict(reversed(costs.items())), 2) == owners
    assert set(assign_owners(costs, 1).values()) == {0}


def test_weighted_average_over_ranks_unit(tmp_path: Path) -> None:
    """Weights 1, 2 (and 5, 0): rank 1's second statistic does not count at all."""
    for stat_a, stat_b, totals, accepted in run_ranks(2, weighted_average, tmp_path):
        torch.testing.assert_close(stat_a, torch.full((2, 3), (1 * 1 + 2 * 2) / 3))
        torch.testing.assert_close(stat_b, torch.full((4,), 10.0))
        torch.testing.assert_close(totals, torch.tensor([3.0, 5.0]))
        assert bool(accepted)


@pytest.mark.parametrize("options", [{}, {"fisher": "mc", "loss": "cross_entropy"}],
                         ids=["empirical", "mc-factors-only"])  # fmt: skip
def test_uneven_and_empty_batches_equal_the_concatenated_batch(
    tmp_path: Path, options: dict
) -> None:
    """Ranks of 3 and 9 rows, …, and an empty batch on either rank: every rank's factors are
    those of the concatenated batch (weighted by rows and samples, not by rank), and its steps
    those of one process using them with DDP's averaged gradient."""
    ranks = run_ranks(2, train_uneven, tmp_path, options)
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    if options:  # the MC labels differ between ranks and one process: compare ranks only
        return
    reference = reference_uneven(options)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(reference["factors"]), exact=False)
    assert_same(ranks[0]["params"], reference["params"], exact=False)


def test_equal_weights_would_not_give_the_concatenated_factors() -> None:
    """The check above can fail: averaging the ranks' factors with equal weights differs
    from the concatenated batch's factors by far more than the tolerance."""
    from tests.distributed_harness import UNEVEN, batches, make_model, make_optimizer

    x_all, y_all = batches()
    per_rank = []
    for rows in (slice(0, UNEVEN[0][0]), slice(UNEVEN[0][0], 12)):
        model = make_model()
        opt = make_optimizer(model)
        torch.nn.functional.cross_entropy(model(x_all[0, rows]), y_all[0, rows]).backward()
        opt.step()
        per_rank.append(factors_flat(opt.preconditioner.factors()))
    whole = factors_flat(reference_uneven(sizes=UNEVEN[:1])["factors"])
    equal = {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in whole}
    assert any(not torch.allclose(equal[k], whole[k], rtol=1e-4, atol=1e-5) for k in whole)


@pytest.mark.parametrize("change", ["shape", "extra"])
def test_ranks_with_different_models_are_refused_on_every_rank(tmp_path: Path, change: str) -> None:
    messages = run_ranks(2, refuse_mismatch, tmp_path, change, timeout=60)
    assert messages[0] == messages[1]
    assert "ranks disagree on the model at layer" in messages[0]
    assert ("'0'" if change == "shape" else "'3'") in messages[0]


def test_float64_models_keep_float64_curvature_across_ranks(tmp_path: Path) -> None:
    """Factors, statistics' averages and inverses of a float64 model stay float64, so 2 ranks
    equal one process on the global batch to float64 precision (not float32's ~1e-7)."""
    options = {"damping_method": "exact"}
    reference = train(0, 1, options, dtype=torch.float64)
    ranks = run_ranks(2, train, tmp_path, options, dtype=torch.float64)
    for name, (a, g) in ranks[0]["factors"].items():
        assert a.dtype == g.dtype == torch.float64, name
    for key, want in reference["params"].items():
        torch.testing.assert_close(ranks[0]["params"][key], want, rtol=1e-10, atol=1e-12, msg=key)
    for key, (a, g) in reference["factors"].items():
        torch.testing.assert_close(ranks[1]["factors"][key][0], a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ranks[1]["factors"][key][1], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"damping_method": "exact"}], ids=["factored", "exact"])
def test_join_with_uneven_inputs_equals_the_reference(tmp_path: Path, options: dict) -> None:
    """Under ``Join``, rank 1 runs out of data two steps early and shadows kfrob's
    collectives: no hang, both ranks keep the same factors and step count, and the weights
    (synced by DDP at the end) are those of one process with the concatenated factors and
    DDP's gradient (which counts the joined rank as an empty batch)."""
    from tests.distributed_harness import JOIN_SIZES

    ranks = run_ranks(2, train_join, tmp_path, options, timeout=90)
    assert [r["steps"] for r in ranks] == [8, 8]
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(ranks[1]["factors"]), exact=True)
    assert_same(ranks[0]["params"], ranks[1]["params"], exact=True)
    reference = reference_uneven(options, sizes=JOIN_SIZES)
    assert_same(factors_flat(ranks[0]["factors"]), factors_flat(reference["factors"]), exact=False)
    assert_same(ranks[0]["params"], reference["params"], exact=False)


def test_join_refuses_what_it_cannot_shadow() -> None:
    from kfrob import FrobPreconditionedSGD

    opt = FrobPreconditionedSGD(
        torch.nn.Linear(2, 2), lr=0.1, adaptive_damping=True, step_rule="preconditioned_sgd"
    )
    with pytest.raises(ValueError, match="Join needs"):
        opt.join_hook()


def test_verify_factors_names_the_layer_on_every_rank(tmp_path: Path) -> None:
    messages = run_ranks(2, desynchronise, tmp_path, timeout=60)
    assert messages[0] == messages[1]
    assert messages[0].startswith("step 2: kfrob: the factors of layer '3' differ")
