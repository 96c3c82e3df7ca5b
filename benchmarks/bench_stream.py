"""Streaming stores on and off, side by side: the same bnlab layer with the kernels' threshold
for non-temporal output stores at its default and at 0, next to PyTorch's module.

    python benchmarks/bench_stream.py                                  # 3 rows x 3 modes, 21 rounds
    python benchmarks/bench_stream.py --shapes 60000x128 --modes infer --rounds 31

Both bnlab variants run in one process with one library; the threshold is switched
between calls (``bnlab_set_stream_min_bytes``), so the ratio on/off isolates the
stores. Rows are ``(N, C)`` matrices (``axis=-1``); ``cp`` = time in copy-times
(``x.clone()`` in the same rounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import bnlab
from _bench import in_turn, keep_freed_memory, seconds
from bench_layer import _step  # the same steps as the layer benchmark (train: forward recording the graph)
from bnlab import _kernels

MODES = ("infer", "train", "fwdbwd")


def bench(shape, mode, rounds, kernels, threshold):
    x = torch.randn(shape)
    dy = torch.randn_like(x)
    c = shape[-1]
    layers = (bnlab.BatchNorm(axis=-1, num_features=c), torch.nn.BatchNorm1d(c, eps=1e-3, momentum=0.01))
    ours, native = (_step(m.train(mode != "infer"), x, dy, mode) for m in layers)

    def with_threshold(n):
        def run():
            kernels.lib.bnlab_set_stream_min_bytes(n)
            ours()

        return run

    variants = {"on": with_threshold(threshold), "off": with_threshold(0), "native": native, "copy": x.clone}

    try:
        times = in_turn(variants, rounds, lambda fn: seconds(fn, 10, warm=True))
    finally:
        kernels.lib.bnlab_set_stream_min_bytes(threshold)
    copy = statistics.median(times["copy"])

    def ratio(a, b):
        return statistics.median(p / q for p, q in zip(times[a], times[b]))

    cps = {k: statistics.median(v) / copy for k, v in times.items() if k != "copy"}
    return cps, ratio("on", "off"), ratio("on", "native")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="60000x128,4096x1024,169000x32", help="comma-separated NxC rows")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; expected some of {MODES}")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    except ValueError:
        p.error(f"--shapes takes NxC rows such as 60000x128, got {a.shapes!r}")
    if any(len(s) != 2 for s in shapes):
        p.error(f"--shapes takes NxC rows such as 60000x128, got {a.shapes!r}")
    kernels = _kernels.get()
    if kernels is None:
        print(f"the compiled kernels are not in use here: {_kernels.status()['reason']}", file=sys.stderr)
        return 1
    threshold = kernels.stream_min_bytes
    if threshold == 0:
        print("streaming is off here (BNLAB_STREAM_MIN_BYTES=0 or no x86-64): nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(a.threads)
    print(f"# {keep_freed_memory()}; {a.threads} threads; streaming from {threshold / 2**20:.0f} MB; "
          f"median of {a.rounds} rounds; torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'mode':<7} {'shape':<12} {'MB':>6} {'on cp':>7} {'off cp':>7} {'nat cp':>7} {'on/off':>7} {'on/nat':>7}")
    for mode in modes:
        for shape in shapes:
            cps, on_off, on_nat = bench(shape, mode, a.rounds, kernels, threshold)
            mb = shape[0] * shape[1] * 4 / 2**20
            print(f"{mode:<7} {'x'.join(map(str, shape)):<12} {mb:>6.1f} {cps['on']:>7.2f} {cps['off']:>7.2f} "
                  f"{cps['native']:>7.2f} {on_off:>7.3f} {on_nat:>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
