"""Recipes: the registry, overrides, and every offline recipe end to end on reduced epochs."""

import pytest

from bnlab import lab
from bnlab.data import OFFLINE


def test_registry_covers_every_tutorial_experiment():
    expected = {"diabetes", "cifar10-sigmoid", "bn-params", "blobs", "blobs-scratch", "blobs-deep",
                "kmnist-cnn", "mnist-mlp", "digits28-mlp", "digits28-cnn", "paper-fig1", "paper-fig1-digits28"}
    assert set(lab.names()) == expected
    assert {r.tutorial for r in lab.RECIPES.values()} == {"000", "001", "002", "003", "004", "paper"}
    d = lab.get("diabetes")
    assert (d.epochs, d.batch_size, d.validation_split, d.optimizer, d.loss) == (100, 64, 0.15, "adam", "mse")
    assert d.reported["bn"]["val_loss"] == 0.6657


def test_overrides_are_type_checked():
    r = lab.with_overrides(lab.get("blobs"), ["epochs=3", "batch_size=50", "learning_rate=0.1", "augment=false", "steps_per_epoch=none"])
    assert (r.epochs, r.batch_size, r.learning_rate, r.augment, r.steps_per_epoch) == (3, 50, 0.1, False, None)
    with pytest.raises(lab.OverrideError, match=r"epochs='ten': expected an int"):
        lab.with_overrides(r, ["epochs=ten"])
    with pytest.raises(lab.OverrideError, match="unknown override 'epoch'. Did you mean epochs"):
        lab.with_overrides(r, ["epoch=3"])
    with pytest.raises(lab.OverrideError, match="key=value"):
        lab.with_overrides(r, ["epochs"])
    with pytest.raises(lab.OverrideError, match="batch_size=0: expected an int >= 1"):
        lab.with_overrides(r, ["batch_size=0"])


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean 'blobs'"):
        lab.get("blob")


OFFLINE_RECIPES = [n for n, r in lab.RECIPES.items() if r.dataset in OFFLINE]


@pytest.mark.parametrize("name", OFFLINE_RECIPES)
@pytest.mark.parametrize("arm", lab.ARMS)
def test_offline_recipe_runs_end_to_end(name, arm):
    recipe = lab.with_overrides(lab.get(name), ["epochs=2"])
    res = lab.run(recipe, arm=arm, seed=0)
    h = res.history.history
    assert len(h["loss"]) == 2 and all(v == v for v in h["loss"])  # two finite epochs
    if recipe.evaluate_test:
        assert "test_loss" in res.test
    has_bn = bool(lab.bn_layers(res.model))
    assert has_bn == (arm == "bn")
    if recipe.check == "recompute" and arm == "bn":
        assert res.checks["recompute_max_abs_diff"] < 1e-5


def test_bn_params_hand_recomputation_full_length():
    res = lab.run(lab.get("bn-params"), arm="bn", seed=0)
    assert res.checks["recompute_max_abs_diff"] < 1e-5
    (layer,) = lab.inspect_bn(res.model, lab.load_data(lab.get("bn-params")).x_train)
    assert layer["moving_variance"].shape == (4,) and layer["epsilon"] == 0.001


@pytest.mark.parametrize("name", ["mnist-mlp", "kmnist-cnn", "cifar10-sigmoid"])
def test_download_backed_recipes_run_on_files_in_the_real_formats(name, tmp_path, monkeypatch):
    from bnlab.data import datasets as D

    from ..fakes import _fake_cifar, _fake_idx_set

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cache"))
    recipe = lab.get(name)
    if recipe.dataset == "cifar10":
        *_, res = _fake_cifar(tmp_path, per_batch=8)
        monkeypatch.setitem(D.RESOURCES, "cifar10", {"archive": res})
    else:
        _, res = _fake_idx_set(tmp_path, n_train=40, n_test=10)
        monkeypatch.setitem(D.RESOURCES, recipe.dataset, res)
    overrides = ["epochs=2", "batch_size=8"] + (["steps_per_epoch=3"] if recipe.steps_per_epoch else [])
    for arm in lab.ARMS:
        r = lab.run(lab.with_overrides(recipe, overrides), arm=arm, seed=0)
        assert len(r.history.history["loss"]) == 2 and "val_accuracy" in r.history.history
        assert 0.0 <= r.test["test_accuracy"] <= 1.0


@pytest.mark.parametrize("norm", ["renorm", "ghost:32", "torch", "scratch-bnlab"])
def test_norm_overrides_swap_the_bn_layer(norm):
    r = lab.with_overrides(lab.get("blobs"), ["epochs=2", f"norm={norm}"])
    res = lab.run(r, arm="bn", seed=0)
    layer = lab.bn_layers(res.model)[0][1]
    if norm == "renorm":
        assert layer.renorm and len(layer.get_weights()) == 7
    if norm.startswith("ghost"):
        assert layer.virtual_batch_size == 32
    assert len(res.history.history["loss"]) == 2


def test_bad_norm_override():
    with pytest.raises(lab.OverrideError, match="ghost:K"):
        lab.with_overrides(lab.get("blobs"), ["norm=ghost:x"])
    with pytest.raises(lab.OverrideError, match="expected one of"):
        lab.with_overrides(lab.get("blobs"), ["norm=layernorm"])
