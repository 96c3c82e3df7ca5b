"""get_config / from_config (Keras' habit): a layer rebuilt from its config is the same layer.

Every constructor argument of every layer of the family must appear in the
config with its value, survive JSON where it is data, and give back a layer
that computes the same thing (seeded initializers make the weights equal).
"""

import inspect
import json

import pytest
import torch

import bnlab
from bnlab import constraints, initializers, regularizers


def _keras_face_kwargs():
    return dict(
        axis=[1, 3], momentum=0.9, epsilon=0.02, center=True, scale=True,
        beta_initializer=initializers.RandomNormal(mean=0.1, stddev=0.2, seed=3),
        gamma_initializer=initializers.RandomUniform(minval=0.5, maxval=1.5, seed=4),
        moving_mean_initializer=initializers.Constant(0.25), moving_variance_initializer=initializers.TruncatedNormal(1.0, 0.1, seed=5),
        beta_regularizer=regularizers.L1(0.003), gamma_regularizer=regularizers.L1L2(0.01, 0.02),
        beta_constraint=constraints.MaxNorm(3.0), gamma_constraint=constraints.MinMaxNorm(0.5, 2.0, rate=0.5),
        num_features=(4, 6), moving_variance_estimator="unbiased", renorm=False, renorm_clipping=None,
        renorm_momentum=0.95, virtual_batch_size=None, synchronized=True, dtype=torch.float64,
    )


CASES = {
    "BatchNorm": (bnlab.BatchNorm, _keras_face_kwargs(), (8, 4, 5, 6)),
    "BatchNorm-renorm": (bnlab.BatchNorm, dict(axis=-1, renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
                                               renorm_momentum=0.9, num_features=6), (16, 6)),
    "BatchNorm-ghost": (bnlab.BatchNorm, dict(axis=-1, virtual_batch_size=4, momentum=None, num_features=6), (16, 6)),
    "BatchNorm-lazy": (bnlab.BatchNorm, dict(axis=-1, center=False, scale=False), (16, 6)),
    "BatchNormAct": (bnlab.BatchNormAct, dict(axis=1, activation="leaky_relu", negative_slope=0.2, num_features=6,
                                              momentum=0.8), (4, 6, 5)),
    "BatchNorm1d": (bnlab.nn.BatchNorm1d, dict(num_features=6, eps=1e-4, momentum=None, affine=False,
                                               track_running_stats=True, dtype=torch.float64), (16, 6)),
    "BatchNorm2d": (bnlab.nn.BatchNorm2d, dict(num_features=6, eps=1e-3, momentum=0.3, affine=True,
                                               track_running_stats=False), (4, 6, 3, 3)),
    "BatchNorm3d": (bnlab.nn.BatchNorm3d, dict(num_features=6, eps=1e-2, momentum=0.2), (2, 6, 2, 3, 3)),
    "BatchNormNd": (bnlab.nn.BatchNormNd, dict(num_features=6, eps=1e-3, momentum=0.5), (2, 6, 3)),
    "FrozenBatchNorm": (bnlab.FrozenBatchNorm, dict(num_features=6, axis=-1, eps=1e-4, dtype=torch.float64), (5, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_layer_rebuilt_from_its_config_is_the_same_layer(case):
    cls, kwargs, shape = CASES[case]
    layer = cls(**kwargs)
    config = layer.get_config()
    # every constructor argument is there (device: where a layer lives is not part of what it is)
    params = {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "device", "bn_kwargs")}
    if cls is bnlab.BatchNormAct:
        params |= set(inspect.signature(bnlab.BatchNorm.__init__).parameters) - {"self", "device"}
    assert params <= set(config), params - set(config)
    for name, value in kwargs.items():  # and says what was asked for
        got = config[name]
        if name == "dtype":
            assert got == str(value).replace("torch.", "")
        elif isinstance(value, (initializers.Initializer, regularizers.Regularizer, constraints.Constraint)):
            assert got == {"class_name": type(value).__name__, "config": value.get_config()}
        elif isinstance(value, tuple):
            assert got == list(value)
        else:
            assert got == value, name
    rebuilt = cls.from_config(json.loads(json.dumps(config)))  # data: JSON both ways
    assert type(rebuilt) is cls and rebuilt.get_config() == config
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=getattr(torch, config.get("dtype", "float32")))
    for mode in ("train", "eval"):
        for bn in (layer, rebuilt):
            bn.train(mode == "train")
        torch.testing.assert_close(rebuilt(x), layer(x))
    assert rebuilt.state_dict().keys() == layer.state_dict().keys()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v)
    if hasattr(layer, "regularization_losses"):
        for a, b in zip(layer.regularization_losses(), rebuilt.regularization_losses(), strict=True):
            torch.testing.assert_close(a, b)


def test_plain_functions_stay_functions_and_trainable_travels():
    # A function is not data: the config keeps it as it is (not JSON), and from_config takes it back.
    def fill_three(shape, dtype, device=None):
        return torch.full(shape, 3.0, dtype=dtype, device=device)

    layer = bnlab.BatchNorm(num_features=4, gamma_initializer=fill_three, beta_regularizer=torch.norm,
                            renorm=True, renorm_clipping=bnlab.functional.renorm_ramp())
    layer.trainable = False
    config = layer.get_config()
    assert config["trainable"] is False
    assert config["gamma_initializer"].fn is fill_three and config["beta_regularizer"] is torch.norm
    with pytest.raises(TypeError):
        json.dumps(config)
    rebuilt = bnlab.BatchNorm.from_config(config)
    assert not rebuilt.trainable and torch.equal(rebuilt.gamma, torch.full((4,), 3.0))
    assert set(rebuilt.renorm_clipping) == {"rmax", "rmin", "dmax"}


def test_a_bad_spec_in_a_config_says_what_a_config_looks_like():
    config = bnlab.BatchNorm(num_features=4).get_config()
    config["gamma_initializer"] = {"class_name": "Nope", "config": {}}
    with pytest.raises(ValueError, match="class_name"):
        bnlab.BatchNorm.from_config(config)
