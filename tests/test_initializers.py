"""Initializers in both styles users bring: Keras' ``fn(shape, dtype) -> Tensor`` and PyTorch's in-place ``fn(tensor)``.

Each is checked through the layer that uses it (the values of its parameters
and statistics after build and after ``reset_parameters``) against the values
written out or drawn by PyTorch itself under the same seed.
"""

import functools

import pytest
import torch

import bnlab
from bnlab import initializers

IN_PLACE = {
    "torch.nn.init.ones_": (torch.nn.init.ones_, 1.0),
    "partial(constant_, val=2.0)": (functools.partial(torch.nn.init.constant_, val=2.0), 2.0),
    "lambda t: t.fill_(-1.5)": (lambda t: t.fill_(-1.5), -1.5),
}


def _fill_returning_none(tensor):
    tensor.fill_(4.0)


IN_PLACE["def fill(tensor) -> None"] = (_fill_returning_none, 4.0)

KERAS = {
    "lambda shape, dtype": (lambda shape, dtype: torch.full(shape, 0.5, dtype=dtype), 0.5),
    "def f(shape, dtype=None)": (lambda shape, dtype=None: torch.full(shape, -3.0, dtype=dtype), -3.0),
    "(shape, dtype, device)": (lambda shape, dtype, device: torch.full(shape, 7.0, dtype=dtype, device=device), 7.0),
    "returns float64": (lambda shape, dtype: torch.full(shape, 0.25, dtype=torch.float64), 0.25),  # cast back
    "torch.ones": (torch.ones, 1.0),
    "instance": (initializers.Constant(0.75), 0.75),
    "name": ("ones", 1.0),
}


def _layer(init, lazy, dtype=torch.float32):
    kwargs = {name: init for name in ("gamma_initializer", "beta_initializer", "moving_mean_initializer", "moving_variance_initializer")}
    layer = bnlab.BatchNorm(axis=1, num_features=None if lazy else 3, dtype=dtype, **kwargs)
    if lazy:
        layer(torch.randn(4, 3, 2, dtype=dtype))  # built by the first batch
    return layer


@pytest.mark.parametrize("lazy", [False, True], ids=["built", "lazy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", list(IN_PLACE) + list(KERAS))
def test_each_style_gives_its_values_to_every_tensor(key, dtype, lazy):
    init, value = IN_PLACE.get(key) or KERAS[key]
    layer = _layer(init, lazy, dtype)
    stats_dtype = dtype  # float32 and float64 keep their statistics in their own dtype
    expected = {"weight": dtype, "bias": dtype, "running_mean": stats_dtype, "running_var": stats_dtype}
    for name, dt in expected.items():
        t = getattr(layer, name)
        assert t.dtype == dt and t.shape == (3,), (name, t.dtype, t.shape)
        if not lazy:
            torch.testing.assert_close(t, torch.full((3,), value, dtype=dt), msg=name)
    assert layer.weight.requires_grad and isinstance(layer.weight, torch.nn.Parameter)
    with torch.no_grad():
        layer.weight.zero_()
        layer.running_var.zero_()
    layer.reset_parameters()
    torch.testing.assert_close(layer.weight, torch.full((3,), value, dtype=dtype))
    torch.testing.assert_close(layer.running_var, torch.full((3,), value, dtype=stats_dtype))


def test_random_in_place_initializers_draw_as_pytorch_does():
    init = functools.partial(torch.nn.init.normal_, mean=1.0, std=0.1)
    torch.manual_seed(5)
    layer = bnlab.BatchNorm(num_features=6, gamma_initializer=init)
    torch.manual_seed(5)
    expected = torch.nn.init.normal_(torch.empty(6), mean=1.0, std=0.1)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=0)


def test_in_place_initializer_fills_nothing_it_was_not_given():
    """An in-place initializer starts from zeros: entries it leaves alone are zero, not memory garbage."""
    def first_two(tensor):
        tensor[:2].fill_(3.0)

    layer = bnlab.BatchNorm(num_features=4, gamma_initializer=first_two)
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([3.0, 3.0, 0.0, 0.0]))


def test_the_styles_are_told_apart_by_signature_without_calling():
    calls = []

    def keras_style(shape, dtype=None):
        calls.append("keras")
        return torch.ones(shape, dtype=dtype)

    def in_place(tensor):
        calls.append("in place")
        tensor.fill_(1.0)

    def one_argument(x):
        calls.append("one argument")
        x.fill_(1.0)

    def takes_kwargs(s, **kwargs):
        calls.append("kwargs")
        return torch.ones(s, dtype=kwargs["dtype"])

    wrapped = [initializers.get(f) for f in (keras_style, in_place, one_argument, takes_kwargs)]
    assert calls == []  # classifying calls nothing (a trial call would draw random numbers)
    assert [type(w).__name__ for w in wrapped] == ["KerasStyle", "InPlace", "InPlace", "KerasStyle"]
    for w in wrapped:
        torch.testing.assert_close(w((2,), dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert initializers.get(wrapped[0]) is wrapped[0]


@pytest.mark.parametrize(
    "spec,error,match",
    [
        (lambda a, b: None, TypeError, "cannot tell how to call the initializer"),
        (lambda t: torch.ones_like(t), TypeError, "instead of filling the tensor it was given"),
        (lambda t: 2.0, TypeError, "returned a new float"),
        (lambda shape, dtype: 1.0, TypeError, r"returned float, expected a tensor"),
        (max, TypeError, "cannot tell how to call"),  # a builtin whose signature cannot be read, not torch's
        (3, TypeError, "must be a name, an instance or a callable"),
        ("glorot", ValueError, "unknown initializer 'glorot'"),
    ],
    ids=["two-unnamed-arguments", "in-place-returns-new", "in-place-returns-number", "keras-returns-number",
         "unreadable-builtin", "not-callable", "unknown-name"],
)
def test_a_bad_initializer_gives_a_clear_error(spec, error, match):
    with pytest.raises(error, match=match):
        bnlab.BatchNorm(num_features=3, gamma_initializer=spec)


def test_wrappers_say_which_style_when_the_signature_cannot():
    def two(a, b=None):  # one argument fits, and no dtype: classified in-place ...
        return torch.full(a, 9.0) if isinstance(a, tuple) else None

    layer = bnlab.BatchNorm(num_features=2, gamma_initializer=initializers.KerasStyle(two))  # ... unless told
    torch.testing.assert_close(layer.weight.detach(), torch.full((2,), 9.0))
    assert repr(initializers.get(torch.nn.init.ones_)).startswith("InPlace(")
