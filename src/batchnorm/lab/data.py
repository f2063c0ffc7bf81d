"""Data sets for the lab, as float32 tensors scaled to [0, 1].

`load(spec)` understands:
- "digits" (default): scikit-learn's UCI handwritten digits, 1797 images of
  8x8 pixels (values 0-16) in 10 classes. The file ships inside
  scikit-learn, so nothing is downloaded. Split: a fixed, stratified 80/20
  train/test split (seed 0), the same on every machine.
- "mnist:DIR": the MNIST IDX files in DIR (train-images-idx3-ubyte,
  train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
  each optionally gzipped), the paper's data set: 60,000 training and 10,000
  test images of 28x28. Headers are big-endian uint32: images carry magic
  2051 then count, rows, cols; labels magic 2049 then count.
- "npz:PATH": your own arrays in a .npz with x (N, ...) and y (N,) integer
  labels, split 80/20 like the digits (or x_train/y_train/x_test/y_test).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "load"]


class DataError(ValueError):
    """A data set could not be read; the message names the file and what was wrong."""


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    x_train: torch.Tensor  # (N, D) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "train_size": len(self.y_train),
            "test_size": len(self.y_test),
            "features": self.num_features,
            "classes": self.num_classes,
        }


def load(spec: str = "digits") -> Dataset:
    """Load the data set named by `spec` ("digits", "mnist:DIR" or "npz:PATH")."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits()
    if kind == "mnist" and arg:
        return _mnist(arg)
    if kind == "npz" and arg:
        return _npz(arg)
    raise DataError(
        f"unknown data set {spec!r}; expected 'digits', 'mnist:DIR' (the four MNIST IDX files) "
        "or 'npz:PATH' (arrays x and y)"
    )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """A stratified split: the same fraction of every class goes to the test set."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test[idx[: round(len(idx) * test_fraction)]] = True
    return x[~test], y[~test], x[test], y[test]


def _tensors(name: str, description: str, xtr, ytr, xte, yte) -> Dataset:
    f = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    g = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(name, description, f(xtr), g(ytr), f(xte), g(yte))


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0  # (1797, 64), pixel values 0-16
    parts = _split(x, bunch.target)
    return _tensors(
        "digits",
        "scikit-learn handwritten digits: 8x8 images, 10 classes, stratified 80/20 split (seed 0)",
        *parts,
    )


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find(directory: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"MNIST file {stem} (or {stem}.gz) not found in {directory!r}; the directory needs "
        f"{', '.join(_MNIST_FILES.values())}"
    )


def read_idx(path: str, magic: int) -> np.ndarray:
    """Read one IDX file (optionally gzipped) and check its magic number and size."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 8:
        raise DataError(f"{path} is {len(raw)} bytes long, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x}); "
            f"{'an images' if magic == 2051 else 'a labels'} IDX file was expected"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header announces shape {tuple(dims)} ({expected} bytes of data), "
            f"but the file holds {len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _mnist(directory: str) -> Dataset:
    if not os.path.isdir(directory):
        raise DataError(f"MNIST directory {directory!r} does not exist")
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        arrays[key] = read_idx(_find(directory, stem), 2051 if key.endswith("images") else 2049)
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise DataError(f"MNIST {part}: {n_img} images but {n_lab} labels in {directory!r}")
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0  # noqa: E731
    return _tensors(
        "mnist",
        f"MNIST from {directory}: 28x28 images, 60,000 train / 10,000 test",
        flat(arrays["train_images"]),
        arrays["train_labels"],
        flat(arrays["test_images"]),
        arrays["test_labels"],
    )


def _npz(path: str) -> Dataset:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a .npz archive: {exc}") from exc
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif {"x", "y"} <= arrays.keys():
        x, y = arrays["x"], arrays["y"]
        if len(x) != len(y):
            raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)} labels")
        parts = list(_split(x.reshape(len(x), -1), y))
    else:
        raise DataError(f"{path} holds arrays {sorted(arrays)}; expected x and y (or x_train, y_train, x_test, y_test)")
    xtr, ytr, xte, yte = parts
    xtr, xte = xtr.reshape(len(xtr), -1).astype(np.float32), xte.reshape(len(xte), -1).astype(np.float32)
    if not all(np.issubdtype(np.asarray(y).dtype, np.integer) for y in (ytr, yte)):
        raise DataError(f"{path}: labels must be integers 0..K-1")
    if ytr.min() < 0 or yte.min() < 0:
        raise DataError(f"{path}: labels must be integers 0..K-1, found a negative label")
    lo, hi = float(min(xtr.min(), xte.min())), float(max(xtr.max(), xte.max()))
    if hi > lo:  # scale features to [0, 1] with the training range
        xtr, xte = (xtr - lo) / (hi - lo), (xte - lo) / (hi - lo)
    return _tensors("npz", f"arrays from {path}", xtr, ytr, xte, yte)
