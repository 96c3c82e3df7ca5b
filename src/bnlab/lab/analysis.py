"""What the records say: per-arm curves and final figures, BN minus no-BN with a confidence interval,
epochs-to-target, and a plain-language verdict computed from those numbers. Pure functions of records.

The confidence interval of a difference of means is Welch's t interval
(unequal variances, Welch-Satterthwaite degrees of freedom). Epochs-to-target
follows the original paper's way of counting the speed-up ("the same accuracy
with 14 times fewer training steps", Ioffe & Szegedy 2015): the first epoch at
which the mean validation metric of the BN arm reaches the best mean value of
the no-BN arm, against the epoch at which the no-BN arm got there.

Every planned run is accounted for: it finished, diverged (a non-finite loss
stopped it; counted in the verdict, not dropped), has unreadable records (left
out of n, with the reason), or has not finished yet. Figures, curves and
intervals are over the runs that finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import records

__all__ = [
    "ARM_NAMES", "ArmRecords", "Experiment", "load", "welch_interval", "epochs_to_target", "primary_metric", "compare",
    "run_status", "verdict_sentences", "verdict",
]

ARM_NAMES = {"bn": "BN", "no_bn": "no-BN"}  # how sentences name the arms


@dataclass
class ArmRecords:
    """One arm's records: the runs that finished (``seeds``, ``histories``, ``finals``, in step) and the others.

    ``diverged`` maps a seed to the epoch its figures stopped being finite;
    ``unreadable`` maps a seed to what is wrong with its records; ``unfinished``
    lists seeds without a ``final.json`` yet.
    """

    arm: str
    seeds: list[int]
    histories: list[dict[str, list[float]]]
    finals: list[dict]
    diverged: dict[int, int] = field(default_factory=dict)
    unreadable: dict[int, str] = field(default_factory=dict)
    unfinished: list[int] = field(default_factory=list)

    @property
    def ended(self) -> int:
        """Runs that ended with a readable result: finished or diverged."""
        return len(self.seeds) + len(self.diverged)

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
    problems: list[str] = field(default_factory=list)  # one line per unreadable record ("<file>: <what is wrong>")

    @property
    def recipe(self) -> dict:
        return self.config["recipe"]

    @property
    def complete(self) -> bool:
        """Every planned run ended with a readable result (finished or diverged)."""
        want = len(self.config["seeds"])
        return all(a.ended == want for a in self.arms.values()) and len(self.arms) == len(self.config["arms"])


def _read_run(rd: Path, arm: str, seed: int, recipe_epochs: int):
    """``(final, history)`` of one ended run, every file checked; RecordError names the first damaged one."""
    final = records.read_final(rd / "final.json", arm, seed)
    diverged = final["diverged_epoch"]
    epochs = final.get("epochs") or (None if diverged is not None else recipe_epochs)
    history = records.read_history(rd / "history.csv", epochs=epochs, diverged_epoch=diverged)
    records.check_digest(rd / "history.csv", final["sha256"])
    records.load_weights(rd / "weights.safetensors")
    records.check_digest(rd / "weights.safetensors", final["sha256"])
    return final, history


def load(path: Path) -> Experiment:
    """Read an experiment directory written by :func:`bnlab.lab.experiment.run_experiment`.

    A damaged ``config.json`` raises :class:`~bnlab.lab.records.RecordError`
    (nothing can be read without it); a damaged run is marked unreadable in
    its arm and listed in ``problems``, and the rest is read.
    """
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} holds no bnlab records (no config.json)")
    cfg = records.read_config(cfg_path)
    exp = Experiment(path, cfg, {})
    try:
        exp.env = records.read_env(path / "env.json")
    except records.RecordError as exc:
        exp.problems.append(str(exc))
    for arm in cfg["arms"]:
        rec = ArmRecords(arm, [], [], [])
        for seed in cfg["seeds"]:
            rd = records.run_dir(path, arm, seed)
            if not (rd / "final.json").exists():
                rec.unfinished.append(seed)
                continue
            try:
                final, history = _read_run(rd, arm, seed, cfg["recipe"]["epochs"])
            except records.RecordError as exc:
                rec.unreadable[seed] = str(exc)
                exp.problems.append(f"{exc} (seed {seed} of the {ARM_NAMES[arm]} arm is left out)")
                continue
            if final["diverged_epoch"] is not None:
                rec.diverged[seed] = final["diverged_epoch"]
                continue
            rec.seeds.append(seed)
            rec.histories.append(history)
            rec.finals.append(final)
        exp.arms[arm] = rec
    return exp


def welch_interval(a, b, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean of ``a`` minus mean of ``b`` with Welch's t interval: ``(diff, low, high, dof)``.

    With fewer than two values in either group, or no spread at all, the
    interval is undefined (NaN bounds).
    """
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan, math.nan
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


def run_status(exp: Experiment) -> dict:
    """Per arm: the seeds planned, finished, diverged (seed -> epoch), unreadable (seed -> reason), unfinished."""
    return {arm: {"planned": list(exp.config["seeds"]), "finished": list(a.seeds), "diverged": dict(a.diverged),
                  "unreadable": dict(a.unreadable), "unfinished": list(a.unfinished)} for arm, a in exp.arms.items()}


def compare(exp: Experiment) -> dict:
    """Final figures per arm, the BN - no-BN differences with 95% intervals, epochs-to-target, and every run's status."""
    arms = exp.arms
    keys = []
    for a in arms.values():
        for f in a.finals:
            keys += [k for k, v in f.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k not in ("seed", "epochs", "diverged_epoch", "seconds", "resumed_from_epoch") and k not in keys]
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
    return {"metric": metric, "table": table, "diffs": diffs, "epochs_to_target": ett, "runs": run_status(exp)}


def shown_figures(exp: Experiment, keys) -> list[str]:
    """The figures worth a table row: ``test_*`` repeats ``val_*`` when the validation data is the test set."""
    if exp.recipe.get("validation") == "test":
        return [k for k in keys if not (k.startswith("test_") and f"val_{k[5:]}" in keys)]
    return list(keys)


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _seeds(seeds) -> str:
    seeds = sorted(seeds)
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def verdict_sentences(exp: Experiment, cmp: dict | None = None) -> list[str]:
    """The verdict, sentence by sentence, computed from the numbers: divergence, left-out seeds, did BN help, how sure."""
    cmp = cmp or compare(exp)
    metric = cmp["metric"]
    name = exp.recipe["name"]
    arms = exp.arms
    out = []
    if any(a.diverged for a in arms.values()):
        counts = [f"{ARM_NAMES[arm]} {'diverged ' if i == 0 else ''}in {len(a.diverged)}/{a.ended}{' seeds' if i == 0 else ''}"
                  for i, (arm, a) in enumerate(arms.items())]
        out.append(f"{', '.join(counts)} (a loss that was no longer finite stopped training; "
                   "the figures compare the runs that did not diverge).")
    left_out = [f"{ARM_NAMES[arm]} {_seeds(a.unreadable)}" for arm, a in arms.items() if a.unreadable]
    if left_out:
        out.append(f"Left out because their records are unreadable: {'; '.join(left_out)}.")
    if "bn" not in arms or "no_bn" not in arms:
        only = next(iter(arms), "?")
        s = cmp["table"].get(metric, {}).get(only, {})
        out.append(f"Only the {only!r} arm was run on {name}: final {metric} {_fmt(s.get('mean'))} ± {_fmt(s.get('std'))} "
                   f"over {s.get('n', 0)} seeds. Run both arms (--compare) for a verdict.")
        return out
    empty = [ARM_NAMES[arm] for arm in ("bn", "no_bn") if not arms[arm].seeds]
    if empty:
        which = "either arm" if len(empty) == 2 else f"the {empty[0]} arm"
        out.append(f"No run of {which} finished on {name} without diverging or damaged records, so there are no final figures to compare.")
        return out
    bn, nb = cmp["table"][metric]["bn"], cmp["table"][metric]["no_bn"]
    d = cmp["diffs"][metric]
    higher = higher_is_better(metric)
    better = (d["diff"] > 0) == higher
    over = f"over {bn['n']} seeds each" if bn["n"] == nb["n"] else f"over {bn['n']} and {nb['n']} seeds"
    out.append(f"On {name}, the final {metric} was {_fmt(bn['mean'])} ± {_fmt(bn['std'], 2)} with BN and "
               f"{_fmt(nb['mean'])} ± {_fmt(nb['std'], 2)} without (mean ± std {over}).")
    if math.isnan(d["low"]):
        out.append(f"With fewer than two seeds per arm there is no interval; the difference BN − no-BN is {_fmt(d['diff'])}.")
    else:
        significant = d["low"] > 0 or d["high"] < 0
        ci = f"{_fmt(d['diff'])} (95% CI {_fmt(d['low'])} to {_fmt(d['high'])}, Welch's t)"
        if significant:
            out.append(f"BN − no-BN = {ci}: BN made the {metric} clearly {'better' if better else 'worse'} here.")
        else:
            out.append(f"BN − no-BN = {ci}: the interval includes zero, so these seeds do not show BN changing the final {metric}.")
    ett = cmp.get("epochs_to_target") or {}
    if ett.get("bn_epoch"):
        out.append(
            f"BN reached the no-BN arm's best mean {metric} ({_fmt(ett['target'])}, at epoch {ett['reference_epoch']}) "
            f"at epoch {ett['bn_epoch']}, a {ett['speedup']:.2g}x speed-up in epochs."
        )
    elif ett:
        out.append(f"BN never reached the no-BN arm's best mean {metric} ({_fmt(ett['target'])}).")
    return out


def verdict(exp: Experiment, cmp: dict | None = None) -> str:
    """One paragraph: :func:`verdict_sentences` joined."""
    return " ".join(verdict_sentences(exp, cmp))
