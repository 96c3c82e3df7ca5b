"""The offline datasets and the augmentation."""

import numpy as np
import torch

from bnlab import data
from bnlab.data import datasets as D


def test_diabetes_as_tutorial_000():
    ds = data.load("diabetes", seed=0)
    assert ds.x_train.shape == (397, 10) and ds.x_test.shape == (45, 10)
    y = torch.cat([ds.y_train, ds.y_test]).double()
    assert abs(y.mean().item()) < 1e-6 and abs(y.std(unbiased=False).item() - 1) < 1e-6  # standardized
    assert int(397 * (1 - 0.15)) == 337  # Keras' validation_split arithmetic: 337 train / 60 validation


def test_blobs_and_observations():
    b = data.load("blobs", seed=1)
    assert b.x_train.shape == (750, 2) and b.y_train.shape == (750, 1) and set(b.y_train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(data.load("blobs", seed=1).x_train, b.x_train)  # deterministic
    o = data.load("observations", seed=0)
    assert o.x_train.shape == (100, 3) and o.y_train.shape == (100, 1)


def test_digits28_is_mnist_shaped():
    d = data.load("digits28")
    assert d.x_train.shape[1:] == (1, 28, 28) and len(d.x_train) + len(d.x_test) == 1797
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1
    assert d.x_train[:, :, :4].abs().max() == 0  # MNIST-like empty border
    assert sorted(d.y_test.unique().tolist()) == list(range(10))


def test_keras_normalize_matches_definition():
    x = np.random.default_rng(0).random((2, 4, 3, 3))
    y = D.keras_normalize(x, axis=1)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0)


def test_augmentation_identity_flip_and_determinism():
    x = torch.rand(6, 3, 8, 8)
    same = data.random_affine(x, shear=0.0, zoom=0.0, horizontal_flip=False)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    flipped = data.random_affine(x, shear=0.0, zoom=0.0, horizontal_flip=True, generator=g)
    for i in range(6):  # each image either unchanged or mirrored left-right
        a, b = torch.allclose(flipped[i], x[i], atol=1e-5), torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5)
        assert a or b
    a1 = data.random_affine(x, generator=torch.Generator().manual_seed(3))
    a2 = data.random_affine(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and a1.shape == x.shape and not torch.equal(a1, x)
