"""The tutorials' datasets as tensors ready for training, deterministic given a seed.

Every loader returns a :class:`Dataset` with ``x_train, y_train, x_test,
y_test`` (torch tensors). Images are channels-first ``(N, C, H, W)`` float32 in
``[0, 1]`` (PyTorch's convolution layout; bnlab's BatchNorm then uses
``axis=1``), class labels int64, regression and binary targets float32 of
shape ``(N, 1)``.

Offline: ``diabetes``, ``blobs``, ``observations``, ``digits28``. The real
``mnist``, ``kmnist`` and ``cifar10`` are downloaded once (verified by SHA-256,
see :mod:`bnlab.data.download`) and fail with instructions when offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import download, formats

__all__ = ["Dataset", "DATASETS", "OFFICIAL_SPLIT", "load", "diabetes", "blobs", "observations", "digits28", "mnist", "kmnist", "cifar10", "keras_normalize"]


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str  # "regression" | "binary" | "multiclass"
    num_classes: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train {tuple(self.x_train.shape)} -> {tuple(self.y_train.shape)}, "
            f"test {tuple(self.x_test.shape)}, task={self.task!r})"
        )


def _split(x, y, test_size, seed, stratify=None):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=stratify)


def _f32(a):
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)


def diabetes(seed: int = 0, test_size: float = 0.1) -> Dataset:
    """scikit-learn's diabetes data (442 x 10), targets standardized ``(t - mean) / std`` (tutorial 000)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    targets = (d["target"] - d["target"].mean(axis=0)) / d["target"].std()
    xtr, xte, ytr, yte = _split(d["data"], targets, test_size, seed)
    return Dataset("diabetes", _f32(xtr), _f32(ytr).view(-1, 1), _f32(xte), _f32(yte).view(-1, 1), "regression")


def blobs(seed: int = 0, n_samples: int = 1000, test_size: float = 0.25) -> Dataset:
    """Two overlapping Gaussian blobs in 2-D (tutorial 002): centers (0, 0) and (0.5, 0.1), std 0.25."""
    from sklearn.datasets import make_blobs

    x, y = make_blobs(
        n_samples=n_samples, n_features=2, centers=[[0.0, 0.0], [0.5, 0.1]], cluster_std=0.25,
        center_box=(-1.0, 1.0), random_state=seed,
    )
    xtr, xte, ytr, yte = _split(x, y.reshape(-1, 1).astype("float32"), test_size, seed)
    return Dataset("blobs", _f32(xtr), _f32(ytr), _f32(xte), _f32(yte), "binary", 2)


def observations(seed: int = 0, n: int = 100) -> Dataset:
    """Tutorial 002's random data: ``x ~ N(0, 1)`` of shape (100, 3), random binary ``y``; no test split."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = rng.choice([0, 1], n).reshape(-1, 1)
    return Dataset("observations", _f32(x), _f32(y), _f32(x), _f32(y), "binary", 2, {"note": "test = train"})


def digits28(seed: int = 0, test_size: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images) made MNIST-shaped, so the MNIST/KMNIST models run offline.

    As MNIST does with its digits, each image is scaled into a 20x20 box
    (bilinear) and centred in a 28x28 frame; values in ``[0, 1]``. Split
    stratified by class.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.as_tensor(d["images"], dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    img = torch.nn.functional.interpolate(img, size=(20, 20), mode="bilinear", align_corners=False)
    img = torch.nn.functional.pad(img, (4, 4, 4, 4)).clamp_(0.0, 1.0)  # (N, 1, 28, 28)
    labels = d["target"].astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = _split(idx, labels, test_size, seed, stratify=labels)[:2]
    x = img.numpy()
    return Dataset(
        "digits28", torch.from_numpy(x[tr]), torch.from_numpy(labels[tr]), torch.from_numpy(x[te]),
        torch.from_numpy(labels[te]), "multiclass", 10,
    )


# -- downloaded image sets ---------------------------------------------------------------------------

_TFDS = "TensorFlow Datasets url_checksums"
_MNIST_MIRRORS = ("https://storage.googleapis.com/cvdf-datasets/mnist/", "http://yann.lecun.com/exdb/mnist/")
_KMNIST_MIRRORS = ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)

RESOURCES: dict[str, dict[str, download.Resource]] = {
    "mnist": {
        "train-images": download.Resource("train-images-idx3-ubyte.gz", tuple(m + "train-images-idx3-ubyte.gz" for m in _MNIST_MIRRORS), 9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", _TFDS),
        "train-labels": download.Resource("train-labels-idx1-ubyte.gz", tuple(m + "train-labels-idx1-ubyte.gz" for m in _MNIST_MIRRORS), 28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", _TFDS),
        "test-images": download.Resource("t10k-images-idx3-ubyte.gz", tuple(m + "t10k-images-idx3-ubyte.gz" for m in _MNIST_MIRRORS), 1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", _TFDS),
        "test-labels": download.Resource("t10k-labels-idx1-ubyte.gz", tuple(m + "t10k-labels-idx1-ubyte.gz" for m in _MNIST_MIRRORS), 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", _TFDS),
    },
    "kmnist": {
        "train-images": download.Resource("train-images-idx3-ubyte.gz", tuple(m + "train-images-idx3-ubyte.gz" for m in _KMNIST_MIRRORS), 18165135, "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4", _TFDS),
        "train-labels": download.Resource("train-labels-idx1-ubyte.gz", tuple(m + "train-labels-idx1-ubyte.gz" for m in _KMNIST_MIRRORS), 29497, "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", _TFDS),
        "test-images": download.Resource("t10k-images-idx3-ubyte.gz", tuple(m + "t10k-images-idx3-ubyte.gz" for m in _KMNIST_MIRRORS), 3041136, "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", _TFDS),
        "test-labels": download.Resource("t10k-labels-idx1-ubyte.gz", tuple(m + "t10k-labels-idx1-ubyte.gz" for m in _KMNIST_MIRRORS), 5120, "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", _TFDS),
    },
    "cifar10": {
        "archive": download.Resource("cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",), 170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", _TFDS),
    },
}


def _idx_set(name: str, progress=None) -> Dataset:
    res = RESOURCES[name]
    arrays = {k: formats.read_idx(download.fetch(r, name, progress=progress)) for k, r in res.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}-images"]), len(arrays[f"{split}-labels"])
        if n_img != n_lab:
            raise ValueError(f"{name}: {n_img} {split} images but {n_lab} labels")
    x_train = torch.from_numpy(arrays["train-images"]).unsqueeze(1).float().div_(255.0)
    x_test = torch.from_numpy(arrays["test-images"]).unsqueeze(1).float().div_(255.0)
    return Dataset(
        name, x_train, torch.from_numpy(arrays["train-labels"].astype(np.int64)), x_test,
        torch.from_numpy(arrays["test-labels"].astype(np.int64)), "multiclass", 10,
    )


def mnist(seed: int = 0, progress=None) -> Dataset:
    """MNIST (LeCun et al.): 60,000 + 10,000 28x28 digits, the official split (``seed`` unused)."""
    return _idx_set("mnist", progress)


def kmnist(seed: int = 0, progress=None) -> Dataset:
    """Kuzushiji-MNIST (Clanuwat et al., 2018, arXiv:1812.01718): 60,000 + 10,000 28x28 characters."""
    return _idx_set("kmnist", progress)


def keras_normalize(x: np.ndarray, axis: int = -1, order: int = 2) -> np.ndarray:
    """``keras.utils.normalize``: divide by the L``order`` norm along ``axis`` (zero norms left at 1)."""
    norm = np.atleast_1d(np.linalg.norm(x, order, axis))
    norm[norm == 0] = 1
    return x / np.expand_dims(norm, axis)


def cifar10(seed: int = 0, progress=None, tutorial_normalize: bool = True) -> Dataset:
    """CIFAR-10 (Krizhevsky, 2009) from its binary version; images ``(N, 3, 32, 32)``.

    ``tutorial_normalize=True`` applies tutorial 001's ``keras.utils.normalize(x,
    axis=1)`` to the NHWC pixel values: an L2 normalization of each column of
    pixels along the image height (not a division by 255). Otherwise ``x/255``.
    """
    path = download.fetch(RESOURCES["cifar10"]["archive"], "cifar10", progress=progress)
    (xtr, ytr), (xte, yte) = formats.read_cifar10_tar(path)

    def prep(x):
        x = x.astype(np.float32)
        x = keras_normalize(x, axis=1) if tutorial_normalize else x / 255.0
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))

    return Dataset(
        "cifar10", prep(xtr), torch.from_numpy(ytr), prep(xte), torch.from_numpy(yte), "multiclass", 10,
        {"classes": formats.CIFAR10_CLASSES, "normalization": "keras.utils.normalize(axis=1)" if tutorial_normalize else "x/255"},
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "diabetes": diabetes,
    "blobs": blobs,
    "observations": observations,
    "digits28": digits28,
    "mnist": mnist,
    "kmnist": kmnist,
    "cifar10": cifar10,
}
OFFLINE = frozenset({"diabetes", "blobs", "observations", "digits28"})
OFFICIAL_SPLIT = frozenset({"mnist", "kmnist", "cifar10"})  # their published train/test split: the seed changes nothing
INPUT_SHAPES = {
    "diabetes": (10,), "blobs": (2,), "observations": (3,), "digits28": (1, 28, 28),
    "mnist": (1, 28, 28), "kmnist": (1, 28, 28), "cifar10": (3, 32, 32),
}


def load(name: str, **kwargs) -> Dataset:
    """Load a dataset by name (see ``DATASETS``)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None
    return loader(**kwargs)
