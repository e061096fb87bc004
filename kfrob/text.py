"""A byte-level text corpus that needs no download: the Python standard library's sources.

:func:`load_corpus` reads the ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and ``dist-packages``), or
every file under a folder you name (hidden ones excepted), as bytes. The corpus is split *by
file*: a file belongs to the validation split when a stable hash of its relative path
(SHA-256 of the POSIX path) falls in the lowest :data:`VALIDATION_FRACTION` of the hash
range, so a file is never in both splits and the split does not depend on the order the file
system lists files in (a folder whose hashes all miss gives its lowest-hash file to
validation). Within each split the files are read in the order of their hashes, a
deterministic shuffle, until the split's byte cap is reached; the capped training text is
therefore a sample of the whole library rather than its first packages alphabetically. The
vocabulary is the 256 byte values.

:func:`windows` cuts ``(inputs, targets)`` pairs out of a split: ``context`` bytes from each
start offset and the ``context`` bytes one further on, so ``targets[:, t]`` is the byte that
follows ``inputs[:, t]``. :func:`evaluation_starts` spreads a fixed number of windows evenly
over a split, for a validation loss that every run measures on the same bytes.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "VALIDATION_FRACTION",
    "VOCABULARY",
    "Corpus",
    "corpus_files",
    "evaluation_starts",
    "in_validation",
    "load_corpus",
    "stdlib_dir",
    "windows",
]

VOCABULARY = 256
VALIDATION_FRACTION = 0.08
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _hash(relative: str) -> int:
    """A stable 64-bit hash of a relative POSIX path (independent of ``PYTHONHASHSEED``)."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big")


def in_validation(relative: str) -> bool:
    """Whether the file at ``relative`` (a POSIX path below the corpus root) is held out."""
    return _hash(relative) < VALIDATION_FRACTION * 2**64


def corpus_files(root: Path, pattern: str = "*") -> list[str]:
    """The relative POSIX paths of the regular files under ``root`` matching ``pattern``,
    sorted; hidden files and folders (``.git``, …), ``site-packages``, ``dist-packages`` and
    ``__pycache__`` are left out."""
    found = []
    for path in root.rglob(pattern):
        parts = path.relative_to(root).parts
        hidden = any(part.startswith(".") for part in parts)
        if not hidden and _SKIPPED_DIRS.isdisjoint(parts[:-1]) and path.is_file():
            found.append("/".join(parts))
    return sorted(found)


@dataclass
class Corpus:
    """The two splits as flat uint8 tensors ``(n_train,)`` and ``(n_val,)``, the files each
    was read from (relative paths, in reading order) and a description of the source."""

    train: Tensor
    val: Tensor
    train_files: list[str]
    val_files: list[str]
    source: str


def _read(root: Path, files: list[str], cap: int | None) -> tuple[Tensor, list[str]]:
    """The files' bytes concatenated, stopping once ``cap`` bytes are read (the last file
    cut short), and the files used."""
    chunks: list[bytes] = []
    used: list[str] = []
    total = 0
    for relative in files:
        if cap is not None and total >= cap:
            break
        data = (root / relative).read_bytes()
        chunks.append(data)
        used.append(relative)
        total += len(data)
    joined = b"".join(chunks)[:cap]
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8), used


def load_corpus(
    directory: str | Path | None = None,
    *,
    train_bytes: int | None = None,
    val_bytes: int | None = None,
) -> Corpus:
    """The standard library's ``*.py`` files (``directory=None``) or every file under
    ``directory``, split by file and capped at ``train_bytes`` / ``val_bytes`` bytes
    (``None``: no cap). Raises ``FileNotFoundError`` for a missing or empty folder and
    ``ValueError`` for one with fewer than two files (a split would be empty)."""
    if directory is None:
        root, files = stdlib_dir(), corpus_files(stdlib_dir(), "*.py")
        version = ".".join(map(str, sys.version_info[:3]))
        origin = f"the Python {version} standard library's *.py files in {root}"
    else:
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"text directory {root} (from data.dir) does not exist")
        files = corpus_files(root)
        origin = f"the files under {root}"
    if len(files) < 2:
        raise (FileNotFoundError if not files else ValueError)(
            f"{origin}: {len(files)} file(s); the corpus needs at least two, as it is split by "
            "file into training and validation"
        )
    ordered = sorted(files, key=lambda relative: (_hash(relative), relative))
    held_out = {relative for relative in ordered if in_validation(relative)} or {ordered[0]}
    train, train_files = _read(root, [f for f in ordered if f not in held_out], train_bytes)
    val, val_files = _read(root, [f for f in ordered if f in held_out], val_bytes)
    source = (
        f"{origin} ({len(train):,} training bytes from {len(train_files)} files, "
        f"{len(val):,} validation bytes from {len(val_files)} files)"
    )
    return Corpus(train, val, train_files, val_files, source)


def windows(stream: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``, int64 ``(len(starts), context)`` each: ``stream[s : s +
    context]`` and ``stream[s + 1 : s + context + 1]`` for each start offset ``s`` (which
    must be ``<= len(stream) - context - 1``). ``stream`` is a uint8 ``(n,)`` tensor;
    ``starts`` int64 ``(B,)`` on its device."""
    offsets = torch.arange(context + 1, device=stream.device)
    chunk = stream[starts.unsqueeze(1) + offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def evaluation_starts(length: int, context: int, count: int) -> Tensor:
    """``count`` start offsets spread evenly over a split of ``length`` bytes (fewer if
    the split is short), int64 ``(count,)``. Raises ``ValueError`` if not one window of
    ``context + 1`` bytes fits."""
    last = length - context - 1
    if last < 0:
        raise ValueError(
            f"the validation text has {length} bytes; a window needs context + 1 = {context + 1}"
        )
    count = min(count, last + 1)
    return torch.linspace(0, last, count).round().long().unique()
