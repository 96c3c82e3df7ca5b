"""The diagnostics' part of a report, from records alone: probes, the original paper's Figure 1, the loss landscape,
and a batch-size sweep's own report.

:func:`sections` gives the :class:`bnlab.lab.report.Section` objects an
experiment's report adds after its curves (``report.build_report`` calls it at
its ``EXTRA SECTIONS`` mark), drawing their figures into ``plots/``:

* **Figure 1** (Ioffe & Szegedy 2015, arXiv:1502.03167): (a) test accuracy
  against steps, (b, c) the 15/50/85th percentiles of the input to one unit of
  the last probed sigmoid (another activation where there is no sigmoid),
  without and with BN; then the speed-up figure: the steps each arm's mean
  curve needs to first reach the no-BN arm's FINAL mean test accuracy, and
  both arms' mean accuracy at a few steps; then how far the percentiles moved.
* **BN drift**: every BN layer's batch statistics against its moving ones
  over training, and a table of every probed layer at the last record.
* **Loss landscape** (Santurkar et al. 2018, arXiv:1805.11604, Figure 4):
  the bands over training, and the median effective beta-smoothness per arm.

Nothing is shown for records that are not there; a damaged probe or
landscape file becomes one line saying so, never a failed report.

:func:`build_sweep_report` writes a sweep directory's ``sweep.csv`` (the
plot's data: mean and 95% t interval over seeds per cell), its
``plots/batch-size-<metric>.png`` (Wu & He 2018, arXiv:1803.08494, Figure 1)
and ``report.md``/``report.html``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from . import analysis, plots, records, sweep
from .landscape import LANDSCAPE_JSONL, read_landscape
from .probes import PROBES_CSV, read_probes

__all__ = ["sections", "fig1_summary", "percentile_drift", "probe_table", "sweep_runs", "sweep_rows", "build_sweep_report"]


def _read_each(exp: analysis.Experiment, name: str, reader) -> tuple[dict, list[str]]:
    """``{arm: [records of each finished seed that has the file]}`` and one line per file that could not be read."""
    found, problems = {}, []
    for arm, rec in exp.arms.items():
        for seed in rec.seeds:
            path = records.run_dir(exp.path, arm, seed) / name
            if not path.exists():
                continue
            try:
                rec = reader(path)
            except (ValueError, OSError, KeyError, TypeError) as exc:
                problems.append(f"{path}: {exc} (left out)")
                continue
            found.setdefault(arm, []).append(rec)  # only after a good read: an arm whose every file is damaged has no entry
    return found, problems


def _f(x, digits=3) -> str:
    """A number as the report writes numbers (:func:`bnlab.lab.analysis.fmt`); infinite ones too."""
    return str(x) if isinstance(x, float) and math.isinf(x) else analysis.fmt(x, digits)


def _mean_series(recs, layer: str, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean over seeds of one series, at the steps every seed recorded."""
    series = [r.series(layer, quantity) for r in recs if (layer, quantity) in r.data]
    if not series:
        return np.empty(0, dtype=np.int64), np.empty(0)
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
    steps = np.array(steps, dtype=np.int64)
    return steps, np.mean([v[np.isin(s, steps)] for s, v in series], axis=0)


def _shown_layer(recs) -> str | None:
    try:
        return plots.last_activation_layer(recs[0].meta, "sigmoid")
    except ValueError:
        try:
            return plots.last_activation_layer(recs[0].meta, None)
        except ValueError:
            return None


def percentile_drift(recs, layer: str, percentiles=("unit_p15", "unit_p50", "unit_p85")) -> dict:
    """How the seed-mean percentiles of ``layer`` moved: per percentile its value at the first record, at 10%
    of the recorded steps, at the last, and its range (max - min) from the 10% mark on (after the first
    updates' transient, which the paper's Figure 1 (b) also shows)."""
    out = {}
    for q in percentiles:
        steps, mean = _mean_series(recs, layer, q)
        if steps.size == 0:
            continue
        k = int(np.searchsorted(steps, steps[-1] * 0.1))
        later = mean[k:]
        out[q] = {"first": float(mean[0]), "at_10pct": float(mean[k]), "step_10pct": int(steps[k]), "last": float(mean[-1]),
                  "range_after_10pct": float(later.max() - later.min()), "steps": int(steps[-1])}
    return out


def fig1_summary(exp: analysis.Experiment, probes: dict) -> list[str]:
    """Sentences under Figure 1: the speed-up to the no-BN arm's final accuracy, the accuracies at a few steps,
    and how far the shown unit's percentiles moved in each arm. Pure numbers from the records."""
    per_epoch = (exp.config.get("facts") or {}).get("steps_per_epoch") or exp.recipe.get("steps_per_epoch") or 1
    out = []
    curves = {arm: rec.curve("val_accuracy") for arm, rec in exp.arms.items()}
    if all(arm in curves and curves[arm].size for arm in ("bn", "no_bn")):
        bn, nb = curves["bn"], curves["no_bn"]
        ett = analysis.epochs_to_target(bn, nb, higher=True, target="final")
        n = f"means over {bn.shape[0]} and {nb.shape[0]} seeds"
        if ett.get("bn_epoch"):
            first = ett["bn_epoch"] == 1  # reached by the first measurement: the speed-up is only bounded below
            out.append(f"Speed-up: the no-BN arm ended at a mean test accuracy of {ett['target']:.4f}; the BN arm's mean first "
                       f"reached it at step {ett['bn_epoch'] * per_epoch:,}"
                       f"{' (its first measurement)' if first else ''}, the no-BN arm's at step "
                       f"{ett['reference_epoch'] * per_epoch:,}: {'at least ' if first else ''}{ett['speedup']:.3g} times fewer "
                       f"steps with BN ({n}; accuracy measured every {per_epoch:,} steps).")
        elif ett:
            out.append(f"Speed-up: the BN arm's mean never reached the no-BN arm's final mean test accuracy {ett['target']:.4f} ({n}).")
        length = min(bn.shape[1], nb.shape[1])
        marks = sorted({0, max(0, length // 100 - 1), max(0, length // 10 - 1), max(0, length // 2 - 1), length - 1})
        bm, nm = bn.mean(0), nb.mean(0)
        out.append("Mean test accuracy, BN vs no BN: " + "; ".join(
            f"step {(i + 1) * per_epoch:,}: {bm[i]:.4f} vs {nm[i]:.4f}" for i in marks) + ".")
    for arm in ("no_bn", "bn"):
        recs = probes.get(arm) or []
        layer = _shown_layer(recs) if recs else None
        if layer is None:
            continue
        d = percentile_drift(recs, layer)
        if not d:
            continue
        name = "without BN" if arm == "no_bn" else "with BN"
        v = next(iter(d.values()))
        at = lambda key: "/".join(analysis.fmt(d[q][key], 2, sign=True) for q in d)  # noqa: E731
        out.append(f"Percentiles ({'/'.join(q[5:] for q in d)}) of the shown unit's input {name} (layer {layer!r}, mean over "
                   f"{len(recs)} seeds): {at('first')} at step 0, {at('at_10pct')} at step {v['step_10pct']:,}, {at('last')} at "
                   f"step {v['steps']:,}; from step {v['step_10pct']:,} on each moved within a range of at most "
                   f"{max(x['range_after_10pct'] for x in d.values()):.2f}.")
    return out


_SHOWN_QUANTITIES = ("p15", "p50", "p85", "saturated", "mean_shift", "var_ratio", "gamma_norm")


def probe_table(probes: dict) -> tuple[list[str], list[list[str]]]:
    """Every probed layer of every arm at its last record, mean over seeds: ``(head, rows)``."""
    head = ["arm", "layer", "kind", "last step", *_SHOWN_QUANTITIES]
    rows = []
    for arm in ("bn", "no_bn"):
        recs = probes.get(arm) or []
        if not recs:
            continue
        for layer, meta in recs[0].meta.get("layers", {}).items():
            kind = " + ".join(([meta["activation"]] if meta.get("activation") else []) + (["BN"] if "bn" in meta.get("kinds", []) else []))
            cells, last = [], None
            for q in _SHOWN_QUANTITIES:
                steps, mean = _mean_series(recs, layer, q)
                cells.append(_f(float(mean[-1])) if steps.size else "—")
                last = int(steps[-1]) if steps.size else last
            rows.append([analysis.ARM_NAMES.get(arm, arm), layer, kind, f"{last:,}" if last is not None else "—", *cells])
    return head, rows


def _landscape_sentence(lands: dict) -> str:
    parts = []
    for arm in ("bn", "no_bn"):
        recs = [r for r in lands.get(arm, []) if len(r.epochs)]
        if not recs:
            continue
        beta = np.concatenate([r.beta for r in recs])
        spread = np.concatenate([r.loss_range for r in recs])
        parts.append(f"{analysis.ARM_NAMES[arm]}: median effective beta-smoothness {np.nanmedian(beta):.3g}, median loss range "
                     f"{np.nanmedian(spread):.3g} over {len(beta)} measurements of {len(recs)} seeds")
    if not parts:
        return ""
    return ("Along the gradient, at step sizes " + ", ".join(f"{e:g}" for e in next(iter(lands.values()))[0].etas) + ": "
            + "; ".join(parts) + ". Santurkar et al. find both smaller with BN.")


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 0):
    """A :class:`bnlab.lab.report.Table` of plain cells (columns from ``numeric_from`` on are numbers)."""
    from .report import Cell, Table

    return Table(head, [("", [Cell(c, "num" if i >= numeric_from else "") for i, c in enumerate(row)]) for row in rows],
                 numeric=set(range(numeric_from, len(head))))


def _fragments(table) -> tuple[str, str]:
    """A table's HTML and Markdown, rendered as the report renders its own tables."""
    from . import report

    return report._table_html(table), report._markdown([("table", table)]).rstrip("\n")


def sections(exp: analysis.Experiment, path: Path) -> list:
    """The diagnostics' :class:`bnlab.lab.report.Section` objects for the experiment at ``path`` (figures drawn into
    ``path/plots``); [] when it recorded no probes and no landscape."""
    from .report import Section

    path = Path(path)
    probes, problems = _read_each(exp, PROBES_CSV, read_probes)
    lands, more = _read_each(exp, LANDSCAPE_JSONL, read_landscape)
    problems += more
    out = []
    if probes:
        recs_by_arm = {arm: recs for arm, recs in probes.items() if _shown_layer(recs) is not None}
        if recs_by_arm:
            layers = {arm: _shown_layer(recs) for arm, recs in recs_by_arm.items()}
            plots.plot_fig1(exp, recs_by_arm, path / "plots", layers)
            sigmoid = all(recs[0].meta["layers"][layers[arm]].get("activation") == "sigmoid" for arm, recs in recs_by_arm.items())
            caption = ("(a) test accuracy against training steps (each seed thin, the mean bold); (b) without BN and (c) "
                       "with BN, the 15th, 50th and 85th percentiles of the input to one unit of the last "
                       f"{'sigmoid' if sigmoid else 'activation'} layer over the training batch, recorded every "
                       f"{next(iter(recs_by_arm.values()))[0].meta.get('every', '?')} steps.")
            out.append(Section("Inside the network: Figure 1 of Ioffe & Szegedy (2015)" if sigmoid else "Inside the network: probes",
                               [caption, *fig1_summary(exp, recs_by_arm)], ["fig1"]))
        head, rows = probe_table(probes)
        html, markdown = _fragments(_table(head, rows, numeric_from=3))
        figures = []
        if probes.get("bn") and any("bn" in d.get("kinds", []) for d in probes["bn"][0].meta.get("layers", {}).values()):
            plots.plot_drift(probes["bn"], path / "plots", exp.recipe["name"])
            figures.append("bn-drift")
        out.append(Section(
            "BN layers: training against inference statistics" if figures else "Probed layers",
            ["mean_shift: how far, in batch standard deviations, a training batch's mean sits from the moving mean that "
             "inference uses; var_ratio: the moving variance over the batch variance (1: none); both measured before the "
             "recorded batch updated the moving statistics. The table: every probed layer at its last record, mean over "
             "seeds (p15/p50/p85 over all units' inputs; saturated: the share of sigmoid/tanh inputs with |x| > "
             f"{next(iter(probes.values()))[0].meta.get('saturation', 2.5):g})."],
            figures, html, markdown))
    if lands:
        plots.plot_landscape(lands, path / "plots", exp.recipe["name"])
        sentence = _landscape_sentence(lands)
        out.append(Section("Loss landscape along the gradient (Santurkar et al. 2018)", [sentence] if sentence else [], ["landscape"]))
    if problems:
        out.append(Section("Diagnostics left out", problems))
    return out


# ----------------------------------------------------------------------------- sweeps


def sweep_runs(root: Path) -> tuple[dict, list[tuple[dict, int, dict]], list[str], list[str]]:
    """``(sweep.json, runs, unfinished, problems)`` of a sweep directory.

    ``runs``: ``(settings, seed, final)`` of every run that ended (finished, or
    diverged: its ``final`` has ``diverged_epoch``), a ``same_as`` cell taking
    its twin's runs under its own settings; ``unfinished``: ``"<cell>/<seed>"``
    without a result yet; ``problems``: unreadable records, each named.
    """
    from .experiment import read_sweep

    root = Path(root)
    cfg, cells = read_sweep(root)
    runs, unfinished, problems = [], [], []
    loaded: dict[str, analysis.Experiment | None] = {}
    for cell in cells:
        cid = cell.same_as or cell.id
        if cid not in loaded:
            try:
                loaded[cid] = analysis.load(root / cid) if (root / cid / "config.json").exists() else None
            except records.RecordError as exc:
                loaded[cid] = None
                problems.append(str(exc))
            if loaded[cid] is not None:
                problems += loaded[cid].problems
        exp = loaded[cid]
        arm = exp.arms.get(cell.arm) if exp is not None else None
        for seed in cfg["seeds"]:
            if arm is not None and seed in arm.seeds:
                runs.append((cell.settings, seed, arm.finals[arm.seeds.index(seed)]))
            elif arm is not None and seed in arm.diverged:
                runs.append((cell.settings, seed, {"diverged_epoch": arm.diverged[seed]}))
            elif arm is None or seed not in arm.unreadable:
                unfinished.append(f"{cell.id}/{seed}")
    return cfg, runs, unfinished, problems


def sweep_rows(root: Path) -> tuple[dict, list[dict], list[str], list[str]]:
    """``(sweep.json, rows of sweep.aggregate over the grid's keys, unfinished, problems)``."""
    cfg, runs, unfinished, problems = sweep_runs(root)
    rows = sweep.aggregate(runs, cfg["metric"], by=tuple(cfg["grid"])) if runs else []
    return cfg, rows, unfinished, problems


def _csv(rows: list[dict], keys: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*keys, "n", "mean", "low", "high", "nonfinite", "values"])
    for r in rows:
        w.writerow([*(r[k] for k in keys), r["n"], repr(r["mean"]), repr(r["low"]), repr(r["high"]), r["nonfinite"],
                    " ".join(repr(v) for v in r["values"])])
    return buf.getvalue().encode()


def _where_bn_falls_behind(rows: list[dict]) -> list[str]:
    """Per batch size, BN and each remedy against BN's best batch size: where the intervals stop overlapping."""
    by = {(r["norm"], r["batch_size"]): r for r in rows}
    bn = sorted((r for r in rows if r["norm"] == "bn" and math.isfinite(r["mean"])), key=lambda r: r["batch_size"])
    if not bn:
        return []
    best = max(bn, key=lambda r: r["mean"])
    out = [f"BN's best mean is {analysis.fmt(best['mean'], 4)} at batch {best['batch_size']}."]
    behind = [r for r in bn if math.isfinite(r["high"]) and math.isfinite(best["low"]) and r["high"] < best["low"]]
    if behind:
        out.append("BN's interval lies wholly below that best one at batch " + ", ".join(str(r["batch_size"]) for r in behind) + ".")
    else:
        out.append("No batch size's interval lies wholly below BN's best one.")
    for norm in ("renorm", "ghost", "none"):
        pairs = [(r, by.get((norm, r["batch_size"]))) for r in bn]
        pairs = [(b, o) for b, o in pairs if o is not None and math.isfinite(o["mean"])]
        if pairs:
            name = plots.SWEEP_STYLE[norm]["label"]
            out.append(f"{name} minus BN per batch size: "
                       + ", ".join(f"{b['batch_size']}: {analysis.fmt(o['mean'] - b['mean'], 4, sign=True)}" for b, o in pairs) + ".")
    return out


def _updates(cell_dir: Path) -> str | None:
    """The training steps of a cell's runs, from the facts its ``config.json`` recorded (``None`` when it has none)."""
    try:
        n = records.read_config(cell_dir / "config.json").get("facts", {}).get("updates")
    except (OSError, records.RecordError):
        return None
    return f"{n:,}" if isinstance(n, int) else None


def _lr_rule(cfg: dict) -> str:
    """How the cells' learning rates were set, from the rule and base rate each cell of ``sweep.json`` records."""
    groups: dict[tuple, int] = {}  # (rule, base rate) -> cells; a grid over optimizer= has one per optimizer under "auto"
    for c in cfg["cells"]:
        if c["lr_scaling"] != "none":
            key = (c["lr_scaling"], c["base_learning_rate"])
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return "learning rate not scaled with the batch size" + (" (the grid sets it)" if "learning_rate" in cfg["grid"] else "")
    at = f"at batch {cfg['base_batch_size']}"
    if len(groups) == 1:
        (rule, base), = groups
        return f"learning rate {rule}-scaled from the recipe's {base:g} {at}"
    return (f"learning rate scaled by each cell's optimizer ({cfg['lr_scaling']}) from its rate {at}: "
            + ", ".join(f"{rule} from {base:g} in {n} cells" for (rule, base), n in groups.items()))


def build_sweep_report(root: Path) -> dict[str, Path]:
    """Write ``sweep.csv``, the batch-size plot and ``report.md``/``report.html`` of the sweep at ``root``; returns their paths."""
    from . import report

    root = Path(root)
    cfg, rows, unfinished, problems = sweep_rows(root)
    keys = list(cfg["grid"])
    metric = cfg["metric"]
    records.atomic_write_bytes(root / "sweep.csv", _csv(rows, keys))
    r = cfg["recipe"]
    grid = " ".join(f"{k}={','.join(v)}" for k, v in cfg["grid"].items())
    blocks = [("h1", f"{r['name']}: sweep over {', '.join(k for k, v in cfg['grid'].items() if len(v) > 1) or ', '.join(keys)}"),
              ("lead", f"Tutorial {r['tutorial']}: {r['title']}"),
              ("p", f"Grid `{grid}`; seeds {', '.join(map(str, cfg['seeds']))}; {_lr_rule(cfg)}; ghost batches of "
                    f"{cfg['ghost_batch']}; each cell's figure is the final {metric}, mean and 95% t interval over seeds.")]
    if unfinished:
        blocks.append(("warn", f"Incomplete: {len(unfinished)} runs have no result yet ({', '.join(unfinished[:8])}"
                               f"{', ...' if len(unfinished) > 8 else ''})."))
    paths = {"csv": root / "sweep.csv"}
    several = [k for k, v in cfg["grid"].items() if len(v) > 1 and k not in ("norm", "batch_size")]
    if rows and {"norm", "batch_size"} <= set(keys) and not several:
        made = plots.plot_batch_size(rows, metric, root / "plots", r["name"])
        paths["plot"] = made[0]
        blocks += [("h2", "Accuracy against batch size" if "accuracy" in metric else f"{metric} against batch size"),
                   *[("p", s) for s in _where_bn_falls_behind(rows)],
                   ("figure", made[0].stem, "Mean over seeds (line) and 95% t interval (band" + (", drawn within [0, 1]" if "accuracy" in metric else "") + "); a cell with diverged seeds says how many.")]
    lrs = {tuple(c["settings"][k] for k in keys): c["learning_rate"] for c in cfg["cells"]}
    updates = {tuple(c["settings"][k] for k in keys): _updates(root / (c["same_as"] or c["id"])) for c in cfg["cells"]}
    head = [*keys, "learning rate", "updates", "n", f"mean {metric}", "95% CI", "diverged"]
    table = [[str(row[k]) for k in keys] + [f"{lrs.get(tuple(row[k] for k in keys)) or math.nan:.3g}",
             updates.get(tuple(row[k] for k in keys)) or "—", str(row["n"]), analysis.fmt(row["mean"], 4),
             f"[{analysis.fmt(row['low'], 4)}, {analysis.fmt(row['high'], 4)}]", str(row["nonfinite"])]
             for row in rows]
    blocks += [("h2", "Cells"), ("table", _table(head, table, numeric_from=len(keys))),
               ("note", "updates: training steps of each run (steps per epoch × epochs), so also how many times each BN "
                        "layer's moving statistics moved; at momentum m they keep m^updates of their initial values, "
                        "and they average roughly the last 1/(1 − m) steps' batches (100 at 0.99): with few updates, or "
                        "weights that change much within those steps, inference normalizes with statistics that lag "
                        "the trained weights.")]
    same = [c for c in cfg["cells"] if c["same_as"]]
    if same:
        blocks.append(("note", "Not run, being the same model as another cell (a ghost batch that holds the whole batch is plain "
                               "BN), whose results stand for it (the same formula; a run of its own would differ by "
                               "rounding, not bit for bit): " + ", ".join(f"{c['id']} (= {c['same_as']})" for c in same) + "."))
    blocks.append(("p", "Records: [sweep.json](sweep.json) (recipe, grid, rules, cells), [sweep.csv](sweep.csv) (this table's "
                        "numbers and every seed's value); each cell is an experiment directory with its own report data."))
    if problems:
        blocks += [("h2", "Left out"), ("ul", [(p, "") for p in problems])]
    records.atomic_write_bytes(root / "report.md", report._markdown(blocks).encode())
    records.atomic_write_bytes(root / "report.html", report._html(f"bnlab sweep: {r['name']}", blocks, root / "plots").encode())
    return {**paths, "md": root / "report.md", "html": root / "report.html"}
