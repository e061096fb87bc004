"""The ``kfrob`` command (also ``python -m kfrob``; ``kfrob --version``).

    kfrob train   [--config FILE] [--optimizer NAME] [options] [dotted.key=value ...]
    kfrob compare [--config FILE] [--optimizers kfrob,sgd,adamw] [options] [dotted.key=value ...]

With no config the embedded default runs (the MLP on the Fashion-MNIST subset shipped with
kfrob); configs/transformer.yaml trains a byte-level transformer on the Python standard
library's sources. Each run gets a fresh directory ``<logdir>/<name>/version_<n>`` (its effective
config, checkpoints, TensorBoard events, results); ``--resume`` continues the latest one, or
the one named, with the config it saved. Exit status: 0 done, 2 bad config or data, 130
interrupted (a checkpoint was written).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfrob.job.config import Config

__all__ = ["main"]


TRAIN_EXAMPLE = """example:
  kfrob train --config configs/autoencoder.yaml --optimizer kfrob training.epochs=3
  kfrob train --resume runs/autoencoder-kfrob/version_0   # after Ctrl-C"""
COMPARE_EXAMPLE = """example:
  kfrob compare                                    # the MLP on the embedded subset
  kfrob compare --config configs/cnn.yaml --optimizers kfrob,adamw training.epochs=1
  kfrob compare --config configs/transformer.yaml training.max_seconds=30"""
OVERRIDES = """overrides: any config key as dotted.key=value or --dotted.key value (the value is
YAML), on top of the file and the defaults, e.g. training.epochs=3 or --training.epochs 3,
optimizers.kfrob.damping=1e-2, training.target=null"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kfrob {version('kfrob')} (torch {version('torch')})"
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "kfrob (not installed)"


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="kfrob",
        description="Train with kfrob on Fashion-MNIST or a byte-level language model, alone or "
        "side by side with SGD and AdamW.",
        epilog=f"{COMPARE_EXAMPLE}\n\n'kfrob COMMAND --help' lists each command's options.",
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", help="YAML config (default: none, the built-in defaults)"
    )
    common.add_argument(
        "--logdir", default="runs", help="root of the run directories (default: runs)"
    )
    common.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue RUN_DIR, or without it the latest run of this config, from its "
        "checkpoint, with its saved config (overrides given now apply on top)",
    )
    common.add_argument(
        "--device", help="override training.device: cpu, cuda, cuda:1, … (default: cpu)"
    )
    common.add_argument(
        "--data-dir",
        metavar="DIR",
        help="use the full Fashion-MNIST from DIR, which must hold its four IDX files; for "
        "the transformer, the text files under DIR (default: the config's data.dir)",
    )
    common.add_argument(
        "--download",
        action="store_true",
        help="download the full Fashion-MNIST if it is not found (into --data-dir, else the "
        "user cache)",
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.epochs=3")

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train one optimizer",
        description="Train one optimizer of the config, in the run directory\n"
        "<logdir>/<workload>-<optimizer>/version_<n>.",
        epilog=f"{OVERRIDES}\n\n{TRAIN_EXAMPLE}",
        formatter_class=raw,
    )
    train.add_argument(
        "--optimizer",
        metavar="NAME",
        help="a key of the config's optimizers (default: the first, kfrob)",
    )
    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="train several optimizers on the same workload",
        description="Train each optimizer from the same initial model on the same batches,\n"
        "then write the table, the figure and the JSON of the comparison, in the run\n"
        "directory <logdir>/compare-<workload>/version_<n>.",
        epilog=f"{OVERRIDES}\n\n{COMPARE_EXAMPLE}",
        formatter_class=raw,
    )
    compare.add_argument(
        "--optimizers",
        metavar="A,B,…",
        help="comma-separated keys of the config's optimizers (default: all; kfrob,sgd,adamw)",
    )
    compare.add_argument(
        "--out",
        metavar="DIR",
        help="also copy comparison.{md,png,json} here (default: only the run directory)",
    )
    return parser


def _run_dir(root: Path, resume: str | None) -> Path:
    """A new ``root/version_<n>``, or for ``resume`` the latest existing one (or the path
    given)."""
    if resume is not None and resume != "latest":
        return Path(resume)
    versions = sorted(
        (int(p.name.removeprefix("version_")), p)
        for p in root.glob("version_*")
        if p.name.removeprefix("version_").isdigit()
    )
    if resume is not None:
        if not versions:
            raise FileNotFoundError(f"nothing to resume under {root}")
        return versions[-1][1]
    return root / f"version_{versions[-1][0] + 1 if versions else 0}"


def _dotted_options(argv: list[str]) -> list[str]:
    """Config keys may also be given as options, as LightningCLI spells them:
    ``--training.epochs 3`` and ``--training.epochs=3`` both mean ``training.epochs=3``
    (no option of the command has a dot in its name)."""
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        key, sep, value = token.partition("=")
        if not (token.startswith("--") and "." in key):
            out.append(token)
            continue
        if not sep:
            value = next(tokens, None)
            if value is None:
                out.append(token)  # reported as an unrecognized argument
                continue
        out.append(f"{key[2:]}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # overrides may come before or after the options
    args, extra = parser.parse_known_args(_dotted_options(sys.argv[1:] if argv is None else argv))
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    try:
        from kfrob.job.compare import compare
        from kfrob.job.config import load_config
        from kfrob.job.training import CONFIG, train
    except ImportError as err:
        print(
            f"kfrob: the training job needs its extra dependencies ({err.name} is missing): "
            "pip install 'kfrob[train]'",
            file=sys.stderr,
        )
        return 2

    overrides = [*args.overrides, *extra]
    if args.device:
        overrides.append(f"training.device={args.device}")
    try:
        if args.data_dir or args.download:
            # --data-dir and --download ask for the full set: an embedded config turns full,
            # and a stdlib one reads the files under --data-dir
            source = load_config(args.config, overrides).data.source
            switch = {"embedded": "full", "stdlib": "files"}
            overrides += [f"data.source={switch[source]}"] if source in switch else []
            overrides += [f"data.dir={json.dumps(args.data_dir)}"] if args.data_dir else []
            overrides += ["data.download=true"] if args.download else []
        config = load_config(args.config, overrides)
        progress = False if args.no_progress else None
        resume = args.resume is not None
        if args.command == "train":
            names = [args.optimizer] if args.optimizer else []
            if resume and args.resume != "latest":  # the run directory names the optimizer
                run_dir = Path(args.resume)
                config, names = _saved(run_dir, config, overrides, names)
            name = names[0] if names else next(iter(config.optimizers))
            if not (resume and args.resume != "latest"):
                run_dir = _run_dir(Path(args.logdir) / f"{config.workload}-{name}", args.resume)
                if resume:
                    config, _ = _saved(run_dir, config, overrides, [name])
            _check_names(config, [name], "--optimizer")
            _preflight(config, [name])
            result = train(config, name, run_dir, resume=resume, progress=progress)
            interrupted = result.interrupted
            print(f"run directory: {run_dir}")
        else:
            names = args.optimizers.split(",") if args.optimizers else []
            run_dir = _run_dir(Path(args.logdir) / f"compare-{config.workload}", args.resume)
            if resume:
                config, names = _saved(run_dir, config, overrides, names)
            names = names or list(config.optimizers)
            _check_names(config, names, "--optimizers")
            _preflight(config, names)
            command = shlex.join(["kfrob", *(sys.argv[1:] if argv is None else argv)])
            results = compare(
                config, names, run_dir, resume=resume, progress=progress, command=command
            )
            interrupted = any(r.interrupted for r in results.values())
            if not interrupted:
                out = Path(args.out) if args.out else run_dir
                out.mkdir(parents=True, exist_ok=True)
                _publish(run_dir, out)
                print((out / "comparison.md").read_text(), end="")
                print(f"figure: {out / 'comparison.png'}, data: {out / 'comparison.json'}")
            print(f"run directory: {run_dir}")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kfrob: error: {err}", file=sys.stderr)
        return 2
    if interrupted:
        print(
            f"kfrob: interrupted; checkpoint written. Continue with: kfrob {args.command} "
            f"--resume {run_dir} (its config, overrides included, is {run_dir / CONFIG})",
            file=sys.stderr,
        )
        return 130
    return 0


def _saved(
    run_dir: Path, config: Config, overrides: list[str], names: list[str]
) -> tuple[Config, list[str]]:
    """For ``--resume``: the config the run directory was run with, with this command's
    overrides on top, and its optimizers (``names``, if given, take precedence). A run
    directory without a saved config keeps ``config``."""
    from kfrob.job.training import saved_run

    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: no run directory {run_dir}")
    saved = saved_run(run_dir, overrides)
    if saved is None:
        return config, names
    return saved[0], names or saved[1]


def _check_names(config: Config, names: list[str], flag: str) -> None:
    unknown = [n for n in names if n not in config.optimizers]
    if unknown:
        raise ValueError(
            f"{flag}: {', '.join(map(repr, unknown))} not in the config's optimizers "
            f"({', '.join(config.optimizers)})"
        )


def _preflight(config: Config, names: list[str]) -> None:
    """Check the device and build the model and every optimizer once, so that a bad
    hyperparameter fails before any training (and before the data is read)."""
    import torch

    from kfrob.job.optimizers import build_optimizer
    from kfrob.job.workloads import WORKLOADS

    device = torch.device(config.training.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device: {device} requested, but no CUDA device is available")
    workload = WORKLOADS[config.workload]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            model = config.build_model()
            optimizer = build_optimizer(name, config.optimizers[name], model, workload, 0)
            close = getattr(optimizer, "close", None)
            if close is not None:
                close()


def _publish(run_dir: Path, out: Path) -> None:
    if out.resolve() == run_dir.resolve():
        return
    for name in ("comparison.md", "comparison.png", "comparison.json"):
        (out / name).write_bytes((run_dir / name).read_bytes())


if __name__ == "__main__":
    sys.exit(main())
