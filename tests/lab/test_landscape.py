"""The loss landscape along the gradient (Santurkar et al., 2018): against a brute-force computation with
torch.func on copies of the weights; nothing disturbed; the callback's records and their reader."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import bnlab
from bnlab.lab import landscape as L
from bnlab.lab import training as T
from bnlab.lab.probes import Probes


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(4, 6),
        bnlab.BatchNorm(num_features=6, renorm=True, momentum=0.5, renorm_momentum=0.5),  # reads its moving stats in training
        nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3), nn.Softmax(dim=-1),
    ).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):  # moving statistics away from their initial values
        opt.zero_grad()
        m(torch.randn(16, 4, dtype=torch.float64)).sum().backward()
        opt.step()
    return m


def _brute_force(model, x, y, etas):
    """L and grad L at w - eta g, each evaluation on fresh copies of the starting buffers and the same RNG state."""
    names = [n for n, p in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()

    def loss_at(params):
        torch.set_rng_state(rng)
        state = {**params, **{n: b.clone() for n, b in buffers.items()}}
        p = functional_call(model, state, (x,))
        return (-torch.log(p.clamp(1e-7, 1 - 1e-7).gather(1, y.view(-1, 1)))).mean()

    def value_and_grad(params):
        params = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        value = loss_at(params)
        grads = torch.autograd.grad(value, [params[n] for n in names])
        return value.item(), torch.cat([g.reshape(-1) for g in grads])

    model.train()
    loss0, g0 = value_and_grad(w)
    g_by_name = dict(zip(names, torch.split(g0, [w[n].numel() for n in names]), strict=True))
    losses, diffs = [], []
    for eta in etas:
        moved = {n: w[n] - eta * g_by_name[n].view_as(w[n]) for n in names}
        value, g = value_and_grad(moved)
        losses.append(value)
        diffs.append(torch.linalg.vector_norm(g - g0).item())
    torch.set_rng_state(rng)
    gn = torch.linalg.vector_norm(g0).item()
    return loss0, gn, losses, diffs


def test_measurement_equals_a_brute_force_computation():
    model = _model()
    torch.manual_seed(5)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    etas = [0.05, 0.2, 0.8, 3.0]
    loss0, gn, losses, diffs = _brute_force(model, x, y, etas)
    got = L.measure(model, x, y, loss="sparse_categorical_crossentropy", etas=etas)
    assert got.loss == pytest.approx(loss0, rel=1e-12)
    assert got.grad_norm == pytest.approx(gn, rel=1e-12)
    np.testing.assert_allclose(got.losses, losses, rtol=1e-12)
    np.testing.assert_allclose(got.grad_diffs, diffs, rtol=1e-10)
    assert got.loss_range == pytest.approx(max(losses) - min(losses), rel=1e-10)
    assert got.beta == pytest.approx(max(d / (e * gn) for e, d in zip(etas, diffs, strict=True)), rel=1e-10)
    assert len(set(got.losses)) == len(etas)  # the steps really moved the weights


def test_least_squares_matches_the_closed_form():
    # L(theta) = mean((X~ theta - y)^2) with X~ = [X, 1]: H = 2/N X~'X~, L(theta - eta g) = L - eta |g|^2 + eta^2/2 g'Hg,
    # grad(theta - eta g) - g = -eta H g, so beta = |Hg| / |g| at every step size.
    torch.manual_seed(2)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], 1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = 2 / 20 * xt.T @ xt
    g = H @ theta - 2 / 20 * xt.T @ y.reshape(-1)
    loss0 = ((xt @ theta - y.reshape(-1)) ** 2).mean().item()
    etas = [0.01, 0.3, 1.0]
    got = L.measure(model, x, y, loss="mse", etas=etas)
    assert got.loss == pytest.approx(loss0, rel=1e-12) and got.grad_norm == pytest.approx(g.norm().item(), rel=1e-12)
    expect = [loss0 - e * (g @ g).item() + e**2 / 2 * (g @ H @ g).item() for e in etas]
    np.testing.assert_allclose(got.losses, expect, rtol=1e-10)
    np.testing.assert_allclose(got.grad_diffs, [e * (H @ g).norm().item() for e in etas], rtol=1e-10)
    assert got.beta == pytest.approx(((H @ g).norm() / g.norm()).item(), rel=1e-10)


def test_measuring_disturbs_neither_parameters_nor_buffers_nor_gradients_nor_rng_nor_mode():
    model = _model()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    model(x).sum().backward()  # gradients of a training step in progress
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    model.eval()
    rng = torch.get_rng_state()
    L.measure(model, x, y, loss="sparse_categorical_crossentropy", etas=[0.1, 1.0])
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


def test_probes_do_not_count_the_measurements_passes():
    model = _model()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    with Probes(model, every=1) as probe:
        L.measure(model, x, y, loss="sparse_categorical_crossentropy", etas=[0.1, 1.0])
    assert probe.counter == 0 and not probe.rows


def test_bad_step_sizes_are_refused():
    model = _model()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    for etas in ([], [0.1, -1.0], [math.nan]):
        with pytest.raises(ValueError, match="etas must be a non-empty list of finite step sizes >= 0"):
            L.measure(model, x, y, loss="sparse_categorical_crossentropy", etas=etas)


def test_etas_follow_the_learning_rate():
    assert L.etas_for(0.1) == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert L.etas_for(0.01, (1, 3)) == pytest.approx([0.01, 0.03])


def _fit(model, x, y, cb, epochs, initial_epoch=0):
    return T.fit(model, x, y, loss="sparse_categorical_crossentropy", optimizer={"name": "sgd", "lr": 0.1}, epochs=epochs,
                 batch_size=8, seed=0, verbose=0, callbacks=[cb], initial_epoch=initial_epoch)


def test_the_callback_writes_one_line_per_chosen_epoch_and_leaves_training_unchanged(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    plain = _model()
    h0 = _fit(plain, x, y, lambda *a: None, epochs=4)
    measured = _model()
    cb = L.landscape_callback(tmp_path / L.LANDSCAPE_JSONL, x, y, loss="sparse_categorical_crossentropy",
                              etas=[0.1, 0.5], batch_size=16, every=2, steps_per_epoch=4)
    h1 = _fit(measured, x, y, cb, epochs=4)
    assert h0.history == h1.history
    for a, b in zip(plain.state_dict().values(), measured.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rec = L.read_landscape(tmp_path)
    assert rec.epochs.tolist() == [2, 4] and rec.steps.tolist() == [8.0, 16.0]
    assert rec.losses.shape == (2, 2) and rec.etas.tolist() == [0.1, 0.5]
    assert np.allclose(rec.loss_range, rec.losses.max(1) - rec.losses.min(1))


def test_resuming_drops_the_later_lines_and_each_epoch_measures_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    kw = dict(loss="sparse_categorical_crossentropy", etas=[0.1, 0.5], batch_size=16, at=[1, 2, 3])
    whole = _model()
    _fit(whole, x, y, L.landscape_callback(tmp_path / "whole.jsonl", x, y, **kw), epochs=3)
    part = _model()
    _fit(part, x, y, L.landscape_callback(tmp_path / "part.jsonl", x, y, **kw), epochs=3)
    lines = (tmp_path / "part.jsonl").read_text().splitlines()
    (tmp_path / "part.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "st')  # a later line, cut mid-write
    # a resume after epoch 1: lines of epochs 2 and 3 go, and come back measured on the same batches
    point = json.loads(lines[1])
    L.landscape_callback(tmp_path / "part.jsonl", x, y, initial_epoch=1, **kw)
    assert [json.loads(t)["epoch"] for t in (tmp_path / "part.jsonl").read_text().splitlines()] == [1]
    assert point == json.loads((tmp_path / "whole.jsonl").read_text().splitlines()[1])


@pytest.mark.parametrize("text, error", [
    ('{"epoch": 1}\n', "expected the keys"),
    ("not json\n", "not a JSON line"),
])
def test_the_reader_rejects_malformed_lines(tmp_path, text, error):
    (tmp_path / L.LANDSCAPE_JSONL).write_text(text)
    with pytest.raises(ValueError, match=error):
        L.read_landscape(tmp_path)


def test_the_reader_checks_order_and_lengths_and_reads_diverged_values(tmp_path):
    line = {"epoch": 1, "step": None, "batch_size": 4, "loss": "nan", "grad_norm": 1.0, "etas": [0.1, 0.2],
            "losses": ["nan", 1.0], "grad_diffs": [0.5, "inf"], "loss_range": "nan", "beta": "inf"}
    path = tmp_path / L.LANDSCAPE_JSONL
    path.write_text(json.dumps(line) + "\n")
    rec = L.read_landscape(path)
    assert np.isnan(rec.losses[0, 0]) and np.isinf(rec.beta[0]) and np.isnan(rec.steps[0])
    path.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="epochs must increase"):
        L.read_landscape(path)
    path.write_text(json.dumps({**line, "losses": [1.0]}) + "\n")
    with pytest.raises(ValueError, match="1 losses for 2 step sizes"):
        L.read_landscape(path)
