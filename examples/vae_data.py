"""Data for the VAE example: MNIST IDX files (raw, ``.gz`` or ``.zip``) and scikit-learn's bundled 8×8 digits.

Images are returned as float tensors of grey levels in [0, 1], one flattened image per row; the VAE binarizes
them dynamically (each pixel is a Bernoulli draw with that probability). Nothing is downloaded: MNIST is read
from a user-supplied path.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: IDX type codes → big-endian NumPy dtypes.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_IMAGE_NAMES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.namelist() if not m.endswith("/") and not m.startswith("__MACOSX")]
            if len(members) != 1:
                raise ValueError(f"{path} must contain exactly one file, found {members}")
            return z.read(members[0])
    return path.read_bytes()


def parse_idx(data: bytes) -> np.ndarray:
    """Parse the bytes of an IDX file (magic ``0 0 type ndim``, big-endian int32 sizes, then the values).

    Raises:
        ValueError: on a bad magic number, an unknown type code or a size mismatch.

    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated IDX header")
    shape = struct.unpack(f">{ndim}i", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"IDX payload has {len(data) - header} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, raw or compressed (``.gz``, or a ``.zip`` holding one file)."""
    return parse_idx(_read_bytes(Path(path)))


def find_mnist_images(data_path: str | Path) -> Path:
    """The MNIST image file at ``data_path``: the file itself, or the first of train/t10k images in a folder.

    Raises:
        FileNotFoundError: if no image file is found.

    """
    path = Path(data_path)
    if path.is_file():
        return path
    for stem in MNIST_IMAGE_NAMES:
        for suffix in ("", ".gz", ".zip"):
            candidate = path / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"no MNIST image file in {path} (looked for {', '.join(MNIST_IMAGE_NAMES)} raw, .gz or .zip)"
    )


def load_mnist(data_path: str | Path) -> Tensor:
    """MNIST images from ``data_path`` (file or folder) as a ``(N, 784)`` float32 tensor in [0, 1]."""
    images = load_idx(find_mnist_images(data_path))
    if images.ndim != 3:
        raise ValueError(f"expected an (N, H, W) image file, got shape {images.shape}")
    return torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)


def load_digits() -> Tensor:
    """scikit-learn's 1,797 bundled 8×8 digits as a ``(1797, 64)`` float32 tensor in [0, 1] (grey levels 0–16)."""
    from sklearn.datasets import load_digits as sk_load_digits

    return torch.from_numpy(sk_load_digits().data.astype(np.float32) / 16.0)


def split(data: Tensor, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0) -> list[Tensor]:
    """Shuffle with a fixed seed and split into train / validation / test parts of the given fractions."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    n = data.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    return [data[perm[:n_train]], data[perm[n_train : n_train + n_val]], data[perm[n_train + n_val :]]]


def binarize(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One dynamic binarization: each pixel is 1 with probability equal to its grey level."""
    return torch.bernoulli(probs, generator=generator)
