"""``bnlab demo``'s plan and pace: which recipes it runs, how long each step should take here, and when to say
that it is running far slower than it should.

The demo is short on an idle machine; on a busy one it can take ten times as
long with nothing to say why. So it times a small fixed workload first
(:func:`calibrate`), predicts each step from it (:func:`expected_seconds`:
the step's cost in calibration units, measured once on an idle machine, times
seeds and epochs), prints how long each step took, and warns when a step took
more than ``SLOW`` times its prediction or the calibration itself ran far
slower than on the idle reference machine (:func:`pace_warning`,
:func:`calibration_warning`), with the load average when the system reports one.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["DEMO_RECIPES", "COST", "REFERENCE_UNIT", "SLOW", "calibrate", "expected_seconds", "pace_warning", "calibration_warning"]

DEMO_RECIPES = ("diabetes", "blobs-deep", "digits28-mlp")

# A demo step (one recipe: both arms' runs, records and report) per seed at the recipe's own epochs, in units of
# calibrate()'s time; and calibrate()'s time itself. Measured on the 2-core development machine (torch 2.13 CPU,
# load average < 0.5), best of 3 demos: see the commit that set them.
COST = {"diabetes": 71.0, "blobs-deep": 90.0, "digits28-mlp": 36.0}
REFERENCE_UNIT = 0.030
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
    """Predicted seconds of a demo step: its cost per seed, scaled by seeds and by epochs against the recipe's own."""
    return COST[name] * unit * seeds * epochs / default_epochs


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
    """A sentence when the calibration ran more than ``SLOW`` times slower than on the idle reference machine."""
    if unit <= SLOW * REFERENCE_UNIT:
        return None
    load = _load()
    return (f"the calibration took {unit * 1000:.0f} ms, {unit / REFERENCE_UNIT:.1f}x the {REFERENCE_UNIT * 1000:.0f} ms of the "
            f"idle reference machine: this machine is slower or busy{f' ({load})' if load else ''}, and the demo will take longer.")
