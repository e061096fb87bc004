"""Build the Fashion-MNIST subset shipped inside kfrob (``kfrob/datasets/fashion-mnist-subset``).

Stratified and deterministic: the first ``--train-per-class`` training images of each class
and the first ``--test-per-class`` test images of each class, in their original order, written
as gzipped IDX files with the standard names, so ``kfrob.data`` reads them like the full set.

    python scripts/make_embedded_subset.py --data-dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from kfrob.data import EMBEDDED_DIR, FILES, find_data_dir, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()
    source = find_data_dir(args.data_dir)
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        image_name, label_name = FILES[split]
        images, labels = read_idx(source / image_name), read_idx(source / label_name)
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        write_idx(EMBEDDED_DIR / image_name, images[keep])
        write_idx(EMBEDDED_DIR / label_name, labels[keep])
        print(f"{split}: {len(keep)} images from {source}")


if __name__ == "__main__":
    main()
