"""Synchronized BN over two gloo processes equals one process on the concatenated batch."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnlab

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

C = 4


def _global_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(n, C, 3, generator=g, dtype=torch.float64)
    return x, dy


def _worker(rank, init, out_dir, splits, unbiased):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        x, dy = _global_batch(sum(splits))
        lo = sum(splits[:rank])
        xs, dys = x[lo : lo + splits[rank]].clone().requires_grad_(), dy[lo : lo + splits[rank]]
        bn = bnlab.BatchNorm(axis=1, num_features=C, synchronized=True, momentum=0.8, dtype=torch.float64,
                             moving_variance_estimator="unbiased" if unbiased else "biased",
                             gamma_initializer=bnlab.initializers.Constant(1.5), beta_initializer=bnlab.initializers.Constant(0.3))
        for _ in range(2):
            y = bn(xs)
            y.backward(dys)
        grads = torch.stack([bn.gamma.grad, bn.beta.grad])
        dist.all_reduce(grads)  # what DDP does to parameter gradients (summed here)
        np.save(os.path.join(out_dir, f"y{rank}.npy"), y.detach().numpy())
        np.save(os.path.join(out_dir, f"dx{rank}.npy"), xs.grad.numpy())
        np.save(os.path.join(out_dir, f"stats{rank}.npy"), np.stack([bn.moving_mean.numpy(), bn.moving_variance.numpy()]))
        np.save(os.path.join(out_dir, f"grads{rank}.npy"), grads.numpy())
        bn.running_mean.fill_(float(rank))
        bnlab.sync_running_stats(bn)  # average over ranks: 0.5
        np.save(os.path.join(out_dir, f"synced{rank}.npy"), bn.moving_mean.numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("splits,unbiased", [((5, 3), False), ((4, 4), True), ((6, 0), False)], ids=["uneven", "even-unbiased", "one-empty"])
def test_two_processes_equal_one_on_the_concatenated_batch(splits, unbiased, tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(init, str(tmp_path), splits, unbiased), nprocs=2, join=True)
    x, dy = _global_batch(sum(splits))
    x = x.clone().requires_grad_()
    ref = bnlab.BatchNorm(axis=1, num_features=C, momentum=0.8, dtype=torch.float64,
                          moving_variance_estimator="unbiased" if unbiased else "biased",
                          gamma_initializer=bnlab.initializers.Constant(1.5), beta_initializer=bnlab.initializers.Constant(0.3))
    for _ in range(2):
        y = ref(x)
        y.backward(dy)
    y_ranks = np.concatenate([np.load(tmp_path / f"y{r}.npy") for r in range(2)])
    dx_ranks = np.concatenate([np.load(tmp_path / f"dx{r}.npy") for r in range(2)])
    np.testing.assert_allclose(y_ranks, y.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(dx_ranks, x.grad.numpy(), atol=1e-10)
    for r in range(2):
        stats = np.load(tmp_path / f"stats{r}.npy")
        np.testing.assert_allclose(stats[0], ref.moving_mean.numpy(), atol=1e-12)
        np.testing.assert_allclose(stats[1], ref.moving_variance.numpy(), atol=1e-12)
        grads = np.load(tmp_path / f"grads{r}.npy")
        np.testing.assert_allclose(grads[0], ref.gamma.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(grads[1], ref.beta.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(np.load(tmp_path / f"synced{r}.npy"), 0.5)


def test_single_process_is_plain_bn_and_convert_sync():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    synced = bnlab.convert_sync(model)
    assert isinstance(synced[1], bnlab.nn.BatchNorm1d) and synced[1].synchronized
    x = torch.randn(8, 3)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ref.load_state_dict(synced.state_dict())
    torch.testing.assert_close(synced(x), ref(x))  # no process group: ordinary BN
    assert bnlab.sync_running_stats(synced) == 0
