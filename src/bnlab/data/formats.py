"""Parsers for the real on-disk formats: IDX (MNIST, KMNIST) and CIFAR-10's binary records.

IDX (LeCun et al., http://yann.lecun.com/exdb/mnist/): big-endian; a magic
number ``0x00 0x00 <type> <ndim>``, then ``ndim`` uint32 sizes, then the data.
CIFAR-10 binary (Krizhevsky, 2009): records of 1 label byte followed by 3072
pixel bytes, 1024 per channel in R, G, B order, each 32x32 row-major.
Nothing here unpickles anything.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "write_idx", "read_cifar_records", "read_cifar10_tar", "CIFAR10_CLASSES"]

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_RECORD = 1 + 32 * 32 * 3


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends in ``.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dt = np.dtype(_IDX_TYPES[dtype])
    expected = int(np.prod(shape)) * dt.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=dt, offset=header).reshape(shape).astype(dt.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed if the name ends in ``.gz`` (used by tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def read_cifar_records(data: bytes, name: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` uint8 and labels ``(N,)`` from CIFAR-10 binary records."""
    if len(data) % _CIFAR_RECORD:
        raise ValueError(f"{name}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise ValueError(f"{name}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10_tar(path: str | Path):
    """``(x_train, y_train), (x_test, y_test)`` from ``cifar-10-binary.tar.gz`` without extracting it."""
    train, test = [], None
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for i in range(1, 6):
            name = f"data_batch_{i}.bin"
            if name not in members:
                raise ValueError(f"{path}: {name} missing from the archive")
            train.append(read_cifar_records(tar.extractfile(members[name]).read(), name))
        if "test_batch.bin" not in members:
            raise ValueError(f"{path}: test_batch.bin missing from the archive")
        test = read_cifar_records(tar.extractfile(members["test_batch.bin"]).read(), "test_batch.bin")
    x_train = np.concatenate([t[0] for t in train])
    y_train = np.concatenate([t[1] for t in train])
    return (x_train, y_train), test
