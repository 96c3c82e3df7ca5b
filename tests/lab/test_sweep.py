"""Sweeps: grid parsing (and its errors), the norm mapping, learning-rate scaling, cell ids, aggregation against
a direct t interval, and the batch-size plot."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from bnlab import lab
from bnlab.lab import plots, sweep
from bnlab.lab.sweep import SweepError


def test_a_grid_spec_parses_into_ordered_keys_and_values():
    assert sweep.parse_grid("batch_size=2,4,8 norm=bn,renorm,ghost,none") == {
        "batch_size": ["2", "4", "8"], "norm": ["bn", "renorm", "ghost", "none"]}
    assert sweep.parse_grid(["batch_size=2,4", "epochs=3"]) == {"batch_size": ["2", "4"], "epochs": ["3"]}


@pytest.mark.parametrize("spec, error", [
    ("", "empty grid"),
    ("batch_size", r"grid item 'batch_size': expected key=v1,v2"),
    ("=2,4", "expected key=v1,v2"),
    ("batchsize=2,4", "grid key 'batchsize': expected norm or a recipe field"),
    ("batch_size=2,,4", "empty value"),
    ("batch_size=2,4 batch_size=8", "given twice"),
    ("norm=bn,bn", r"repeats \['bn'\]"),
])
def test_bad_grid_specs_say_what_was_expected(spec, error):
    with pytest.raises(SweepError, match=error):
        sweep.parse_grid(spec)


def test_cells_map_norms_to_layers_and_arms_and_scale_the_learning_rate_linearly():
    recipe = lab.get("digits28-cnn")  # Adam with Keras' default rate 1e-3 at batch 250
    cells = sweep.plan(recipe, "batch_size=2,16,128 norm=bn,renorm,ghost,none", lr_scaling="linear")
    assert len(cells) == 12
    by_id = {c.id: c for c in cells}
    assert list(by_id)[:4] == ["batch_size=2+norm=bn", "batch_size=2+norm=renorm", "batch_size=2+norm=ghost", "batch_size=2+norm=none"]
    c = by_id["batch_size=128+norm=ghost"]
    assert (c.arm, c.recipe.norm, c.recipe.batch_size, c.same_as) == ("bn", "ghost:16", 128, None)
    assert c.recipe.learning_rate == pytest.approx(1e-3 * 128 / 250)
    assert by_id["batch_size=16+norm=ghost"].same_as == "batch_size=16+norm=bn"  # ghost batch >= batch: plain BN
    assert all(c.same_as is None for c in sweep.plan(recipe, "batch_size=2,16 norm=ghost,none"))  # no bn cell to point at
    assert (by_id["batch_size=2+norm=none"].arm, by_id["batch_size=2+norm=bn"].recipe.norm) == ("no_bn", "bnlab")
    assert by_id["batch_size=2+norm=renorm"].recipe.norm == "renorm"
    assert by_id["batch_size=2+norm=bn"].settings == {"batch_size": 2, "norm": "bn"}
    assert recipe.learning_rate is None  # the registry's recipe is untouched


def test_learning_rate_scaling_options():
    recipe = lab.with_overrides(lab.get("blobs"), {"learning_rate": 0.01, "batch_size": 300})
    lr = lambda cells: [c.recipe.learning_rate for c in cells]  # noqa: E731
    assert lr(sweep.plan(recipe, "batch_size=75,1200", lr_scaling="linear")) == pytest.approx([0.0025, 0.04])
    assert lr(sweep.plan(recipe, "batch_size=75,1200", lr_scaling="sqrt")) == pytest.approx([0.005, 0.02])
    assert lr(sweep.plan(recipe, "batch_size=75,1200", lr_scaling="none")) == pytest.approx([0.01, 0.01])
    assert lr(sweep.plan(recipe, "batch_size=75", base_batch_size=150, lr_scaling="linear")) == pytest.approx([0.005])
    assert lr(sweep.plan(recipe, "batch_size=75,1200 learning_rate=0.3")) == pytest.approx([0.3, 0.3])  # set: not scaled
    with pytest.raises(SweepError, match="lr_scaling must be one of auto, linear, sqrt, none, got 'cubic'"):
        sweep.plan(recipe, "batch_size=75", lr_scaling="cubic")
    with pytest.raises(SweepError, match="base_batch_size must be a positive int, got 0"):
        sweep.plan(recipe, "batch_size=75", base_batch_size=0)


def test_auto_scaling_is_linear_for_sgd_and_square_root_for_adam_and_rmsprop():
    lr = lambda recipe, **k: [c.recipe.learning_rate for c in sweep.plan(recipe, "batch_size=2,250", **k)]  # noqa: E731
    adam = lab.get("digits28-cnn")  # Adam, Keras' 1e-3, batch 250
    assert lr(adam) == pytest.approx([1e-3 * (2 / 250) ** 0.5, 1e-3])
    assert lr(lab.with_overrides(adam, {"optimizer": "rmsprop"})) == pytest.approx([1e-3 * (2 / 250) ** 0.5, 1e-3])
    sgd = lab.with_overrides(lab.get("paper-fig1-digits28"), {"batch_size": 250})  # SGD at 0.1
    assert lr(sgd) == pytest.approx([0.1 * 2 / 250, 0.1])
    assert lr(adam, base_batch_size=2) == pytest.approx([1e-3, 1e-3 * (250 / 2) ** 0.5])
    assert sweep.scaling_for(adam) == "sqrt" and sweep.scaling_for(sgd) == "linear" and sweep.scaling_for(adam, "none") == "none"
    assert sweep.base_learning_rate(lab.get("diabetes")) == pytest.approx(1e-3)  # Adam's Keras default
    assert sweep.base_learning_rate(lab.get("paper-fig1")) == pytest.approx(0.1)


def test_a_grid_over_the_optimizer_scales_each_cells_own_rate_by_its_own_rule():
    cells = {c.id: c for c in sweep.plan(lab.get("digits28-cnn"), "batch_size=25,250 optimizer=adam,sgd")}
    adam, sgd = cells["batch_size=25+optimizer=adam"], cells["batch_size=25+optimizer=sgd"]
    assert (adam.lr_scaling, adam.base_learning_rate) == ("sqrt", pytest.approx(1e-3))  # Keras' Adam default, root rule
    assert adam.recipe.learning_rate == pytest.approx(1e-3 * (25 / 250) ** 0.5)
    assert (sgd.recipe.optimizer, sgd.lr_scaling, sgd.base_learning_rate) == ("sgd", "linear", pytest.approx(0.01))
    assert sgd.recipe.learning_rate == pytest.approx(0.01 * 25 / 250)  # Keras' SGD default, linear rule
    assert cells["batch_size=250+optimizer=sgd"].recipe.learning_rate == pytest.approx(0.01)
    fixed = sweep.plan(lab.get("digits28-cnn"), "optimizer=adam,sgd learning_rate=0.05")
    assert [(c.lr_scaling, c.recipe.learning_rate) for c in fixed] == [("none", 0.05), ("none", 0.05)]  # the grid sets it


def test_without_norm_in_the_grid_the_recipes_own_layer_stays():
    recipe = lab.with_overrides(lab.get("blobs"), {"norm": "torch"})
    (cell,) = sweep.plan(recipe, "epochs=3")
    assert (cell.arm, cell.recipe.norm, cell.recipe.epochs, cell.id) == ("bn", "torch", 3, "epochs=3")
    ids = [c.id for c in sweep.plan(recipe, "batch_size=8,16 epochs=3 norm=bn,ghost")]  # one value: not in the id
    assert ids == ["batch_size=8+norm=bn", "batch_size=8+norm=ghost", "batch_size=16+norm=bn", "batch_size=16+norm=ghost"]
    assert sweep.plan(recipe, "batch_size=8,16 epochs=3 norm=bn,ghost")[1].same_as == "batch_size=8+norm=bn"


def test_bad_cell_values_are_refused_with_the_cell_named():
    with pytest.raises(SweepError, match=r"cell batch_size=two: batch_size='two': expected an int"):
        sweep.plan(lab.get("blobs"), "batch_size=two")
    with pytest.raises(SweepError, match="norm='layernorm': expected one of"):
        sweep.plan(lab.get("blobs"), "norm=bn,layernorm")
    with pytest.raises(SweepError, match="ghost_batch must be a positive int"):
        sweep.plan(lab.get("blobs"), "norm=ghost", ghost_batch=0)


def test_cell_ids_are_safe_directory_names_and_unique():
    (cell,) = sweep.plan(lab.get("blobs"), "norm=ghost:8")
    assert cell.id == "norm=ghost-8" and cell.recipe.norm == "ghost:8"
    assert sweep.cell_id({"batch_size": 4, "norm": "a/b c"}) == "batch_size=4+norm=a-b-c"
    with pytest.raises(SweepError, match="two cells have the id 'learning_rate=0.1'"):
        sweep.plan(lab.get("blobs"), "learning_rate=0.1,0.10")  # two spellings, one value, one directory


def _t_interval(v, level=0.95):
    v = np.asarray(v, float)
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return v.mean(), v.mean() - half, v.mean() + half


def test_aggregation_gives_mean_and_t_interval_per_group_and_counts_diverged_runs():
    runs = []
    rng = np.random.default_rng(0)
    for norm in ("bn", "none"):
        for bs in (2, 8):
            for seed in range(4):
                acc = float(rng.uniform(0.5, 1.0))
                runs.append(({"batch_size": bs, "norm": norm}, seed, {"val_accuracy": acc, "loss": 1.0}))
    runs.append(({"batch_size": 2, "norm": "bn"}, 4, {"val_accuracy": math.nan}))  # a non-finite figure
    runs.append(({"batch_size": 8, "norm": "none"}, 4, {"diverged_epoch": 3, "loss": 1.0}))  # final.json of a diverged run: no figures
    rows = sweep.aggregate(runs, "val_accuracy")
    assert [(r["norm"], r["batch_size"]) for r in rows] == [("bn", 2), ("bn", 8), ("none", 2), ("none", 8)]
    for r in rows:
        vals = [f.get("val_accuracy", math.nan) for s, _, f in runs if (s["norm"], s["batch_size"]) == (r["norm"], r["batch_size"])]
        finite = [v for v in vals if math.isfinite(v)]
        assert (r["mean"], r["low"], r["high"]) == pytest.approx(_t_interval(finite), rel=1e-12)
        assert r["n"] == len(vals) and r["nonfinite"] == len(vals) - len(finite)
    assert rows[0]["nonfinite"] == 1 and math.isnan(rows[0]["values"][-1])
    assert rows[3]["nonfinite"] == 1 and rows[3]["n"] == 5 and math.isnan(rows[3]["values"][-1])
    one = sweep.aggregate(runs[:1], "val_accuracy")[0]
    assert one["mean"] == runs[0][2]["val_accuracy"] and math.isnan(one["low"])  # one seed: no interval
    with pytest.raises(SweepError, match="has no final 'test_accuracy'"):
        sweep.aggregate(runs, "test_accuracy")


def test_the_default_metric_is_the_test_figure_of_the_recipes_kind():
    assert sweep.default_metric(lab.get("digits28-cnn")) == "test_accuracy"
    assert sweep.default_metric(lab.get("diabetes")) == "test_loss"
    assert sweep.default_metric(lab.get("bn-params")) == "val_loss"  # no test evaluation


def test_mean_interval_is_the_one_sample_t_interval():
    v = [0.91, 0.93, 0.88, 0.95, 0.9]
    assert sweep.mean_interval(v) == pytest.approx(_t_interval(v), rel=1e-12)
    assert sweep.mean_interval(v, 0.8) == pytest.approx(_t_interval(v, 0.8), rel=1e-12)


def test_batch_size_plot_has_a_log2_axis_and_one_line_per_norm(tmp_path):
    rows = sweep.aggregate(
        [({"batch_size": bs, "norm": n}, s, {"acc": 0.9 - 0.1 / bs + 0.01 * s}) for n in ("bn", "renorm", "none")
         for bs in (2, 4, 8) for s in range(3)], "acc")
    fig = plots.batch_size_figure(rows, "acc")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["BN (n=3)", "batch renorm (n=3)", "no BN (n=3)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8"]
    paths = plots.plot_batch_size(rows, "acc", tmp_path)
    assert [p.name for p in paths] == ["batch-size-acc.png", "batch-size-acc.svg"] and all(p.stat().st_size for p in paths)


def test_sweep_json_keeps_the_asked_rule_and_each_cells_own_and_is_planned_again_the_same(tmp_path):
    from bnlab.lab import diagnostics_report, experiment, records

    def write(root, grid, **changes):
        cfg = experiment.sweep_config(lab.get("digits28-cnn"), grid, seeds=[0], lr_scaling="auto", base_batch_size=None,
                                      ghost_batch=16, metric="test_accuracy")
        records.write_json(root / "sweep.json", {**cfg, **changes})
        return cfg

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write(mixed, "batch_size=25,250 optimizer=adam,sgd")
    cfg, cells = experiment.read_sweep(mixed)
    assert cfg["lr_scaling"] == "auto" and cfg["format"] == "bnlab-sweep/2"  # as asked: resolved again per cell on resume
    assert [(c["lr_scaling"], c["base_learning_rate"]) for c in cfg["cells"]] == [("sqrt", 1e-3), ("linear", 0.01)] * 2
    assert [c["learning_rate"] for c in cfg["cells"]] == [c.recipe.learning_rate for c in cells]
    diagnostics_report.build_sweep_report(mixed)
    assert ("learning rate scaled by each cell's optimizer (auto) from its rate at batch 250: sqrt from 0.001 in 2 cells, "
            "linear from 0.01 in 2 cells") in (mixed / "report.md").read_text()

    damaged = json.loads((mixed / "sweep.json").read_text())
    damaged["cells"][1]["learning_rate"] = 1e-3 * (25 / 250) ** 0.5  # what the base recipe's rule and rate gave
    records.write_json(mixed / "sweep.json", damaged)
    with pytest.raises(records.RecordError, match="records other settings, learning rates or rules for its cells"):
        experiment.read_sweep(mixed)

    old = tmp_path / "old"  # format 1: the base recipe's resolved rule, no rule or rate per cell
    old.mkdir()
    cfg = write(old, "batch_size=25,250 norm=bn,none", format="bnlab-sweep/1", lr_scaling="sqrt")
    records.write_json(old / "sweep.json", {**json.loads((old / "sweep.json").read_text()),
                                            "cells": [{k: v for k, v in c.items() if k not in ("lr_scaling", "base_learning_rate")}
                                                      for c in cfg["cells"]]})
    got, _ = experiment.read_sweep(old)
    assert [(c["lr_scaling"], c["base_learning_rate"], c["learning_rate"]) for c in got["cells"]] == [
        (c["lr_scaling"], c["base_learning_rate"], c["learning_rate"]) for c in cfg["cells"]]
    diagnostics_report.build_sweep_report(old)
    assert "learning rate sqrt-scaled from the recipe's 0.001 at batch 250" in (old / "report.md").read_text()
    with pytest.raises(experiment.ExperimentError, match="a sweep of an older bnlab .* can be reported and merged, not continued"):
        experiment._prepare_sweep_dir(old, cfg, [c["id"] for c in cfg["cells"]], resume=True, overwrite=False)


def test_an_accuracy_band_is_drawn_within_0_and_1():
    rows = sweep.aggregate([({"batch_size": bs, "norm": "bn"}, s, {"test_accuracy": v})
                            for bs, vals in ((64, (0.1, 0.5, 0.9)), (128, (0.97, 0.99, 0.995))) for s, v in enumerate(vals)],
                           "test_accuracy")
    assert rows[0]["low"] < 0 or rows[1]["high"] > 1  # the t interval itself reaches past [0, 1] here
    ax = plots.batch_size_figure(rows, "test_accuracy").axes[0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0 and band.max() <= 1.0
    loss_rows = sweep.aggregate([({"batch_size": bs, "norm": "bn"}, s, {"test_loss": v - 0.8})
                                 for bs, vals in ((64, (0.1, 0.5, 0.9)),) for s, v in enumerate(vals)], "test_loss")
    band = plots.batch_size_figure(loss_rows, "test_loss").axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() < 0  # other metrics: as computed
