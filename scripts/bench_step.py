"""Step overhead: kfrob's amortised step against SGD, AdamW and the linear-algebra limit.

For each workload (the MLP 784-512-256-10, the deep autoencoder 784-1000-500-250-30 with its
mirrored decoder, a small CNN), batch size and (factor, inverse) update frequency, the
optimizers run round-robin on the same model and batch; each round times a whole refresh
cycle (``inverse_update_freq`` steps, at least ``--steps``) so kfrob's time is amortised over
its refreshes. Reported, as medians over rounds:

* ``kfrob / SGD`` and ``kfrob / AdamW``: step-time ratios (forward + backward + step), for
  kfrob with its defaults (each side dense or low-rank as its cost model chooses);
* ``kfrob / dense``: against the dense reference, kfrob with every side dense;
* ``kfrob / limit``: the limit of dense K-FAC, SGD's step + the bare ``torch.linalg.eigh``
  time of all dense factors / inverse_freq + the bare ``aᵀa``, ``gᵀg`` matmul time /
  factor_freq, measured in the same run;
* ``refresh / eigh``: one refresh of kfrob against the bare ``eigh`` calls on the dense
  factors (the dense reference's), and ``dense refresh / eigh`` of the dense reference;
* a breakdown of kfrob's step: factor update, inverse refresh, preconditioning, the rest
  (forward, backward with hooks, momentum and update);
* with ``--asdl``, ``kfrob / ASDL-emp`` and ``kfrob / ASDL-mc``: against ASDL's K-FAC (PyPI
  ``asdfghjkl==0.1a5``, module ``asdl``; ``pip install -e '.[bench]'``) with the empirical
  and the Monte Carlo Fisher, a whole step each (forward, backward, curvature at the same
  factor frequency, inverse at the same inverse frequency, preconditioning, an SGD step),
  round-robin with the others (see :class:`AsdlKfac` for how the settings map).

``--device cuda`` runs everything on the GPU (the device is synchronised before every clock
read; the phase breakdown then comes from a separate cycle per round, so its
synchronisations do not slow the timed steps).

    python scripts/bench_step.py --name step_overhead_default   # kfrob's default rule
    python scripts/bench_step.py --workloads mlp --batch-sizes 128 --rounds 3   # quick look
    python scripts/bench_step.py --workloads mlp --batch-sizes 128 --asdl --device cuda
    python scripts/bench_step.py --step-rule preconditioned_sgd   # the KL-clipped step's
        # damping methods, factored and exact: results/step_overhead.md

``kfrob`` runs ``--step-rule`` (default ``eigenbasis_adam``, kfrob's own) with each of
``--damping-methods`` (default: the rule's own, ``exact_where_dense`` for
``eigenbasis_adam``, else ``factored`` and ``exact``); its "preconditioning" phase is the
rule's direction (the K-FAC solve, or the Adam rules' rotations and moments).

Absolute times on a shared 2-core CPU are noise; the ratios are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import statistics
import time
import types
import warnings
from collections import defaultdict
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import torch
import torch.nn.functional as F
from report import add_device_argument, asynchronous, provenance, sync, write_report
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.capture import CurvatureCapture
from kfrob.job.workloads import WORKLOADS, training_loss
from kfrob.options import PreconditionerOptions
from kfrob.preconditioner import KroneckerPreconditioner
from kfrob.rules import RULES

PHASES = ("capture", "factor update", "inverse refresh", "preconditioning")
ASDL_PIN = "asdfghjkl==0.1a5"
ASDL_FISHERS = {"asdl-emp": "fisher_emp", "asdl-mc": "fisher_mc"}  # contender: fisher_type


class PhaseTimer:
    """Accumulates wall time of chosen kfrob methods (patched for the run). A call inside
    another timed call counts for the outer phase only, so phases never overlap. On an
    asynchronous device (CUDA) the device is synchronised as each phase starts and ends."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._inside = False
        self.device = torch.device(device)

    @contextmanager
    def patched(self) -> Any:
        originals = {}
        targets: list[tuple[str, Any, str]] = [
            ("capture", CurvatureCapture, "_on_forward"),
            ("capture", CurvatureCapture, "_on_output_grad"),
            ("capture", CurvatureCapture, "_on_model_output"),
            ("factor update", KroneckerPreconditioner, "update_factors"),
            ("inverse refresh", KroneckerPreconditioner, "update_inverses"),
            ("preconditioning", KroneckerPreconditioner, "precondition_"),
            *(("preconditioning", rule, "directions") for rule in RULES.values()),
        ]
        for phase, cls, name in targets:
            original = cls.__dict__[name]
            originals[(cls, name)] = original
            function = original.__func__ if isinstance(original, staticmethod) else original

            def timed(*args: Any, _function: Any = function, _phase: str = phase, **kw: Any) -> Any:
                if self._inside:
                    return _function(*args, **kw)
                self._inside = True
                sync(self.device)
                start = time.perf_counter()
                try:
                    return _function(*args, **kw)
                finally:
                    self._inside = False
                    sync(self.device)
                    self.totals[_phase] += time.perf_counter() - start

            setattr(cls, name, staticmethod(timed) if isinstance(original, staticmethod) else timed)
        try:
            yield self
        finally:
            for (cls, name), original in originals.items():
                setattr(cls, name, original)


def loss_of(kind: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The workload's own training loss."""
    return training_loss(kind, model(x), x, y)


def random_batch(size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """A fixed batch of random 28×28 images and labels (the same in every call, drawn on the
    CPU and moved to ``device``)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(size, 1, 28, 28, generator=gen), torch.randint(0, 10, (size,), generator=gen)
    return x.to(device), y.to(device)


def reconstruction(output: Tensor, images: Tensor, reduction: str = "mean") -> Tensor:
    """The autoencoder's loss ``½‖f(x) − x‖²`` per image (kfrob's ``reconstruction_loss``
    for ``reduction="mean"``), with the ``reduction`` argument ASDL's Fisher needs (it calls
    the loss with ``"sum"`` and divides by the batch size itself)."""
    per_image = 0.5 * (output - images.flatten(1)).square().sum(1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def import_asdl() -> types.ModuleType:
    """ASDL (PyPI ``asdfghjkl``, imported as ``asdl``), or exit saying how to install it.

    On a CPU-only torch build ``torch.cuda.nvtx.range`` raises, and ASDL 0.1a5 wraps its
    curvature and inverse computations in NVTX ranges unconditionally; there its modules get
    no-op ranges instead (profiler annotations only: no computation changes)."""
    try:
        asdl = importlib.import_module("asdl")
        importlib.import_module("asdl.precondition")
    except ImportError as err:
        raise SystemExit(
            f"--asdl needs ASDL's K-FAC, which is not importable ({err}): "
            f"pip install {ASDL_PIN}   (or pip install -e '.[bench]')"
        ) from None
    # ASDL 0.1a5 hooks modules with register_backward_hook, which torch deprecates loudly
    warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
    try:
        torch.cuda.nvtx.range_push("kfrob")
        torch.cuda.nvtx.range_pop()
    except RuntimeError:  # no NVTX in this build
        no_op = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())
        for name in ("asdl.operations.operation", "asdl.precondition.natural_gradient"):
            importlib.import_module(name).nvtx = no_op
    return asdl


def asdl_version() -> str:
    try:
        return package_version("asdfghjkl")
    except PackageNotFoundError:
        return "unknown version"


class AsdlKfac:
    """ASDL's K-FAC (``asdl.KfacGradientMaker``) and ``torch.optim.SGD``, one training step
    per :meth:`train_step`, set up like kfrob in this benchmark:

    * ``PreconditioningConfig(data_size=batch, damping=λ, ema_decay=1 − factor_decay,
      curvature_upd_interval=factor_freq, preconditioner_upd_interval=inverse_freq)``
      with kfrob's ``λ`` and ``factor_decay`` (``ema_decay`` is 1 for the first curvature
      update, so that the first statistic sets the curvature as in kfrob). ASDL updates
      the curvature on steps ``s % factor_freq == 0`` (during that step's forward and
      backward, with its own hooks) and inverts it on steps ``s % inverse_freq == 0``
      (after that step's curvature update), counting steps from 0 like kfrob: both
      frequencies are kfrob's exactly. Without ``ema_decay`` ASDL would keep no running
      curvature and invert at every curvature update.
    * ``fisher_type`` ``"fisher_emp"`` or ``"fisher_mc"`` (one sample), ``loss_type``
      ``"cross_entropy"`` for the classifiers and ``"mse"`` (unit-variance Gaussian, as
      kfrob's ``loss="mse"``) for the autoencoder.
    * Its damping is always factored (π-scaled Tikhonov per factor, Cholesky inverses), like
      kfrob's ``damping_method="factored"``; it has no KL clip. Each step preconditions the
      gradients in place (once the first inverse exists), then SGD (``lr``, no momentum)
      updates. Without a clip its steps diverge on the benchmark's fixed batch at the
      learning rates the others use (the autoencoder at 1e-4 and frequencies 10/100 within
      ~20–100 steps, then Cholesky fails on NaN factors), so ``lr`` is small
      (``--asdl-lr``); a step's work does not depend on it.
    """

    def __init__(
        self,
        asdl: types.ModuleType,
        model: nn.Module,
        kind: str,
        fisher_type: str,
        *,
        batch: int,
        freqs: tuple[int, int],
        damping: float,
        factor_decay: float,
        lr: float,
    ) -> None:
        factor_freq, inverse_freq = freqs
        self.ema_decay = 1 - factor_decay
        config = asdl.PreconditioningConfig(
            data_size=batch,
            damping=damping,
            ema_decay=1.0,  # the first statistic sets the curvature, as in kfrob
            curvature_upd_interval=factor_freq,
            preconditioner_upd_interval=inverse_freq,
        )
        loss_type = "cross_entropy" if kind == "classify" else "mse"
        self.maker = asdl.KfacGradientMaker(
            model, config, fisher_type=fisher_type, loss_type=loss_type
        )
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr)
        self.model, self.kind = model, kind

    def preconditioned_gradients(self, x: Tensor, y: Tensor) -> None:
        """Forward and backward (and, when due, curvature and inverse), leaving the
        preconditioned gradients in ``.grad``."""
        self.sgd.zero_grad()
        output = self.maker.setup_model_call(self.model, x)
        if self.kind == "classify":
            self.maker.setup_loss_call(F.cross_entropy, output, y)
        else:
            self.maker.setup_loss_call(reconstruction, output, x)
        self.maker.forward_and_backward()
        self.maker.config.ema_decay = self.ema_decay  # after the first curvature update

    def train_step(self, x: Tensor, y: Tensor) -> None:
        self.preconditioned_gradients(x, y)
        self.sgd.step()


Contender = torch.optim.Optimizer | AsdlKfac


def train_step(opt: Contender, model: nn.Module, kind: str, x: Tensor, y: Tensor) -> None:
    """One training step: forward, backward, the optimizer's step (ASDL: its own)."""
    if isinstance(opt, AsdlKfac):
        opt.train_step(x, y)
        return
    opt.zero_grad()
    loss_of(kind, model, x, y).backward()
    opt.step()


def step_times(
    opt: Contender, model: nn.Module, kind: str, x: Tensor, y: Tensor, steps: int
) -> list[float]:
    """Seconds of each of ``steps`` consecutive steps (the device of ``x`` synchronised
    before each clock read)."""
    times = []
    for _ in range(steps):
        sync(x.device)
        start = time.perf_counter()
        train_step(opt, model, kind, x, y)
        sync(x.device)
        times.append(time.perf_counter() - start)
    return times


def timed_steps(
    opt: Contender, model: nn.Module, kind: str, x: Tensor, y: Tensor, steps: int
) -> float:
    """Mean seconds per step over ``steps`` consecutive steps."""
    return statistics.fmean(step_times(opt, model, kind, x, y, steps))


def asdl_preconditions(
    asdl: types.ModuleType, workload: str, x: Tensor, y: Tensor, **options: Any
) -> float:
    """Check that ASDL's K-FAC preconditions: on a fresh model, its first step's gradient
    (curvature, inverse, preconditioning) against the plain gradient of the same model and
    batch, as ``‖g_ASDL − g‖ / ‖g‖``; refuses (RuntimeError) a gradient left as it was."""
    kind = WORKLOADS[workload].task
    model = WORKLOADS[workload].build().to(x.device)
    loss_of(kind, model, x, y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    AsdlKfac(asdl, model, kind, **options).preconditioned_gradients(x, y)
    preconditioned = [p.grad for p in model.parameters()]
    if any(g is None or not torch.isfinite(g).all() for g in preconditioned):
        raise RuntimeError(f"ASDL K-FAC ({options}) left a missing or non-finite gradient")
    diff = sum((a - b).square().sum() for a, b in zip(preconditioned, plain, strict=True))
    norm = sum(b.square().sum() for b in plain)
    relative = float((diff / norm).sqrt())
    if relative < 1e-3:
        raise RuntimeError(
            f"ASDL K-FAC ({options}) did not precondition on {workload}: its gradient differs "
            f"from the plain one by {relative:.1e} (relative)"
        )
    return relative


def bare_eigh(factors: list[Tensor]) -> float:
    """Seconds for one ``torch.linalg.eigh`` call per factor (float64 where float32 fails,
    as kfrob retries)."""
    device = factors[0].device
    sync(device)
    start = time.perf_counter()
    for f in factors:
        try:
            torch.linalg.eigh(f)
        except torch.linalg.LinAlgError:
            torch.linalg.eigh(f.double())
    sync(device)
    return time.perf_counter() - start


def bare_linear_algebra(
    opt: FrobPreconditionedSGD, x: Tensor, model: nn.Module, kind: str, y: Tensor
) -> tuple[float, float]:
    """Seconds for bare eigh of every factor, and for the bare aᵀa, gᵀg products."""
    eigh_time = bare_eigh(
        [f.value for layer in opt.preconditioner.layers.values() for f in layer.factors]
    )
    rows: list[Tensor] = []
    hooks = []
    for layer in opt.preconditioner.layers.values():

        def grab(module: nn.Module, args: Any, output: Tensor, math: Any = layer.math) -> None:
            rows.append(math.input_rows(args[0].detach()))
            output.register_hook(lambda g, math=math: rows.append(math.output_rows(g)))

        hooks.append(layer.module.register_forward_hook(grab))
    opt.preconditioner.capture.active = False
    loss_of(kind, model, x, y).backward()
    for h in hooks:
        h.remove()
    sync(x.device)
    start = time.perf_counter()
    for r in rows:
        r.mT @ r
    sync(x.device)
    return eigh_time, time.perf_counter() - start


def bench(
    workload: str, batch: int, freqs: tuple[int, int], method: str, args: argparse.Namespace
) -> dict:
    make, kind = WORKLOADS[workload].build, WORKLOADS[workload].task
    device = args.device
    x, y = random_batch(batch, device)
    factor_freq, inverse_freq = freqs
    cycle = max(args.steps, inverse_freq)
    names = ["sgd", "adamw", "kfrob", "kfrob-dense"] + (list(ASDL_FISHERS) if args.asdl else [])
    models = {name: make().to(device) for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfrob = {
            "lr": 1e-3,
            "step_rule": args.step_rule,
            "factor_update_freq": factor_freq,
            "inverse_update_freq": inverse_freq,
            "damping_method": method,
            "weight_sharing": args.weight_sharing,
            "loss": WORKLOADS[workload].kfrob_loss,  # the Monte Carlo Fisher, as in training
        }
        dense = {"domain_structure": "dense", "codomain_structure": "dense"}
        opts: dict[str, Contender] = {
            "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=1e-3),
            "adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=1e-4),
            "kfrob": FrobPreconditionedSGD(models["kfrob"], **kfrob),
            "kfrob-dense": FrobPreconditionedSGD(models["kfrob-dense"], **kfrob, **dense),
        }
    kfrob_opt, dense_opt = opts["kfrob"], opts["kfrob-dense"]
    assert isinstance(kfrob_opt, FrobPreconditionedSGD)
    assert isinstance(dense_opt, FrobPreconditionedSGD)
    checks: dict[str, float] = {}
    if args.asdl:  # ASDL's K-FAC at kfrob's frequencies, damping and factor decay
        asdl = import_asdl()
        options = {
            "batch": batch,
            "freqs": freqs,
            "damping": kfrob_opt.preconditioner.options.damping,
            "factor_decay": kfrob_opt.preconditioner.options.curvature.factor_decay,
            "lr": args.asdl_lr,
        }
        for name, fisher_type in ASDL_FISHERS.items():
            checks[name] = asdl_preconditions(
                asdl, workload, x, y, fisher_type=fisher_type, **options
            )
            opts[name] = AsdlKfac(asdl, models[name], kind, fisher_type, **options)
    for name, opt in opts.items():  # warm-up: allocations, first refresh
        timed_steps(opt, models[name], kind, x, y, min(cycle, 3))
    times: dict[str, list[float]] = defaultdict(list)
    timer = PhaseTimer(device)
    # on an asynchronous device the phase timer's synchronisations would slow kfrob's timed
    # steps: there the phases are timed in a cycle of their own, after the timed one
    separate_phases = asynchronous(device)
    for r in range(args.rounds):
        order = list(opts.items())
        for name, opt in order[r % len(order) :] + order[: r % len(order)]:  # rotated
            if name in ("kfrob", "kfrob-dense") and separate_phases:
                t = timed_steps(opt, models[name], kind, x, y, cycle)
            if name in ("kfrob", "kfrob-dense"):
                before = dict(timer.totals)
                with timer.patched():
                    phased = timed_steps(opt, models[name], kind, x, y, cycle)
                for phase, total in timer.totals.items():
                    times[f"{name} {phase}"].append((total - before.get(phase, 0.0)) / cycle)
                times[f"{name}, phases timed"].append(phased)
                if not separate_phases:
                    t = phased
            else:
                t = timed_steps(opt, models[name], kind, x, y, cycle)
            times[name].append(t)
    for name in checks:  # a diverged ASDL run would have timed NaN arithmetic
        if not all(torch.isfinite(p).all() for p in models[name].parameters()):
            raise RuntimeError(
                f"{name} diverged on {workload} (non-finite parameters): lower --asdl-lr"
            )
    eighs, matmuls = [], []
    for _ in range(args.rounds):
        e, m = bare_linear_algebra(dense_opt, x, models["kfrob-dense"], kind, y)
        eighs.append(e)
        matmuls.append(m)
    med = {k: statistics.median(v) for k, v in times.items()}
    eigh_time, matmul_time = statistics.median(eighs), statistics.median(matmuls)
    limit = med["sgd"] + eigh_time / inverse_freq + matmul_time / factor_freq
    refreshes = max(1, cycle // inverse_freq)
    refresh = med.get("kfrob inverse refresh", 0.0) * cycle / refreshes
    dense_refresh = med.get("kfrob-dense inverse refresh", 0.0) * cycle / refreshes
    phased = med["kfrob, phases timed"]  # the kfrob step of the cycles the phases are from
    rest = phased - sum(med.get(f"kfrob {p}", 0.0) for p in PHASES)
    against_asdl = {f"{name}_ms": 1e3 * med[name] for name in checks} | {
        f"vs_{name}": med["kfrob"] / med[name] for name in checks
    }
    return {
        "workload": workload,
        "batch": batch,
        "freqs": f"{factor_freq}/{inverse_freq}",
        "damping": method,
        "sgd_ms": 1e3 * med["sgd"],
        "adamw_ms": 1e3 * med["adamw"],
        "kfrob_ms": 1e3 * med["kfrob"],
        "dense_ms": 1e3 * med["kfrob-dense"],
        "vs_dense": med["kfrob"] / med["kfrob-dense"],
        "dense_refresh_vs_eigh": dense_refresh / eigh_time,
        "vs_sgd": med["kfrob"] / med["sgd"],
        "vs_adamw": med["kfrob"] / med["adamw"],
        "vs_limit": med["kfrob"] / limit,
        "refresh_vs_eigh": refresh / eigh_time,
        "breakdown": {p: med.get(f"kfrob {p}", 0.0) / phased for p in PHASES}
        | {"rest": rest / phased},
        "asdl_checks": checks,
        **against_asdl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,autoencoder,cnn")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--freqs", default="1/10,10/100")
    parser.add_argument(
        "--damping-methods",
        default=None,
        help="comma-separated; default: exact_where_dense for eigenbasis_adam, else factored,exact",
    )
    parser.add_argument(
        "--step-rule",
        default="eigenbasis_adam",
        choices=("preconditioned_sgd", "eigenbasis_adam", "adam_grafted"),
        help="kfrob's step rule (default: kfrob's own)",
    )
    parser.add_argument("--weight-sharing", default="expand", help="expand or reduce (convs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="minimum steps per timed cycle")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="step_overhead", help="results/<name>.md")
    parser.add_argument(
        "--asdl",
        action="store_true",
        help=f"also time ASDL's K-FAC, empirical and MC Fisher (pip install {ASDL_PIN})",
    )
    parser.add_argument(
        "--asdl-lr",
        type=float,
        default=1e-6,
        help="ASDL's SGD learning rate (small: without a KL clip larger steps diverge)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    if args.damping_methods is None:
        own = args.step_rule == "eigenbasis_adam"
        args.damping_methods = "exact_where_dense" if own else "factored,exact"
    if args.asdl:
        import_asdl()  # refuse before any timing if it is not installed
    rows = []
    for workload in args.workloads.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for freq, method in itertools.product(
                args.freqs.split(","), args.damping_methods.split(",")
            ):
                f, i = (int(v) for v in freq.split("/"))
                row = bench(workload, batch, (f, i), method, args)
                rows.append(row)
                print(
                    f"{workload:12s} B={batch:<4d} {row['freqs']:>6s} {method:8s} "
                    f"kfrob {row['kfrob_ms']:7.1f} ms"
                    f"  ×SGD {row['vs_sgd']:5.2f}  ×AdamW {row['vs_adamw']:5.2f}"
                    f"  ×dense {row['vs_dense']:5.2f}"
                    f"  ×limit {row['vs_limit']:5.2f}  refresh/eigh {row['refresh_vs_eigh']:5.2f}"
                    + "".join(
                        f"  ×{name[5:]} {row[f'vs_{name}']:5.2f}"
                        f" (ASDL {row[f'{name}_ms']:.1f} ms, preconditioned Δ "
                        f"{row['asdl_checks'][name]:.2g})"
                        for name in ASDL_FISHERS
                        if args.asdl
                    ),
                    flush=True,
                )
    asdl_columns = list(ASDL_FISHERS) if args.asdl else []
    lines = [
        "# Step overhead of kfrob",
        "",
        f"{provenance(args.device)} Medians over {args.rounds} round-robin rounds; kfrob's "
        f"time is amortised over whole refresh cycles. Step rule: `{args.step_rule}`. Weight "
        f"sharing: {args.weight_sharing}."
        + (
            " The phase breakdown comes from a separate cycle per round, synchronised at "
            "each phase's start and end, and is a share of that cycle's step."
            if asynchronous(args.device)
            else ""
        ),
    ]
    if args.asdl:
        lines += ["", asdl_note(args)]
    lines += [
        "",
        "| workload | batch | factor/inverse freq | damping | SGD ms | AdamW ms | kfrob ms | "
        "dense ms | "
        + "".join(f"{asdl_label(n)} ms | " for n in asdl_columns)
        + "kfrob/SGD | kfrob/AdamW | kfrob/dense | "
        + "".join(f"kfrob/{asdl_label(n)} | " for n in asdl_columns)
        + "kfrob/limit | refresh/eigh | dense refresh/eigh | capture | factors | refresh "
        "| precond | rest |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(asdl_columns)) + "---|" * 11,
    ]
    for r in rows:
        b = r["breakdown"]
        lines.append(
            f"| {r['workload']} | {r['batch']} | {r['freqs']} | {r['damping']} | "
            f"{r['sgd_ms']:.1f} | {r['adamw_ms']:.1f} | {r['kfrob_ms']:.1f} | "
            f"{r['dense_ms']:.1f} | "
            + "".join(f"{r[f'{n}_ms']:.1f} | " for n in asdl_columns)
            + f"{r['vs_sgd']:.2f} | {r['vs_adamw']:.2f} | {r['vs_dense']:.2f} | "
            + "".join(f"{r[f'vs_{n}']:.2f} | " for n in asdl_columns)
            + f"{r['vs_limit']:.2f} | {r['refresh_vs_eigh']:.2f} | "
            f"{r['dense_refresh_vs_eigh']:.2f} | {b['capture']:.0%} | {b['factor update']:.0%} | "
            f"{b['inverse refresh']:.0%} | {b['preconditioning']:.0%} | {b['rest']:.0%} |"
        )
    write_report(args.out, f"{args.name}.md", lines)


def asdl_label(name: str) -> str:
    """``asdl-emp`` → ``ASDL-emp``."""
    return "ASDL" + name[4:]


def asdl_note(args: argparse.Namespace) -> str:
    """What the ASDL columns measure, for the report."""
    defaults = PreconditionerOptions()  # what bench() gives kfrob and ASDL
    damping, decay = defaults.damping, defaults.curvature.factor_decay
    return (
        f"ASDL: `asdl.KfacGradientMaker` of asdfghjkl {asdl_version()} with "
        "`fisher_type='fisher_emp'` (ASDL-emp) and `'fisher_mc'` (ASDL-mc, one sample), "
        "`loss_type` cross-entropy (classifiers) or `mse` (autoencoder), then "
        f"`torch.optim.SGD` (lr {args.asdl_lr:g}: without kfrob's KL clip, ASDL's steps "
        "diverge on this fixed batch at the others' learning rates, e.g. the autoencoder "
        "at 1e-4 and frequencies 10/100, and a step's work does not depend on it; a run "
        "whose ASDL parameters turn non-finite is refused); each step is `setup_model_call`, "
        "`setup_loss_call`, `forward_and_backward()` and the SGD step, round-robin with the "
        "others after the same warm-up. `PreconditioningConfig(data_size=batch, "
        f"damping={damping:g}, ema_decay={1 - decay:g}, curvature_upd_interval=f, "
        "preconditioner_upd_interval=i)` for kfrob's frequencies f/i, damping and factor "
        f"decay {decay:g}: ASDL updates the curvature (with its own hooks, during that step's "
        "forward and backward) on steps s with s % f == 0 and inverts it on steps with "
        "s % i == 0, counting from 0 like kfrob, so both frequencies match exactly. "
        "Differences: ASDL's damping is always factored (π-scaled, Cholesky inverses; the "
        "`exact` rows compare against it too), and it has no KL clip. ASDL's `ema_decay` is 1 "
        "for its first curvature update, so that, as in kfrob, the first statistic sets the "
        "curvature. Before timing, "
        "each ASDL contender's first preconditioned gradient is checked to differ from the "
        "plain gradient of the same model and batch."
    )


if __name__ == "__main__":
    main()
