"""Probes: every recorded figure against a NumPy computation from independently captured inputs; counting;
training unchanged bit for bit; clean detaching; resuming; the reader's checks."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab.lab import records
from bnlab.lab import training as T
from bnlab.lab.probes import PROBES_CSV, Probes, read_probes, suspended


def _mlp(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), bnlab.BatchNorm(num_features=10), nn.Sigmoid(),          # 1 Keras BN (biased), 2 sigmoid
        nn.Linear(10, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Dropout(dropout),      # 4 torch BN (unbiased), 5 tanh
        nn.Linear(7, 5), bnlab.nn.BatchNormAct(num_features=5, activation="sigmoid"),  # 8 BN + sigmoid in one
        nn.Linear(5, 3), nn.ReLU(),                                                 # 10 relu
    )


def _capture(model, names):
    """Inputs of the named modules and every BN layer's buffers as they were before the module ran."""
    got, handles = {}, []
    for n, m in model.named_modules():
        if n in names:
            def hook(mod, args, n=n):
                bufs = {k: v.detach().clone() for k, v in mod.named_buffers()}
                got[n] = (args[0].detach().double().numpy().copy(), bufs)
            handles.append(m.register_forward_pre_hook(hook))
    return got, handles


def _rows(probe_rows, step):
    return {(layer, q): v for s, layer, q, v in probe_rows if s == step}


def _activation_expect(x, unit, saturating, pct=(15, 50, 85), thr=2.5, feature_axis=1):
    cols = np.moveaxis(x, feature_axis, -1).reshape(-1, x.shape[feature_axis])
    out = {f"p{p}": np.percentile(x, p) for p in pct}
    out.update({f"unit_p{p}": np.percentile(cols[:, unit], p) for p in pct})
    out.update(mean=x.mean(), std=x.std())
    if saturating:
        out["saturated"] = np.mean(np.abs(x) > thr)
    return out


def _bn_expect(x, mu, var, eps, gamma, beta):
    mb, vb = x.mean(0), x.var(0)  # biased: the variance training divides by
    return {"mean_diff": np.sqrt(np.mean((mb - mu) ** 2)), "mean_shift": np.sqrt(np.mean((mb - mu) ** 2 / (vb + eps))),
            "var_ratio": np.exp(np.mean(np.log((var + eps) / (vb + eps)))),
            "gamma_norm": np.linalg.norm(gamma), "beta_norm": np.linalg.norm(beta)}


def _check(rows, layer, expect):
    for q, v in expect.items():
        assert rows[(layer, q)] == pytest.approx(float(v), rel=2e-5, abs=2e-6), (layer, q)


def _drift_model():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):  # moving statistics and affine parameters away from their initial values
        opt.zero_grad()
        model(torch.randn(32, 6) * 2 + 1).sum().backward()
        opt.step()
    return model


def test_every_figure_equals_a_numpy_computation_from_captured_inputs():
    model = _drift_model()
    x = torch.randn(40, 6) * 3 + 0.5  # wide enough that some sigmoid/tanh inputs saturate
    got, handles = _capture(model, {"1", "2", "4", "5", "8", "10"})
    probe = Probes(model, every=1, unit={"2": 3, "5": 6, "8": 4, "10": 2})
    model(x)
    probe.remove()
    for h in handles:
        h.remove()
    rows = _rows(probe.rows, 0)
    np64 = lambda t: t.detach().double().numpy()  # noqa: E731

    for name, unit, sat in (("2", 3, True), ("5", 6, True), ("10", 2, False)):
        _check(rows, name, _activation_expect(got[name][0], unit, sat))
    assert ("10", "saturated") not in rows  # ReLU inputs do not saturate

    keras_bn, torch_bn = model[1], model[4]
    h, bufs = got["1"]
    _check(rows, "1", _bn_expect(h, np64(bufs["running_mean"]), np64(bufs["running_var"]), 1e-3, np64(keras_bn.weight), np64(keras_bn.bias)))
    h, bufs = got["4"]  # torch's layer: its moving variance is unbiased and compared as stored
    _check(rows, "4", _bn_expect(h, np64(bufs["running_mean"]), np64(bufs["running_var"]), 1e-5, np64(torch_bn.weight), np64(torch_bn.bias)))

    act = model[8]  # BatchNormAct: drift from its input, pre-activation = its BN output before the sigmoid
    h, bufs = got["8"]
    g, b = np64(act.weight), np64(act.bias)
    _check(rows, "8", _bn_expect(h, np64(bufs["running_mean"]), np64(bufs["running_var"]), 1e-3, g, b))
    pre = g * (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-3) + b
    _check(rows, "8", _activation_expect(pre, 4, True))
    # every figure of every layer is accounted for: nothing extra, nothing missing
    # BN 1, sigmoid 2, BN 4, tanh 5, BatchNormAct 8 (drift and pre-activation), relu 10 (no saturation)
    assert len(rows) == 5 + 9 + 5 + 9 + (5 + 9) + 8


def test_drift_uses_the_moving_statistics_from_before_the_batch_and_the_biased_batch_variance():
    # With momentum 0.5 the update moves the moving mean halfway to the batch mean: figures taken after the
    # update (or with the unbiased batch variance) differ by far more than the tolerance.
    torch.manual_seed(0)
    bn = bnlab.BatchNorm(num_features=3, momentum=0.5)
    model = nn.Sequential(nn.Linear(2, 3), bn)
    x = torch.randn(4, 2) * 3 + 2
    h = model[0](x).detach().double().numpy()
    probe = Probes(model, every=1)
    model(x)
    probe.remove()
    rows = _rows(probe.rows, 0)
    _check(rows, "1", _bn_expect(h, np.zeros(3), np.ones(3), 1e-3, np.ones(3), np.zeros(3)))
    meta = probe.meta()["layers"]["1"]
    assert meta["moving_variance"] == "biased" and meta["kinds"] == ["bn"]


def test_convolution_units_are_channels_and_torch_bn2d_is_declared_unbiased():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(5, 2, 6, 6)
    got, handles = _capture(model, {"1", "2"})
    probe = Probes(model, every=1, unit=3)
    model(x)
    probe.remove()
    rows = _rows(probe.rows, 0)
    _check(rows, "2", _activation_expect(got["2"][0], 3, False))
    h = np.moveaxis(got["1"][0], 1, -1).reshape(-1, 4)  # (N*H*W, C)
    _check(rows, "1", _bn_expect(h, np.zeros(4), np.ones(4), 1e-5, np.ones(4), np.zeros(4)))
    assert probe.meta()["layers"]["1"]["moving_variance"] == "unbiased"


def test_batchnormact_in_eval_uses_its_moving_statistics_when_eval_passes_are_asked_for():
    model = _drift_model().eval()
    x = torch.randn(16, 6)
    got, handles = _capture(model, {"8"})
    probe = Probes(model, every=1, count="all", layers=["8"])
    with torch.no_grad():
        model(x)
    probe.remove()
    act = model[8]
    h, bufs = got["8"]
    g, b = act.weight.detach().double().numpy(), act.bias.detach().double().numpy()
    pre = g * (h - bufs["running_mean"].double().numpy()) / np.sqrt(bufs["running_var"].double().numpy() + 1e-3) + b
    _check(_rows(probe.rows, 0), "8", _activation_expect(pre, 0, True))


def test_percentiles_of_large_layers_use_every_kth_value():
    model = nn.Sequential(nn.Identity(), nn.Sigmoid())
    x = torch.randn(100, 37)
    probe = Probes(model, every=1, max_values=1000)
    model(x)
    probe.remove()
    rows = _rows(probe.rows, 0)
    sample = x.reshape(-1)[:: int(np.ceil(x.numel() / 1000))].double().numpy()
    assert rows[("1", "p15")] == pytest.approx(np.percentile(sample, 15), rel=1e-6)
    assert rows[("1", "mean")] == pytest.approx(x.double().mean().item(), rel=1e-5)  # moments use every value


def test_only_training_passes_count_and_every_nth_is_recorded():
    model = _mlp()
    probe = Probes(model, every=3, layers=["2"])
    x = torch.randn(8, 6)
    for i in range(8):
        model.train()
        model(x)
        model.eval()
        model(x)  # evaluation: neither counted nor recorded
        model.train()
        with torch.no_grad():
            model(x)  # statistics re-estimation: not a training step
        with suspended():
            model(x)  # e.g. a landscape measurement
    probe.remove()
    assert probe.counter == 8
    assert sorted({r[0] for r in probe.rows}) == [0, 3, 6]

    manual = Probes(model, every=2, count="manual", layers=["2"])
    for _ in range(5):
        model(x)
        model(x)  # two passes per step (e.g. gradient accumulation): the step's first is recorded
        manual.step()
    manual.remove()
    assert sorted({r[0] for r in manual.rows}) == [0, 2, 4] and len(manual.rows) == 3 * 9

    everything = Probes(model.eval(), every=1, count="all", layers=["2"])
    with torch.no_grad():
        model(x)
    everything.remove()
    assert {r[0] for r in everything.rows} == {0}


def test_detaching_leaves_no_hooks_even_after_a_pass_that_raised():
    model = _mlp()

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    with Probes(model, every=1):
        model(torch.randn(4, 6))
        assert hooks() == 1  # between passes only the counting hook on the root
        with pytest.raises(RuntimeError):
            model(torch.randn(4, 5))  # wrong width: raises inside a recorded pass
        assert hooks() > 1
    assert hooks() == 0
    probe = Probes(model, every=1)
    probe.remove()
    assert hooks() == 0


class _Boom(nn.Module):
    armed = True

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_a_pass_that_raised_leaves_no_partial_figures():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), _Boom(), nn.Tanh())
    probe = Probes(model, every=1)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(5, 3))  # step 0: the sigmoid's figures are taken, then the pass fails
    model[2].armed = False
    model(torch.randn(5, 3))  # step 1
    probe.remove()
    assert {(step, layer) for step, layer, *_ in probe.rows} == {(1, "1"), (1, "3")}


def _train(model, x, y, probe_path=None, every=1, epochs=3):
    probe = Probes(model, probe_path, every=every) if probe_path is not None else None
    try:
        # mse on one-hot targets: the ReLU head can output all zeros, which sparse cross-entropy (it normalizes the
        # outputs) turns into a NaN loss, and a non-finite loss ends training (fit's divergence rule)
        hist = T.fit(model, x, torch.nn.functional.one_hot(y, 3).float(), loss="mse", optimizer={"name": "sgd", "lr": 0.3},
                     metrics=["mae"], epochs=epochs, batch_size=16, seed=3, verbose=0)
    finally:
        if probe is not None:
            probe.remove()
    return hist


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_training_is_bit_identical_with_probes_attached(tmp_path, dropout):
    torch.manual_seed(1)
    x, y = torch.randn(80, 6) * 2, torch.randint(0, 3, (80,))
    plain, probed = _mlp(dropout), _mlp(dropout)
    h0 = _train(plain, x, y)
    h1 = _train(probed, x, y, tmp_path / PROBES_CSV, every=1)  # recording every step: the most the hooks can do
    records.write_history(tmp_path / "a.csv", h0.history)
    records.write_history(tmp_path / "b.csv", h1.history)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    for (k, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert len(read_probes(tmp_path).series("2", "p50")[0]) == 3 * 5  # 80 / 16 = 5 steps per epoch


def test_recorded_passes_draw_no_random_numbers():
    model = _mlp(0.5)  # dropout draws from the global generator, the probes must not
    x = torch.randn(8, 6)
    before = torch.get_rng_state()
    with Probes(model, every=1):
        model(x)
    probed = torch.get_rng_state()
    torch.set_rng_state(before)
    model(x)
    assert torch.equal(probed, torch.get_rng_state())


def test_a_resumed_run_appends_the_same_rows_as_an_uninterrupted_one(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(12, 6) for _ in range(10)]

    def steps(model, probe, batches):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in batches:
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()

    whole = tmp_path / "whole" / PROBES_CSV
    model = _mlp()
    with Probes(model, whole, every=2) as p:
        steps(model, p, xs)

    part = tmp_path / "part" / PROBES_CSV
    model = _mlp()
    with Probes(model, part, every=2) as p:
        steps(model, p, xs[:5])
        checkpoint = (copy.deepcopy(model.state_dict()), p.state_dict())
        steps(model, p, xs[5:8])  # recorded steps 6 after the checkpoint, then the run is killed ...
    with open(part, "a") as f:
        f.write("8,2,p1")  # ... in the middle of a write
    assert read_probes(part).partial
    resumed = _mlp()
    resumed.load_state_dict(checkpoint[0])
    p = Probes(resumed, part, every=2)
    p.load_state_dict(checkpoint[1])
    steps(resumed, p, xs[5:])
    p.remove()
    assert part.read_bytes() == whole.read_bytes()
    assert sorted(set(read_probes(part).series("2", "p50")[0].tolist())) == [0, 2, 4, 6, 8]


def test_resuming_with_other_settings_is_refused_and_a_fresh_start_clears_the_file(tmp_path):
    model = _mlp()
    with Probes(model, tmp_path / PROBES_CSV, every=1):
        model(torch.randn(4, 6))
    with pytest.raises(ValueError, match="other probe settings"):
        Probes(model, tmp_path / PROBES_CSV, every=2, step=1)
    Probes(model, tmp_path / PROBES_CSV, every=2).remove()
    assert (tmp_path / PROBES_CSV).read_text() == "step,layer,quantity,value\n"


def test_bad_settings_are_refused_with_what_was_expected():
    model = _mlp()
    with pytest.raises(ValueError, match="every must be a positive int"):
        Probes(model, every=0)
    with pytest.raises(ValueError, match=r"percentiles must be numbers in \[0, 100\]"):
        Probes(model, percentiles=(15, 150))
    with pytest.raises(ValueError, match=r"layers \['0'\] are not activation or BN modules"):
        Probes(model, layers=["0"])
    with pytest.raises(ValueError, match="count must be one of"):
        Probes(model, count="sometimes")
    with pytest.raises(ValueError, match=r"unit names layers that are not probed: \['5'\]"):
        Probes(model, layers=["2"], unit={"2": 1, "5": 0})
    probe = Probes(model, every=1, unit=99, layers=["2"])
    with pytest.raises(ValueError, match="probe unit 99 is out of range for layer '2' with 10 units"):
        model(torch.randn(4, 6))
    probe.remove()


@pytest.mark.parametrize("text, error", [
    ("step,layer,value\n", "expected the header line"),
    ("step,layer,quantity,value\n0,1,p15\n", "expected 4 fields"),
    ("step,layer,quantity,value\nx,1,p15,0.5\n", "expected an int step and a float value"),
    ("step,layer,quantity,value\n2,2,p15,0.5\n1,2,p15,0.5\n", "steps must not decrease"),
    ("step,layer,quantity,value\n2,2,p15,0.5\n2,2,p15,0.6\n", "recorded twice"),
    ("step,layer,quantity,value\n2,9,p15,0.5\n", "layer '9' is not in probes.json"),
])
def test_the_reader_rejects_malformed_records(tmp_path, text, error):
    model = _mlp()
    Probes(model, tmp_path / PROBES_CSV, layers=["2"]).remove()  # writes probes.json
    (tmp_path / PROBES_CSV).write_text(text)
    with pytest.raises(ValueError, match=error):
        read_probes(tmp_path)


def test_the_reader_keeps_diverged_values_and_names_missing_series(tmp_path):
    (tmp_path / PROBES_CSV).write_text("step,layer,quantity,value\n0,2,p50,nan\n5,2,p50,inf\n")
    rec = read_probes(tmp_path / PROBES_CSV)
    steps, values = rec.series("2", "p50")
    assert steps.tolist() == [0, 5] and np.isnan(values[0]) and np.isinf(values[1])
    with pytest.raises(KeyError, match=r"no 'p15' for layer '2'; it has quantities \['p50'\]"):
        rec.series("2", "p15")


def test_a_frozen_batchnormact_is_probed_with_the_moving_statistics_it_normalizes_with():
    # Keras: trainable=False runs the layer in inference mode even while the model trains; the recorded
    # pre-activation must be the one the sigmoid gets (moving statistics), not the batch-normalized one.
    torch.manual_seed(0)
    act = bnlab.nn.BatchNormAct(num_features=4, activation="sigmoid")
    model = nn.Sequential(nn.Linear(3, 4), act)
    for _ in range(5):
        model(torch.randn(32, 3) * 3 + 2)  # moving statistics away from the batch's
    act.trainable = False
    x = torch.randn(16, 3)
    got, handles = _capture(model, {"1"})
    probe = Probes(model, every=1, layers=["1"])
    out = model(x)
    probe.remove()
    for h in handles:
        h.remove()
    h, bufs = got["1"]
    g, b = act.weight.detach().double().numpy(), act.bias.detach().double().numpy()
    pre = g * (h - bufs["running_mean"].double().numpy()) / np.sqrt(bufs["running_var"].double().numpy() + 1e-3) + b
    assert np.allclose(torch.sigmoid(torch.from_numpy(pre)).numpy(), out.detach().double().numpy(), atol=1e-6)  # what ran
    _check(_rows(probe.rows, 0), "1", _activation_expect(pre, 0, True))


@pytest.mark.parametrize("meta", ["[1, 2]\n", '{"format": "bnlab-probes/1", "layers": [1]}\n'])
def test_the_reader_names_a_probes_json_that_is_not_what_probes_write(tmp_path, meta):
    (tmp_path / PROBES_CSV).write_text("step,layer,quantity,value\n0,1,p50,0.5\n")
    (tmp_path / "probes.json").write_text(meta)
    with pytest.raises(ValueError, match=r"probes.json: expected a JSON object with a 'layers' object"):
        read_probes(tmp_path)
