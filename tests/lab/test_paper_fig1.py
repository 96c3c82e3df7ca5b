"""The original paper's Figure 1 network and recipes: shapes and parameter counts, the recipes' settings, a short
run through the library with probes and the landscape callback, its figures, and MNIST files in the real format."""

import numpy as np
import pytest
import torch
from torch import nn

from bnlab import lab
from bnlab.lab import landscape, plots
from bnlab.lab.analysis import ArmRecords, Experiment
from bnlab.lab.probes import read_probes


def _count(model, trainable):
    return sum(p.numel() for p in model.parameters() if p.requires_grad == trainable)


def test_the_network_is_784_100_100_100_10_sigmoid_with_bn_before_each_sigmoid():
    plain, with_bn = lab.build("paper_mlp", norm_layer=None), lab.build("paper_mlp")
    linears = [m for m in plain if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100), (100, 100), (100, 100), (100, 10)]
    assert _count(plain, True) == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10 == 99_710
    kinds = [type(m).__name__ for m in with_bn]
    assert kinds == ["Flatten"] + ["Linear", "BatchNorm", "Sigmoid"] * 3 + ["Linear", "Softmax"]
    assert all(m.bias is None for m in with_bn if isinstance(m, nn.Linear) and m.out_features == 100)  # BN's beta replaces it
    assert _count(with_bn, True) == 784 * 100 + 2 * 100 * 100 + 100 * 10 + 10 + 3 * 200 == 100_010
    assert sum(b.numel() for n, b in with_bn.named_buffers() if "running" in n) == 600
    out = with_bn(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10) and torch.allclose(out.sum(1), torch.ones(5))


def test_weights_are_small_gaussians_at_glorots_scale():
    torch.manual_seed(0)
    w = lab.build("paper_mlp", norm_layer=None)[1].weight.detach().double().numpy().ravel()  # 78,400 draws
    std = np.sqrt(2 / (784 + 100))
    assert w.std() == pytest.approx(std, rel=0.02)
    excess_kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2 - 3
    assert abs(excess_kurtosis) < 0.1  # Gaussian (0); Glorot's uniform draw would give -1.2


def test_the_recipes_run_the_papers_schedule():
    for name, dataset in (("paper-fig1", "mnist"), ("paper-fig1-digits28", "digits28")):
        r = lab.get(name)
        assert (r.dataset, r.model, r.batch_size, r.epochs * r.steps_per_epoch) == (dataset, "paper_mlp", 60, 50_000)
        assert (r.optimizer, r.learning_rate, r.loss, r.validation) == ("sgd", 0.1, "sparse_categorical_crossentropy", "test")
        assert "1502.03167" in r.notes and lab.Recipe.from_dict(r.to_dict()) == r
    assert lab.get("paper-fig1-digits28").offline and not lab.get("paper-fig1").offline


def _short_run(tmp_path, recipe, arm, seed):
    """What the CLI does for one arm and seed: run() records the recipe's probes and landscape into the run's directory."""
    rd = tmp_path / arm / f"seed-{seed}"
    rd.mkdir(parents=True)
    res = lab.run(recipe, arm=arm, seed=seed, records_dir=rd)
    return res, read_probes(rd), landscape.read_landscape(rd)


def test_a_short_run_of_the_digits28_recipe_with_probes_and_the_landscape(tmp_path):
    recipe = lab.with_overrides(lab.get("paper-fig1-digits28"), ["epochs=3", "steps_per_epoch=20", "probes=10", "landscape=1"])
    results = {arm: [_short_run(tmp_path, recipe, arm, seed) for seed in (0, 1)] for arm in lab.ARMS}
    for arm, runs in results.items():
        for res, probes, land in runs:
            assert len(res.history.history["val_accuracy"]) == 3 and 0 <= res.test["test_accuracy"] <= 1
            last = plots.last_activation_layer(probes.meta)
            assert last == ("9" if arm == "bn" else "6")  # the last hidden sigmoid
            steps, p50 = probes.series(last, "unit_p50")
            assert steps.tolist() == [0, 10, 20, 30, 40, 50] and np.isfinite(p50).all()
            assert land.steps.tolist() == [20.0, 40.0, 60.0] and np.isfinite(land.beta).all()
            assert ("2", "var_ratio") in probes.data if arm == "bn" else not any(q == "var_ratio" for _, q in probes.data)

    exp = Experiment(tmp_path, {"recipe": recipe.to_dict(), "seeds": [0, 1], "arms": list(lab.ARMS)}, {})
    for arm, runs in results.items():
        exp.arms[arm] = ArmRecords(arm, [0, 1], [r.history.history for r, _, _ in runs], [r.final() for r, _, _ in runs])
    fig = plots.fig1_figure(exp, {arm: [p for _, p, _ in runs] for arm, runs in results.items()})
    a, b, c = fig.axes
    means = [line for line in a.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in means] == ["with BN (n=2)", "without BN (n=2)"]
    assert all(list(line.get_xdata()) == [20, 40, 60] for line in means) and a.get_xlabel() == "training step"
    assert "unit 0 of layer '6'" in b.get_title() and "unit 0 of layer '9'" in c.get_title()
    assert b.get_ylim() == c.get_ylim()
    assert [line.get_label() for line in c.get_lines() if not line.get_label().startswith("_")] == ["p15 (n=2)", "p50 (n=2)", "p85 (n=2)"]
    assert [p.name for p in plots.plot_fig1(exp, {arm: [p for _, p, _ in runs] for arm, runs in results.items()}, tmp_path)] == ["fig1.png", "fig1.svg"]
    fig = plots.landscape_figure({arm: [land for _, _, land in runs] for arm, runs in results.items()}, "short")
    assert fig.axes[0].get_xlabel() == "training step" and len(fig.axes[2].get_lines()) == 2


def test_the_mnist_recipe_runs_on_files_in_the_real_format(tmp_path, monkeypatch):
    from bnlab.data import datasets as D

    from ..fakes import _fake_idx_set

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cache"))
    _, res = _fake_idx_set(tmp_path, n_train=120, n_test=30)
    monkeypatch.setitem(D.RESOURCES, "mnist", res)
    recipe = lab.with_overrides(lab.get("paper-fig1"), ["epochs=2", "steps_per_epoch=5"])
    for arm in lab.ARMS:
        r = lab.run(recipe, arm=arm, seed=0)
        assert len(r.history.history["val_accuracy"]) == 2 and 0.0 <= r.test["test_accuracy"] <= 1.0
        assert bool(lab.bn_layers(r.model)) == (arm == "bn")
