"""BatchNormAct against BatchNorm followed by the activation (outputs, gradients, state dict)."""

import pytest
import torch
import torch.nn.functional as F

import bnlab

ACTS = {
    "relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "silu": F.silu, "gelu": F.gelu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda t: t,
}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("training", [True, False])
def test_equals_bn_then_activation(act, training):
    torch.manual_seed(0)
    fused = bnlab.BatchNormAct(axis=1, num_features=5, activation=act, negative_slope=0.2, dtype=torch.float64)
    plain = bnlab.BatchNorm(axis=1, num_features=5, dtype=torch.float64)
    plain.load_state_dict(fused.state_dict())  # same keys
    fused.train(training), plain.train(training)
    x = torch.randn(6, 5, 4, dtype=torch.float64) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), ACTS[act](plain(xb))
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(fused.gamma.grad, plain.gamma.grad)
    assert torch.equal(x, xa.detach())  # the caller's input is never modified
    torch.testing.assert_close(fused.moving_mean, plain.moving_mean)


def test_gradcheck_and_errors():
    layer = bnlab.BatchNormAct(num_features=3, activation="tanh", dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, training=True), (x,))
    with pytest.raises(ValueError, match="activation must be one of"):
        bnlab.BatchNormAct(activation="mish")
    assert list(layer.state_dict()) == list(bnlab.BatchNorm(num_features=3).state_dict())
