"""IDX reading on small generated files; the real data only where it is installed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from kfrob.data import (
    FILES,
    SYSTEM_DIR,
    find_data_dir,
    load_any_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None, cut: int = 0) -> None:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_dataset(directory: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for images, labels in FILES.values():
        write_idx(directory / images, rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / labels, rng.integers(0, 10, (n,)))


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magic": bytes([1, 0, 8, 1])}, "magic"),
        ({"magic": bytes([0, 0, 0x0D, 1])}, "type code"),
        ({"cut": 3}, "truncated"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = tmp_path / "bad.gz"
    write_idx(path, np.zeros(10), **kwargs)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_corrupt_gzip_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"bad\.gz"):
        read_idx(path)


def test_load_from_explicit_dir_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dataset(tmp_path)
    x, y = load_fashion_mnist("test", data_dir=tmp_path)
    assert x.shape == (6, 1, 28, 28) and y.shape == (6,)
    assert x.min() >= 0.0 and x.max() <= 1.0
    monkeypatch.setenv("KFROB_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path


def test_missing_files_say_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFROB_DATA", raising=False)
    monkeypatch.setattr("kfrob.data.SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_data_dir(tmp_path)


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_system_copy_has_the_standard_sizes() -> None:
    x, y = load_fashion_mnist("test", data_dir=SYSTEM_DIR)
    assert x.shape == (10000, 1, 28, 28) and int(y.max()) == 9


def test_embedded_subset_is_stratified_and_complete() -> None:
    x, y = load_fashion_mnist("train", embedded=True)
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10
    x, y = load_fashion_mnist("test", embedded=True)
    assert x.shape == (2000, 1, 28, 28) and torch.bincount(y).tolist() == [200] * 10


def test_load_any_falls_back_to_the_embedded_subset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KFROB_DATA", raising=False)
    monkeypatch.setattr("kfrob.data.SYSTEM_DIR", tmp_path / "nowhere")
    x, _, source = load_any_fashion_mnist("test")
    assert source == "embedded subset" and len(x) == 2000
    fake_dataset(tmp_path)
    x, _, source = load_any_fashion_mnist("test", tmp_path)
    assert source == f"full ({tmp_path})" and len(x) == 6
