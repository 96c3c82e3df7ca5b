"""bnlab.nn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d as the oracle."""

import pytest
import torch

import bnlab

SHAPES = {
    "1d-NC": (bnlab.nn.BatchNorm1d, torch.nn.BatchNorm1d, (16, 5)),
    "1d-NCL": (bnlab.nn.BatchNorm1d, torch.nn.BatchNorm1d, (8, 5, 7)),
    "2d": (bnlab.nn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 6, 7)),
    "3d": (bnlab.nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 4, 3)),
}
CONFIGS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
]


def _pair(ours_cls, theirs_cls, C, **kw):
    theirs = theirs_cls(C, **kw)
    ours = ours_cls(C, **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_matches_torch_outputs_gradients_running_stats(kind, kw):
    ours_cls, theirs_cls, shape = SHAPES[kind]
    ours, theirs = _pair(ours_cls, theirs_cls, shape[1], **kw)
    for step in range(4):
        x = torch.randn(shape) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn(shape)
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
        if theirs.weight is not None:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-4, rtol=1e-4)
    if theirs.running_mean is not None:
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-5)  # unbiased
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4
    else:
        assert ours.running_mean is None
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_state_dicts_are_interchangeable():
    ours, theirs = _pair(bnlab.nn.BatchNorm2d, torch.nn.BatchNorm2d, 3)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours(torch.randn(4, 3, 2, 2))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs.running_var, ours.running_var)


def test_torch_errors_are_reproduced():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnlab.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bnlab.nn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bnlab.nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="built for 3 features, got 4"):
        bnlab.nn.BatchNorm2d(3)(torch.randn(2, 4, 2, 2))


def test_channels_last_input_matches_torch():
    ours, theirs = _pair(bnlab.nn.BatchNorm2d, torch.nn.BatchNorm2d, 8)
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, theirs(x), atol=1e-5, rtol=1e-5)


def test_gradcheck_double():
    bn = bnlab.nn.BatchNorm2d(3).double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))
