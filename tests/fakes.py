"""Small files in the real formats of MNIST/KMNIST (gzip IDX) and CIFAR-10 (binary records in a tar.gz)."""

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from bnlab.data import download, formats


def resource_for(path: Path, name: str) -> download.Resource:
    data = path.read_bytes()
    return download.Resource(name, (path.as_uri(),), len(data), hashlib.sha256(data).hexdigest())


def _fake_idx_set(tmp: Path, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    files = {"train-images": "train-images-idx3-ubyte.gz", "train-labels": "train-labels-idx1-ubyte.gz",
             "test-images": "t10k-images-idx3-ubyte.gz", "test-labels": "t10k-labels-idx1-ubyte.gz"}
    res = {}
    for key, arr in arrays.items():
        p = tmp / "remote" / files[key]
        p.parent.mkdir(parents=True, exist_ok=True)
        formats.write_idx(p, arr)
        res[key] = resource_for(p, files[key])
    return arrays, res


def _cifar_records(images, labels):
    # records: label byte + R plane + G plane + B plane (each 32x32 row-major)
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes()


def _fake_cifar(tmp: Path, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    remote = tmp / "remote"
    remote.mkdir(parents=True, exist_ok=True)
    path = remote / "cifar-10-binary.tar.gz"
    train_x, train_y = [], []
    with tarfile.open(path, "w:gz") as tar:
        def add(name, blob):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for i in range(1, 6):
            x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, 10, per_batch)
            train_x.append(x)
            train_y.append(y)
            add(f"data_batch_{i}.bin", _cifar_records(x, y))
        tx, ty = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 3)
        add("test_batch.bin", _cifar_records(tx, ty))
        add("batches.meta.txt", "\n".join(formats.CIFAR10_CLASSES).encode())
    return (np.concatenate(train_x), np.concatenate(train_y)), (tx, ty), resource_for(path, "cifar-10-binary.tar.gz")


