"""What the records say: per-arm curves and final figures, BN minus no-BN with a confidence interval,
epochs-to-target, and a plain-language verdict computed from those numbers. Pure functions of records.

The confidence interval of a difference of means is Welch's t interval
(unequal variances, Welch-Satterthwaite degrees of freedom). Epochs-to-target
follows the original paper's way of counting the speed-up ("the same accuracy
with 14 times fewer training steps", Ioffe & Szegedy 2015): the first epoch at
which the mean validation metric of the BN arm reaches the best mean value of
the no-BN arm, against the epoch at which the no-BN arm got there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import records

__all__ = ["ArmRecords", "Experiment", "load", "welch_interval", "epochs_to_target", "primary_metric", "compare", "verdict"]


@dataclass
class ArmRecords:
    arm: str
    seeds: list[int]
    histories: list[dict[str, list[float]]]
    finals: list[dict]

    def curve(self, key: str) -> np.ndarray:
        """(seeds, epochs) array of a metric; runs of different lengths are cut to the shortest."""
        rows = [h[key] for h in self.histories if key in h]
        if not rows:
            return np.empty((0, 0))
        n = min(len(r) for r in rows)
        return np.array([r[:n] for r in rows], dtype=float)

    def final_values(self, key: str) -> np.ndarray:
        return np.array([f[key] for f in self.finals if key in f], dtype=float)


@dataclass
class Experiment:
    path: Path
    config: dict
    env: dict
    arms: dict[str, ArmRecords] = field(default_factory=dict)

    @property
    def recipe(self) -> dict:
        return self.config["recipe"]

    @property
    def complete(self) -> bool:
        want = len(self.config["seeds"])
        return all(len(a.finals) == want for a in self.arms.values()) and len(self.arms) == len(self.config["arms"])


def load(path: Path) -> Experiment:
    """Read an experiment directory written by :func:`bnlab.lab.experiment.run_experiment`."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} holds no bnlab records (no config.json)")
    cfg = records.read_json(cfg_path)
    env = records.read_json(path / "env.json") if (path / "env.json").exists() else {}
    exp = Experiment(path, cfg, env)
    for arm in cfg["arms"]:
        seeds, hists, finals = [], [], []
        for seed in cfg["seeds"]:
            rd = records.run_dir(path, arm, seed)
            if (rd / "final.json").exists():
                seeds.append(seed)
                hists.append(records.read_history(rd / "history.csv"))
                finals.append(records.read_json(rd / "final.json"))
        exp.arms[arm] = ArmRecords(arm, seeds, hists, finals)
    return exp


def welch_interval(a, b, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean of ``a`` minus mean of ``b`` with Welch's t interval: ``(diff, low, high, dof)``.

    With fewer than two values in either group, or no spread at all, the
    interval is undefined (NaN bounds).
    """
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff, math.inf
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = float(stats.t.ppf(0.5 + level / 2, dof))
    return diff, diff - t * se, diff + t * se, float(dof)


_HIGHER_IS_BETTER = ("accuracy",)


def higher_is_better(metric: str) -> bool:
    return any(metric.endswith(k) for k in _HIGHER_IS_BETTER)


def primary_metric(exp: Experiment) -> str:
    """The figure the verdict is about: validation accuracy for classifiers, validation loss otherwise."""
    keys = set().union(*[set(h) for a in exp.arms.values() for h in a.histories]) if exp.arms else set()
    for k in ("val_accuracy", "val_loss", "accuracy", "loss"):
        if k in keys:
            return k
    return "loss"


def epochs_to_target(bn_curve: np.ndarray, ref_curve: np.ndarray, higher: bool) -> dict:
    """First epoch (1-based) at which the mean BN curve reaches the best of the mean reference curve."""
    if bn_curve.size == 0 or ref_curve.size == 0:
        return {}
    bn_mean, ref_mean = bn_curve.mean(0), ref_curve.mean(0)
    best_idx = int(np.argmax(ref_mean) if higher else np.argmin(ref_mean))
    target = float(ref_mean[best_idx])
    reached = np.nonzero(bn_mean >= target if higher else bn_mean <= target)[0]
    out = {"target": target, "reference_epoch": best_idx + 1}
    if reached.size:
        out["bn_epoch"] = int(reached[0]) + 1
        out["speedup"] = (best_idx + 1) / (int(reached[0]) + 1)
    else:
        out["bn_epoch"] = None
        out["speedup"] = None
    return out


def summarize(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else math.nan),
            "n": int(values.size)}


def compare(exp: Experiment) -> dict:
    """Final figures per arm, the BN - no-BN differences with 95% intervals, epochs-to-target."""
    arms = exp.arms
    keys = []
    for a in arms.values():
        for f in a.finals:
            keys += [k for k, v in f.items() if isinstance(v, (int, float)) and k not in ("seed", "seconds", "resumed_from_epoch") and k not in keys]
    table = {k: {arm: summarize(a.final_values(k)) for arm, a in arms.items()} for k in keys}
    diffs = {}
    if "bn" in arms and "no_bn" in arms:
        for k in keys:
            d, lo, hi, dof = welch_interval(arms["bn"].final_values(k), arms["no_bn"].final_values(k))
            diffs[k] = {"diff": d, "low": lo, "high": hi, "dof": dof}
    metric = primary_metric(exp)
    ett = {}
    if "bn" in arms and "no_bn" in arms:
        ett = epochs_to_target(arms["bn"].curve(metric), arms["no_bn"].curve(metric), higher_is_better(metric))
    return {"metric": metric, "table": table, "diffs": diffs, "epochs_to_target": ett}


def shown_figures(exp: Experiment, keys) -> list[str]:
    """The figures worth a table row: ``test_*`` repeats ``val_*`` when the validation data is the test set."""
    if exp.recipe.get("validation") == "test":
        return [k for k in keys if not (k.startswith("test_") and f"val_{k[5:]}" in keys)]
    return list(keys)


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def verdict(exp: Experiment, cmp: dict | None = None) -> str:
    """One paragraph, computed from the numbers: did BN help on this experiment, by how much, how sure."""
    cmp = cmp or compare(exp)
    metric = cmp["metric"]
    name = exp.recipe["name"]
    if "bn" not in exp.arms or "no_bn" not in exp.arms:
        only = next(iter(exp.arms), "?")
        s = cmp["table"].get(metric, {}).get(only, {})
        return f"Only the {only!r} arm was run on {name}: final {metric} {_fmt(s.get('mean'))} ± {_fmt(s.get('std'))} over {s.get('n', 0)} seeds. Run both arms (--compare) for a verdict."
    bn, nb = cmp["table"][metric]["bn"], cmp["table"][metric]["no_bn"]
    d = cmp["diffs"][metric]
    higher = higher_is_better(metric)
    better = (d["diff"] > 0) == higher
    n = min(bn["n"], nb["n"])
    parts = [
        f"On {name}, the final {metric} was {_fmt(bn['mean'])} ± {_fmt(bn['std'], 2)} with BN and "
        f"{_fmt(nb['mean'])} ± {_fmt(nb['std'], 2)} without (mean ± std over {n} seeds each)."
    ]
    if math.isnan(d["low"]):
        parts.append(f"With fewer than two seeds per arm there is no interval; the difference BN − no-BN is {_fmt(d['diff'])}.")
    else:
        significant = d["low"] > 0 or d["high"] < 0
        ci = f"{_fmt(d['diff'])} (95% CI {_fmt(d['low'])} to {_fmt(d['high'])}, Welch's t)"
        if significant:
            parts.append(f"BN − no-BN = {ci}: BN made the {metric} clearly {'better' if better else 'worse'} here.")
        else:
            parts.append(f"BN − no-BN = {ci}: the interval includes zero, so these seeds do not show BN changing the final {metric}.")
    ett = cmp.get("epochs_to_target") or {}
    if ett.get("bn_epoch"):
        parts.append(
            f"BN reached the no-BN arm's best mean {metric} ({_fmt(ett['target'])}, at epoch {ett['reference_epoch']}) "
            f"at epoch {ett['bn_epoch']}, a {ett['speedup']:.2g}x speed-up in epochs."
        )
    elif ett:
        parts.append(f"BN never reached the no-BN arm's best mean {metric} ({_fmt(ett['target'])}).")
    return " ".join(parts)
