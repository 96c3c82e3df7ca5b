"""bnlab.BatchNorm vs torch.nn.BatchNorm*: training forward+backward, side by side in one process.

Every row times the variants in turn (A B A B ...) over several rounds and
reports the median per-call time of each and the median of the per-round
ratios bnlab/native, plus the time of one copy of x measured in the same
rounds (``copies`` = time / copy time, a memory-traffic yardstick).

    python benchmarks/bench_layer.py                 # 2 threads, the default grid
    python benchmarks/bench_layer.py --threads 1 --rounds 9 --json out.json

Rows:
  2D      (N, C)          bnlab BatchNorm(axis=-1)   vs torch BatchNorm1d
  NCHW    (N, C, H, W)    bnlab BatchNorm(axis=1)    vs torch BatchNorm2d
  NHWC    (N, H, W, C)    bnlab BatchNorm(axis=-1)   vs torch BatchNorm2d on x.permute(0, 3, 1, 2)
                          (the best of: the strided permuted view, and that view made contiguous)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import bnlab

ROWS_2D = [(64, 64), (256, 256), (4096, 1024), (60000, 128)]
ROWS_4D = [(32, 32, 32, 32), (128, 64, 16, 16), (250, 32, 26, 26)]


def _timer(fn, reps):
    fn()  # warm
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _reps_for(numel):
    return max(10, min(200, int(2e7 // max(numel, 1))))


def _fwd_bwd(module, x, g, view=lambda t: t):
    xr = x.detach().requires_grad_()

    def step():
        y = module(view(xr))
        y.backward(g)
        xr.grad = None
        for p in module.parameters():
            p.grad = None

    return step


def bench_row(name, layout, x, variants, rounds):
    """variants: dict label -> callable. Returns a result dict with medians and ratios."""
    reps = _reps_for(x.numel())
    times = {k: [] for k in variants}
    times["copy"] = []
    xd = x.detach()
    for _ in range(rounds):
        for label, fn in variants.items():
            times[label].append(_timer(fn, reps))
        times["copy"].append(_timer(lambda: xd.clone(), reps))
    med = {k: statistics.median(v) for k, v in times.items()}
    native_labels = [k for k in variants if k != "bnlab"]
    best_native = min(native_labels, key=lambda k: med[k])
    ratios = [b / n for b, n in zip(times["bnlab"], times[best_native], strict=True)]
    return {
        "row": name,
        "layout": layout,
        "shape": list(x.shape),
        "mbytes": x.numel() * x.element_size() / 1e6,
        "median_s": med,
        "native": best_native,
        "ratio_median": statistics.median(ratios),
        "copies_bnlab": med["bnlab"] / med["copy"],
        "copies_native": med[best_native] / med["copy"],
    }


def run(threads: int, rounds: int, quick: bool):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    rows_2d = ROWS_2D[:2] if quick else ROWS_2D
    rows_4d = ROWS_4D[:1] if quick else ROWS_4D
    for shape in rows_2d:
        C = shape[1]
        x, g = torch.randn(shape), torch.randn(shape)
        ours, theirs = bnlab.BatchNorm(num_features=C), torch.nn.BatchNorm1d(C, eps=1e-3, momentum=0.01)
        rows.append(bench_row(f"{shape}", "2D", x, {"bnlab": _fwd_bwd(ours, x, g), "torch": _fwd_bwd(theirs, x, g)}, rounds))
    for shape in rows_4d:
        N, C, H, W = shape
        x, g = torch.randn(shape), torch.randn(shape)
        ours, theirs = bnlab.BatchNorm(axis=1, num_features=C), torch.nn.BatchNorm2d(C, eps=1e-3, momentum=0.01)
        rows.append(bench_row(f"{shape}", "NCHW", x, {"bnlab": _fwd_bwd(ours, x, g), "torch": _fwd_bwd(theirs, x, g)}, rounds))
        xh = torch.randn(N, H, W, C)
        gh = torch.randn(N, H, W, C)
        ours = bnlab.BatchNorm(axis=-1, num_features=C)
        theirs = torch.nn.BatchNorm2d(C, eps=1e-3, momentum=0.01)
        gp = gh.permute(0, 3, 1, 2)
        rows.append(
            bench_row(
                f"{(N, H, W, C)}",
                "NHWC",
                xh,
                {
                    "bnlab": _fwd_bwd(ours, xh, gh),
                    "torch-permute": _fwd_bwd(theirs, xh, gp, lambda t: t.permute(0, 3, 1, 2)),
                    "torch-permute-contig": _fwd_bwd(theirs, xh, gp.contiguous(), lambda t: t.permute(0, 3, 1, 2).contiguous()),
                },
                rounds,
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a few small rows only (smoke test)")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    rows = run(a.threads, a.rounds, a.quick)
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "threads": a.threads,
        "rounds": a.rounds,
        "torch": torch.__version__,
        "bnlab": bnlab.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"# training forward+backward, float32, {a.threads} threads, median of {a.rounds} rounds; "
          f"torch {torch.__version__}, bnlab {bnlab.__version__}, {env['date']}")
    head = f"{'layout':<6} {'shape':<20} {'MB':>7} {'native':<21} {'native ms':>10} {'bnlab ms':>10} {'bnlab/native':>13} {'copies':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["median_s"]
        print(
            f"{r['layout']:<6} {r['row']:<20} {r['mbytes']:>7.2f} {r['native']:<21} {m[r['native']] * 1e3:>10.3f} "
            f"{m['bnlab'] * 1e3:>10.3f} {r['ratio_median']:>13.2f} {r['copies_bnlab']:>7.1f}"
        )
    worst = max(r["ratio_median"] for r in rows)
    print(f"worst row bnlab/native: {worst:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
