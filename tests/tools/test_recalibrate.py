"""recalibrate against closed-form NumPy population statistics."""

import numpy as np
import torch
from torch import nn

import bnlab


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g) * 2 + 1 for n in sizes]


def test_exact_population_statistics_over_uneven_batches():
    torch.manual_seed(0)
    lin = nn.Linear(3, 5)
    model = nn.Sequential(lin, bnlab.BatchNorm(num_features=5), nn.ReLU(), nn.Linear(5, 2), nn.BatchNorm1d(2))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    data = _batches([7, 3, 12, 2])
    model.eval()
    seen = bnlab.recalibrate(model, data)
    with torch.no_grad():
        h = torch.cat([lin(b) for b in data]).double().numpy()
    bn = model[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(0), rtol=1e-5, atol=1e-6)  # Keras face: biased
    assert seen["1"] == 24 and seen["4"] == 24
    assert not model.training and not bn.training  # modes restored
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v)  # weights untouched


def test_unbiased_for_pytorch_convention_and_num_batches():
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin, nn.BatchNorm1d(4))
    data = [(b, torch.zeros(len(b))) for b in _batches([5, 6, 8])]  # (x, y) tuples are fine
    bnlab.recalibrate(model, data, num_batches=2)
    with torch.no_grad():
        h = torch.cat([lin(b) for b, _ in data[:2]]).double().numpy()
    np.testing.assert_allclose(model[1].running_var.numpy(), h.var(0, ddof=1), rtol=1e-5, atol=1e-6)


def test_recalibration_repairs_stale_statistics():
    # The digits28-cnn pitfall: too few updates at momentum 0.99 leave the moving statistics near
    # their initial values. Recalibrating over the training set repairs inference.
    from bnlab import lab

    recipe = lab.with_overrides(lab.get("digits28-cnn"), ["epochs=8"])
    res = lab.run(recipe, arm="bn", seed=0)
    ds = lab.load_data(recipe)
    before = res.test["test_accuracy"]
    bnlab.recalibrate(res.model, ds.x_train.split(250))
    after = lab.evaluate(res.model, ds.x_test, ds.y_test, loss=recipe.loss, metrics=recipe.metrics)["accuracy"]
    assert before < 0.5 < 0.9 < after
