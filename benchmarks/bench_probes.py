"""What probes cost: ``digits28-mlp`` training (the lab's ``fit``) with :class:`bnlab.lab.probes.Probes` attached
vs without, writing ``probes.csv`` to a temporary directory.

Each timed run trains a fresh model (same seed) for ``--epochs`` epochs with
per-epoch validation, as the recipe does; the variants alternate run by run
(order reversed every other round); one thread (the lab's policy for small
models). Printed: median seconds per run of each variant and, per recording
interval, the ratio of the medians (probes / none) and the median of the
per-round ratios. Target: <= 1.10 at the default interval (100 steps).

    python benchmarks/bench_probes.py [--rounds 11] [--epochs 10] [--every 100 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _bench import in_turn, seconds, write_json
from bnlab import lab
from bnlab.lab import training as T
from bnlab.lab.probes import Probes


def train(recipe, ds, epochs, every=None, out=None):
    """One training run; with ``every``, probes record every ``every`` steps into ``out``."""
    model = lab.build_model(recipe, "bn", seed=0)
    probe = Probes(model, Path(out) / f"probes-{every}.csv", every=every) if every else None
    try:
        T.fit(model, ds.x_train, ds.y_train, loss=recipe.loss, optimizer={"name": recipe.optimizer, "lr": recipe.learning_rate},
              metrics=recipe.metrics, epochs=epochs, batch_size=recipe.batch_size, validation_data=(ds.x_test, ds.y_test),
              seed=0, verbose=0, threads=1)
    finally:
        if probe is not None:
            probe.remove()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--epochs", type=int, default=10, help="epochs per timed run (the recipe's 10 by default)")
    p.add_argument("--every", type=int, nargs="+", default=[100], help="recording intervals to time (steps)")
    p.add_argument("--recipe", default="digits28-mlp")
    p.add_argument("--json", help="write the figures to this file (atomically)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = lab.get(a.recipe)
    ds = lab.load_data(recipe)
    steps = a.epochs * -(-len(ds.x_train) // recipe.batch_size)
    with tempfile.TemporaryDirectory() as out:
        fns = {"none": lambda: train(recipe, ds, a.epochs)}
        fns.update({f"every {k}": (lambda k=k: train(recipe, ds, a.epochs, k, out)) for k in a.every})
        for f in fns.values():
            f()  # warm-up
        times = in_turn(fns, a.rounds, seconds)
    print(f"# {a.recipe}: {a.epochs}-epoch runs ({steps} steps), 1 thread, {a.rounds} rounds (variants alternate); "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'variant':<10} {'median s/run':>13} {'records':>8} {'ratio of medians':>17} {'median ratio':>13}")
    base = statistics.median(times["none"])
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        k = None if label == "none" else int(label.split()[1])
        ratio = med / base
        per_round = statistics.median(t / b for t, b in zip(ts, times["none"], strict=True))
        records = 0 if k is None else -(-steps // k)
        print(f"{label:<10} {med:>13.3f} {records:>8} {ratio:>17.3f} {per_round:>13.3f}")
        rows.append({"variant": label, "every": k, "median_s": med, "records": records, "ratio_of_medians": ratio,
                     "median_ratio": per_round, "seconds": ts})
    if a.json:
        write_json(a.json, {"recipe": a.recipe, "epochs": a.epochs, "steps": steps, "rounds": a.rounds,
                            "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
