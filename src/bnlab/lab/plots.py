"""Plots of an experiment, drawn from its records alone (matplotlib, PNG and SVG).

* ``curves-<metric>.png``: the metric per epoch, training (solid) and
  validation (dashed), for each arm: the mean over seeds as a line and a band of
  ± one standard deviation; the tutorial's reported final figure is marked.
* ``final-<metric>.png``: a strip plot of the final value of each seed per arm,
  with the arm's mean.

Each arm has one colour in every figure (BN blue, no-BN orange).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .analysis import Experiment, primary_metric

__all__ = ["ARM_STYLE", "curves_figure", "finals_figure", "plot_curves", "plot_finals", "plot_all"]

ARM_STYLE = {
    "bn": {"color": "#1f77b4", "label": "with BN"},
    "no_bn": {"color": "#ff7f0e", "label": "without BN"},
}
_NAMES = {"loss": "loss", "mae": "mean absolute error", "accuracy": "accuracy", "mse": "mean squared error"}


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ylabel(metric: str, recipe: dict) -> str:
    base = _NAMES.get(metric, metric)
    if metric == "loss":
        return f"loss ({recipe.get('loss', '')})"
    if metric == "accuracy":
        return "accuracy (fraction correct)"
    return base


def _save(fig, out: Path, stem: str) -> list[Path]:
    """Write ``fig`` as PNG and SVG (each atomically) and close it."""
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{stem}.{ext}"
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
        tmp.replace(p)  # atomic: a half-written figure is never left under the final name
        paths.append(p)
    _mpl().close(fig)
    return paths


def plot_curves(exp: Experiment, metric: str, out: Path) -> list[Path]:
    """Training and validation ``metric`` per epoch for each arm, mean ± std over seeds (PNG + SVG)."""
    return _save(curves_figure(exp, metric), out, f"curves-{metric}")


def curves_figure(exp: Experiment, metric: str):
    """The figure of :func:`plot_curves` (a matplotlib Figure, not saved)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    recipe = exp.recipe
    drawn = 0
    for arm, rec in exp.arms.items():
        style = ARM_STYLE.get(arm, {"color": "gray", "label": arm})
        for key, ls, what in ((metric, "-", "training"), (f"val_{metric}", "--", "validation")):
            curve = rec.curve(key)
            if curve.size == 0:
                continue
            epochs = np.arange(1, curve.shape[1] + 1)
            mean, std = curve.mean(0), curve.std(0, ddof=1) if curve.shape[0] > 1 else np.zeros(curve.shape[1])
            ax.plot(epochs, mean, ls, color=style["color"], lw=1.8, label=f"{style['label']}, {what} (n={curve.shape[0]})")
            ax.fill_between(epochs, mean - std, mean + std, color=style["color"], alpha=0.18, lw=0)
            drawn += 1
    for arm, figures in (recipe.get("reported") or {}).items():
        style = ARM_STYLE.get(arm, {"color": "gray", "label": arm})
        for key, marker in ((metric, "*"), (f"val_{metric}", "P")):
            if key in figures:
                ax.plot([recipe["epochs"]], [figures[key]], marker, color=style["color"], ms=13, mec="black", mew=0.8,
                        ls="none", label=f"tutorial's {'validation' if key.startswith('val_') else 'training'} {metric}, {style['label']}")
    ax.set_title(f"{recipe['name']}: {_NAMES.get(metric, metric)} per epoch, mean ± 1 std over seeds")
    ax.set_xlabel("epoch")
    ax.set_ylabel(_ylabel(metric, recipe))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    return fig


def plot_finals(exp: Experiment, key: str, out: Path) -> list[Path]:
    """Final ``key`` of every seed, per arm, with the arm's mean as a bar (PNG + SVG)."""
    return _save(finals_figure(exp, key), out, f"final-{key}")


def finals_figure(exp: Experiment, key: str):
    """The figure of :func:`plot_finals` (not saved)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    rng = np.random.default_rng(0)
    labels = []
    for i, (arm, rec) in enumerate(exp.arms.items()):
        style = ARM_STYLE.get(arm, {"color": "gray", "label": arm})
        vals = rec.final_values(key)
        if vals.size == 0:
            continue
        ax.scatter(i + rng.uniform(-0.08, 0.08, vals.size), vals, color=style["color"], s=36, zorder=3, edgecolor="black", lw=0.5)
        ax.hlines(vals.mean(), i - 0.25, i + 0.25, color=style["color"], lw=2.5, zorder=2)
        labels.append((i, f"{style['label']}\n(n={vals.size})"))
    ax.set_xticks([i for i, _ in labels], [t for _, t in labels])
    ax.set_xlim(-0.6, max(len(labels) - 0.4, 0.6))
    ax.set_title(f"{exp.recipe['name']}: final {key} per seed")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_all(exp: Experiment, out: Path) -> dict[str, list[Path]]:
    """Every curve and strip plot for the experiment into ``out``; returns name -> files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = set().union(*[set(h) for a in exp.arms.values() for h in a.histories]) if exp.arms else set()
    metrics = [k for k in ("loss", "accuracy", "mae") if k in keys]
    made = {f"curves-{m}": plot_curves(exp, m, out) for m in metrics}
    finals = set().union(*[set(f) for a in exp.arms.values() for f in a.finals]) if exp.arms else set()
    primary = primary_metric(exp)
    for k in dict.fromkeys([primary, "test_" + primary.removeprefix("val_")]):
        if k in finals:
            made[f"final-{k}"] = plot_finals(exp, k, out)
    return made
