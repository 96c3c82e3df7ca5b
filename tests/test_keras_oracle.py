"""bnlab.BatchNorm against Keras 3's BatchNormalization on the torch backend (when keras is installed).

Compared on data where Keras itself is stable (Keras computes the variance as
E[x^2] - E[x]^2 and loses precision, then returns NaN, for data with a large offset).
"""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras is not installed (pip install 'bnlab[keras]')")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras runs on the {keras.backend.backend()!r} backend, these tests need 'torch'", allow_module_level=True)

import bnlab  # noqa: E402


def _np(t):
    return keras.ops.convert_to_numpy(t)


CASES = [
    dict(shape=(32, 6), kw={}),
    dict(shape=(16, 4, 5, 3), kw={}),  # NHWC, axis=-1
    dict(shape=(16, 3, 4, 5), kw={"axis": 1, "momentum": 0.9, "epsilon": 1e-2}),
    dict(shape=(24, 5), kw={"center": False}),
    dict(shape=(24, 5), kw={"scale": False, "momentum": 0.95, "epsilon": 0.005}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['shape']}-{c['kw']}")
def test_matches_keras_training_inference_and_moving_stats(case):
    shape, kw = case["shape"], case["kw"]
    k = keras.layers.BatchNormalization(**kw)
    ours = bnlab.BatchNorm(**kw)
    rng = np.random.default_rng(0)
    for step in range(5):
        x = (rng.normal(size=shape) * (1 + step) + step).astype("float32")
        yk = _np(k(x, training=True))
        xt = torch.from_numpy(x).requires_grad_()
        yo = ours(xt, training=True)
        np.testing.assert_allclose(yo.detach().numpy(), yk, atol=2e-5, rtol=1e-5)
    for wk, wo in zip(k.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(wo, wk, atol=1e-5, rtol=1e-5)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(ours(torch.from_numpy(x), training=False).detach().numpy(), _np(k(x, training=False)), atol=2e-5, rtol=1e-5)


def test_gradients_match_keras():
    k = keras.layers.BatchNormalization()
    ours = bnlab.BatchNorm()
    x = np.random.default_rng(1).normal(size=(20, 4)).astype("float32")
    dy = torch.from_numpy(np.random.default_rng(2).normal(size=(20, 4)).astype("float32"))
    xk = torch.from_numpy(x).requires_grad_()
    yk = k(xk, training=True)
    (gk,) = torch.autograd.grad(yk, xk, dy)
    xo = torch.from_numpy(x).requires_grad_()
    (go,) = torch.autograd.grad(ours(xo, training=True), xo, dy)
    np.testing.assert_allclose(go.numpy(), gk.detach().cpu().numpy(), atol=1e-5)


def test_keras_weights_load_through_set_weights():
    k = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-2)
    x = np.random.default_rng(3).normal(size=(32, 3)).astype("float32") * 4 + 2
    for _ in range(3):
        k(x, training=True)
    ours = bnlab.BatchNorm(momentum=0.9, epsilon=1e-2, num_features=3)
    ours.set_weights(k.get_weights())
    np.testing.assert_allclose(ours(torch.from_numpy(x), training=False).detach().numpy(), _np(k(x, training=False)), atol=1e-5)


def test_weight_count_like_keras():
    k = keras.layers.BatchNormalization(center=False)
    k.build((None, 7))
    ours = bnlab.BatchNorm(center=False, num_features=7)
    assert [w.shape for w in ours.get_weights()] == [tuple(w.shape) for w in k.get_weights()]


def test_where_keras_fails_bnlab_does_not():
    # The documented reason bnlab exists: Keras-on-torch returns NaN for data with a large offset.
    x = (1e4 + np.random.default_rng(4).normal(size=(64, 3))).astype("float32")
    yk = _np(keras.layers.BatchNormalization()(x, training=True))
    yo = bnlab.BatchNorm()(torch.from_numpy(x), training=True).detach().numpy()
    assert np.allclose(yo.std(0), 1.0, atol=2e-3)
    assert not np.allclose(yk.std(0), 1.0, atol=2e-3)  # if Keras ever fixes this, this line tells us


@pytest.mark.parametrize("clipping", [None, {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}], ids=["no-clip", "clip"])
def test_renorm_matches_keras(clipping):
    kw = {"renorm": True, "renorm_clipping": clipping, "renorm_momentum": 0.9, "momentum": 0.95}
    k = keras.layers.BatchNormalization(**kw)
    ours = bnlab.BatchNorm(**kw)
    rng = np.random.default_rng(5)
    for step in range(6):
        x = (rng.normal(size=(24, 4)) * (1 + step) + step).astype("float32")
        xk = torch.from_numpy(x).requires_grad_()
        yk = k(xk, training=True)
        xo = torch.from_numpy(x).requires_grad_()
        yo = ours(xo, training=True)
        np.testing.assert_allclose(yo.detach().numpy(), _np(yk), atol=3e-5, rtol=1e-5)
        dy = torch.from_numpy(rng.normal(size=(24, 4)).astype("float32"))
        (gk,) = torch.autograd.grad(yk, xk, dy)
        (go,) = torch.autograd.grad(yo, xo, dy)
        np.testing.assert_allclose(go.numpy(), gk.detach().cpu().numpy(), atol=3e-5, rtol=1e-4)
    assert len(ours.get_weights()) == len(k.get_weights()) == 7
    for wk, wo in zip(k.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(wo, wk, atol=1e-5, rtol=1e-5)
    x = rng.normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(ours(torch.from_numpy(x), training=False).detach().numpy(), _np(k(x, training=False)), atol=3e-5)
