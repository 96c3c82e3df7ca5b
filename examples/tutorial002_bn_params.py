"""Tutorial 002, "observing the parameters of BatchNormalization", with bnlab on PyTorch.

The lecture builds  x (100, 3) -> Dense(4, no bias) -> BN(rho=0.99, eps=1e-3) -> ReLU
-> Dense(1, sigmoid), trains it for 10 epochs (batch 10, Adam, mean squared error)
on random data, then reads gamma, beta and the moving statistics out of the BN
layer and re-computes the layer's inference output by hand:

    r = gamma * (h - moving_mean) / sqrt(moving_variance + eps) + beta

This script does the same and prints the largest difference between the
layer's output and the hand computation.

    python examples/tutorial002_bn_params.py [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import bnlab


def dense(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:
    """A Keras-initialised Dense layer: glorot_uniform kernel, zero bias."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    x = torch.tensor(rng.normal(size=(100, 3)), dtype=torch.float32)
    y = torch.tensor(rng.choice([0, 1], 100).reshape(-1, 1), dtype=torch.float32)
    eps, rho = 0.001, 0.99
    hidden = dense(3, 4, bias=False)  # 'HN' in the lecture
    bn = bnlab.BatchNorm(momentum=rho, epsilon=eps, num_features=4)  # 'BN'
    model = nn.Sequential(hidden, bn, nn.ReLU(), dense(4, 1), nn.Sigmoid())

    g, b, mu, var = bn.get_weights()
    print("Initial values:")
    print(f" gamma = {g.round(3)}\n beta  = {b.round(3)}\n E[h]  = {mu.round(3)}\n V[h]  = {var.round(3)}")

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)  # Keras' Adam defaults
    start = time.perf_counter()
    for epoch in range(10):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 10):
            idx = order[i : i + 10]
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"\nTrained 10 epochs in {time.perf_counter() - start:.2f} s")

    model.eval()
    with torch.no_grad():
        h = hidden(x)
        r = bn(h)
    g, b, mu, var = bn.get_weights()
    by_hand = g * (h.numpy() - mu) / np.sqrt(var + eps) + b
    print("After training: inference stage")
    print("h =", h[:3].numpy().round(3), sep="\n")
    print("r (layer) =", r[:3].numpy().round(3), sep="\n")
    print(f"\n gamma = {g.round(3)}\n beta  = {b.round(3)}\n E[h]  = {mu.round(3)}\n V[h]  = {var.round(3)}")
    print("r (by hand: gamma * (h - E[h]) / sqrt(V[h] + eps) + beta) =", by_hand[:3].round(3), sep="\n")
    diff = float(np.abs(by_hand - r.numpy()).max())
    print(f"\nmax |layer - by hand| over all 100 rows = {diff:.2e}")
    return diff


if __name__ == "__main__":
    main()
