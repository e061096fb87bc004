"""Fashion-MNIST from the standard IDX files (``*-idx3-ubyte.gz``, ``*-idx1-ubyte.gz``).

An IDX file is a big-endian header — two zero bytes, a type code (``0x08`` = uint8), the
number of dimensions ``n`` — followed by ``n`` uint32 sizes and the data. Files may be
gzipped. The data directory is searched in order: the ``data_dir`` argument, ``$KFROB_DATA``,
and ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package).
Nothing is ever downloaded here.

kfrob also ships an *embedded* stratified subset (10,000 training and 2,000 test images,
1,000 and 200 per class; built by ``scripts/make_embedded_subset.py``) in the same format:
``load_fashion_mnist(..., embedded=True)`` reads it, and :func:`load_any_fashion_mnist` falls
back to it when the full set is not installed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EMBEDDED_DIR",
    "FILES",
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
_UINT8 = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzipped) into an array of its stated shape.

    Raises ``ValueError`` naming the file for a bad magic number, an unsupported type, or a
    size that does not match the header (truncated or padded files).
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable (gzip) IDX file: {err}") from None
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


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The first candidate directory holding all four Fashion-MNIST files."""
    candidates = [Path(d) for d in (data_dir, os.environ.get("KFROB_DATA")) if d] + [SYSTEM_DIR]
    names = [name for pair in FILES.values() for name in pair]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in names):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({', '.join(names)}) not found; looked in: {looked}. "
        "Install Debian's package (apt-get install dataset-fashion-mnist), or set "
        "KFROB_DATA / pass data_dir to a directory holding them."
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None, *, embedded: bool = False
) -> tuple[Tensor, Tensor]:
    """``(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and int64 ``(N,)``,
    from the full set (see :func:`find_data_dir`) or, with ``embedded``, the shipped subset."""
    if split not in FILES:
        raise ValueError(f"invalid split={split!r}: expected one of {tuple(FILES)}")
    directory = EMBEDDED_DIR if embedded else find_data_dir(data_dir)
    image_file, label_file = (directory / name for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{directory}: images {images.shape} and labels {labels.shape} do not match"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_any_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None
) -> tuple[Tensor, Tensor, str]:
    """The full set if it can be found, else the embedded subset; the third item says which
    (``"full (<dir>)"`` or ``"embedded subset"``), for the user to see."""
    try:
        directory = find_data_dir(data_dir)
    except FileNotFoundError:
        return (*load_fashion_mnist(split, embedded=True), "embedded subset")
    return (*load_fashion_mnist(split, directory), f"full ({directory})")
