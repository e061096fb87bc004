"""Shared by the benchmark scripts: where a result came from, writing it down, and the
device the models run on (``--device``)."""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import torch


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``cpu``; e.g. ``cuda``, ``cuda:1``): where the models, the data
    and the optimizers go. Parsed to a :class:`torch.device`."""
    parser.add_argument(
        "--device",
        type=parse_device,
        default="cpu",
        help="where models, data and optimizers go: cpu (default), cuda, cuda:1, ...",
    )


def parse_device(value: str) -> torch.device:
    """``value`` as a :class:`torch.device`, refused (as an argparse error) if it is not a
    device name or names CUDA on a machine without it."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available to this torch")
    return device


def asynchronous(device: torch.device | str) -> bool:
    """Whether work queued on ``device`` runs asynchronously to the host (CUDA), so that a
    clock read on the host needs :func:`sync` first."""
    return torch.device(device).type == "cuda"


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA); a no-op on the CPU. Called before
    reading a clock, so a timing counts the device's work and not only its launch."""
    if asynchronous(device):
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """The device, for a report: ``cpu``, or ``cuda:0 (NVIDIA H200)`` with the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def rank_device(device: torch.device | str, rank: int) -> torch.device:
    """Rank ``rank``'s device under data parallelism: its own GPU (``cuda:<rank>``) on CUDA,
    else ``device`` itself."""
    device = torch.device(device)
    return torch.device(device.type, rank) if device.type == "cuda" else device


def use_device(device: torch.device | str) -> None:
    """Make ``device`` the current device of its kind (CUDA: ``torch.cuda.set_device``, so
    that collectives and kfrob's buffers of this rank go to its own GPU); a no-op on the
    CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def process_group_backend(device: torch.device | str) -> str:
    """The collective backend for ``device``: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_count(device: torch.device | str) -> int | None:
    """How many devices of ``device``'s kind this machine has (``None`` for the CPU)."""
    return torch.cuda.device_count() if torch.device(device).type == "cuda" else None


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the device allocator's peak counter (CUDA); a no-op on the CPU."""
    if asynchronous(device):
        torch.cuda.reset_peak_memory_stats(device)


def device_memory(device: torch.device | str) -> tuple[int, int] | None:
    """Bytes allocated on the device now and at the peak since :func:`reset_peak_memory`
    (CUDA's caching allocator); ``None`` on the CPU, whose memory is the process's."""
    if not asynchronous(device):
        return None
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def provenance(device: torch.device | str | None = None) -> str:
    """The exact command, the date and the machine, for the first line of a results file;
    with ``device``, also the device the models ran on (for CUDA the GPU's name)."""
    where = "" if device is None else f", device {device_name(device)}"
    return (
        f"`python {' '.join(sys.argv)}` on {date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}{where}."
    )


def write_report(out_dir: str, name: str, lines: list[str]) -> None:
    """Print the Markdown report and write it to ``out_dir/name``."""
    report = "\n".join(lines)
    print(report)
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    (out / name).write_text(report + "\n")
