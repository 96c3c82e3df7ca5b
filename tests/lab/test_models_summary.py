"""Model builders and bnlab.summary against the counts Keras 3 gives for the same models."""

import pytest
import torch

import bnlab
from bnlab.lab import models as M


def _counts(model, shape):
    s = bnlab.summary(model, shape, print_fn=None)
    return s.total, s.trainable, s.non_trainable


def test_tutorial_000_up_to_the_custom_bn():
    assert _counts(M.diabetes_mlp(head=False), (10,)) == (17_856, 17_600, 256)


@pytest.mark.parametrize(
    "name,kwargs,shape,with_bn,without_bn",
    [
        ("diabetes_mlp", {}, (10,), (19_137, 18_369, 768), None),
        ("blobs_mlp", {}, (2,), 897, None),
        ("blobs_mlp", {"depth": 11}, (2,), 169_857, 164_225),
        ("kmnist_cnn", {}, (1, 28, 28), 433_034, 431_242),
    ],
)
def test_keras_counts(name, kwargs, shape, with_bn, without_bn):
    got = _counts(M.build(name, **kwargs), shape)
    assert (got if isinstance(with_bn, tuple) else got[0]) == with_bn
    if without_bn is not None:
        assert _counts(M.build(name, norm_layer=None, **kwargs), shape)[0] == without_bn


def test_summary_table_and_side_effects():
    model = M.bn_params_mlp()
    bn = model[1]
    before = [w.copy() for w in bn.get_weights()]
    lines = []
    s = bnlab.summary(model, (3,), print_fn=lines.append)
    text = lines[0]
    assert "Total params: 33" in text and "Non-trainable params: 8" in text and "(None, 4)" in text
    for a, b in zip(before, bn.get_weights(), strict=True):
        assert (a == b).all()  # the dry run changed nothing
    assert model.training and s.total == 33
    bn.trainable = False  # frozen gamma/beta count as non-trainable, as in Keras
    assert _counts(model, (3,)) == (33, 17, 16)


def test_no_bn_twin_and_norm_layer_choices():
    twin = M.build("mnist_mlp", norm_layer=None)
    assert not any(isinstance(m, bnlab.nn.batchnorm._BatchNormBase) for m in twin.modules())
    torch_bn = M.build("kmnist_cnn", norm_layer="torch")
    assert sum(isinstance(m, M.TorchBatchNorm) for m in torch_bn.modules()) == 5
    assert _counts(torch_bn, (1, 28, 28))[0] == 433_034
    with pytest.raises(ValueError, match="unknown norm_layer"):
        M.build("blobs_mlp", norm_layer="group")
    with pytest.raises(ValueError, match="unknown model"):
        M.build("resnet")


def test_keras_initialization():
    torch.manual_seed(0)
    layer = M.dense(400, 300)
    limit = (6 / (400 + 300)) ** 0.5
    assert layer.weight.abs().max() <= limit and layer.weight.abs().max() > 0.9 * limit
    assert torch.equal(layer.bias, torch.zeros(300))
    conv = M.conv2d(32, 64, init="he_uniform")
    he = (6 / (32 * 9)) ** 0.5
    assert conv.weight.abs().max() <= he and conv.weight.abs().max() > 0.9 * he


def test_scratch_layer_with_bnlab_settings_equals_bnlab():
    torch.manual_seed(0)
    scratch = M.ScratchBatchNorm(16, bnlab_defaults=True)
    ours = bnlab.BatchNorm(num_features=16)
    for step in range(8):
        x = torch.randn(32, 16) * (1 + step) + step
        torch.testing.assert_close(scratch(x), ours(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scratch.mean_ema, ours.moving_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scratch.var_ema, ours.moving_variance, atol=1e-5, rtol=1e-5)
    scratch.eval(), ours.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(scratch(x), ours(x), atol=1e-5, rtol=1e-5)


def test_scratch_layer_tutorial_defaults():
    s = M.ScratchBatchNorm(128)
    assert s.epsilon == 1e-5 and torch.equal(s.var_ema, torch.zeros(128))
    assert s.mean_ema.abs().max() <= (6 / 256) ** 0.5 and s.mean_ema.abs().max() > 0
