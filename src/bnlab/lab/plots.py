"""Plots of an experiment, drawn from its records alone (matplotlib, PNG and SVG).

* ``curves-<metric>.png``: the metric per epoch, training (solid) and
  validation (dashed), for each arm: the mean over seeds as a line and a band of
  ± one standard deviation; the tutorial's reported final figure is marked.
* ``final-<metric>.png``: a strip plot of the final value of each seed per arm,
  with the arm's mean.

Each arm has one colour in every figure (BN blue, no-BN orange).

Diagnostics (from the records of :mod:`bnlab.lab.probes`, :mod:`~bnlab.lab.landscape`
and :mod:`~bnlab.lab.sweep`): ``fig1`` (the original paper's Figure 1: test
accuracy against steps and one sigmoid's input percentiles per arm),
``landscape`` (Santurkar et al.'s Figure 4) and ``batch-size-<metric>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .analysis import Experiment, primary_metric

__all__ = ["ARM_STYLE", "curves_figure", "finals_figure", "plot_curves", "plot_finals", "plot_all",
           "fig1_figure", "plot_fig1", "last_activation_layer", "landscape_figure", "plot_landscape",
           "SWEEP_STYLE", "batch_size_figure", "plot_batch_size"]

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


# ----------------------------------------------------------------------------- diagnostics: probes, landscape, sweeps
# Pure functions of the records of bnlab.lab.probes, bnlab.lab.landscape and bnlab.lab.sweep.


def _seed_lines(ax, series, color, label, lw=1.8):
    """Each seed's (x, y) thin, their mean over the steps all share bold; returns the mean's x, y."""
    common = None
    for x, _ in series:
        common = set(x.tolist()) if common is None else common & set(x.tolist())
    for x, y in series:
        ax.plot(x, y, color=color, lw=0.6, alpha=0.35)
    if not common:
        return None
    steps = np.array(sorted(common))
    mean = np.mean([y[np.isin(x, steps)] for x, y in series], axis=0)
    ax.plot(steps, mean, color=color, lw=lw, label=label)
    return steps, mean


def fig1_figure(exp: Experiment, probes: dict, layers: dict | None = None):
    """Ioffe & Szegedy (2015), Figure 1, from records: (a) test accuracy against steps for each arm,
    (b, c) the percentiles of one unit's input to the last hidden sigmoid, without and with BN.

    ``exp``: the experiment (its ``val_accuracy`` is test accuracy when the recipe
    validates on the test set; an epoch is ``steps_per_epoch`` steps).
    ``probes``: ``{arm: [ProbeRecords per seed]}``. ``layers``: ``{arm: layer
    name}``; by default each arm's last probed sigmoid. The step at which the
    mean BN curve first reaches the no-BN arm's best mean accuracy is marked
    (:func:`bnlab.lab.analysis.epochs_to_target`, in steps).
    """
    from .analysis import epochs_to_target

    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    recipe = exp.recipe
    per_epoch = recipe.get("steps_per_epoch") or 1
    ax = axes[0]
    curves = {}
    for arm, rec in exp.arms.items():
        curve = rec.curve("val_accuracy")
        if curve.size == 0:
            continue
        curves[arm] = curve
        steps = np.arange(1, curve.shape[1] + 1) * per_epoch
        style = ARM_STYLE.get(arm, {"color": "gray", "label": arm})
        _seed_lines(ax, [(steps, c) for c in curve], style["color"], f"{style['label']} (n={curve.shape[0]})")
    if "bn" in curves and "no_bn" in curves:
        ett = epochs_to_target(curves["bn"], curves["no_bn"], higher=True)
        if ett.get("bn_epoch"):
            ax.axvline(ett["bn_epoch"] * per_epoch, color=ARM_STYLE["bn"]["color"], ls=":", lw=1)
            ax.set_title(f"(a) test accuracy; BN reaches no-BN's best ({ett['target']:.3f}) at step "
                         f"{ett['bn_epoch'] * per_epoch:,} vs {ett['reference_epoch'] * per_epoch:,}", fontsize=9)
    if not ax.get_title():
        ax.set_title("(a) test accuracy", fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    lims = []
    for ax, arm, tag in ((axes[1], "no_bn", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
        recs = probes.get(arm) or []
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if not recs:
            continue
        layer = (layers or {}).get(arm) or last_activation_layer(recs[0].meta, "sigmoid")
        unit = recs[0].meta.get("layers", {}).get(layer, {}).get("unit", "?")
        pcts = [q for q in recs[0].quantities(layer) if q.startswith("unit_p")]
        for q, color in zip(pcts, ("#9467bd", "#2ca02c", "#d62728", "#8c564b", "#17becf"), strict=False):
            _seed_lines(ax, [r.series(layer, q) for r in recs], color, f"{q[5:]} (n={len(recs)})")
        ax.set_title(f"{tag}: input to sigmoid unit {unit} of layer {layer!r}", fontsize=9)
        ax.set_ylabel("pre-activation percentiles")
        ax.legend(fontsize=8)
        lims.append(ax.get_ylim())
    if lims:  # the same scale on both, so the drift compares by eye
        lo, hi = min(a for a, _ in lims), max(b for _, b in lims)
        for ax in axes[1:]:
            ax.set_ylim(lo, hi)
    fig.suptitle(f"{recipe['name']}: Ioffe & Szegedy (2015), Figure 1", fontsize=11)
    fig.tight_layout()
    return fig


def last_activation_layer(meta: dict, activation: str = "sigmoid") -> str:
    """The last layer (in module order) of ``probes.json`` whose recorded input feeds ``activation``."""
    names = [n for n, d in meta.get("layers", {}).items() if d.get("activation") == activation]
    if not names:
        raise ValueError(f"no probed {activation} layer; probed: {list(meta.get('layers', {}))}")
    return names[-1]


def plot_fig1(exp: Experiment, probes: dict, out: Path, layers: dict | None = None) -> list[Path]:
    """:func:`fig1_figure` saved as ``fig1.png`` and ``fig1.svg``."""
    return _save(fig1_figure(exp, probes, layers), Path(out), "fig1")


def landscape_figure(landscapes: dict, title: str = ""):
    """Santurkar et al. (2018), Figure 4, from records: per arm, over training, (a) the band between the
    smallest and largest loss along the gradient, (b) the band of gradient changes, (c) the effective
    beta-smoothness. ``landscapes``: ``{arm: [LandscapeRecords per seed]}``; bands are min-max over the
    step sizes, averaged over seeds.
    """
    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    for arm, recs in landscapes.items():
        recs = [r for r in recs if len(r.epochs)]
        if not recs:
            continue
        style = ARM_STYLE.get(arm, {"color": "gray", "label": arm})
        n = min(len(r.epochs) for r in recs)
        use_steps = all(np.isfinite(r.steps[:n]).all() for r in recs)
        x = recs[0].steps[:n] if use_steps else recs[0].epochs[:n]
        for ax, key in ((axes[0], "losses"), (axes[1], "grad_diffs")):
            vals = np.array([getattr(r, key)[:n] for r in recs])  # (seeds, points, etas)
            lo, hi = vals.min(axis=2).mean(0), vals.max(axis=2).mean(0)
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.3, lw=0, label=f"{style['label']} (n={len(recs)})")
        beta = np.array([r.beta[:n] for r in recs])
        axes[2].plot(x, beta.mean(0), color=style["color"], lw=1.8, label=f"{style['label']} (n={len(recs)})")
        if len(recs) > 1:
            axes[2].fill_between(x, beta.min(0), beta.max(0), color=style["color"], alpha=0.18, lw=0)
        for ax in axes:
            ax.set_xlabel("training step" if use_steps else "epoch")
    for ax, t in zip(axes, ("(a) loss along the gradient (min-max over step sizes)",
                            "(b) gradient change ||g(w - eta g) - g(w)|| (min-max)",
                            "(c) effective beta-smoothness (max over step sizes)"), strict=True):
        ax.set_title(t, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if axes[1].has_data():
        axes[1].set_yscale("log")  # gradient changes span orders of magnitude between the arms
    fig.suptitle(f"{title + ': ' if title else ''}loss landscape along the gradient (Santurkar et al., 2018, Figure 4)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_landscape(landscapes: dict, out: Path, title: str = "") -> list[Path]:
    """:func:`landscape_figure` saved as ``landscape.png`` and ``.svg``."""
    return _save(landscape_figure(landscapes, title), Path(out), "landscape")


SWEEP_STYLE = {
    "bn": {"color": "#1f77b4", "label": "BN"},
    "renorm": {"color": "#2ca02c", "label": "batch renorm"},
    "ghost": {"color": "#9467bd", "label": "ghost BN"},
    "none": {"color": "#ff7f0e", "label": "no BN"},
}


def batch_size_figure(rows: list[dict], metric: str, title: str = ""):
    """Final ``metric`` against batch size (log2 axis), one line per norm with its confidence band.

    ``rows``: :func:`bnlab.lab.sweep.aggregate` output grouped by ``("norm",
    "batch_size")``. Groups with diverged (non-finite) seeds are marked with
    their count.
    """
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    named = list(SWEEP_STYLE)  # the sweep's own names first, in their order; others after, as they come
    norms = sorted(dict.fromkeys(r["norm"] for r in rows), key=lambda n: named.index(n) if n in named else len(named))
    for i, norm in enumerate(norms):
        rs = sorted((r for r in rows if r["norm"] == norm), key=lambda r: r["batch_size"])
        style = SWEEP_STYLE.get(norm, {"color": f"C{(i + 4) % 10}", "label": norm})
        bs = np.array([r["batch_size"] for r in rs], dtype=float)
        mean = np.array([r["mean"] for r in rs], dtype=float)
        low = np.array([r["low"] for r in rs], dtype=float)
        high = np.array([r["high"] for r in rs], dtype=float)
        n = min(r["n"] for r in rs)
        ax.plot(bs, mean, "o-", color=style["color"], lw=1.8, ms=4, label=f"{style['label']} (n={n})")
        ok = np.isfinite(low) & np.isfinite(high)
        ax.fill_between(bs[ok], low[ok], high[ok], color=style["color"], alpha=0.18, lw=0)
        for r in rs:
            if r["nonfinite"]:
                ax.annotate(f"{r['nonfinite']} diverged", (r["batch_size"], r["mean"] if np.isfinite(r["mean"]) else ax.get_ylim()[0]),
                            fontsize=7, color=style["color"], xytext=(3, -10), textcoords="offset points")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (log2 scale)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{title + ': ' if title else ''}final {metric} against batch size, mean and 95% CI over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    if norms:
        ax.legend(fontsize=8)
    return fig


def plot_batch_size(rows: list[dict], metric: str, out: Path, title: str = "") -> list[Path]:
    """:func:`batch_size_figure` saved as ``batch-size-<metric>.png`` and ``.svg``."""
    return _save(batch_size_figure(rows, metric, title), Path(out), f"batch-size-{metric}")
