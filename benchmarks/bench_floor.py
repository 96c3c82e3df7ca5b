"""How close bnlab's layer is to the least a Python-level layer can cost, in copy-times.

The issue's copy-time targets are figures for the whole layer, as a user calls
it. This benchmark splits the layer's time into what the compiled kernels
take and what wrapping them as a PyTorch layer takes, so one can see which
targets any layer written in Python could meet on this machine at all. For
every float32 row of the layer grid of at least 1 MB and each mode, these run
in turn (order reversed every other round, freed memory kept, as in
``bench_layer.py``):

  copy      ``x.clone()``: the unit (a copy-time)
  kernels   bnlab's C kernels called directly through ctypes, outputs
            allocated per call as a layer must (training: forward with the
            moving-statistics update, then backward; inference: one call);
            no autograd, no checks
  bare      the same calls inside the least a PyTorch layer needs:
            a ``torch.autograd.Function`` with no checks or routing
            (training), a plain ``nn.Module`` (inference)
  bnlab     ``bnlab.BatchNorm`` (its checks, routing and own Function)
  native    ``torch.nn.BatchNorm1d/2d``

"bare" is not a proven lower bound, but it is what remains of any layer
whose autograd node is Python once every check is gone: where it is over a
target, only a compiled autograd node (a C++ extension built against
PyTorch's headers) could reach that target. Before timing, every row checks
that ``kernels`` and ``bare`` give the layer's output, gradients and moving
statistics.

    python benchmarks/bench_floor.py                      # the >= 1 MB rows, 21 rounds
    python benchmarks/bench_floor.py --shapes 32x32x32x32 --layouts NCHW --rounds 5
    python benchmarks/bench_floor.py --json floor.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import bnlab
from _bench import in_turn, keep_freed_memory, seconds, write_json
from bench_layer import LAYOUTS, MODE_TITLES, MODES, environment, grid
from bnlab import _dispatch, _kernels
from bnlab._kernels import ops
from bnlab import functional as F

TARGETS = {"train": 2.0, "fwdbwd": 6.0, "infer": 1.2}  # the copy-time targets on rows >= 1 MB
TARGET_SECONDS = 0.02
EPSILON, MOMENTUM = 1e-3, 0.99


def _input(layout, shape):
    if layout == "NHWC":
        n, c, h, w = shape
        return torch.randn(n, h, w, c), -1
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, (-1 if layout == "2D" else 1)


class _Bare(torch.autograd.Function):
    """Training BN through bnlab's kernels with nothing else: no checks, no routing, no module."""

    @staticmethod
    def forward(ctx, x, gamma, beta, calls):
        y, saved = calls.forward(x)
        ctx.save_for_backward(x)
        ctx.saved, ctx.calls = saved, calls
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx, dgamma, dbeta = ctx.calls.backward(x, dy, ctx.saved)
        return dx, dgamma, dbeta, None


class _KernelCalls:
    """The ctypes calls of one row, with every argument that does not change between calls bound once."""

    def __init__(self, x, layer, gamma, beta, moving_mean, moving_var):
        feat = F.normalize_axes(layer.axis, x.ndim)
        dims, kernels = _dispatch.acb_dims(x, feat), ops.loaded()
        if dims is None or kernels is None:
            raise RuntimeError(f"bnlab's kernels do not take this row as it is: {_kernels.status()['reason']}")
        self.a, self.c, self.b = dims
        self.fwd, self.bwd, self.inf = (kernels.train_fwd[x.dtype], kernels.train_bwd[x.dtype], kernels.infer[x.dtype])
        self.threads = _kernels.threads_for(x.numel())
        self.gamma, self.beta, self.mm, self.mv = gamma, beta, moving_mean, moving_var
        n = self.a * self.b
        self.momentum = float(layer.momentum)
        self.var_factor = n / (n - 1) if layer.moving_variance_estimator == "unbiased" else 1.0

    def forward(self, x):
        c = self.c
        y = torch.empty_like(x)
        saved = torch.empty(2 * c)  # mean ++ 1/std
        p = saved.data_ptr()
        rc = self.fwd(x.data_ptr(), y.data_ptr(), self.a, c, self.b, self.gamma.data_ptr(), self.beta.data_ptr(), EPSILON,
                      p, None, p + 4 * c, self.mm.data_ptr(), self.mv.data_ptr(), self.momentum, self.var_factor, 0, 0.01,
                      self.threads, None)
        assert rc == 0
        return y, saved

    def backward(self, x, dy, saved):
        c = self.c
        dx, dgamma, dbeta = torch.empty_like(x), torch.empty(c), torch.empty(c)
        p = saved.data_ptr()
        rc = self.bwd(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), self.a, c, self.b, self.gamma.data_ptr(),
                      self.beta.data_ptr(), p, p + 4 * c, dgamma.data_ptr(), dbeta.data_ptr(), 0, 0.01, self.threads)
        assert rc == 0
        return dx, dgamma, dbeta

    def infer(self, x):
        y = torch.empty_like(x)
        rc = self.inf(x.data_ptr(), y.data_ptr(), self.a, self.c, self.b, self.gamma.data_ptr(), self.beta.data_ptr(),
                      self.mm.data_ptr(), self.mv.data_ptr(), EPSILON, 0, 0.01, self.threads)
        assert rc == 0
        return y


class _BareModule(torch.nn.Module):
    """Inference through the kernels inside a plain module: the call every layer pays, and nothing more."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        return self.calls.infer(x)


def _layer(axis, c, mode, momentum=MOMENTUM):
    layer = bnlab.BatchNorm(axis=axis, num_features=c, momentum=momentum, epsilon=EPSILON)
    with torch.no_grad():  # parameters and statistics away from 1 and 0, so the checks compare something
        layer.gamma.uniform_(0.5, 1.5)
        layer.beta.uniform_(-0.5, 0.5)
        layer.moving_mean.uniform_(-0.5, 0.5)
        layer.moving_variance.uniform_(0.5, 1.5)
    return layer.train(mode != "infer")


def check_row(layout, shape, mode):
    """Raise ``AssertionError`` unless ``kernels`` and ``bare`` compute what ``bnlab.BatchNorm`` does for this row."""
    x, axis = _input(layout, shape)
    c = shape[1]
    # momentum 0.5: the batch statistics weigh as much as the old ones in the compared update
    ours, ref = _layer(axis, c, mode, 0.5), _layer(axis, c, mode, 0.5)
    ref.load_state_dict(ours.state_dict())
    calls = _KernelCalls(x, ours, ours.gamma.detach(), ours.beta.detach(), ours.moving_mean, ours.moving_variance)
    tol = dict(rtol=1e-5, atol=1e-5)
    if mode == "infer":
        with torch.no_grad():
            torch.testing.assert_close(_BareModule(calls)(x), ref(x), **tol)
        return
    dy = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = _Bare.apply(xa, ours.gamma, ours.beta, calls)
    y_ref = ref(xb)
    torch.testing.assert_close(y, y_ref, **tol)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ours.gamma.grad, ref.gamma.grad, **tol)
    torch.testing.assert_close(ours.beta.grad, ref.beta.grad, **tol)
    torch.testing.assert_close(ours.moving_mean, ref.moving_mean, **tol)
    torch.testing.assert_close(ours.moving_variance, ref.moving_variance, **tol)


def _steps(layout, shape, mode):
    x, axis = _input(layout, shape)
    c = shape[1]
    dy = torch.randn_like(x)
    ours = _layer(axis, c, mode)
    native = (torch.nn.BatchNorm1d if layout == "2D" else torch.nn.BatchNorm2d)(c, eps=EPSILON, momentum=1 - MOMENTUM)
    native.train(mode != "infer")
    if layout == "NHWC":  # the strided view in, the result viewed back as NHWC (so the same dy applies)
        def run_native(t):
            return native(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    else:
        run_native = native
    # the kernels' own parameters: the bare variants record no graph into the layer's
    gamma = ours.gamma.detach().clone().requires_grad_()
    beta = ours.beta.detach().clone().requires_grad_()
    calls = _KernelCalls(x, ours, gamma, beta, ours.moving_mean.clone(), ours.moving_variance.clone())
    xr = x.detach().clone().requires_grad_()
    steps = {"copy": lambda: x.clone()}
    if mode == "infer":
        bare = _BareModule(calls)

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn(x)
            return run

        steps.update(kernels=lambda: calls.infer(x), bare=no_grad(bare), bnlab=no_grad(ours),
                     native=no_grad(run_native))
        return steps
    if mode == "train":
        steps.update(kernels=lambda: calls.forward(x), bare=lambda: _Bare.apply(xr, gamma, beta, calls),
                     bnlab=lambda: ours(xr), native=lambda: run_native(xr))
        return steps

    def kernels():
        _, saved = calls.forward(x)
        calls.backward(x, dy, saved)

    def step(fn):
        def run():
            fn().backward(dy)
            xr.grad = None
        return run

    steps.update(kernels=kernels, bare=step(lambda: _Bare.apply(xr, gamma, beta, calls)), bnlab=step(lambda: ours(xr)),
                 native=step(lambda: run_native(xr)))
    return steps


def bench_row(layout, shape, mode, rounds):
    check_row(layout, shape, mode)
    steps = _steps(layout, shape, mode)
    reps = {}
    for label, fn in steps.items():
        fn()
        fn()
        reps[label] = max(1, min(500, int(TARGET_SECONDS / max(seconds(fn), 1e-7))))
    times = in_turn({label: (fn, reps[label]) for label, fn in steps.items()}, rounds, lambda item: seconds(*item))
    copies = {label: statistics.median(t / c for t, c in zip(times[label], times["copy"])) for label in steps}
    x, _ = _input(layout, shape)
    return {
        "layout": layout,
        "shape": list(x.shape),
        "mode": mode,
        "mbytes": x.numel() * x.element_size() / 1e6,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "copies": copies,
        "bnlab_over_bare": statistics.median(b / f for b, f in zip(times["bnlab"], times["bare"])),
    }


HEADER = (f"{'layout':<13} {'shape':<16} {'MB':>6} {'copy ms':>8} {'kernels':>8} {'bare':>7} {'bnlab':>7} "
          f"{'native':>7} {'bn/bare':>8}")


def _fmt_row(r):
    cp = r["copies"]
    shape = "x".join(map(str, r["shape"]))
    return (f"{r['layout']:<13} {shape:<16} {r['mbytes']:>6.2f} {r['median_s']['copy'] * 1e3:>8.3f} {cp['kernels']:>8.2f} "
            f"{cp['bare']:>7.2f} {cp['bnlab']:>7.2f} {cp['native']:>7.2f} {r['bnlab_over_bare']:>8.2f}")


def summary(rows):
    """Per mode: the worst row of each variant in copy-times against the issue's target."""
    out = []
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        worst = {k: max(sel, key=lambda r: r["copies"][k]) for k in ("kernels", "bare", "bnlab")}
        over = [r for r in sel if r["copies"]["bare"] > TARGETS[mode]]
        parts = ", ".join(f"{k} {w['copies'][k]:.2f} ({w['layout']} {'x'.join(map(str, w['shape']))})"
                          for k, w in worst.items())
        out.append(f"{MODE_TITLES[mode]}: target <= {TARGETS[mode]} cp; worst row: {parts}; "
                   f"rows where even 'bare' is over the target: {len(over)} of {len(sel)}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=21, help="rounds of alternating variants (default 21)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--shapes", help="comma-separated shapes as in bench_layer.py (NCHW order); default: every "
                   "grid row of at least 1 MB")
    p.add_argument("--json", help="write the results to this JSON file")
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    if any(m not in MODES for m in modes):
        p.error(f"unknown mode in {modes}; expected some of {list(MODES)}")
    shapes = None if a.shapes is None else set(a.shapes.split(","))
    rows_wanted = [(lay, s) for lay, s in grid(False, a.layouts.split(","), shapes)
                   if shapes is not None or torch.Size(s).numel() * 4 >= 1e6]
    if not rows_wanted:
        p.error("no grid row matches --layouts/--shapes")
    if _kernels.get() is None:
        p.error(f"bnlab's kernels are not available here: {_kernels.status()['reason']}")
    allocator = keep_freed_memory()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    env = environment(a.threads, a.rounds, None)
    env["allocator"] = allocator
    print(f"# bnlab {env['bnlab']}, torch {env['torch']}, Python {env['python']}; {env['cpu']} ({env['cores']} cores), "
          f"{a.threads} threads; {env['date']}; float32; median of {a.rounds} rounds")
    print(f"# kernels: {env['kernels']}; memory: {allocator}")
    print("# figures in copy-times (median of per-round ratios to x.clone()); bn/bare = median of per-round ratios")
    rows = []
    for mode in modes:
        print(f"\n## {MODE_TITLES[mode]} (target <= {TARGETS[mode]} copy-times on rows >= 1 MB)")
        print(HEADER)
        print("-" * len(HEADER))
        for layout, shape in rows_wanted:
            r = bench_row(layout, shape, mode, a.rounds)
            rows.append(r)
            print(_fmt_row(r), flush=True)
    print("\n## against the targets")
    for line in summary(rows):
        print(line)
    if a.json:
        write_json(a.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
