"""fit / evaluate: Keras' semantics checked against direct computation."""

import math

import pytest
import torch
from torch import nn

import bnlab
from bnlab.lab import training as T


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 1))


def test_validation_split_takes_the_last_rows_and_loss_is_sample_weighted():
    x = torch.randn(103, 3)
    y = torch.randn(103, 1)
    model = _linear()
    h = T.fit(model, x, y, loss="mse", optimizer=lambda p: torch.optim.SGD(p, lr=0.0), epochs=1, batch_size=10,
              validation_split=0.2, verbose=0)
    split_at = int(103 * 0.8)  # 82
    with torch.no_grad():
        train_loss = ((model(x[:split_at]) - y[:split_at]) ** 2).mean().item()
        val_loss = ((model(x[split_at:]) - y[split_at:]) ** 2).mean().item()
    assert h.params["samples"] == 82
    assert h.history["loss"][0] == pytest.approx(train_loss, rel=1e-5)  # last batch of 2 weighted by its size
    assert h.history["val_loss"][0] == pytest.approx(val_loss, rel=1e-5)


def test_same_seed_same_history_different_seed_different():
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64, 1)).float()

    def go(seed):
        torch.manual_seed(123)
        m = nn.Sequential(nn.Linear(3, 8), bnlab.BatchNorm(num_features=8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1), nn.Sigmoid())
        return T.fit(m, x, y, loss="binary_crossentropy", metrics=["accuracy"], epochs=3, batch_size=16, seed=seed, verbose=0).history

    assert go(1) == go(1)
    assert go(1) != go(2)


def test_losses_and_metrics_match_keras_formulas():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 1.0]])
    y_sparse = torch.tensor([0, 0, 1])
    y_onehot = torch.nn.functional.one_hot(y_sparse, 2).float()
    expected = -torch.log(torch.tensor([0.9, 0.2, 1 - 1e-7]))
    torch.testing.assert_close(T.sparse_categorical_crossentropy(y_sparse, p), expected)
    torch.testing.assert_close(T.categorical_crossentropy(y_onehot, p), expected)
    pb, yb = torch.tensor([[0.0], [0.7]]), torch.tensor([[0.0], [1.0]])
    torch.testing.assert_close(T.binary_crossentropy(yb, pb), -torch.log(torch.tensor([1 - 1e-7, 0.7])))
    assert T.resolve_metrics(["accuracy"], T.get_loss("sparse_categorical_crossentropy"))["accuracy"] is T.sparse_categorical_accuracy
    assert T.resolve_metrics(["accuracy"], T.get_loss("binary_crossentropy"))["accuracy"] is T.binary_accuracy
    assert T.sparse_categorical_accuracy(y_sparse, p).mean().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown loss"):
        T.get_loss("hinge2")


def test_keras_optimizer_defaults():
    p = [nn.Parameter(torch.zeros(1))]
    adam = T.get_optimizer("adam", p)
    assert adam.defaults["lr"] == 1e-3 and adam.defaults["eps"] == 1e-7 and adam.defaults["betas"] == (0.9, 0.999)
    rms = T.get_optimizer("rmsprop", p)
    assert rms.defaults["alpha"] == 0.9 and rms.defaults["eps"] == 1e-7 and rms.defaults["lr"] == 1e-3
    assert T.get_optimizer({"name": "adam", "lr": 0.01}, p).defaults["lr"] == 0.01
    with pytest.raises(ValueError, match="unknown optimizer"):
        T.get_optimizer("adagrad2", p)


def test_regularizers_and_constraints_take_effect_in_fit():
    x, y = torch.randn(40, 4), torch.randn(40, 1)
    torch.manual_seed(0)
    bn = bnlab.BatchNorm(num_features=4, gamma_regularizer=bnlab.regularizers.L2(10.0), beta_constraint=bnlab.constraints.NonNeg())
    model = nn.Sequential(bn, nn.Linear(4, 1))
    with torch.no_grad():
        bn.beta.fill_(-0.5)
    h = T.fit(model, x, y, epochs=2, batch_size=8, optimizer={"name": "sgd", "lr": 0.01}, verbose=0)
    assert (bn.beta >= 0).all()  # the constraint projected beta after every step
    penalty = 10.0 * bn.gamma.detach().square().sum().item()
    ev = T.evaluate(model, x, y)
    assert ev["loss"] > penalty  # reported loss includes the penalty, as Keras' does
    assert bn.gamma.abs().max() < 1.0  # the L2 penalty shrank gamma from 1
    assert len(h.history["loss"]) == 2


def test_steps_per_epoch_streams_across_epochs():
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    seen = []
    model = _linear()
    orig = model.forward
    model.forward = lambda t: (seen.append(len(t)), orig(t))[1]
    T.fit(model, x, y, epochs=3, batch_size=4, steps_per_epoch=2, verbose=0)
    # 6 batches drawn from an endless pass: 4, 4, 2 (end of pass), 4, 4, 2
    assert seen == [4, 4, 2, 4, 4, 2]


def test_verbose_prints_one_keras_style_line_per_epoch(capsys):
    T.fit(_linear(), torch.randn(20, 3), torch.randn(20, 1), epochs=2, batch_size=5, metrics=["mae"], validation_split=0.25, verbose=1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Epoch 1/2" and out[1].startswith("3/3 - ") and " - loss: " in out[1] and "val_mae: " in out[1]


def test_thread_policy():
    from bnlab import lab

    assert T.thread_policy(_linear(), 32) == 1
    for name in ("blobs-deep", "digits28-cnn"):  # 5e7 and 1.1e8 parameters x batch: one thread (see the module docstring)
        r = lab.get(name)
        assert T.thread_policy(lab.build_model(r, "bn", 0), r.batch_size) == 1
    assert T.thread_policy(nn.Linear(3000, 3000), 256) is None
    assert T.thread_policy(_linear(), 32, threads=2) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="validation_split"):
        T.fit(_linear(), torch.randn(4, 3), torch.randn(4, 1), validation_split=1.0, verbose=0)
    with pytest.raises(ValueError, match="different lengths"):
        T.fit(_linear(), torch.randn(4, 3), torch.randn(5, 1), verbose=0)


@pytest.mark.parametrize("name", ["mse", "mae", "sparse_categorical_crossentropy", "binary_crossentropy", "categorical_crossentropy"])
def test_fused_batch_mean_equals_the_per_sample_definition(name):
    fn = T.get_loss(name)
    torch.manual_seed(0)
    if name in ("mse", "mae"):
        y, p = torch.randn(9, 3), torch.randn(9, 3)
    elif name == "binary_crossentropy":
        y, p = torch.randint(0, 2, (9, 1)).float(), torch.rand(9, 1)
    else:
        p = torch.softmax(torch.randn(9, 5), -1)
        p[0] = torch.tensor([1.0, 0, 0, 0, 0])  # a saturated prediction exercises the clipping
        y = torch.randint(0, 5, (9,))
        if name == "categorical_crossentropy":
            y = torch.nn.functional.one_hot(y, 5).float()
    torch.testing.assert_close(T._mean_loss(fn)(y, p), fn(y, p).mean())


def test_a_non_finite_loss_ends_training_at_that_epoch():
    """Keras' TerminateOnNaN at epoch granularity: the epoch that went non-finite is logged, nothing after it runs."""
    x = torch.randn(40, 3)
    y = x.sum(1, keepdim=True)
    seen = []
    h = T.fit(_linear(), x, y, epochs=10, batch_size=8, optimizer={"name": "sgd", "lr": 1e10}, verbose=0,
              callbacks=[lambda epoch, logs, *rest: seen.append(epoch)])
    k = h.diverged_epoch
    assert k is not None and 1 <= k < 10
    assert len(h.history["loss"]) == k and seen == list(range(k))  # the history up to it, callbacks for each epoch
    assert not math.isfinite(h.history["loss"][-1]) and all(math.isfinite(v) for v in h.history["loss"][:-1])
    again = T.fit(_linear(), x, y, epochs=10, batch_size=8, optimizer={"name": "sgd", "lr": 1e10}, verbose=0, history=h, initial_epoch=k)
    assert again.history["loss"] == h.history["loss"] and len(again.history["loss"]) == k  # a diverged run does not go on


def test_a_finite_run_has_no_divergence():
    h = T.fit(_linear(), torch.randn(20, 3), torch.randn(20, 1), epochs=2, batch_size=5, verbose=0)
    assert h.diverged_epoch is None
