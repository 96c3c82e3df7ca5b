"""The BN family side by side in one process: BatchNormAct vs BN then activation; folded vs unfolded inference.

    python benchmarks/bench_family.py [--rounds 11] [--threads 2]

Each row alternates its variants over several rounds and reports medians and
the median of the per-round ratios (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import bnlab
from _bench import in_turn, keep_freed_memory, seconds
from bnlab.lab import models


def _rows(variants: dict, rounds: int, reps: int):
    return in_turn(variants, rounds, lambda fn: seconds(fn, reps, warm=True))


def _fwd_bwd(module, x, g):
    xr = x.clone().requires_grad_()

    def step():
        module(xr).backward(g)
        xr.grad = None
        for p in module.parameters():
            p.grad = None

    return step


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, plus the identity, ReLU."""

    def __init__(self, c=64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bnlab.BatchNorm(axis=1, num_features=c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), bnlab.BatchNorm(axis=1, num_features=c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone (see _bench.py)")
    a = p.parse_args(argv)
    allocator = "glibc malloc, default settings" if a.system_malloc else keep_freed_memory()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"# {a.threads} threads, float32, median of {a.rounds} rounds; torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"memory: {allocator}")
    print(f"{'row':<44} {'variant A':>12} {'variant B':>12} {'A/B':>6}")
    print("-" * 78)
    out = []
    acts = {"relu": nn.ReLU, "silu": nn.SiLU}
    for shape, axis, act in [((4096, 1024), -1, "relu"), ((128, 64, 16, 16), 1, "relu"), ((250, 32, 26, 26), 1, "relu"),
                             ((128, 64, 16, 16), 1, "silu")]:
        c = shape[axis]
        x, g = torch.randn(shape), torch.randn(shape)
        fused = bnlab.BatchNormAct(axis=axis, num_features=c, activation=act)
        unfused = nn.Sequential(bnlab.BatchNorm(axis=axis, num_features=c), acts[act]())
        times = _rows({"fused": _fwd_bwd(fused, x, g), "unfused": _fwd_bwd(unfused, x, g)}, a.rounds, 10)
        ratio = statistics.median(f / u for f, u in zip(times["fused"], times["unfused"], strict=True))
        out.append((f"BatchNormAct({act}) vs BN+{acts[act].__name__} fwd+bwd {shape}", times["fused"], times["unfused"], ratio))
    for name, model, shape in [("digits28-cnn (kmnist_cnn), batch 250", models.kmnist_cnn(), (250, 1, 28, 28)),
                               ("ResNet basic block, (64, 64, 16, 16)", Block(), (64, 64, 16, 16))]:
        model.eval()
        for m in model.modules():  # non-trivial statistics
            if isinstance(m, bnlab.nn.batchnorm._BatchNormBase):
                with torch.no_grad():
                    m.running_var.uniform_(0.5, 2)
                    m.running_mean.uniform_(-1, 1)
        folded, report = bnlab.fold(model, return_report=True)
        x = torch.randn(shape)
        with torch.no_grad():
            err = (folded(x) - model(x)).abs().max().item()
            times = _rows({"folded": lambda f=folded, x=x: f(x), "unfolded": lambda m=model, x=x: m(x)}, a.rounds, 10)
        ratio = statistics.median(f / u for f, u in zip(times["folded"], times["unfolded"], strict=True))
        out.append((f"folded vs unfolded inference: {name} ({len(report.folded)} BN folded, max diff {err:.1e})",
                    times["folded"], times["unfolded"], ratio))
    for label, ta, tb, ratio in out:
        print(f"{label}\n{'':<44} {statistics.median(ta) * 1e3:>9.2f} ms {statistics.median(tb) * 1e3:>9.2f} ms {ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
