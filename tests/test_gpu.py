"""CUDA checks: the layer and a whole recipe on the GPU agree with the CPU. Skipped without CUDA."""

import pytest
import torch

import bnlab

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("shape,axis", [((64, 32), -1), ((8, 16, 5, 5), 1), ((8, 5, 5, 16), -1)])
def test_layer_on_cuda_matches_cpu(shape, axis):
    torch.manual_seed(0)
    cpu = bnlab.BatchNorm(axis=axis)
    x = torch.randn(shape) * 3 + 1
    y_cpu = cpu(x)
    gpu = bnlab.BatchNorm(axis=axis).cuda()
    y_gpu = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu.moving_variance.cpu(), cpu.moving_variance, atol=1e-6, rtol=1e-5)
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    gpu(x_bad.cuda())
    assert torch.isfinite(gpu.moving_mean).all() and torch.isfinite(gpu.moving_variance).all()


def test_recipe_runs_on_cuda():
    from bnlab import lab

    r = lab.with_overrides(lab.get("digits28-mlp"), ["epochs=2"])
    res = lab.run(r, arm="bn", seed=0, device="cuda")
    assert len(res.history.history["loss"]) == 2 and 0 <= res.test["test_accuracy"] <= 1
