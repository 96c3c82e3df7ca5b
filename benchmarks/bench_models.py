"""Time per training epoch of the tutorials' networks: bnlab BN vs PyTorch's BN vs no BN, in one run.

Each network is built three times from the lab's registry: with
``bnlab.BatchNorm`` (``norm_layer="bnlab"``), with ``torch.nn.BatchNorm1d/2d``
(``"torch"``, same momentum/epsilon) and without BN. Data are random tensors of
MNIST's shape (N x 1 x 28 x 28, 10 classes). One timed unit is ``--steps``
training steps (forward, loss, backward, Adam step) at the recipe's batch
size; the variants alternate unit by unit over several rounds, and the time
per epoch is the median step time times the steps in one epoch of
``--epoch-samples`` samples (60,000, MNIST's training set). Ratios are medians
of per-round ratios.

    python benchmarks/bench_models.py                     # kmnist-cnn and mnist-mlp, 2 threads
    python benchmarks/bench_models.py --threads 1 --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import bnlab
from _bench import in_turn, keep_freed_memory, seconds, write_json
from bnlab import _kernels
from bnlab.lab import models as M
from bnlab.lab import recipes

NETWORKS = {
    # name: (recipe giving architecture and batch size)
    "kmnist-cnn": "kmnist-cnn",
    "mnist-mlp": "mnist-mlp",
}
VARIANTS = {"bnlab BN": "bnlab", "torch BN": "torch", "no BN": None}


def _unit(recipe, norm, steps, seed=0):
    """A callable that runs ``steps`` training steps of a fresh copy of the network (built once)."""
    torch.manual_seed(seed)
    model = M.build(recipe.model, norm_layer=norm, **dict(recipe.model_kwargs)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    gen = torch.Generator().manual_seed(seed)
    bs = recipe.batch_size
    xs = torch.randn(steps, bs, 1, 28, 28, generator=gen)
    ys = torch.randint(0, 10, (steps, bs), generator=gen)
    loss_fn = torch.nn.NLLLoss()

    def run():
        for i in range(steps):
            out = model(xs[i])
            loss = loss_fn(torch.log(out.clamp_min(1e-7)), ys[i])  # the models end in softmax, as in Keras
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def bench(name, steps, rounds, epoch_samples):
    recipe = recipes.get(NETWORKS[name])
    units = {label: _unit(recipe, norm, steps) for label, norm in VARIANTS.items()}
    for fn in units.values():
        fn()  # warm: allocations, kernel build
    times = in_turn(units, rounds, lambda fn: seconds(fn) / steps)
    per_epoch = epoch_samples / recipe.batch_size
    med = {k: statistics.median(v) * per_epoch for k, v in times.items()}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return {
        "network": name,
        "batch_size": recipe.batch_size,
        "epoch_s": med,
        "bnlab_over_nobn": ratio("bnlab BN", "no BN"),
        "torch_over_nobn": ratio("torch BN", "no BN"),
        "bnlab_over_torch": ratio("bnlab BN", "torch BN"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="training steps per timed unit (default 20)")
    p.add_argument("--epoch-samples", type=int, default=60000)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone (see _bench.py)")
    a = p.parse_args(argv)
    allocator = "glibc malloc, default settings" if a.system_malloc else keep_freed_memory()
    torch.set_num_threads(a.threads)
    env = {
        "date": time.strftime("%Y-%m-%d"), "threads": a.threads, "rounds": a.rounds, "steps": a.steps,
        "torch": torch.__version__, "bnlab": bnlab.__version__, "python": platform.python_version(),
        "cores": os.cpu_count(), "kernels": _kernels.status()["reason"], "allocator": allocator,
    }
    print(f"# time per epoch of {a.epoch_samples} samples (MNIST-shaped random data), {a.threads} threads, "
          f"median of {a.rounds} rounds of {a.steps} steps; torch {env['torch']}, bnlab {env['bnlab']}, {env['date']}")
    print(f"# memory: {allocator}")
    head = (f"{'network':<12} {'batch':>5} {'bnlab BN s':>11} {'torch BN s':>11} {'no BN s':>9} "
            f"{'bnlab/noBN':>11} {'torch/noBN':>11} {'bnlab/torch':>12}")
    print(head)
    print("-" * len(head))
    rows = []
    for name in a.networks:
        r = bench(name, a.steps, a.rounds, a.epoch_samples)
        rows.append(r)
        e = r["epoch_s"]
        print(f"{name:<12} {r['batch_size']:>5} {e['bnlab BN']:>11.2f} {e['torch BN']:>11.2f} {e['no BN']:>9.2f} "
              f"{r['bnlab_over_nobn']:>11.2f} {r['torch_over_nobn']:>11.2f} {r['bnlab_over_torch']:>12.2f}", flush=True)
    if a.json:
        write_json(a.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
