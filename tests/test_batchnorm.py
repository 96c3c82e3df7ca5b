"""bnlab.BatchNorm (Keras face): one test per bullet of its contract."""

import warnings

import numpy as np
import pytest
import torch

import bnlab
from bnlab import functional as F
from bnlab import constraints, initializers, reference as R, regularizers


# ---------------------------------------------------------------- constructor


def test_keras_defaults():
    bn = bnlab.BatchNorm()
    assert (bn.axis, bn.momentum, bn.epsilon, bn.center, bn.scale) == (-1, 0.99, 1e-3, True, True)
    assert bn.moving_variance_estimator == "biased"
    bn(torch.randn(8, 5))
    gamma, beta, mm, mv = bnlab.BatchNorm(num_features=5).get_weights()
    np.testing.assert_array_equal(gamma, np.ones(5))
    np.testing.assert_array_equal(beta, np.zeros(5))
    np.testing.assert_array_equal(mm, np.zeros(5))
    np.testing.assert_array_equal(mv, np.ones(5))
    assert bnlab.BatchNormalization is bnlab.BatchNorm


def test_arguments_are_keyword_only():
    # BatchNorm(64) would otherwise silently mean axis=64 to a Keras reader, num_features to a PyTorch one.
    with pytest.raises(TypeError):
        bnlab.BatchNorm(64)


@pytest.mark.parametrize("bad", [{"momentum": 1.5}, {"epsilon": 0.0}, {"moving_variance_estimator": "sample"}, {"axis": "x"}, {"num_features": 0}])
def test_bad_constructor_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        bnlab.BatchNorm(**bad)


def test_lazy_build_infers_features_from_first_input():
    bn = bnlab.BatchNorm(axis=1)
    assert not bn.built and bn.gamma is None and len(list(bn.parameters())) == 0
    bn(torch.randn(4, 7, 3))
    assert bn.built and bn.gamma.shape == (7,) and bn.moving_variance.shape == (7,)


def test_list_axis_parameters_have_the_feature_axes_sizes():
    bn = bnlab.BatchNorm(axis=[3, 1])
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64)
    y = bn(x)
    assert bn.gamma.shape == (3, 6) and bn.moving_mean.shape == (3, 6)
    yr, mr, vr = R.forward_train(x.numpy(), np.ones((3, 6)), np.zeros((3, 6)), 1e-3, axis=(1, 3))
    np.testing.assert_allclose(y.detach().numpy(), yr, atol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.01 * mr, atol=1e-6)


# ---------------------------------------------------------------- training / inference


def test_training_uses_biased_variance_and_keras_momentum_direction():
    bn = bnlab.BatchNorm(num_features=3, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 1
    y = bn(x)
    xn = x.numpy()
    np.testing.assert_allclose(y.detach().numpy(), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-3), atol=1e-12)
    # momentum 0.99 weighs the OLD value; the stored variance is the biased one (ddof=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.99 * 0 + 0.01 * xn.mean(0), atol=1e-12)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.99 * 1 + 0.01 * xn.var(0), atol=1e-12)
    assert not np.allclose(bn.moving_variance.numpy(), 0.99 + 0.01 * xn.var(0, ddof=1), atol=1e-6)


def test_moving_statistics_over_steps_match_numpy_reference_float32():
    bn = bnlab.BatchNorm(momentum=0.9, epsilon=1e-2, num_features=4)
    ref = R.NumpyBatchNorm(4, momentum=0.9, epsilon=1e-2)
    for step in range(6):
        x = torch.randn(32, 4) * (1 + step) - step
        y = bn(x)
        np.testing.assert_allclose(y.detach().numpy(), ref(x.numpy(), training=True), atol=2e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), ref.moving_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), ref.moving_variance, rtol=1e-5, atol=1e-6)
    bn.eval()
    x = torch.randn(5, 4)
    np.testing.assert_allclose(bn(x).detach().numpy(), ref(x.numpy(), training=False), atol=1e-5)


def test_epsilon_default_is_keras_not_torch():
    # A feature with tiny variance tells epsilon apart: 1e-3 (Keras) vs 1e-5 (PyTorch).
    bn = bnlab.BatchNorm(num_features=1, dtype=torch.float64)
    x = torch.tensor([[0.0], [0.002]], dtype=torch.float64)  # biased var = 1e-6
    y = bn(x)
    np.testing.assert_allclose(y[1, 0].item(), 0.001 / np.sqrt(1e-6 + 1e-3), rtol=1e-10)


def test_gradients_flow_through_batch_statistics():
    bn = bnlab.BatchNorm(num_features=3, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    # A loss of sum(y) has zero gradient w.r.t. x when the statistics are differentiated
    # (the batch mean absorbs any shift) but not when they are treated as constants.
    bn(x).sum().backward()
    assert x.grad.abs().max().item() < 1e-12
    x.grad = None
    assert torch.autograd.gradcheck(lambda t: bn(t, training=True), (x,))


def test_inference_uses_moving_statistics_and_updates_nothing():
    bn = bnlab.BatchNorm(num_features=2, dtype=torch.float64)
    bn(torch.randn(16, 2, dtype=torch.float64) * 3 + 2)
    bn.eval()
    before = [w.copy() for w in bn.get_weights()]
    x = torch.randn(4, 2, dtype=torch.float64)
    y = bn(x)
    g, b, mm, mv = before
    np.testing.assert_allclose(y.detach().numpy(), g * (x.numpy() - mm) / np.sqrt(mv + 1e-3) + b, atol=1e-12)
    for a, c in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, c)
    assert bn.num_batches_tracked.item() == 1


def test_training_none_follows_module_mode_and_argument_overrides_it():
    bn = bnlab.BatchNorm(num_features=2)
    x = torch.randn(8, 2) + 5
    bn.eval()
    bn(x)  # training=None in eval mode -> inference
    assert torch.equal(bn.moving_mean, torch.zeros(2))
    bn(x, training=True)  # explicit training in eval mode -> batch statistics and update
    assert not torch.equal(bn.moving_mean, torch.zeros(2))
    bn.train()
    m = bn.moving_mean.clone()
    y = bn(x, training=False)
    assert torch.equal(bn.moving_mean, m)
    assert y.mean().item() > 1  # normalized with moving stats, not the batch's


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("shape,axis", [((4, 6, 3), -1), ((4, 3, 6), 1), ((5, 7, 1), -1), ((3, 4, 5, 2), [1, 3])])
def test_mask_only_true_positions_enter_statistics(shape, axis):
    bn = bnlab.BatchNorm(axis=axis, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    feat = bnlab.functional.normalize_axes(axis, x.ndim)
    mask = torch.rand([s for d, s in enumerate(shape) if d not in feat]) > 0.5
    mask.view(-1)[:2] = True
    y = bn(x, mask=mask)
    fs = R.feature_shape(shape, axis)
    yr, mr, vr = R.forward_train(x.numpy(), np.ones(fs), np.zeros(fs), 1e-3, axis, mask.numpy())
    np.testing.assert_allclose(y.detach().numpy(), yr, atol=1e-12)  # every position normalized
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.01 * mr, atol=1e-14)  # exact count, no +1e-7
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.99 + 0.01 * vr, atol=1e-14)


def test_mask_count_is_exact():
    # Two valid values: mean must be exactly their mean (Keras divides by count + 1e-7).
    bn = bnlab.BatchNorm(num_features=1, momentum=0.0, dtype=torch.float64)
    x = torch.tensor([[[1.0], [3.0], [100.0]]], dtype=torch.float64)
    bn(x, mask=torch.tensor([[True, True, False]]))
    assert bn.moving_mean.item() == 2.0
    assert bn.moving_variance.item() == 1.0


def test_fully_masked_batch_updates_nothing_and_uses_moving_stats():
    bn = bnlab.BatchNorm(num_features=3)
    bn(torch.randn(8, 3) + 1)
    state = [w.copy() for w in bn.get_weights()]
    x = torch.randn(2, 4, 3)
    y = bn(x, mask=torch.zeros(2, 4, dtype=torch.bool))
    for a, c in zip(state, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, c)
    assert torch.isfinite(y).all()
    g, b, mm, mv = state
    np.testing.assert_allclose(y.detach().numpy(), g * (x.numpy() - mm) / np.sqrt(mv + 1e-3) + b, atol=1e-5)


def test_mask_errors():
    bn = bnlab.BatchNorm(num_features=3)
    with pytest.raises(ValueError, match=r"expected \(2, 4\), got \(2, 3\)"):
        bn(torch.randn(2, 4, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        bn(torch.randn(2, 4, 3), mask=torch.ones(2, 4))
    bn.eval()  # the shape is checked in inference too, even though the mask is not used there
    with pytest.raises(ValueError, match="expected"):
        bn(torch.randn(2, 4, 3), mask=torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------- robustness


def test_non_finite_batch_never_reaches_moving_statistics():
    bn = bnlab.BatchNorm(num_features=3)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    x[3, 2] = float("inf")
    bn(x)
    assert torch.isfinite(bn.moving_mean).all() and torch.isfinite(bn.moving_variance).all()
    assert bn.moving_mean[1].item() == 0.0 and bn.moving_variance[2].item() == 1.0  # skipped per feature
    assert bn.moving_mean[0].item() != 0.0  # the healthy feature was updated


@pytest.mark.parametrize(
    "case",
    ["small-rows", "small-rows-no-grad", "kernel-rows", "kernel-rows-no-grad", "planes", "masked", "cumulative",
     "float-counter"],
)
def test_num_batches_tracked_counts_each_training_batch_once(case):
    # The kernels count inside the call that updates the moving statistics (small batches: the
    # update alone; others: the training forward, with or without a graph), the other paths with
    # add_: every path must count each non-empty training batch exactly once, like PyTorch's.
    shapes = {"kernel-rows": (300, 300), "kernel-rows-no-grad": (300, 300), "planes": (4, 3, 5, 5)}
    shape = shapes.get(case, (64, 8))
    bn = bnlab.BatchNorm(axis=1, momentum=None if case == "cumulative" else 0.99)
    if case == "float-counter":  # a counter the kernels do not take: counted by add_ instead
        bn(torch.randn(shape))
        bn.num_batches_tracked = torch.tensor(1.0)
    ref = torch.nn.BatchNorm1d(shape[1]) if len(shape) == 2 else torch.nn.BatchNorm2d(shape[1])
    done = 1 if case == "float-counter" else 0
    for step in range(3):
        x = torch.randn(shape, requires_grad=not case.endswith("no-grad"))
        mask = torch.rand(shape[0]) < 0.7 if case == "masked" else None
        with torch.set_grad_enabled(not case.endswith("no-grad")):
            y = bn(x, mask=mask)
        ref(x.detach())
        if x.requires_grad:
            y.sum().backward()
        bn(torch.randn((0,) + shape[1:]))  # empty: not counted
        bn.eval()
        bn(x.detach())  # inference: not counted
        bn.train()
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() + done == 3 + done
    assert bn.num_batches_tracked.dtype == (torch.float32 if case == "float-counter" else torch.int64)
    if case == "cumulative":  # the cumulative average needs the count before the update
        assert torch.isfinite(bn.moving_mean).all()


def test_empty_batch_updates_nothing():
    bn = bnlab.BatchNorm(num_features=3)
    before = [w.copy() for w in bn.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom" warning from an empty reduction
        y = bn(torch.randn(0, 3))
    assert y.shape == (0, 3)
    assert bn.num_batches_tracked.item() == 0  # an empty batch is not counted either
    bn(torch.randn(0, 5, 3), mask=torch.zeros(0, 5, dtype=torch.bool))
    for a, c in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, c)


def test_batch_of_one_gives_beta():
    bn = bnlab.BatchNorm(num_features=4, beta_initializer=initializers.Constant(0.7))
    x = torch.randn(1, 4, requires_grad=True)
    y = bn(x)
    torch.testing.assert_close(y, torch.full((1, 4), 0.7))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.99 * np.ones(4), atol=1e-7)  # var 0 entered


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    bn = bnlab.BatchNorm(num_features=4)
    bn32 = bnlab.BatchNorm(num_features=4)
    x = (torch.randn(64, 4) * 3 + 10).to(dtype)
    y = bn(x)
    y32 = bn32(x.float())
    assert y.dtype == dtype
    assert bn.moving_mean.dtype == torch.float32 and bn.moving_variance.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32.to(dtype).float())
    torch.testing.assert_close(bn.moving_mean, bn32.moving_mean)
    torch.testing.assert_close(bn.moving_variance, bn32.moving_variance)


def test_trainable_false_freezes_and_runs_inference():
    bn = bnlab.BatchNorm(num_features=3)
    bn(torch.randn(16, 3) * 2 + 1)
    bn.trainable = False
    assert not bn.gamma.requires_grad and not bn.beta.requires_grad
    state = [w.copy() for w in bn.get_weights()]
    x = torch.randn(8, 3) + 4
    y = bn(x, training=True)
    for a, c in zip(state, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, c)
    g, b, mm, mv = state
    np.testing.assert_allclose(y.detach().numpy(), g * (x.numpy() - mm) / np.sqrt(mv + 1e-3) + b, atol=1e-5)
    bn.trainable = True
    assert bn.gamma.requires_grad
    bn(x, training=True)
    assert not np.array_equal(bn.get_weights()[2], mm)


def test_input_errors_are_clear():
    bn = bnlab.BatchNorm(num_features=64)
    with pytest.raises(ValueError, match=r"BatchNorm\(axis=-1\) built for 64 features, got 32 \(input shape \(8, 32\)\)"):
        bn(torch.randn(8, 32))
    with pytest.raises(ValueError, match=r"axis 3 is out of range for an input of rank 2"):
        bnlab.BatchNorm(axis=3)(torch.randn(4, 3))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        bn(np.zeros((4, 64)))


# ---------------------------------------------------------------- weights and checkpoints


def test_gamma_beta_none_when_disabled_and_get_weights_order():
    bn = bnlab.BatchNorm(num_features=3, center=False)
    assert bn.beta is None and bn.gamma is not None
    assert len(bn.get_weights()) == 3
    bn = bnlab.BatchNorm(num_features=3, scale=False)
    assert bn.gamma is None and len(bn.get_weights()) == 3
    bn = bnlab.BatchNorm(num_features=3, scale=False, center=False)
    assert len(bn.get_weights()) == 2 and list(bn.parameters()) == []
    x = torch.randn(10, 3, dtype=torch.float64)
    y = bnlab.BatchNorm(num_features=3, scale=False, center=False, dtype=torch.float64)(x)
    xn = x.numpy()
    np.testing.assert_allclose(y.numpy(), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-3), atol=1e-12)


def test_set_weights_roundtrip_and_shape_error():
    bn = bnlab.BatchNorm(num_features=3)
    w = [np.array([1.0, 2, 3]), np.array([0.1, 0.2, 0.3]), np.array([-1.0, 0, 1]), np.array([4.0, 5, 6])]
    bn.set_weights(w)
    for a, c in zip(w, bn.get_weights(), strict=True):
        np.testing.assert_allclose(a, c)
    with pytest.raises(ValueError, match=r"gamma expected shape \(3,\), got \(4,\)"):
        bn.set_weights([np.ones(4), np.ones(3), np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match="expected 4 arrays"):
        bn.set_weights(w[:2])


def test_torch_checkpoint_loads_and_gives_same_eval_output():
    C = 6
    tbn = torch.nn.BatchNorm2d(C, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-1, 1)
    for _ in range(3):
        tbn(torch.randn(8, C, 5, 5) * 2 + 1)
    tbn.eval()
    bn = bnlab.BatchNorm(axis=1, num_features=C)
    bn.load_state_dict(tbn.state_dict())
    bn.eval()
    x = torch.randn(4, C, 5, 5)
    torch.testing.assert_close(bn(x), tbn(x))
    # ... and the reverse
    bn2 = bnlab.BatchNorm(axis=1, num_features=C, gamma_initializer=initializers.RandomUniform(0.5, 1.5))
    bn2(torch.randn(8, C, 3, 3) + 2)
    bn2.eval()
    tbn2 = torch.nn.BatchNorm2d(C, eps=1e-3, momentum=0.01)
    tbn2.load_state_dict(bn2.state_dict())
    tbn2.eval()
    torch.testing.assert_close(tbn2(x), bn2(x))


def test_checkpoint_loads_into_lazy_layer_and_old_checkpoints_without_counter():
    tbn = torch.nn.BatchNorm1d(5)
    sd = tbn.state_dict()
    bn = bnlab.BatchNorm(axis=1)  # not built
    bn.load_state_dict(sd)
    assert bn.built and bn.gamma.shape == (5,)
    old = {k: v for k, v in sd.items() if k != "num_batches_tracked"}
    bn3 = bnlab.BatchNorm(axis=1, num_features=5)
    bn3.load_state_dict(old)
    assert bn3.num_batches_tracked.item() == 0


def test_state_dict_keys_are_pytorch_keys():
    bn = bnlab.BatchNorm(num_features=4)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert bn.state_dict().keys() == torch.nn.BatchNorm1d(4).state_dict().keys()


# ---------------------------------------------------------------- initializers, regularizers, constraints


def test_tutorial_000_custom_initializers():
    torch.manual_seed(1)
    bn = bnlab.BatchNorm(
        momentum=0.95, epsilon=0.005, axis=-1,
        beta_initializer=initializers.RandomNormal(mean=0.0, stddev=0.05),
        gamma_initializer=initializers.Constant(value=0.9),
        num_features=256,
    )
    np.testing.assert_allclose(bn.gamma.detach().numpy(), 0.9)
    beta = bn.beta.detach().numpy()
    assert abs(beta.mean()) < 0.02 and 0.035 < beta.std() < 0.065


def test_initializers_semantics():
    a = initializers.RandomNormal(1.0, 2.0, seed=3)((1000,))
    b = initializers.RandomNormal(1.0, 2.0, seed=3)((1000,))
    assert torch.equal(a, b) and abs(a.mean().item() - 1.0) < 0.2 and abs(a.std().item() - 2.0) < 0.2
    u = initializers.RandomUniform(-1, 3, seed=0)((1000,))
    assert u.min() >= -1 and u.max() < 3
    t = initializers.TruncatedNormal(0.0, 1.0, seed=0)((5000,))
    assert t.abs().max() <= 2.0
    bn = bnlab.BatchNorm(num_features=3, moving_variance_initializer=lambda shape, dtype, device: torch.full(shape, 2.0, dtype=dtype))
    assert torch.equal(bn.moving_variance, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="unknown initializer"):
        bnlab.BatchNorm(gamma_initializer="glorot")


def test_regularizers_reach_the_loss():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        bnlab.BatchNorm(num_features=4, gamma_regularizer=regularizers.L2(0.1), beta_regularizer=regularizers.L1(0.5)),
    )
    bn = model[1]
    with torch.no_grad():
        bn.gamma.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        bn.beta.copy_(torch.tensor([-1.0, 1.0, 0.0, 2.0]))
    penalty = bnlab.regularization_loss(model)
    assert penalty.item() == pytest.approx(0.1 * 30 + 0.5 * 4)
    penalty.backward()
    torch.testing.assert_close(bn.gamma.grad, 0.2 * bn.gamma.detach())
    torch.testing.assert_close(bn.beta.grad, 0.5 * torch.sign(bn.beta.detach()))
    assert bnlab.regularization_loss(torch.nn.Linear(2, 2)).item() == 0.0
    assert regularizers.get("l1_l2")(torch.ones(2)).item() == pytest.approx(0.04)


@pytest.mark.parametrize(
    "constraint,expected",
    [
        (constraints.NonNeg(), lambda w: np.maximum(w, 0)),
        (constraints.MaxNorm(1.0), lambda w: w * min(1.0, np.linalg.norm(w)) / (1e-7 + np.linalg.norm(w))),
        (constraints.UnitNorm(), lambda w: w / (1e-7 + np.linalg.norm(w))),
        (constraints.MinMaxNorm(6.0, 7.0), lambda w: w * np.clip(np.linalg.norm(w), 6.0, 7.0) / (1e-7 + np.linalg.norm(w))),
    ],
)
def test_constraints_apply_after_step(constraint, expected):
    bn = bnlab.BatchNorm(num_features=3, gamma_constraint=constraint, beta_constraint=constraint)
    opt = torch.optim.SGD(bn.parameters(), lr=1.0)
    bn(torch.randn(8, 3)).pow(3).sum().backward()
    opt.step()
    g_before, b_before = bn.gamma.detach().numpy().copy(), bn.beta.detach().numpy().copy()
    bnlab.apply_constraints(bn)
    np.testing.assert_allclose(bn.gamma.detach().numpy(), expected(g_before), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.beta.detach().numpy(), expected(b_before), rtol=1e-5, atol=1e-6)


def test_keras_face_can_keep_pytorchs_books():
    # momentum converted explicitly, unbiased moving variance, PyTorch's epsilon: the same numbers as torch.
    ours = bnlab.BatchNorm(
        axis=1, momentum=bnlab.conventions.keras_momentum_from_torch(0.1), epsilon=1e-5,
        moving_variance_estimator="unbiased", num_features=4,
    )
    theirs = torch.nn.BatchNorm1d(4)
    for _ in range(3):
        x = torch.randn(10, 4, 3) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.moving_variance, theirs.running_var, atol=1e-6, rtol=1e-5)
    # momentum=None: cumulative average of every batch seen, as PyTorch's momentum=None
    cum = bnlab.BatchNorm(momentum=None, num_features=2, dtype=torch.float64)
    batches = [torch.randn(8, 2, dtype=torch.float64) + i for i in range(4)]
    for b in batches:
        cum(b)
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(cum.moving_mean, expected)


def test_renorm_validation_schedule_and_nan_guard():
    with pytest.raises(ValueError, match="keys rmax, rmin, dmax"):
        bnlab.BatchNorm(renorm=True, renorm_clipping={"r_max": 3})
    with pytest.raises(ValueError, match="rmax >= rmin"):
        bnlab.BatchNorm(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 2})
    ramp = bnlab.functional.renorm_ramp(start=10, rmax_steps=30, dmax_steps=20)
    steps = torch.tensor([0, 10, 20, 30, 100])
    torch.testing.assert_close(ramp["rmax"](steps), torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(ramp["dmax"](steps), torch.tensor([0.0, 0.0, 5.0, 5.0, 5.0], dtype=torch.float64))
    # with rmax = 1 and dmax = 0 (the ramp's start) renorm is plain batch norm
    early = bnlab.BatchNorm(num_features=3, renorm=True, renorm_clipping=ramp, dtype=torch.float64)
    plain = bnlab.BatchNorm(num_features=3, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(16, 3, dtype=torch.float64) * 3 + 2
        torch.testing.assert_close(early(x), plain(x))
    bad = torch.randn(8, 3)
    bad[0, 1] = float("inf")
    rn = bnlab.BatchNorm(num_features=3, renorm=True)
    rn(bad)
    for w in rn.get_weights():
        assert np.isfinite(w).all()
    assert rn.get_weights()[2][1] == 0.0 and rn.get_weights()[2][0] != 0.0  # the bad feature kept, the others moved


def _ghost_reference(x, k, axis, eps=1e-3):
    """Ghost BN by a loop over groups in NumPy: group g holds samples g, g+G, g+2G, ... (G = ceil(N/k))."""
    x = x.double().numpy()
    n = x.shape[0]
    groups = -(-n // k)
    feat = bnlab.functional.normalize_axes(axis, x.ndim)
    red = tuple(d for d in range(x.ndim) if d not in feat)
    y, means, variances = np.empty_like(x), [], []
    for g in range(groups):
        idx = np.arange(g, n, groups)
        m, v = x[idx].mean(axis=red, keepdims=True), x[idx].var(axis=red, keepdims=True)
        y[idx] = (x[idx] - m) / np.sqrt(v + eps)
        means.append(m.squeeze())
        variances.append(v.squeeze())
    return y, np.mean(means, 0), np.mean(variances, 0)


@pytest.mark.parametrize("shape,axis,k", [((12, 5), -1, 4), ((10, 5), -1, 4), ((8, 3, 4, 4), 1, 2), ((9, 4, 4, 3), -1, 4)])
def test_ghost_batch_norm_matches_closed_form(shape, axis, k):
    bn = bnlab.BatchNorm(axis=axis, virtual_batch_size=k, momentum=0.9, dtype=torch.float64)
    mm = np.zeros(shape[axis] if isinstance(axis, int) else 0)
    mv = np.ones_like(mm)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
        y = bn(x)
        yr, m, v = _ghost_reference(x, k, axis)
        np.testing.assert_allclose(y.detach().numpy(), yr, atol=1e-10)
        mm, mv = 0.9 * mm + 0.1 * m, 0.9 * mv + 0.1 * v
    np.testing.assert_allclose(bn.moving_mean.numpy(), mm, atol=1e-12)
    np.testing.assert_allclose(bn.moving_variance.numpy(), mv, atol=1e-12)
    bn.eval()  # inference is unchanged: moving statistics
    x = torch.randn(shape, dtype=torch.float64)
    plain = bnlab.BatchNorm(axis=axis, dtype=torch.float64).eval()
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), plain(x))


def test_ghost_batch_norm_gradients_and_errors():
    bn = bnlab.BatchNorm(num_features=3, virtual_batch_size=3, dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bn(t, training=True), (x,))
    with pytest.raises(ValueError, match="does not support masks"):
        bn(torch.randn(6, 2, 3, dtype=torch.float64), mask=torch.ones(6, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot be combined"):
        bnlab.BatchNorm(virtual_batch_size=4, renorm=True)
    with pytest.raises(ValueError, match="axis 0"):
        bnlab.BatchNorm(axis=0, virtual_batch_size=2)(torch.randn(4, 3))


def test_torch_compile_captures_the_layer_without_graph_breaks():
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), bnlab.BatchNorm(num_features=16), torch.nn.ReLU())
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), bnlab.BatchNorm(num_features=16), torch.nn.ReLU())
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(32, 8)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(model[1].moving_mean, ref[1].moving_mean)
    dynamo.reset()
    assert dynamo.explain(model)(x).graph_break_count == 0
    # inference, and a PyTorch drop-in, through the forward's shortcut: captured whole too
    model.eval()
    dynamo.reset()
    assert dynamo.explain(model)(x).graph_break_count == 0
    torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x))
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnlab.nn.BatchNorm2d(8))
    dynamo.reset()
    assert dynamo.explain(conv)(torch.randn(4, 3, 10, 10)).graph_break_count == 0
    # trained eagerly first (small batches: PyTorch's op + the kernels' update), then compiled: still
    # whole, still right; and the same after batches for the kernels (80,000 values in the BN layer),
    # whose compiled code must never run inside the capture
    model.train()
    ref.load_state_dict(model.state_dict())  # (explain above ran a training step on model only)
    for batch in (x, torch.randn(5000, 8)):
        for _ in range(2):
            model(batch)
            ref(batch)
        dynamo.reset()
        assert dynamo.explain(model)(batch).graph_break_count == 0
        ref(batch)
        torch.testing.assert_close(torch.compile(model, backend="eager")(batch), ref(batch))
        torch.testing.assert_close(model[1].moving_mean, ref[1].moving_mean)


def test_ghost_batch_norm_with_cumulative_momentum():
    # momentum=None (cumulative average) goes through the same counter as plain BN
    bn = bnlab.BatchNorm(num_features=3, momentum=None, virtual_batch_size=2, dtype=torch.float64)
    batches = [torch.randn(6, 3, dtype=torch.float64) * 2 + i for i in range(3)]
    expected = np.mean([_ghost_reference(b, 2, -1)[1] for b in batches], axis=0)
    for b in batches:
        bn(b)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, atol=1e-12)
    assert bn.num_batches_tracked.item() == 3


# ---------------------------------------------------------------- inputs and state the layer must not get wrong


@pytest.mark.parametrize("shape", [(64, 8), (20, 8, 30, 30)])  # the small route and the kernels' route
@pytest.mark.parametrize("where", ["input", "gamma", "moving_mean"])
def test_negative_bit_views_give_their_values(shape, where):
    # torch._neg_view(t) holds -t's memory with a bit saying "negate on read"; handed to C as memory
    # it would be read with the wrong sign. Every path must see the values the view stands for.
    torch.manual_seed(0)
    axis = 1
    x = torch.randn(shape) * 2 + 1
    layers = [bnlab.BatchNorm(axis=axis, num_features=8, momentum=0.5) for _ in range(2)]
    gamma, moving_mean = torch.rand(8) + 0.5, torch.randn(8)
    with torch.no_grad():
        for layer in layers:
            layer.gamma.copy_(gamma)
            layer.moving_mean.copy_(moving_mean)
    plain, viewed = layers
    if where == "gamma":
        viewed.weight.data = torch._neg_view(-viewed.weight.data)
    if where == "moving_mean":
        viewed.running_mean.data = torch._neg_view(-viewed.running_mean.data)
    xv = torch._neg_view(-x) if where == "input" else x
    assert xv.is_neg() or where != "input"
    for layer, xi in ((plain, x), (viewed, xv)):
        layer.train()
        layer(xi)  # training: statistics and an update through the views
    torch.testing.assert_close(viewed.moving_mean.resolve_neg(), plain.moving_mean)
    torch.testing.assert_close(viewed(xv.resolve_neg() if where != "input" else xv), plain(x), rtol=1e-5, atol=1e-5)
    plain.eval()
    viewed.eval()
    with torch.no_grad():
        torch.testing.assert_close(viewed(xv), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 3e38, -3e38])
@pytest.mark.parametrize("shape,axis", [((6, 5, 4), -1), ((6, 4, 5, 5), 1)])
def test_masked_out_positions_never_reach_the_statistics(garbage, shape, axis):
    # Keras' contract for masks: what the mask excludes is not used for the mean or variance. With
    # 0/1 weights multiplied in, 0 * NaN and (3e38 - mean)^2 * 0 poisoned the statistics.
    torch.manual_seed(1)
    feat = F.normalize_axes(axis, len(shape))
    mshape = [s for d, s in enumerate(shape) if d not in feat]
    mask = torch.rand(mshape) > 0.4
    mask.view(-1)[:3] = True
    mask.view(-1)[-1] = False
    x = torch.randn(shape) * 2 + 1
    dirty = x.clone()
    m_full = mask
    for a in feat:
        m_full = m_full.unsqueeze(a)
    dirty = torch.where(m_full.expand(shape), dirty, torch.full_like(dirty, garbage))
    clean_layer, dirty_layer = bnlab.BatchNorm(axis=axis), bnlab.BatchNorm(axis=axis)
    y_clean = clean_layer(x, mask=mask)
    y_dirty = dirty_layer(dirty, mask=mask)
    assert torch.isfinite(dirty_layer.moving_mean).all() and torch.isfinite(dirty_layer.moving_variance).all()
    torch.testing.assert_close(dirty_layer.moving_mean, clean_layer.moving_mean)
    torch.testing.assert_close(dirty_layer.moving_variance, clean_layer.moving_variance)
    keep = m_full.expand(shape)
    torch.testing.assert_close(y_dirty[keep], y_clean[keep])  # the included positions: same outputs
    mean, var = F.moments(dirty, axis, mask)
    ref_mean, ref_var = F.moments(x, axis, mask)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    # a loss that ignores the masked outputs (dy = 0 there) gets finite gradients
    xr = dirty.clone().requires_grad_()
    y = bnlab.BatchNorm(axis=axis)(xr, mask=mask)
    (torch.where(keep, y, torch.zeros_like(y)) ** 2).sum().backward()
    assert torch.isfinite(xr.grad[keep]).all()


def test_masks_broadcast_over_size_one_axes_like_keras():
    # Keras: a mask of the input's rank minus one, broadcast against it; e.g. (N, H, 1) for an
    # (N, H, W, C) input masks whole rows of W. The result equals the explicitly expanded mask.
    torch.manual_seed(2)
    x = torch.randn(4, 5, 6, 3)
    row = torch.rand(4, 5, 1) > 0.3
    row[0, 0, 0] = True
    a, b = bnlab.BatchNorm(axis=-1), bnlab.BatchNorm(axis=-1)
    ya = a(x, mask=row)
    yb = b(x, mask=row.expand(4, 5, 6))
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.moving_mean, b.moving_mean)
    torch.testing.assert_close(a.moving_variance, b.moving_variance)
    per_sample = torch.tensor([True, False, True, True]).view(4, 1, 1)
    c, d = bnlab.BatchNorm(axis=-1), bnlab.BatchNorm(axis=-1)
    torch.testing.assert_close(c(x, mask=per_sample), d(x, mask=per_sample.expand(4, 5, 6)))
    with pytest.raises(ValueError, match=r"expected \(4, 5, 6\), got \(5, 6\)"):  # fewer axes: refused, not aligned
        bnlab.BatchNorm(axis=-1)(x, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(4, 5, 2\)"):
        bnlab.BatchNorm(axis=-1)(x, mask=torch.ones(4, 5, 2, dtype=torch.bool))


def test_trainable_false_before_the_first_call_of_a_lazy_layer():
    # Keras: trainable=False means inference, also on the call that builds the layer: the moving
    # statistics (their initial values) normalize the batch, nothing is updated or counted.
    layer = bnlab.BatchNorm(axis=-1, moving_mean_initializer=bnlab.initializers.Constant(0.5),
                            moving_variance_initializer=bnlab.initializers.Constant(4.0))
    layer.trainable = False
    x = torch.randn(16, 3) * 3 + 2
    y = layer(x)
    torch.testing.assert_close(y, (x - 0.5) / torch.sqrt(torch.tensor(4.0 + 1e-3)))
    assert torch.equal(layer.moving_mean, torch.full((3,), 0.5))
    assert torch.equal(layer.moving_variance, torch.full((3,), 4.0))
    assert layer.num_batches_tracked.item() == 0
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad


@pytest.mark.parametrize("make", [lambda: bnlab.BatchNorm(num_features=4), lambda: bnlab.nn.BatchNorm1d(4)])
def test_a_partial_state_dict_keeps_the_batch_counter(make):
    # PyTorch keeps every buffer a non-strict load does not name; bnlab used to reset
    # num_batches_tracked to 0 (the path for checkpoints older than the counter).
    layer = make()
    for _ in range(3):
        layer(torch.randn(8, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    result = layer.load_state_dict({}, strict=False)
    native = torch.nn.BatchNorm1d(4)
    assert result.missing_keys == native.load_state_dict({}, strict=False).missing_keys
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    for _ in range(3):
        native(torch.randn(8, 4))
    native.load_state_dict({}, strict=False)
    assert native.num_batches_tracked.item() == 3 == layer.num_batches_tracked.item()
    # a checkpoint from before the counter existed (no version, no key) still loads, counting from 0
    old = {k: v for k, v in before.items() if k != "num_batches_tracked"}
    fresh = make()
    fresh.load_state_dict(old, strict=False)
    assert fresh.num_batches_tracked.item() == 0


@pytest.mark.parametrize("kernels", [True, False])
def test_training_leaves_the_buffers_as_pytorch_made_them(kernels, monkeypatch):
    # The moving statistics are touched only by C or by torch ops: a NumPy view of a buffer (the old
    # PyTorch-path update) made its storage impossible to resize afterwards, which native layers allow.
    from bnlab._kernels import ops

    if not kernels:
        monkeypatch.setattr(ops, "loaded", lambda: None)
    layer = bnlab.nn.BatchNorm1d(8)
    for _ in range(2):
        layer(torch.randn(16, 8))
    for name in ("running_mean", "running_var"):
        getattr(layer, name).resize_(11)  # raised "Trying to resize storage that is not resizable"
    native = torch.nn.BatchNorm1d(8)
    native(torch.randn(16, 8))
    native.running_mean.resize_(11)


def test_a_lazy_layer_first_called_in_inference_uses_its_initial_moving_statistics():
    # Keras: inference normalizes with the moving statistics, which a lazily built layer has from
    # its initializers on its first call; it used batch statistics there (nothing to read yet).
    x = torch.randn(32, 3) * 4 + 2
    for layer in (bnlab.BatchNorm(), bnlab.BatchNorm(moving_mean_initializer=initializers.Constant(1.0))):
        layer.eval()
        expected = (x - layer.moving_mean_initializer((3,))) / torch.sqrt(torch.tensor(1.0 + 1e-3))
        torch.testing.assert_close(layer(x), expected)
        assert layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("kernels", [True, False])
def test_buffers_reshaped_or_set_to_require_gradients_still_work(kernels, monkeypatch):
    # Found by the state fuzz at its nightly size: a multi-axis layer's moving mean resized in place to
    # a flat vector (its variance still (3, 2)), and a moving variance set to require gradients, used
    # in inference: both paths give the same results (PyTorch's op refused the second).
    from bnlab._kernels import ops

    if not kernels:
        monkeypatch.setattr(ops, "loaded", lambda: None)
    torch.manual_seed(0)
    layer = bnlab.BatchNorm(axis=[1, 3], num_features=[3, 2])
    x = torch.randn(64, 3, 2, 2)
    layer(x)
    layer.running_mean.resize_(6)
    layer(x)
    ref = bnlab.BatchNorm(axis=[1, 3], num_features=[3, 2])
    ref(x)
    ref(x)
    torch.testing.assert_close(layer.running_mean, ref.running_mean.reshape(6))
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.running_var.requires_grad_(True)
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x))
