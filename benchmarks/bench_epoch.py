"""Time per epoch of lab recipes: bnlab's fit + bnlab.BatchNorm vs a plain PyTorch loop + torch.nn.BatchNorm1d.

Both sides train the same architecture on the same data with the same batch
size, optimizer and per-epoch validation, and both accumulate the loss and
the recipe's metric every batch; one thread each (the lab's policy for small
models). Each timed run trains a fresh model for ``--epochs`` epochs (model
building included); variants alternate run by run; the table gives median
time per epoch and the median of the per-round ratios.

    python benchmarks/bench_epoch.py [--rounds 9] [--epochs 10] [--recipes digits28-mlp diabetes]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _bench import in_turn, seconds
from bnlab import lab
from bnlab.lab import models as M
from bnlab.lab import training as T


def plain_run(recipe, ds, epochs):
    """``epochs`` epochs of a hand-written PyTorch loop with torch.nn.BatchNorm1d (validation each epoch)."""
    torch.manual_seed(0)
    model = M.build(recipe.model, norm_layer="torch", **dict(recipe.model_kwargs))
    opt = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate or 1e-3, eps=1e-7)
    x, y = ds.x_train, ds.y_train
    if recipe.validation == "test":
        xv, yv = ds.x_test, ds.y_test
    else:
        cut = int(len(x) * (1 - recipe.validation_split))
        x, y, xv, yv = x[:cut], y[:cut], x[cut:], y[cut:]
    regression = recipe.loss == "mse"
    crit = torch.nn.MSELoss() if regression else torch.nn.NLLLoss()

    def loss_of(out, t):
        return crit(out, t) if regression else crit(torch.log(out.clamp_min(1e-7)), t)

    def metric_of(out, t):
        return (out - t).abs().sum() if regression else (out.argmax(1) == t).sum()

    for _ in range(epochs):
        model.train()
        total, hits, n = 0.0, 0.0, 0
        for idx in torch.randperm(len(x)).split(recipe.batch_size):
            out = model(x[idx])
            loss = loss_of(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            hits += float(metric_of(out.detach(), y[idx]))
            n += len(idx)
        model.eval()
        with torch.no_grad():
            vt = vh = 0.0
            for i in range(0, len(xv), recipe.batch_size):
                out = model(xv[i : i + recipe.batch_size])
                vt += loss_of(out, yv[i : i + recipe.batch_size]).item() * len(out)
                vh += float(metric_of(out, yv[i : i + recipe.batch_size]))


def fit_run(recipe, ds, epochs, norm="bnlab"):
    """``epochs`` epochs of the lab's fit (validation each epoch, as the recipe says)."""
    r = lab.with_overrides(recipe, {"norm": norm})
    model = lab.build_model(r, "bn", seed=0)
    val = (ds.x_test, ds.y_test) if r.validation == "test" else None
    T.fit(model, ds.x_train, ds.y_train, loss=r.loss, optimizer={"name": r.optimizer, "lr": r.learning_rate},
          metrics=r.metrics, epochs=epochs, batch_size=r.batch_size,
          validation_split=r.validation_split if val is None else 0.0, validation_data=val, verbose=0, threads=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--epochs", type=int, default=10, help="epochs per timed run")
    p.add_argument("--recipes", nargs="+", default=["digits28-mlp", "diabetes"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# time per epoch ({a.epochs}-epoch runs), 1 thread, median of {a.rounds} rounds (variants alternate); torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    head = f"{'recipe':<14} {'plain loop + torch BN':>22} {'fit + torch BN':>15} {'fit + bnlab BN':>15} {'bnlab/plain':>12}"
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name in a.recipes:
        recipe = lab.get(name)
        ds = lab.load_data(recipe)
        fns = {
            "plain": lambda recipe=recipe, ds=ds: plain_run(recipe, ds, a.epochs),
            "fit-torch": lambda recipe=recipe, ds=ds: fit_run(recipe, ds, a.epochs, "torch"),
            "fit-bnlab": lambda recipe=recipe, ds=ds: fit_run(recipe, ds, a.epochs),
        }
        for f in fns.values():
            f()  # warm-up run
        times = in_turn(fns, a.rounds, lambda f: seconds(f) / a.epochs)
        ratio = statistics.median(b / p_ for b, p_ in zip(times["fit-bnlab"], times["plain"], strict=True))
        worst = max(worst, ratio)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{name:<14} {med['plain']:>19.1f} ms {med['fit-torch']:>12.1f} ms {med['fit-bnlab']:>12.1f} ms {ratio:>12.2f}")
    print(f"worst bnlab/plain: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
