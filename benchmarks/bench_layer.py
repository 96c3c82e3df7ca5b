"""bnlab.BatchNorm against PyTorch's and Keras 3's batch norm, side by side in one process.

For every row (shape x memory layout x dtype) and mode (training forward,
training forward+backward, inference forward) the variants run in turn, round
after round, the order reversed every other round: bnlab, PyTorch's module
(``torch.nn.BatchNorm1d/2d``), Keras 3's ``BatchNormalization`` on the torch
backend (when keras is installed), and a copy of x (``x.clone()``, which like
every layer allocates its output). The table gives medians over the rounds,
the median of the per-round ratios bnlab/native (bnlab with its kernels, and
``off``: the same layer with them switched off, as where there is no C
compiler) and keras/bnlab, and each time in "copy-times" (time / copy time).

    python benchmarks/bench_layer.py                        # the full grid, 2 threads
    python benchmarks/bench_layer.py --quick                # a smoke run
    python benchmarks/bench_layer.py --json out.json        # also keep the results
    python benchmarks/bench_layer.py --compare out.json     # ratios against an earlier run

Layouts:
  2D             (N, C)          bnlab axis=-1  | BatchNorm1d            | Keras axis=-1
  NCHW           (N, C, H, W)    bnlab axis=1   | BatchNorm2d            | Keras axis=1
  channels_last  (N, C, H, W) stored NHWC: bnlab axis=1 | BatchNorm2d    | Keras axis=1
  NHWC           (N, H, W, C), axis=-1: bnlab axis=-1 | BatchNorm2d on x.permute(0, 3, 1, 2)
                 (best of: that strided view, and the view made contiguous) | Keras axis=-1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import bnlab
from _bench import in_turn, keep_freed_memory, seconds, write_json
from bnlab import _kernels
from bnlab._kernels import ops

ROWS_2D = [(64, 64), (256, 256), (4096, 1024), (60000, 128)]
ROWS_4D = [(32, 32, 32, 32), (128, 64, 16, 16), (250, 32, 26, 26)]
MODES = ("train", "fwdbwd", "infer")
MODE_TITLES = {"train": "training forward", "fwdbwd": "training forward+backward", "infer": "inference forward"}
TARGET_SECONDS = 0.02  # each timed batch of calls lasts about this long


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        return None
    return keras if keras.backend.backend() == "torch" else None


# --------------------------------------------------------------------------- callables to time


def _step(call, x, dy, mode):
    """A zero-argument callable running one ``mode`` step of ``call`` (x -> y)."""
    if mode == "infer":

        def infer():
            with torch.no_grad():
                call(x)

        return infer
    xr = x.detach().requires_grad_()
    if mode == "train":
        return lambda: call(xr)

    def fwdbwd():
        y = call(xr)
        y.backward(dy)
        xr.grad = None

    return fwdbwd


def _without_kernels(layer, x):
    """``layer(x)`` with the kernels switched off (as on a machine without a C compiler)."""
    loaded = ops.loaded
    ops.loaded = lambda: None
    try:
        return layer(x)
    finally:
        ops.loaded = loaded


def _variants(layout, shape, dtype, mode, keras):
    """``(x, dy, {label: callable(x) -> y})`` for one row; labels: bnlab, bnlab-off, native[:how], keras."""
    if layout == "NHWC":
        n, c, h, w = shape
        x = torch.randn(n, h, w, c)
    else:
        x = torch.randn(shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    dy = torch.randn_like(x)
    c = shape[1]
    axis = -1 if layout in ("2D", "NHWC") else 1
    ours = bnlab.BatchNorm(axis=axis, num_features=c)
    ours.train(mode != "infer")
    native = (torch.nn.BatchNorm1d if layout == "2D" else torch.nn.BatchNorm2d)(c, eps=1e-3, momentum=0.01)
    native.train(mode != "infer")
    calls = {"bnlab": ours}
    off = bnlab.BatchNorm(axis=axis, num_features=c)  # the same layer, its kernels off: the PyTorch paths
    off.train(mode != "infer")
    calls["bnlab-off"] = lambda t: _without_kernels(off, t)
    if layout == "NHWC":
        # results permuted back to NHWC (a free view) so the same dy applies
        calls["native:permuted view"] = lambda t: native(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        calls["native:permuted+contiguous"] = lambda t: native(t.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
    else:
        calls["native"] = native
    if keras is not None and dtype == torch.float32:
        k = keras.layers.BatchNormalization(axis=axis, momentum=0.99, epsilon=1e-3)
        k.build(tuple(x.shape))
        training = mode != "infer"
        calls["keras"] = lambda t: k(t, training=training)
    return x, dy, calls


# --------------------------------------------------------------------------- timing


def _reps(fn):
    fn()
    fn()  # warm: first-use allocations and kernel builds
    t = seconds(fn)
    return max(1, min(500, int(TARGET_SECONDS / max(t, 1e-7))))


def bench_row(layout, shape, dtype, mode, rounds, keras):
    x, dy, calls = _variants(layout, shape, dtype, mode, keras)
    steps = {label: _step(call, x, dy, mode) for label, call in calls.items()}
    xd = x.detach()
    steps["copy"] = lambda: xd.clone()
    reps = {label: _reps(fn) for label, fn in steps.items()}
    times = in_turn({label: (fn, reps[label]) for label, fn in steps.items()}, rounds, lambda item: seconds(*item))
    med = {k: statistics.median(v) for k, v in times.items()}
    natives = [k for k in steps if k.startswith("native")]
    best = min(natives, key=lambda k: med[k])
    row = {
        "layout": layout,
        "shape": list(x.shape),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "mbytes": x.numel() * x.element_size() / 1e6,
        "median_s": med,
        "native": best,
        "bnlab_over_native": statistics.median(b / n for b, n in zip(times["bnlab"], times[best])),
        "off_over_native": statistics.median(b / n for b, n in zip(times["bnlab-off"], times[best])),
        "copies": {k: med[k] / med["copy"] for k in steps if k != "copy"},
    }
    if "keras" in times:
        row["keras_over_bnlab"] = statistics.median(k / b for k, b in zip(times["keras"], times["bnlab"]))
    return row


LAYOUTS = ("2D", "NCHW", "channels_last", "NHWC")


def grid(quick: bool, layouts=LAYOUTS, shapes=None):
    """``(layout, shape)`` rows; ``shapes``: a set of ``"AxBx..."`` strings (in the NCHW order) or ``None`` for all."""
    rows_2d = ROWS_2D[:2] if quick else ROWS_2D
    rows_4d = ROWS_4D[:1] if quick else ROWS_4D
    rows = [("2D", shape) for shape in rows_2d]
    rows += [(layout, shape) for shape in rows_4d for layout in ("NCHW", "channels_last", "NHWC")]
    for layout, shape in rows:
        if layout in layouts and (shapes is None or "x".join(map(str, shape)) in shapes):
            yield layout, shape


# --------------------------------------------------------------------------- report


def _fmt_row(r):
    m = r["median_s"]
    keras = f"{r['keras_over_bnlab']:>9.1f}" if "keras_over_bnlab" in r else f"{'-':>9}"
    shape = "x".join(map(str, r["shape"]))
    return (
        f"{r['layout']:<13} {shape:<16} {r['mbytes']:>7.2f} {m['bnlab'] * 1e3:>9.3f} {m[r['native']] * 1e3:>9.3f} "
        f"{r['bnlab_over_native']:>8.2f} {r['off_over_native']:>8.2f} {r['copies']['bnlab']:>7.2f} "
        f"{r['copies'][r['native']]:>7.2f} {keras}"
    )


HEADER = (
    f"{'layout':<13} {'shape':<16} {'MB':>7} {'bnlab ms':>9} {'native ms':>9} {'bn/nat':>8} {'off/nat':>8} "
    f"{'bn cp':>7} {'nat cp':>7} {'keras/bn':>9}"
)


def summary(rows):
    """The issue's acceptance figures, computed from the rows."""
    out = []

    def sel(mode, dtype="float32", big=None):
        return [r for r in rows if r["mode"] == mode and r["dtype"] == dtype and (big is None or (r["mbytes"] >= 1) == big)]

    fb_big = sel("fwdbwd", big=True)
    fb_all = sel("fwdbwd")
    if fb_big:
        med = statistics.median(r["bnlab_over_native"] for r in fb_big)
        out.append(f"fwd+bwd float32, rows >= 1 MB: median bnlab/native {med:.2f} (target <= 0.75)")
        out.append(f"fwd+bwd float32, rows >= 1 MB: max copy-times {max(r['copies']['bnlab'] for r in fb_big):.2f}")
    if fb_all:
        worst = max(fb_all, key=lambda r: r["bnlab_over_native"])
        out.append(f"fwd+bwd float32, every row: max bnlab/native {worst['bnlab_over_native']:.2f} "
                   f"({worst['layout']} {worst['shape']}) (target <= 1.0)")
        worst = max(fb_all, key=lambda r: r["off_over_native"])
        out.append(f"fwd+bwd float32, kernels off, every row: max bnlab/native {worst['off_over_native']:.2f} "
                   f"({worst['layout']} {worst['shape']}) (target <= 1.1)")
    for mode in ("train", "infer"):
        big = sel(mode, big=True)
        if big:
            worst = max(big, key=lambda r: r["copies"]["bnlab"])
            out.append(f"{MODE_TITLES[mode]} float32, rows >= 1 MB: max copy-times {worst['copies']['bnlab']:.2f} "
                       f"({worst['layout']} {worst['shape']})")
    nhwc = [r for r in fb_all if r["layout"] == "NHWC"]
    for r in nhwc:
        n, h, w, c = r["shape"]
        same = [q for q in fb_all if q["layout"] in ("NCHW", "channels_last") and q["shape"] == [n, c, h, w]]
        if same:
            best_native = min(min(q["median_s"][q["native"]] for q in same), r["median_s"][r["native"]])
            out.append(f"NHWC axis=-1 {r['shape']}: bnlab / best native layout {r['median_s']['bnlab'] / best_native:.2f} (target <= 1.1)")
    keras_rows = [r for r in rows if "keras_over_bnlab" in r]
    if keras_rows:
        worst = min(keras_rows, key=lambda r: r["keras_over_bnlab"])
        out.append(f"keras/bnlab, every row: min {worst['keras_over_bnlab']:.1f}x "
                   f"({MODE_TITLES[worst['mode']]}, {worst['layout']} {worst['shape']})")
    return out


def environment(threads, rounds, keras):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d"),
        "threads": threads,
        "rounds": rounds,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bnlab": bnlab.__version__,
        "keras": keras.__version__ if keras is not None else None,
        "kernels": _kernels.status()["reason"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every variant (default 2)")
    p.add_argument("--rounds", type=int, default=7, help="rounds of alternating variants (default 7)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--no-keras", action="store_true", help="leave Keras out even if installed")
    p.add_argument("--quick", action="store_true", help="two 2D rows and one 4D shape only (smoke test)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--shapes", help="comma-separated shapes of the grid to keep, as in the table (NCHW order), "
                   "e.g. 64x64,128x64x16x16")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--compare", help="a JSON file from an earlier run: print bnlab's time now / then per row")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone (see _bench.py)")
    a = p.parse_args(argv)
    layouts = a.layouts.split(",")
    shapes = None if a.shapes is None else set(a.shapes.split(","))
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        p.error(f"unknown layout(s) {unknown}; expected some of {list(LAYOUTS)}")
    if shapes is not None and not list(grid(a.quick, layouts, shapes)):
        p.error(f"no grid row has layout in {layouts} and shape in {sorted(shapes)}")
    allocator = "glibc malloc, default settings" if a.system_malloc else keep_freed_memory()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    keras = None if a.no_keras else _keras()
    env = environment(a.threads, a.rounds, keras)
    env["allocator"] = allocator
    print(f"# bnlab {env['bnlab']}, torch {env['torch']}, keras {env['keras'] or 'not installed'}, Python {env['python']}; "
          f"{env['cpu']} ({env['cores']} cores), {a.threads} threads; {env['date']}; median of {a.rounds} rounds")
    print(f"# kernels: {env['kernels']}; memory: {allocator}")
    print("# bn/nat = median of per-round ratios bnlab/native (best native variant); cp = copy-times; "
          "keras/bn = how many times slower Keras is")
    rows = []
    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for mode in a.modes.split(","):
            print(f"\n## {MODE_TITLES[mode]}, {dtype_name}")
            print(HEADER)
            print("-" * len(HEADER))
            for layout, shape in grid(a.quick, layouts, shapes):
                r = bench_row(layout, shape, dtype, mode, a.rounds, keras)
                rows.append(r)
                print(_fmt_row(r), flush=True)
    print("\n## against the targets")
    for line in summary(rows):
        print(line)
    if a.compare:
        with open(a.compare) as fh:
            old = {(r["layout"], tuple(r["shape"]), r["dtype"], r["mode"]): r for r in json.load(fh)["rows"]}
        print(f"\n## bnlab now / then ({a.compare})")
        for r in rows:
            o = old.get((r["layout"], tuple(r["shape"]), r["dtype"], r["mode"]))
            if o:
                print(f"{r['mode']:<7} {r['dtype']:<9} {r['layout']:<13} {str(r['shape']):<18} "
                      f"{r['median_s']['bnlab'] / o['median_s']['bnlab']:.2f}")
    if a.json:
        write_json(a.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
