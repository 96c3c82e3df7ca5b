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


def _keras_diabetes():
    L = keras.layers
    return keras.Sequential([
        keras.Input((10,)), L.Dense(64, activation="relu"), L.BatchNormalization(), L.Dropout(0.5),
        L.BatchNormalization(), L.Dropout(0.5), L.Dense(256, activation="relu"),
        L.BatchNormalization(momentum=0.95, epsilon=0.005), L.Dense(1),
    ])


def _keras_kmnist():
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)), L.Conv2D(32, 3, activation="relu"), L.BatchNormalization(), L.MaxPooling2D(2),
        L.BatchNormalization(), L.Conv2D(64, 3, activation="relu"), L.BatchNormalization(), L.MaxPooling2D(2),
        L.BatchNormalization(), L.Flatten(), L.Dense(256, activation="relu"), L.BatchNormalization(),
        L.Dense(10, activation="softmax"),
    ])


# Whole networks (convolutions, dense layers, softmax) are compared at rtol=1e-4: the two
# frameworks sum in different orders, and float32 rounding through four layers reaches a few
# 1e-5 of the value (measured: 1.1e-5 on an output of 0.29, one run in several).


def _train_a_little(km, x, y, loss):
    km.compile(optimizer="adam", loss=loss)
    km.fit(x, y, epochs=2, batch_size=16, verbose=0)  # moves gamma, beta and the moving statistics


@pytest.mark.parametrize("fmt", [".keras", ".weights.h5"])
def test_keras_model_loads_into_its_bnlab_twin(fmt, tmp_path):
    pytest.importorskip("h5py")
    import bnlab.keras as bk
    from bnlab.lab import models

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)  # the Keras model's initial weights
    rng = np.random.default_rng(0)
    km = _keras_diabetes()
    x = rng.normal(size=(64, 10)).astype("float32")
    _train_a_little(km, x, rng.normal(size=(64, 1)).astype("float32"), "mse")
    path = tmp_path / f"m{fmt}"
    km.save(path) if fmt == ".keras" else km.save_weights(path)
    twin = models.diabetes_mlp()
    report = bk.load_weights(twin, path)
    twin.eval()
    np.testing.assert_allclose(twin(torch.from_numpy(x)).detach().numpy(), _np(km(x, training=False)), atol=1e-5, rtol=1e-4)
    assert any("transposed" in line for line in report) and sum("batch_normalization" in line for line in report) == 3


def test_keras_cnn_with_flatten_loads_and_saves_back(tmp_path):
    pytest.importorskip("h5py")
    import bnlab.keras as bk
    from bnlab.lab import models

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)  # the Keras model's initial weights
    rng = np.random.default_rng(1)
    km = _keras_kmnist()
    x = rng.random((32, 28, 28, 1)).astype("float32")
    _train_a_little(km, x, rng.integers(0, 10, 32), "sparse_categorical_crossentropy")
    km.save(tmp_path / "cnn.keras")
    twin = models.kmnist_cnn()
    with pytest.raises(ValueError, match="input_shape"):
        bk.load_weights(twin, tmp_path / "cnn.keras")
    report = bk.load_weights(twin, tmp_path / "cnn.keras", input_shape=(1, 28, 28))
    assert any("permuted from Keras'" in line for line in report)
    twin.eval()
    x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(twin(x_nchw).detach().numpy(), _np(km(x, training=False)), atol=1e-5, rtol=1e-4)
    # and back: bnlab weights into a fresh Keras twin through Keras' own loader
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
    bk.save_weights(twin, tmp_path / "back.weights.h5", input_shape=(1, 28, 28))
    keras.backend.clear_session()
    fresh = _keras_kmnist()
    fresh.load_weights(tmp_path / "back.weights.h5")
    np.testing.assert_allclose(_np(fresh(x, training=False)), twin(x_nchw).detach().numpy(), atol=1e-5, rtol=1e-4)


def test_keras_weights_into_torch_bn_report_conventions(tmp_path):
    pytest.importorskip("h5py")
    import bnlab.keras as bk

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)  # the Keras model's initial weights
    km = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    _train_a_little(km, np.random.default_rng(2).normal(size=(32, 3)).astype("float32"), np.zeros((32, 4), "float32"), "mse")
    km.save(tmp_path / "t.keras")
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, eps=1e-3))
    report = bk.load_weights(twin, tmp_path / "t.keras")
    assert "momentum 0.1 = Keras 0.9" in report[-1] and "biased variance" in report[-1]
    twin.eval()
    x = np.random.default_rng(3).normal(size=(5, 3)).astype("float32")
    np.testing.assert_allclose(twin(torch.from_numpy(x)).detach().numpy(), _np(km(x, training=False)), atol=1e-5, rtol=1e-4)
