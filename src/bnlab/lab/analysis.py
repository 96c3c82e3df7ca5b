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

How numbers are written is decided here once, for the verdict, the report's
tables and ``bnlab report``: one precision per metric (:func:`decimals_for`),
the true minus sign (U+2212), signed differences (:func:`fmt`,
:func:`fmt_interval`). :func:`figure_rows` sets the tutorial's figure (and any
reference re-run) beside each measured one, whatever the validation/test
arrangement: when the test set is the validation data, ``val_x`` and
``test_x`` are one figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import records

__all__ = [
    "ARM_NAMES", "ArmRecords", "Experiment", "load", "welch_interval", "epochs_to_target", "primary_metric", "compare",
    "run_status", "verdict_sentences", "verdict", "MINUS", "fmt", "fmt_interval", "fmt_stat", "fmt_value", "decimals_for",
    "base_metric", "better_direction",
    "FigureRow", "figure_rows", "tutorial_note", "outcome",
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


def epochs_to_target(bn_curve: np.ndarray, ref_curve: np.ndarray, higher: bool, target: str = "best") -> dict:
    """First epoch (1-based) at which the mean BN curve reaches the best (``target="best"``) or the last
    (``"final"``) value of the mean reference curve, and the first epoch at which the reference curve did."""
    if bn_curve.size == 0 or ref_curve.size == 0:
        return {}
    bn_mean, ref_mean = bn_curve.mean(0), ref_curve.mean(0)
    if target not in ("best", "final"):
        raise ValueError(f"target must be 'best' or 'final', got {target!r}")
    if target == "final":  # a noisy plateau may have touched its last value before the end
        target = float(ref_mean[-1])
        best_idx = int(np.nonzero(ref_mean >= target if higher else ref_mean <= target)[0][0])
    else:
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


# ----------------------------------------------------------------------------- how numbers are written

MINUS = "\u2212"  # the minus sign, never the hyphen, in every figure a report or verdict prints


def fmt(x, decimals: int, *, sign: bool = False) -> str:
    """``x`` with ``decimals`` decimals, a true minus sign (U+2212) and, with ``sign``, a ``+`` on positive values.

    ``None`` or NaN is ``n/a``. Every number of a report, a verdict and ``bnlab report``'s table is written by this.
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    text = f"{x:{'+' if sign else ''}.{decimals}f}"
    if text.lstrip("+-").strip("0.") == "":  # rounds to zero: no sign
        text = text.lstrip("+-")
    return text.replace("-", MINUS)


def fmt_interval(diff: dict | None, decimals: int) -> str:
    """A difference with its interval, ``+0.012 [−0.003, +0.027]`` (signed: it says which arm is ahead); ``—`` when there
    is no difference (an arm without finished runs), the difference alone when there is no interval."""
    if not diff or math.isnan(diff["diff"]):
        return "—"
    if math.isnan(diff["low"]):
        return fmt(diff["diff"], decimals, sign=True)
    return (f"{fmt(diff['diff'], decimals, sign=True)} [{fmt(diff['low'], decimals, sign=True)}, "
            f"{fmt(diff['high'], decimals, sign=True)}]")


def fmt_stat(s: dict | None, decimals: int) -> str:
    """A :func:`summarize` result as ``mean ± std`` (the mean alone for one value; ``—`` for none)."""
    if not s or not s.get("n"):
        return "—"
    if s["n"] > 1:
        return f"{fmt(s['mean'], decimals)} ± {fmt(s['std'], decimals)}"
    return fmt(s["mean"], decimals)


def fmt_value(v, decimals: int) -> str:
    """A quoted figure: a number, or a ``(low, high)`` range written ``low to high``; ``—`` for none."""
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)):
        return f"{fmt(v[0], decimals)} to {fmt(v[1], decimals)}"
    return fmt(v, decimals)


def decimals_for(values, spreads=()) -> int:
    """One precision for a metric: three significant digits of its largest value, and at least one of its smallest
    non-zero spread (standard deviation, interval half-width), from 0 to 5 decimals."""
    vals = [abs(float(v)) for v in values if v is not None and math.isfinite(float(v)) and v != 0]
    digits = 2 - math.floor(math.log10(max(vals))) if vals else 3
    spread = [abs(float(v)) for v in spreads if v is not None and math.isfinite(float(v)) and v != 0]
    if spread:
        digits = max(digits, -math.floor(math.log10(min(spread))))
    return min(max(digits, 0), 5)


def base_metric(key: str) -> str:
    """``val_accuracy`` and ``test_accuracy`` measure ``accuracy``."""
    for prefix in ("val_", "test_"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


_LOWER_IS_BETTER = ("loss", "mae", "mse", "error")


def better_direction(metric: str) -> str | None:
    """``"higher"`` (accuracy), ``"lower"`` (losses and errors), or None for a figure without a better side."""
    if higher_is_better(metric):
        return "higher"
    return "lower" if any(base_metric(metric).endswith(k) for k in _LOWER_IS_BETTER) else None


# ----------------------------------------------------------------------------- the table of final figures


@dataclass
class FigureRow:
    """One final figure across the arms, with the tutorial's and the reference's figure for it.

    ``same_as``: the other name of the same figure (``test_accuracy`` for
    ``val_accuracy`` when the validation data is the test set). ``stats``: arm ->
    mean, std, n over the finished seeds; ``diff``: BN − no-BN with its interval;
    ``tutorial``: arm -> the figure the tutorial printed (one run);
    ``reference``: arm -> a figure or a (low, high) range quoted by the recipe.
    ``decimals``: the precision of the figure's metric, for every number of the row.
    """

    key: str
    same_as: str | None
    stats: dict
    diff: dict | None
    tutorial: dict
    reference: dict
    direction: str | None
    verdict: bool
    decimals: int = 4

    @property
    def label(self) -> str:
        return f"{self.key} = {self.same_as}" if self.same_as else self.key

    @property
    def names(self) -> tuple[str, ...]:
        return (self.key, self.same_as) if self.same_as else (self.key,)


def _recipe_figure(figures: dict, names) -> object:
    return next((figures[n] for n in names if n in figures), None)


def figure_rows(exp: Experiment, cmp: dict | None = None) -> list[FigureRow]:
    """The rows of the final-figures table: every figure measured (``test_*`` merged into ``val_*`` when they are the
    same data), then any figure the tutorial or the reference gives that this run did not measure; one precision per
    metric (:func:`decimals_for` over every number of that metric)."""
    cmp = cmp or compare(exp)
    recipe = exp.recipe
    reported, reference = recipe.get("reported") or {}, recipe.get("reference") or {}
    keys = [k for k in shown_figures(exp, cmp["table"]) if not k.startswith("recompute")]
    rows = []
    for key in keys:
        same = f"test_{key[4:]}" if recipe.get("validation") == "test" and key.startswith("val_") and f"test_{key[4:]}" in cmp["table"] else None
        names = (key, same) if same else (key,)
        rows.append(FigureRow(
            key, same, cmp["table"][key], cmp["diffs"].get(key),
            {arm: v for arm, figs in reported.items() if (v := _recipe_figure(figs, names)) is not None},
            {arm: v for arm, figs in reference.items() if (v := _recipe_figure(figs, names)) is not None},
            better_direction(key), key == cmp["metric"]))
    seen = {n for r in rows for n in r.names}
    for key in dict.fromkeys(k for figs in (*reported.values(), *reference.values()) for k in figs):
        alias = f"val_{key[5:]}" if key.startswith("test_") and recipe.get("validation") == "test" else None
        if key in seen or alias in seen:
            continue
        rows.append(FigureRow(key, None, {}, None, {a: f[key] for a, f in reported.items() if key in f},
                              {a: f[key] for a, f in reference.items() if key in f}, better_direction(key), False))
    for base in {base_metric(r.key) for r in rows}:
        same = [r for r in rows if base_metric(r.key) == base]
        values, spreads = [], []
        for r in same:
            values += [s["mean"] for s in r.stats.values() if s.get("n")]
            spreads += [s["std"] for s in r.stats.values() if s.get("n", 0) > 1]
            for v in (*r.tutorial.values(), *r.reference.values()):
                values += list(v) if isinstance(v, (list, tuple)) else [v]
            if r.diff and not math.isnan(r.diff["low"]):
                spreads.append((r.diff["high"] - r.diff["low"]) / 2)
        d = decimals_for(values, spreads)
        for r in same:
            r.decimals = d
    return rows


def tutorial_note(recipe: dict) -> str | None:
    """Why the tutorial column is empty, when the recipe carries no figure of its tutorial; None when it does."""
    if recipe.get("reported"):
        return None
    if recipe.get("stands_in_for"):
        return (f"No tutorial figure: {recipe['name']} is an offline stand-in for {recipe['stands_in_for']} on other data "
                f"({recipe['dataset']}), so that tutorial's figures do not apply.")
    return f"No tutorial figure: tutorial {recipe['tutorial']} prints no final figure for this experiment."


# ----------------------------------------------------------------------------- the verdict


def _seeds(seeds) -> str:
    seeds = sorted(seeds)
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def outcome(exp: Experiment, cmp: dict | None = None) -> str:
    """The verdict in a few words (an index's column): ``BN better``, ``BN worse``, ``no clear difference``,
    ``too few seeds``, ``no finished runs`` or ``one arm only``."""
    cmp = cmp or compare(exp)
    if "bn" not in exp.arms or "no_bn" not in exp.arms:
        return "one arm only"
    if not exp.arms["bn"].seeds or not exp.arms["no_bn"].seeds:
        return "no finished runs"
    d = cmp["diffs"][cmp["metric"]]
    if math.isnan(d["low"]):
        return "too few seeds"
    if d["low"] > 0 or d["high"] < 0:
        return "BN better" if (d["diff"] > 0) == higher_is_better(cmp["metric"]) else "BN worse"
    return "no clear difference"


def _speedup_sentence(exp: Experiment, cmp: dict, decimals: int) -> str | None:
    """Epochs to target, in this run's own epochs and steps (``facts['steps_per_epoch']``)."""
    ett, metric = cmp.get("epochs_to_target") or {}, cmp["metric"]
    if not ett:
        return None
    target = fmt(ett["target"], decimals)
    per_epoch = (exp.config.get("facts") or {}).get("steps_per_epoch")
    step = (lambda e: f", step {e * per_epoch:,}") if per_epoch else (lambda e: "")
    if not ett.get("bn_epoch"):
        return f"BN never reached the no-BN arm's best mean {metric} ({target}, at epoch {ett['reference_epoch']}{step(ett['reference_epoch'])})."
    ratio = ett["speedup"]
    if ratio > 1 and ett["bn_epoch"] == 1:  # already there at its first measurement: it may have been sooner
        gain = (f"at least {ratio:.1f} times fewer epochs{' and steps' if per_epoch else ''} in this run (BN was there at "
                f"its first measurement)")
    elif ratio > 1:
        gain = f"{ratio:.1f} times fewer epochs{' and steps' if per_epoch else ''} in this run"
    else:
        gain = "no fewer epochs" + (" or steps" if per_epoch else "") + " in this run"
    return (f"BN first reached the no-BN arm's best mean {metric} ({target}, at epoch {ett['reference_epoch']}"
            f"{step(ett['reference_epoch'])}) at epoch {ett['bn_epoch']}{step(ett['bn_epoch'])}: {gain}.")


def verdict_sentences(exp: Experiment, cmp: dict | None = None) -> list[str]:
    """The verdict, sentence by sentence, computed from the numbers: divergence, left-out seeds, did BN help, how sure,
    the tutorial's figure beside ours, how much sooner BN got there.

    Every number of the verdict's metric is written at that metric's one precision (:func:`figure_rows`), the same
    strings as the report's table.
    """
    cmp = cmp or compare(exp)
    metric = cmp["metric"]
    name = exp.recipe["name"]
    arms = exp.arms
    rows = {r.key: r for r in figure_rows(exp, cmp)}
    d_ = rows[metric].decimals if metric in rows else 4
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
        out.append(f"Only the {only!r} arm was run on {name}: final {metric} {fmt(s.get('mean'), d_)} ± {fmt(s.get('std'), d_)} "
                   f"over {s.get('n', 0)} seeds. Run both arms (--compare) for a verdict.")
        return out
    empty = [ARM_NAMES[arm] for arm in ("bn", "no_bn") if not arms[arm].seeds]
    if empty:
        which = "either arm" if len(empty) == 2 else f"the {empty[0]} arm"
        out.append(f"No run of {which} finished on {name} without diverging or damaged records, so there are no final figures to compare.")
        return out
    bn, nb = cmp["table"][metric]["bn"], cmp["table"][metric]["no_bn"]
    d = cmp["diffs"][metric]
    over = f"over {bn['n']} seeds each" if bn["n"] == nb["n"] else f"over {bn['n']} and {nb['n']} seeds"
    out.append(f"On {name}, the final {metric} was {fmt(bn['mean'], d_)} ± {fmt(bn['std'], d_)} with BN and "
               f"{fmt(nb['mean'], d_)} ± {fmt(nb['std'], d_)} without (mean ± std {over}).")
    if math.isnan(d["low"]):
        out.append(f"With fewer than two seeds per arm there is no interval; the difference BN − no-BN is {fmt(d['diff'], d_, sign=True)}.")
    else:
        ci = f"{fmt(d['diff'], d_, sign=True)} (95% CI {fmt(d['low'], d_, sign=True)} to {fmt(d['high'], d_, sign=True)}, Welch's t)"
        label = outcome(exp, cmp)
        if label in ("BN better", "BN worse"):
            out.append(f"BN − no-BN = {ci}: BN made the {metric} clearly {label.split()[1]} here.")
        else:
            out.append(f"BN − no-BN = {ci}: the interval includes zero, so these seeds do not show BN changing the final {metric}.")
    tut = rows[metric].tutorial if metric in rows else {}
    if tut:
        said = " and ".join(f"{fmt(v, d_)} {'with' if arm == 'bn' else 'without'} BN" for arm, v in tut.items()
                            if not isinstance(v, (list, tuple)))
        if said:
            out.append(f"The tutorial's single run printed {said}.")
    if (sentence := _speedup_sentence(exp, cmp, d_)) is not None:
        out.append(sentence)
    return out


def verdict(exp: Experiment, cmp: dict | None = None) -> str:
    """One paragraph: :func:`verdict_sentences` joined."""
    return " ".join(verdict_sentences(exp, cmp))
