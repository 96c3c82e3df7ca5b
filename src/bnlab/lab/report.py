"""The report of an experiment (``report.md`` and a self-contained ``report.html``), from its records alone."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from . import analysis, records
from .plots import plot_all
from .recipes import render_notes

__all__ = ["build_report"]


def _f(x, digits=4):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (list, tuple)):
        return "–".join(_f(v, digits) for v in x)
    return f"{x:.{digits}f}"


def _rows(exp: analysis.Experiment, cmp: dict) -> list[list[str]]:
    reported, reference = exp.recipe.get("reported") or {}, exp.recipe.get("reference") or {}
    rows = []
    for key in analysis.shown_figures(exp, cmp["table"]):
        per_arm = cmp["table"][key]
        if key.startswith("recompute"):
            continue
        row = [key]
        for arm in ("bn", "no_bn"):
            s = per_arm.get(arm)
            row.append(f"{_f(s['mean'])} ± {_f(s['std'])} (n={s['n']})" if s and s["n"] else "—")
        d = cmp["diffs"].get(key)
        row.append(f"{_f(d['diff'])} [{_f(d['low'])}, {_f(d['high'])}]" if d and not math.isnan(d["diff"]) else "—")
        tut = [f"{arm}: {_f(reported[arm][key])}" for arm in ("bn", "no_bn") if key in reported.get(arm, {})]
        ref = [f"{arm}: {_f(reference[arm][key])}" for arm in ("bn", "no_bn") if key in reference.get(arm, {})]
        row.append("; ".join(tut) or "—")
        row.append("; ".join(ref) or "—")
        rows.append(row)
    return rows


_HEAD = ["figure (last epoch / test)", "with BN", "without BN", "BN − no-BN [95% CI]", "tutorial", "reference re-run"]


def _setup(exp) -> list[tuple[str, str]]:
    r = exp.recipe
    val = f"validation_split={r['validation_split']} (the last fraction)" if r["validation"] == "split" else "the test set"
    opt = r["optimizer"] + (f" (lr {r['learning_rate']})" if r.get("learning_rate") else " (Keras defaults)")
    return [
        ("tutorial", f"{r['tutorial']}: {r['title']}"),
        ("data", f"{r['dataset']} (split seed {r['data_seed']})"),
        ("model", f"{r['model']} {dict(r.get('model_kwargs') or {}) or ''}".strip() + f"; BN arm uses norm={r['norm']}, no-BN arm removes every BN layer"),
        ("training", f"{r['epochs']} epochs, batch {r['batch_size']}, {opt}, loss {r['loss']}"
                     + (f", {r['steps_per_epoch']} steps per epoch" if r.get("steps_per_epoch") else "")
                     + (", augmentation (shear 0.2°, zoom 0.2, horizontal flip)" if r.get("augment") else "")),
        ("validation", val),
        ("seeds", ", ".join(str(s) for s in exp.config["seeds"])),
        ("processes", f"{exp.config.get('nproc', 1)}" + (" (torch.distributed with gloo; synchronized BN: statistics over all processes)"
                                                          if exp.config.get("nproc", 1) > 1 else " (a single process)")),
        ("software", f"bnlab {exp.env.get('bnlab', '?')}, torch {exp.env.get('torch', '?')}, numpy {exp.env.get('numpy', '?')}, "
                     f"Python {exp.env.get('python', '?')}, {exp.env.get('cpu_count', '?')} CPUs"),
    ]


def _runs(exp, cmp) -> list[tuple[str, str]]:
    """One line per arm that has runs other than finished ones: diverged (epoch), unreadable (why), unfinished."""
    lines = []
    for arm, st in cmp["runs"].items():
        parts = [f"{len(st['finished'])} of {len(st['planned'])} finished"]
        if st["diverged"]:
            parts.append("diverged: " + ", ".join(f"seed {s} at epoch {e}" for s, e in sorted(st["diverged"].items())))
        if st["unreadable"]:
            parts.append("unreadable, left out: " + "; ".join(f"seed {s} ({why})" for s, why in sorted(st["unreadable"].items())))
        if st["unfinished"]:
            parts.append("not finished: " + ", ".join(f"seed {s}" for s in st["unfinished"]))
        if len(parts) > 1:
            lines.append((f"{analysis.ARM_NAMES[arm]} arm", "; ".join(parts)))
    return lines


def build_report(path: Path, exp: analysis.Experiment | None = None) -> dict[str, Path]:
    """(Re)build plots, ``report.md`` and ``report.html`` in the experiment directory ``path`` (read unless ``exp`` is given)."""
    path = Path(path)
    exp = exp or analysis.load(path)
    cmp = analysis.compare(exp)
    text = analysis.verdict(exp, cmp)
    figs = plot_all(exp, path / "plots")
    r = exp.recipe
    ett = cmp["epochs_to_target"]
    ett_line = ""
    if ett:
        if ett.get("bn_epoch"):
            ett_line = (f"Epochs to target: the no-BN arm's best mean {cmp['metric']} was {_f(ett['target'])} at epoch "
                        f"{ett['reference_epoch']}; the BN arm's mean first reached it at epoch {ett['bn_epoch']} "
                        f"(speed-up {ett['speedup']:.2f}x; the paper reports the same accuracy in 14 times fewer steps on ImageNet).")
        else:
            ett_line = f"Epochs to target: the BN arm's mean never reached the no-BN arm's best mean {cmp['metric']} ({_f(ett['target'])})."
    checks = [f"{arm} seed {f['seed']}: {k} = {v:.3g}" for arm, rec in exp.arms.items() for f in rec.finals
              for k, v in (f.get("checks") or {}).items()]
    blocks = [("h1", f"{r['name']}: does batch normalization help?")]
    if not exp.complete:
        blocks.append(("warn", "Incomplete: not every run of every arm ended with readable records; the figures cover the runs that did."))
    blocks += [
        ("p", f"**Question.** Tutorial {r['tutorial']} trains this model once with BN and eyeballs the curves. "
              f"Here both arms ran over {len(exp.config['seeds'])} seeds: does BN change the result, by how much, and how sure are we?"),
        ("h2", "Verdict"), ("p", text),
    ]
    if _runs(exp, cmp):
        blocks += [("h2", "Runs"), ("ul", _runs(exp, cmp))]
    notes = render_notes(r["notes"], {**r, **exp.config.get("facts", {})}) if r.get("notes") else ""
    blocks += [
        ("h2", "Setup"), ("ul", [(k, v) for k, v in _setup(exp)] + ([("notes", notes)] if notes else [])),
        ("h2", "Final figures"), ("table", _HEAD, _rows(exp, cmp)),
        ("p", ("The validation data is the test set, so test figures equal the validation ones. " if r["validation"] == "test" else "")
              + "Intervals: Welch's t interval (unequal variances) for the difference of means; 'tutorial' is the figure "
              "printed in the tutorial (one run); 'reference re-run' figures are other measurements quoted by the recipe."),
    ]
    if ett_line:
        blocks.append(("p", ett_line))
    if checks:
        blocks += [("h2", "Checks"), ("ul", [(c, "") for c in checks])]
    blocks.append(("h2", "Curves"))
    blocks += [("img", name) for name in figs]
    records.atomic_write_bytes(path / "report.md", _markdown(blocks).encode())
    records.atomic_write_bytes(path / "report.html", _html(exp, blocks, path).encode())
    return {"md": path / "report.md", "html": path / "report.html", **{k: v[0] for k, v in figs.items()}}


def _markdown(blocks) -> str:
    out = []
    for kind, *content in blocks:
        if kind == "h1":
            out += [f"# {content[0]}", ""]
        elif kind == "h2":
            out += [f"## {content[0]}", ""]
        elif kind == "p":
            out += [content[0], ""]
        elif kind == "warn":
            out += [f"> **{content[0]}**", ""]
        elif kind == "ul":
            out += [f"- **{k}**: {v}" if v else f"- {k}" for k, v in content[0]] + [""]
        elif kind == "table":
            head, rows = content
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows], ""]
        elif kind == "img":
            out.append(f"![{content[0]}](plots/{content[0]}.png)")
    return "\n".join(out).rstrip() + "\n"


def _html(exp, blocks, root: Path) -> str:
    """A self-contained page with the same blocks; images embedded as base64 PNG."""
    body = []
    for kind, *content in blocks:
        if kind == "h1":
            body.append(f"<h1>{html.escape(content[0])}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{html.escape(content[0])}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline(content[0])}</p>")
        elif kind == "warn":
            body.append(f"<p class='warn'><strong>{html.escape(content[0])}</strong></p>")
        elif kind == "ul":
            items = "".join(f"<li><strong>{html.escape(k)}</strong>: {html.escape(v)}</li>" if v else f"<li>{html.escape(k)}</li>" for k, v in content[0])
            body.append(f"<ul>{items}</ul>")
        elif kind == "table":
            head, rows = content
            th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            png = (root / "plots" / f"{content[0]}.png").read_bytes()
            body.append(f'<figure><img alt="{html.escape(content[0])}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
        "table{border-collapse:collapse;font-size:0.88em;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}.warn{background:#fff3cd;padding:0.5em}"
    )
    title = html.escape(f"bnlab report: {exp.recipe['name']}")
    page = "\n".join(body)
    return f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>\n<body>\n{page}\n</body></html>\n"


def _inline(text: str) -> str:
    out = html.escape(text)
    while out.count("**") >= 2:
        out = out.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
    return out
