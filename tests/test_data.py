"""IDX reading on small generated files; the real data only where it is installed."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kfrob.data import (
    CHECKSUMS,
    EMBEDDED_DIR,
    FILES,
    SYSTEM_DIR,
    download_fashion_mnist,
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
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("kfrob.data.SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message
    assert str(tmp_path / "cache" / "kfrob" / "fashion-mnist") in message


@pytest.fixture
def complete_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A complete copy in the user cache, which an explicit directory must never fall back
    to."""
    monkeypatch.delenv("KFROB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("kfrob.data.SYSTEM_DIR", tmp_path / "nowhere")
    cache = tmp_path / "cache" / "kfrob" / "fashion-mnist"
    cache.mkdir(parents=True)
    fake_dataset(cache)
    return cache


def test_explicit_dir_that_does_not_exist_is_an_error(tmp_path: Path, complete_cache) -> None:
    assert find_data_dir() == complete_cache
    missing = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir(missing, named_by="--data-dir")
    message = str(info.value)
    assert f"{missing} (from --data-dir) does not exist" in message
    assert all(name in message for pair in FILES.values() for name in pair)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any_fashion_mnist("test", missing)  # no fallback to the embedded subset either


def test_incomplete_explicit_dir_names_the_missing_files(tmp_path: Path, complete_cache) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    fake_dataset(partial)
    (partial / FILES["test"][1]).unlink()
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir(partial)
    message = str(info.value)
    assert f"{partial} (from data_dir) lacks {FILES['test'][1]}." in message
    assert FILES["train"][0] not in message.split("lacks")[1].split(".")[0]


def test_kfrob_data_that_is_incomplete_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, complete_cache
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("KFROB_DATA", str(empty))
    with pytest.raises(FileNotFoundError, match=r"\(from \$KFROB_DATA\) lacks train-images"):
        find_data_dir()
    with pytest.raises(FileNotFoundError, match=r"\$KFROB_DATA"):
        load_any_fashion_mnist("test")
    # an explicit argument takes precedence over the variable
    assert find_data_dir(complete_cache) == complete_cache


def test_user_cache_is_searched_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFROB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("kfrob.data.SYSTEM_DIR", tmp_path / "nowhere")
    cache = tmp_path / "kfrob" / "fashion-mnist"
    cache.mkdir(parents=True)
    fake_dataset(cache)
    assert find_data_dir() == cache
    explicit = tmp_path / "mine"
    explicit.mkdir()
    fake_dataset(explicit)
    assert find_data_dir(explicit) == explicit


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("t10k-labels-idx1-ubyte.gz", "do not match"),  # 5 labels for 6 images
        ("t10k-images-idx3-ubyte.gz", r"expected \(N, 28, 28\)"),
    ],
)
def test_inconsistent_files_are_rejected(tmp_path: Path, broken: str, message: str) -> None:
    fake_dataset(tmp_path)
    shape = (5,) if "labels" in broken else (6, 28, 27)
    write_idx(tmp_path / broken, np.zeros(shape))
    with pytest.raises(ValueError, match=message):
        load_fashion_mnist("test", tmp_path)


def test_labels_outside_the_ten_classes_are_rejected(tmp_path: Path) -> None:
    fake_dataset(tmp_path)
    write_idx(tmp_path / FILES["test"][1], np.full(6, 12))
    with pytest.raises(ValueError, match=r"label 12 outside 0\.\.9"):
        load_fashion_mnist("test", tmp_path)


# --- downloads, from a local "server" (file:// URLs): the tests never touch the network --------


def served_dataset(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A directory of fake files to download from, and their content checksums."""
    server = tmp_path / "server"
    server.mkdir()
    fake_dataset(server)
    sums = {
        name: hashlib.sha256(gzip.decompress((server / name).read_bytes())).hexdigest()
        for name in CHECKSUMS
    }
    return server.as_uri() + "/", sums


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_verifies_and_places_the_files(tmp_path: Path) -> None:
    url, sums = served_dataset(tmp_path)
    destination = download_fashion_mnist(tmp_path / "cache", url=url, checksums=sums)
    assert leftovers(destination) == sorted(CHECKSUMS)  # no temporary files
    x, _ = load_fashion_mnist("train", destination)
    assert x.shape == (6, 1, 28, 28)


def test_download_with_wrong_checksum_leaves_nothing(tmp_path: Path) -> None:
    url, sums = served_dataset(tmp_path)
    name = FILES["train"][0]
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_fashion_mnist(tmp_path / "cache", url=url, checksums={**sums, name: "0" * 64})
    assert name not in leftovers(tmp_path / "cache")
    assert not [n for n in leftovers(tmp_path / "cache") if n.endswith(".part")]


def test_truncated_download_leaves_nothing(tmp_path: Path) -> None:
    url, sums = served_dataset(tmp_path)
    served = tmp_path / "server" / FILES["test"][0]
    served.write_bytes(served.read_bytes()[:-20])  # a cut-off gzip stream
    with pytest.raises(ValueError, match="corrupt gzip"):
        download_fashion_mnist(tmp_path / "cache", url=url, checksums=sums)
    assert FILES["test"][0] not in leftovers(tmp_path / "cache")
    assert not [n for n in leftovers(tmp_path / "cache") if n.endswith(".part")]


def test_interrupted_download_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sums = served_dataset(tmp_path)

    class Dropped:
        def __init__(self, *args, **kwargs) -> None:
            self.calls = 0

        def __enter__(self) -> Dropped:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read(self, size: int) -> bytes:
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("connection dropped")
            return b"\x1f\x8b partial"

    monkeypatch.setattr("urllib.request.urlopen", Dropped)
    with pytest.raises(OSError, match="connection dropped"):
        download_fashion_mnist(tmp_path / "cache", url=url, checksums=sums)
    assert leftovers(tmp_path / "cache") == []


def test_valid_files_are_not_downloaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sums = served_dataset(tmp_path)
    download_fashion_mnist(tmp_path / "cache", url=url, checksums=sums)

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetched although the files were present and valid")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    download_fashion_mnist(tmp_path / "cache", url=url, checksums=sums)


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_official_checksums_match_the_system_copy() -> None:
    for name, expected in CHECKSUMS.items():
        content = gzip.decompress((SYSTEM_DIR / name).read_bytes())
        assert hashlib.sha256(content).hexdigest() == expected


def test_embedded_subset_is_a_subset_of_the_full_set() -> None:
    # the subset's images all occur in the full set (checked where it is installed)
    if not SYSTEM_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    full = read_idx(SYSTEM_DIR / FILES["test"][0]).reshape(10000, -1)
    subset = read_idx(EMBEDDED_DIR / FILES["test"][0]).reshape(2000, -1)
    known = {row.tobytes() for row in full}
    assert all(row.tobytes() in known for row in subset)


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
