"""``bnlab demo``'s plan and pace: which recipes it runs, how long each step should take here, and when to say
that it is running far slower than it should.

The demo is short on an idle machine; on a busy one it can take ten times as
long with nothing to say why. So it times a small fixed workload first
(:func:`calibrate`), predicts each step from it (:func:`expected_seconds`:
the step's cost in calibration units, measured once, times seeds and epochs,
plus its report), prints how long each step took, and warns when a step took
more than ``SLOW`` times its prediction or the calibration itself ran far
slower than its best time on the reference machine (:func:`pace_warning`,
:func:`calibration_warning`), with the load average when the system reports one.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["DEMO_RECIPES", "COST", "REPORT", "REFERENCE_UNIT", "SLOW", "calibrate", "expected_seconds", "pace_warning",
           "calibration_warning"]

DEMO_RECIPES = ("diabetes", "blobs-deep", "digits28-mlp")

# The cost of a demo step in units of calibrate()'s time: COST per seed (both arms' runs and records, at the
# recipe's own epochs) and REPORT (plots and report, once). REFERENCE_UNIT is calibrate()'s best time seen.
# Measured on the 2-core development machine while other work shared it (load average 5-7), best of 4
# repetitions of calibrate() + each recipe's 3-seed experiment + its report (torch 2.13 CPU, one thread each);
# a busy machine slows the calibration too, so the ratios hold better than the seconds.
COST = {"diabetes": 92.0, "blobs-deep": 240.0, "digits28-mlp": 68.0}
REPORT = {"diabetes": 36.0, "blobs-deep": 25.0, "digits28-mlp": 26.0}
REFERENCE_UNIT = 0.017
SLOW = 2.0  # warn when a step takes more than this many times its expected time


def calibrate(repeats: int = 3, steps: int = 30) -> float:
    """Seconds for a fixed small workload, best of ``repeats``: ``steps`` Adam steps of a Dense(128) + BN + ReLU MLP
    on 300 rows, one thread (the demo's models run on one thread too). Leaves torch's generator as it was."""
    import bnlab

    best = float("inf")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            x, y = torch.randn(300, 2), torch.rand(300, 1)
            for _ in range(repeats):
                model = torch.nn.Sequential(torch.nn.Linear(2, 128), bnlab.BatchNorm(num_features=128), torch.nn.ReLU(),
                                            torch.nn.Linear(128, 1), torch.nn.Sigmoid())
                opt = torch.optim.Adam(model.parameters())
                t0 = time.perf_counter()
                for _ in range(steps):
                    loss = torch.nn.functional.binary_cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return best


def expected_seconds(name: str, epochs: int, default_epochs: int, seeds: int, unit: float) -> float:
    """Predicted seconds of a demo step: its cost per seed scaled by seeds and by epochs against the recipe's own,
    plus its report."""
    return unit * (COST[name] * seeds * epochs / default_epochs + REPORT[name])


def _load() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return ""


def pace_warning(step: str, seconds: float, expected: float) -> str | None:
    """A sentence when ``step`` took more than ``SLOW`` times ``expected`` seconds, else None."""
    if seconds <= SLOW * expected:
        return None
    load = _load()
    return (f"{step} took {seconds:.1f} s, {seconds / expected:.1f}x the {expected:.1f} s expected from this machine's "
            f"calibration: other programs are probably using the CPUs{f' ({load})' if load else ''}.")


def calibration_warning(unit: float) -> str | None:
    """A sentence when the calibration ran more than ``SLOW`` times slower than its best time on the reference machine."""
    if unit <= SLOW * REFERENCE_UNIT:
        return None
    load = _load()
    return (f"the calibration took {unit * 1000:.0f} ms, {unit / REFERENCE_UNIT:.1f}x its {REFERENCE_UNIT * 1000:.0f} ms on the "
            f"reference machine: this machine is slower or busy{f' ({load})' if load else ''}, and the demo will take longer.")
