"""Fashion-MNIST from the standard IDX files (``*-idx3-ubyte.gz``, ``*-idx1-ubyte.gz``).

An IDX file is a big-endian header — two zero bytes, a type code (``0x08`` = uint8), the
number of dimensions ``n`` — followed by ``n`` uint32 sizes and the data. Files may be
gzipped. A directory named explicitly (the ``data_dir`` argument, else ``$KFROB_DATA``) is the
only one looked at: if it is missing or lacks one of the four files, ``FileNotFoundError``
names it and the missing files. With neither, the standard places are searched in order:
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package) and the
user cache (``$XDG_CACHE_HOME/kfrob/fashion-mnist``, by default ``~/.cache/kfrob/...``).
Nothing is downloaded unless asked: :func:`download_fashion_mnist` fetches the four files
from the dataset's official location into the cache, checks each file's SHA-256 (of the
decompressed content, so any gzip packing of the same data passes) and moves it into place
only then; an interrupted or failed download leaves nothing behind.

kfrob also ships an *embedded* stratified subset (10,000 training and 2,000 test images,
1,000 and 200 per class; built by ``scripts/make_embedded_subset.py``) in the same format:
``load_fashion_mnist(..., embedded=True)`` reads it, and :func:`load_any_fashion_mnist` falls
back to it when no directory is named and the full set is not installed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CHECKSUMS",
    "EMBEDDED_DIR",
    "FILES",
    "OFFICIAL_URL",
    "cache_dir",
    "download_fashion_mnist",
    "explicit_data_dir",
    "find_data_dir",
    "load_any_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_DIR = Path(__file__).parent / "datasets" / "fashion-mnist-subset"
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of each file's decompressed content (the IDX bytes)
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
_UINT8 = 0x08


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if they are gzipped (by their magic number, whatever
    the file's name); gzip's CRC catches corruption."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable (gzip) IDX file: {err}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzipped) into an array of its stated shape.

    Raises ``ValueError`` naming the file for a bad magic number, an unsupported type, or a
    size that does not match the header (truncated or padded files).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()!r}")
    if raw[2] != _UINT8:
        raise ValueError(f"{path}: unsupported IDX type code 0x{raw[2]:02x} (only uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, header says {expected} (truncated file?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def cache_dir() -> Path:
    """The user cache for downloads: ``$XDG_CACHE_HOME/kfrob/fashion-mnist``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kfrob" / "fashion-mnist"


NAMES = tuple(name for pair in FILES.values() for name in pair)


_HOW_TO_GET = (
    "Install Debian's package (apt-get install dataset-fashion-mnist), set KFROB_DATA / pass "
    "data_dir (--data-dir) to a directory holding the four files, or download them "
    "(`kfrob train --download`, or kfrob.data.download_fashion_mnist())."
)

_HOW_TO_FIX = (
    "Name a directory that holds all four, or download them into this one "
    "(`--download`, or kfrob.data.download_fashion_mnist(directory))."
)


def explicit_data_dir(data_dir: str | Path | None = None) -> tuple[Path, str] | None:
    """The directory named explicitly, and by what: ``data_dir`` (``"data_dir"``), else
    ``$KFROB_DATA`` (``"$KFROB_DATA"``); ``None`` when neither is set."""
    if data_dir:
        return Path(data_dir), "data_dir"
    if os.environ.get("KFROB_DATA"):
        return Path(os.environ["KFROB_DATA"]), "$KFROB_DATA"
    return None


def find_data_dir(data_dir: str | Path | None = None, *, named_by: str | None = None) -> Path:
    """The directory holding all four Fashion-MNIST files.

    A directory named explicitly (``data_dir``, else ``$KFROB_DATA``) is used or refused: a
    missing or incomplete one raises ``FileNotFoundError`` naming it and the files it lacks,
    and nothing else is searched. Otherwise the first of the standard places that holds all
    four files (``/usr/share/datasets/fashion-mnist``, then the user cache) is returned.
    ``named_by`` says how the caller's user wrote ``data_dir`` (e.g. ``"--data-dir"``), for
    the message."""
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:
        directory, origin = explicit
        if origin == "data_dir" and named_by is not None:
            origin = named_by
        if not directory.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST directory {directory} (from {origin}) does not exist; it should "
                f"hold {', '.join(NAMES)}. {_HOW_TO_FIX}"
            )
        missing = [name for name in NAMES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST directory {directory} (from {origin}) lacks "
                f"{', '.join(missing)}. {_HOW_TO_FIX}"
            )
        return directory
    candidates = [SYSTEM_DIR, cache_dir()]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in NAMES):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({', '.join(NAMES)}) not found; looked in: {looked}. "
        + _HOW_TO_GET
    )


def download_fashion_mnist(
    destination: str | Path | None = None,
    *,
    url: str = OFFICIAL_URL,
    checksums: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download the four files from ``url`` into ``destination`` (default :func:`cache_dir`).

    Each file is written to a temporary file in ``destination``, its decompressed content's
    SHA-256 is checked against ``checksums`` (default :data:`CHECKSUMS`), and only then is it
    renamed into place (atomic on one file system). Files already present and valid are kept.
    A failed or interrupted download raises and leaves no partial file behind: ``ValueError``
    for a checksum mismatch or a corrupt file, ``OSError`` for a network failure.
    """
    destination = Path(destination) if destination is not None else cache_dir()
    checksums = CHECKSUMS if checksums is None else checksums
    destination.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        target = destination / name
        if target.is_file() and _sha256_ok(target, checksums[name]):
            continue
        handle, temporary = tempfile.mkstemp(dir=destination, prefix=f".{name}.", suffix=".part")
        try:
            with (
                os.fdopen(handle, "wb") as out,
                urllib.request.urlopen(url + name, timeout=timeout) as response,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            if not _sha256_ok(Path(temporary), checksums[name]):
                raise ValueError(
                    f"{url + name}: corrupt gzip or checksum mismatch (expected SHA-256 "
                    f"{checksums[name]} of the decompressed file); the download was discarded"
                )
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
    return destination


def _sha256_ok(path: Path, expected: str) -> bool:
    """Whether ``path`` decompresses to content with SHA-256 ``expected``."""
    try:
        return hashlib.sha256(_read_bytes(path)).hexdigest() == expected
    except ValueError:
        return False


def load_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None, *, embedded: bool = False
) -> tuple[Tensor, Tensor]:
    """``(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and int64 ``(N,)``,
    from the full set (see :func:`find_data_dir`) or, with ``embedded``, the shipped subset.

    Raises ``ValueError`` naming the file for anything but 28×28 images with one label in
    ``0..9`` each."""
    if split not in FILES:
        raise ValueError(f"invalid split={split!r}: expected one of {tuple(FILES)}")
    directory = EMBEDDED_DIR if embedded else find_data_dir(data_dir)
    image_file, label_file = (directory / name for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file}: shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{directory}: images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_file}: label {labels.max()} outside 0..9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_any_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None
) -> tuple[Tensor, Tensor, str]:
    """The full set if it can be found, else the embedded subset; the third item says which
    (``"full (<dir>)"`` or ``"embedded subset"``), for the user to see. A directory named
    explicitly (``data_dir`` or ``$KFROB_DATA``) must hold the full set: there is no fallback
    from it (see :func:`find_data_dir`)."""
    try:
        directory = find_data_dir(data_dir)
    except FileNotFoundError:
        if explicit_data_dir(data_dir) is not None:
            raise
        return (*load_fashion_mnist(split, embedded=True), "embedded subset")
    return (*load_fashion_mnist(split, directory), f"full ({directory})")
