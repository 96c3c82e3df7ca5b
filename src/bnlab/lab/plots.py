"""Plots of an experiment, drawn from its records alone (matplotlib; SVG, and PNG at twice the screen density).

* ``curves-<metric>``: the metric per epoch, training and validation side by
  side, each arm's mean over seeds bold over a band of ± one standard deviation
  and each seed's own curve thin beneath; the tutorial's final figure (one run)
  as a dotted reference line ending in a star.
* ``final-<metric>``: the final value of every seed, labelled with its seed, per
  arm, with the arm's mean and the tutorial's figure; one panel per distinct
  quantity (``test_*`` only where the test set is not the validation data).
* ``thumb``: a small picture of the validation curve for an index.

One look for every figure (:data:`STYLE`): the colour-blind-safe palette of
Okabe & Ito (2008, "Color Universal Design"), the BN arm blue and filled, the
no-BN arm vermillion and hatched, so that where their bands overlap both stay
visible; legends beside or below the data, never on it; whole-number epochs.

Diagnostics (from the records of :mod:`bnlab.lab.probes`, :mod:`~bnlab.lab.landscape`
and :mod:`~bnlab.lab.sweep`): ``fig1`` (the original paper's Figure 1: test
accuracy against steps and one sigmoid's input percentiles per arm),
``landscape`` (Santurkar et al.'s Figure 4) and ``batch-size-<metric>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .analysis import Experiment, base_metric, figure_rows, primary_metric

__all__ = ["ARM_STYLE", "OKABE_ITO", "STYLE", "DPI", "curves_figure", "finals_figure", "thumbnail_figure", "plot_curves",
           "plot_finals", "plot_all", "fig1_figure", "plot_fig1", "last_activation_layer", "layer_figure", "plot_layer",
           "drift_figure", "plot_drift", "landscape_figure", "plot_landscape", "SWEEP_STYLE", "batch_size_figure",
           "plot_batch_size"]

# Okabe & Ito's eight colours, distinct under the common colour-vision deficiencies.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7"}

ARM_STYLE = {
    "bn": {"color": OKABE_ITO["blue"], "label": "with BN", "hatch": None},
    "no_bn": {"color": OKABE_ITO["vermillion"], "label": "without BN", "hatch": "///"},
}
_OTHER = {"color": "#777777", "label": "?", "hatch": "...."}
_NAMES = {"loss": "loss", "mae": "mean absolute error", "accuracy": "accuracy", "mse": "mean squared error"}

STYLE = {  # matplotlib rcParams of every bnlab figure
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "figure.titlesize": 11, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
    "legend.frameon": False, "hatch.linewidth": 0.7, "svg.fonttype": "path", "svg.hashsalt": "bnlab",
    "axes.prop_cycle": None,  # set below from the palette
}
DPI = 192  # PNG pixels per inch: twice the 96 CSS pixels per inch a browser shows the figure at


def _mpl():
    """pyplot on the Agg backend with :data:`STYLE` (set once: updating rcParams validates every entry)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if plt.rcParams["svg.hashsalt"] != STYLE["svg.hashsalt"]:
        from cycler import cycler

        plt.rcParams.update({**STYLE, "axes.prop_cycle": cycler(color=[OKABE_ITO[c] for c in (
            "blue", "vermillion", "bluish green", "reddish purple", "orange", "sky blue", "yellow", "black")])})
    return plt


def _style(arm: str) -> dict:
    return ARM_STYLE.get(arm, {**_OTHER, "label": arm})


def _ylabel(metric: str, recipe: dict) -> str:
    base = _NAMES.get(metric, metric)
    if metric == "loss":
        return f"loss ({recipe.get('loss', '')})"
    if metric == "accuracy":
        return "accuracy (fraction correct)"
    return base


def _save(fig, out: Path, stem: str) -> list[Path]:
    """Write ``fig`` as PNG (at :data:`DPI`) and SVG, each atomically and without a date (the same records give the
    same bytes), and close it. A figure with constrained layout is saved as laid out (one drawing per file); any
    other is cropped to what it draws ("tight", which draws it twice)."""
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    tight = "tight" if fig.get_layout_engine() is None else None
    for ext, kw in (("png", {"metadata": {"Software": None}, "pil_kwargs": {"compress_level": 1}}),  # fast: the page embeds the SVG
                    ("svg", {"metadata": {"Date": None}})):
        p = out / f"{stem}.{ext}"
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches=tight, **kw)
        tmp.replace(p)  # atomic: a half-written figure is never left under the final name
        paths.append(p)
    _mpl().close(fig)
    return paths


def _integer_epochs(ax, n: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.7 if n <= 1 else 1, n + 0.3 if n <= 1 else n)


def _band(ax, x, lo, hi, style, **kw):
    """A ± std band: filled for BN, hatched for no-BN, so that overlapping bands stay apart."""
    if style["hatch"]:
        return ax.fill_between(x, lo, hi, facecolor="none", edgecolor=style["color"], hatch=style["hatch"], lw=0, alpha=0.5, **kw)
    return ax.fill_between(x, lo, hi, color=style["color"], alpha=0.2, lw=0, **kw)


def _tutorial_rows(exp: Experiment) -> dict[str, object]:
    """Figure name (each of its names) -> its FigureRow, for the figures the tutorial gives."""
    return {n: r for r in figure_rows(exp) if r.tutorial for n in r.names}


def plot_curves(exp: Experiment, metric: str, out: Path) -> list[Path]:
    """Training and validation ``metric`` per epoch for each arm, mean ± std over seeds and each seed (PNG + SVG)."""
    return _save(curves_figure(exp, metric), out, f"curves-{metric}")


def curves_figure(exp: Experiment, metric: str):
    """The figure of :func:`plot_curves` (a matplotlib Figure, not saved): one panel for training, one for
    validation (when there is validation data), sharing the metric's axis."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _mpl()
    recipe = exp.recipe
    panels = [(key, what) for key, what in ((metric, "training"), (f"val_{metric}", "validation = test set"
                                                                    if recipe.get("validation") == "test" else "validation"))
              if any(a.curve(key).size for a in exp.arms.values())] or [(metric, "training")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels) + 0.4, 4.1), sharey=True, squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.08, wspace=0.06)  # sharing the y axis, the second panel would otherwise touch the first
    axes = axes[0]
    handles, n_epochs = {}, 1
    tutorial = _tutorial_rows(exp)
    for ax, (key, what) in zip(axes, panels):
        for arm, rec in exp.arms.items():
            style = _style(arm)
            curve = rec.curve(key)
            if curve.size == 0:
                continue
            epochs = np.arange(1, curve.shape[1] + 1)
            n_epochs = max(n_epochs, len(epochs))
            for seed_curve in curve:
                ax.plot(epochs, seed_curve, color=style["color"], lw=0.7, alpha=0.45, zorder=2)
            mean, std = curve.mean(0), curve.std(0, ddof=1) if curve.shape[0] > 1 else np.zeros(curve.shape[1])
            _band(ax, epochs, mean - std, mean + std, style, zorder=1)
            ax.plot(epochs, mean, color=style["color"], lw=2.2, zorder=3, marker="o" if len(epochs) <= 12 else None, ms=3.5)
            handles[arm] = (Line2D([], [], color=style["color"], lw=2.2),
                            f"{style['label']}: mean of {curve.shape[0]} seeds")
            handles[f"{arm} band"] = (Patch(facecolor="none" if style["hatch"] else style["color"], alpha=0.5 if style["hatch"] else 0.2,
                                            edgecolor=style["color"], hatch=style["hatch"], lw=0), f"{style['label']}: ± 1 std")
        handles.setdefault("seed", (Line2D([], [], color="#555555", lw=0.7, alpha=0.6), "each seed (thin)"))
        row = tutorial.get(key)  # val_* also answers for test_* when the test set validates (figure_rows merges them)
        if row is not None:
            values = {arm: v for arm, v in row.tutorial.items() if not isinstance(v, (list, tuple))}
            for arm, value in values.items():
                style = _style(arm)
                above = value >= max(values.values())  # the highest labelled above its line, any other below
                ax.axhline(value, color=style["color"], ls=":", lw=1.2, zorder=2.5)
                ax.plot([n_epochs], [value], "*", color=style["color"], ms=12, mec="black", mew=0.6, zorder=4, clip_on=False)
                ax.annotate(f"{value:g}", (n_epochs, value), xytext=(-8, 3 if above else -3), textcoords="offset points",
                            ha="right", va="bottom" if above else "top", fontsize=7, color=style["color"])
                handles[f"tutorial {arm}"] = (Line2D([], [], color=style["color"], ls=":", marker="*", ms=10, mec="black", mew=0.6),
                                              f"tutorial, {style['label']} (one run)")
        ax.set_title(what)
        ax.set_xlabel("epoch")
    for ax in axes:
        _integer_epochs(ax, n_epochs)
    axes[0].set_ylabel(_ylabel(metric, recipe))
    fig.suptitle(f"{recipe['name']}: {_NAMES.get(metric, metric)} per epoch, mean ± 1 std over seeds")
    if exp.arms and any(k in handles for k in exp.arms):
        order = [k for k in (*exp.arms, *(f"{a} band" for a in exp.arms), "seed", *(f"tutorial {a}" for a in exp.arms)) if k in handles]
        fig.legend([handles[k][0] for k in order], [handles[k][1] for k in order], loc="outside lower center",
                   ncol=min(len(order), 3), handlelength=2.4)
    return fig


def plot_finals(exp: Experiment, keys, out: Path) -> list[Path]:
    """Final figures of every seed, per arm, one panel per key (PNG + SVG, named after the first key)."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    return _save(finals_figure(exp, keys), out, f"final-{keys[0]}")


def finals_figure(exp: Experiment, keys):
    """The figure of :func:`plot_finals` (not saved): per panel, each seed's final value as a point labelled with its
    seed, the arm's mean as a bar, the tutorial's figure as a dashed line, the reference's range as a grey span."""
    plt = _mpl()
    keys = [keys] if isinstance(keys, str) else list(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys) + 0.5, 3.6), squeeze=False, layout="constrained")
    rows = {n: r for r in figure_rows(exp) for n in r.names}
    for ax, key in zip(axes[0], keys):
        row = rows.get(key)
        ticks = []
        for i, (arm, rec) in enumerate(exp.arms.items()):
            style = _style(arm)
            seeds = [s for s, f in zip(rec.seeds, rec.finals) if key in f]
            vals = rec.final_values(key)
            ticks.append((i, f"{style['label']}\n(n={vals.size})"))
            ref = row.reference.get(arm) if row else None
            if ref is not None:
                lo, hi = (ref if isinstance(ref, (list, tuple)) else (ref, ref))
                ax.add_patch(plt.Rectangle((i - 0.4, lo), 0.8, max(hi - lo, 1e-12), color="#999999", alpha=0.25, lw=0, zorder=0))
                ax.text(i + 0.42, hi, "reference", fontsize=7, color="#555555", va="bottom")
            tut = row.tutorial.get(arm) if row else None
            if tut is not None and not isinstance(tut, (list, tuple)):
                ax.hlines(tut, i - 0.4, i + 0.4, color=style["color"], ls="--", lw=1.3, zorder=2)
                ax.text(i + 0.42, tut, f"tutorial {tut:g}", fontsize=7, color=style["color"], va="center")
            if vals.size == 0:
                continue
            order = np.argsort(vals)
            xs = np.empty(vals.size)
            xs[order] = i + (np.linspace(-0.22, 0.22, vals.size) if vals.size > 1 else 0.0)  # low to high, left to right
            ax.scatter(xs, vals, s=34, color=style["color"], edgecolor="black", lw=0.5, zorder=3)
            for x, v, s in zip(xs, vals, seeds):
                ax.annotate(str(s), (x, v), xytext=(4, 3), textcoords="offset points", fontsize=7, color="#333333")
            ax.hlines(vals.mean(), i - 0.32, i + 0.32, color=style["color"], lw=2.5, zorder=2.5)
        ax.set_xticks([i for i, _ in ticks], [t for _, t in ticks])
        ax.set_xlim(-0.6, len(ticks) - 0.15)
        ax.grid(False, axis="x")
        ax.set_title(f"final {key}" + (f" (= {row.same_as})" if row and row.same_as else ""))
        ax.set_ylabel(base_metric(key).replace("_", " "))
    fig.suptitle(f"{exp.recipe['name']}: each seed's final figure")
    return fig


def thumbnail_figure(exp: Experiment):
    """A small picture of the primary metric per epoch (mean and band per arm) for an index; no text."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(2.4, 1.25), layout="constrained")
    metric = primary_metric(exp)
    for arm, rec in exp.arms.items():
        curve, style = rec.curve(metric), _style(arm)
        if curve.size == 0:
            continue
        x = np.arange(1, curve.shape[1] + 1)
        mean, std = curve.mean(0), curve.std(0, ddof=1) if curve.shape[0] > 1 else np.zeros(curve.shape[1])
        _band(ax, x, mean - std, mean + std, style)
        ax.plot(x, mean, color=style["color"], lw=1.6, marker="o" if len(x) <= 3 else None, ms=2.5)
    ax.tick_params(labelbottom=False, labelleft=False, length=0)  # a picture: the numbers are in the table beside it
    ax.grid(alpha=0.2)
    return fig


def plot_all(exp: Experiment, out: Path) -> dict[str, list[Path]]:
    """Every figure of the report into ``out``, one per distinct quantity; returns name -> files (``thumb`` last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = set().union(*[set(h) for a in exp.arms.values() for h in a.histories]) if exp.arms else set()
    metrics = sorted({base_metric(k) for k in keys}, key=lambda k: (k != "loss", k))
    made = {f"curves-{m}": plot_curves(exp, m, out) for m in metrics}
    finals = set().union(*[set(f) for a in exp.arms.values() for f in a.finals]) if exp.arms else set()
    primary = primary_metric(exp)
    shown = {n for r in figure_rows(exp) for n in r.names[:1]}  # test_* merged into val_* when the same data
    per_seed = [k for k in dict.fromkeys([primary, "test_" + base_metric(primary)]) if k in finals and k in shown]
    if per_seed:
        made[f"final-{per_seed[0]}"] = plot_finals(exp, per_seed, out)
    if exp.arms and any(a.histories for a in exp.arms.values()):
        made["thumb"] = _save(thumbnail_figure(exp), out, "thumb")
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
    validates on the test set; an epoch is ``steps_per_epoch`` steps, from the
    run's facts or the recipe). ``probes``: ``{arm: [ProbeRecords per seed]}``.
    ``layers``: ``{arm: layer name}``; by default each arm's last probed
    sigmoid. The step at which the mean BN curve first reaches the no-BN arm's
    final mean accuracy is marked (:func:`bnlab.lab.analysis.epochs_to_target`
    with ``target="final"``, in steps): the paper's speed-up figure.
    """
    from .analysis import epochs_to_target

    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    recipe = exp.recipe
    per_epoch = (exp.config.get("facts") or {}).get("steps_per_epoch") or recipe.get("steps_per_epoch") or 1
    ax = axes[0]
    curves = {}
    for arm, rec in exp.arms.items():
        curve = rec.curve("val_accuracy")
        if curve.size == 0:
            continue
        curves[arm] = curve
        steps = np.arange(1, curve.shape[1] + 1) * per_epoch
        style = _style(arm)
        _seed_lines(ax, [(steps, c) for c in curve], style["color"], f"{style['label']} (n={curve.shape[0]})")
    if "bn" in curves and "no_bn" in curves:
        ett = epochs_to_target(curves["bn"], curves["no_bn"], higher=True, target="final")
        if ett.get("bn_epoch"):
            ax.axvline(ett["bn_epoch"] * per_epoch, color=ARM_STYLE["bn"]["color"], ls=":", lw=1)
            ax.set_title(f"(a) test accuracy; BN reaches no-BN's final {ett['target']:.3f} at step "
                         f"{ett['bn_epoch'] * per_epoch:,} vs {ett['reference_epoch'] * per_epoch:,} "
                         f"({'≥ ' if ett['bn_epoch'] == 1 else ''}{ett['speedup']:.3g}x)",  # by its first measurement: a bound
                         fontsize=9)
        elif ett:
            ax.set_title(f"(a) test accuracy; BN never reaches no-BN's final {ett['target']:.3f}", fontsize=9)
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
        act = recs[0].meta.get("layers", {}).get(layer, {}).get("activation") or "activation"
        pcts = [q for q in recs[0].quantities(layer) if q.startswith("unit_p")]
        for q, color in zip(pcts, (OKABE_ITO["reddish purple"], OKABE_ITO["bluish green"], OKABE_ITO["orange"], OKABE_ITO["sky blue"], OKABE_ITO["black"]), strict=False):
            _seed_lines(ax, [r.series(layer, q) for r in recs], color, f"{q[5:]} (n={len(recs)})")
        ax.set_title(f"{tag}: input to {act} unit {unit} of layer {layer!r}", fontsize=9)
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


def last_activation_layer(meta: dict, activation: str | None = "sigmoid") -> str:
    """The last layer (in module order) of ``probes.json`` whose recorded input feeds ``activation`` (None: any)."""
    names = [n for n, d in meta.get("layers", {}).items() if d.get("activation") and activation in (None, d.get("activation"))]
    if not names:
        raise ValueError(f"no probed {activation or 'activation'} layer; probed: {list(meta.get('layers', {}))}")
    return names[-1]


def layer_figure(rec, layer: str, title: str = ""):
    """Everything the probes recorded for one layer over training: one small panel per kind of quantity
    (percentiles together, then mean and std, saturation, drift, affine norms). ``rec``: a ``ProbeRecords``."""
    groups = [("percentiles of all inputs", [q for q in rec.quantities(layer) if q.startswith("p")]),
              ("percentiles of the unit's inputs", [q for q in rec.quantities(layer) if q.startswith("unit_p")]),
              ("mean and std", [q for q in ("mean", "std") if (layer, q) in rec.data]),
              ("saturated share", [q for q in ("saturated",) if (layer, q) in rec.data]),
              ("BN drift", [q for q in ("mean_diff", "mean_shift", "var_ratio") if (layer, q) in rec.data]),
              ("affine norms", [q for q in ("gamma_norm", "beta_norm") if (layer, q) in rec.data])]
    groups = [(name, qs) for name, qs in groups if qs]
    plt = _mpl()
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(3.6 * max(len(groups), 1), 3.0), squeeze=False)
    for ax, (name, qs) in zip(axes[0], groups, strict=False):
        for i, q in enumerate(qs):
            steps, values = rec.series(layer, q)
            ax.plot(steps, values, color=f"C{i}", lw=1.2, label=q)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title + ': ' if title else ''}layer {layer!r}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer(rec, layer: str, path: Path, title: str = "") -> Path:
    """:func:`layer_figure` saved to ``path`` (its suffix gives the format, e.g. ``.png``), atomically."""
    path = Path(path)
    fig = layer_figure(rec, layer, title)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=DPI, bbox_inches="tight")
    tmp.replace(path)
    _mpl().close(fig)
    return path


def drift_figure(probes: list, title: str = ""):
    """Train/inference drift of every probed BN layer over training (mean over seeds, each seed thin):
    (a) ``mean_shift``, the batch mean's distance from the moving mean in batch standard deviations,
    (b) ``var_ratio``, moving over batch variance (geometric mean over features; 1: no drift).
    ``probes``: the BN arm's ``ProbeRecords``, one per seed.
    """
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    layers = [n for n, d in (probes[0].meta.get("layers", {}) if probes else {}).items() if "bn" in d.get("kinds", [])]
    for i, layer in enumerate(layers):
        for ax, q in zip(axes, ("mean_shift", "var_ratio"), strict=True):
            series = [r.series(layer, q) for r in probes if (layer, q) in r.data]
            if series:
                _seed_lines(ax, series, f"C{i % 10}", f"layer {layer!r} (n={len(series)})", lw=1.4)
    for ax, t in zip(axes, ("(a) |batch mean - moving mean| / batch std (RMS over features)",
                            "(b) moving variance / batch variance (geometric mean)"), strict=True):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if axes[1].has_data():
        axes[1].set_yscale("log")
        axes[1].axhline(1.0, color="black", lw=0.8, ls=":")
    fig.suptitle(f"{title + ': ' if title else ''}BN layers, training statistics against the moving ones", fontsize=11)
    fig.tight_layout()
    return fig


def plot_drift(probes: list, out: Path, title: str = "") -> list[Path]:
    """:func:`drift_figure` saved as ``bn-drift.png`` and ``.svg``."""
    return _save(drift_figure(probes, title), Path(out), "bn-drift")


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
        style = _style(arm)
        n = min(len(r.epochs) for r in recs)
        use_steps = all(np.isfinite(r.steps[:n]).all() for r in recs)
        x = recs[0].steps[:n] if use_steps else recs[0].epochs[:n]
        for ax, key in ((axes[0], "losses"), (axes[1], "grad_diffs")):
            vals = np.array([getattr(r, key)[:n] for r in recs])  # (seeds, points, etas)
            lo, hi = vals.min(axis=2).mean(0), vals.max(axis=2).mean(0)
            _band(ax, x, lo, hi, style, label=f"{style['label']} (n={len(recs)})")
        beta = np.array([r.beta[:n] for r in recs])
        axes[2].plot(x, beta.mean(0), color=style["color"], lw=1.8, label=f"{style['label']} (n={len(recs)})")
        if len(recs) > 1:
            _band(axes[2], x, beta.min(0), beta.max(0), style)
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
    "bn": {"color": OKABE_ITO["blue"], "label": "BN"},
    "renorm": {"color": OKABE_ITO["bluish green"], "label": "batch renorm"},
    "ghost": {"color": OKABE_ITO["reddish purple"], "label": "ghost BN"},
    "none": {"color": OKABE_ITO["vermillion"], "label": "no BN"},
}


def batch_size_figure(rows: list[dict], metric: str, title: str = ""):
    """Final ``metric`` against batch size (log2 axis), one line per norm with its confidence band.

    ``rows``: :func:`bnlab.lab.sweep.aggregate` output grouped by ``("norm",
    "batch_size")``. Groups with diverged (non-finite) seeds are marked with
    their count. For an accuracy the band is drawn within [0, 1] (the table
    keeps the interval as computed).
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
        if "accuracy" in metric:  # a t interval over few seeds may reach past what an accuracy can be
            low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
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
