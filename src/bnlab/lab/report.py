"""The report of an experiment (``report.md`` and a self-contained ``report.html``), from its records alone."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from . import analysis, records
from .plots import plot_all

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
    for key, per_arm in cmp["table"].items():
        if key.startswith("recompute"):
            continue
        row = [key]
        for arm in ("bn", "no_bn"):
            s = per_arm.get(arm)
            row.append(f"{_f(s['mean'])} ± {_f(s['std'])} (n={s['n']})" if s and s["n"] else "—")
        d = cmp["diffs"].get(key)
        row.append(f"{_f(d['diff'])} [{_f(d['low'])}, {_f(d['high'])}]" if d else "—")
        tut = [f"{arm}: {_f(reported[arm][key])}" for arm in ("bn", "no_bn") if key in reported.get(arm, {})]
        ref = [f"{arm}: {_f(reference[arm][key])}" for arm in ("bn", "no_bn") if key in reference.get(arm, {})]
        row.append("; ".join(tut) or "—")
        row.append("; ".join(ref) or "—")
        rows.append(row)
    return rows


_HEAD = ["figure (last epoch / test)", "with BN", "without BN", "BN − no-BN [95% CI]", "tutorial", "reference re-run"]


def _md_table(rows) -> str:
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


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
        ("software", f"bnlab {exp.env.get('bnlab', '?')}, torch {exp.env.get('torch', '?')}, numpy {exp.env.get('numpy', '?')}, "
                     f"Python {exp.env.get('python', '?')}, {exp.env.get('cpu_count', '?')} CPUs"),
    ]


def build_report(path: Path) -> dict[str, Path]:
    """(Re)build plots, ``report.md`` and ``report.html`` in the experiment directory ``path``."""
    path = Path(path)
    exp = analysis.load(path)
    cmp = analysis.compare(exp)
    text = analysis.verdict(exp, cmp)
    figs = plot_all(exp, path / "plots")
    rows = _rows(exp, cmp)
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
    status = "" if exp.complete else "\n> **Incomplete**: not every seed of every arm has finished; the figures cover the runs that did.\n"
    checks = []
    for arm, rec in exp.arms.items():
        for f in rec.finals:
            for k, v in (f.get("checks") or {}).items():
                checks.append(f"{arm} seed {f['seed']}: {k} = {v:.3g}")
    md = [
        f"# {r['name']}: does batch normalization help?",
        status,
        f"**Question.** Tutorial {r['tutorial']} trains this model once with BN and eyeballs the curves. "
        f"Here both arms ran over {len(exp.config['seeds'])} seeds: does BN change the result, by how much, and how sure are we?",
        "",
        "## Verdict",
        "",
        text,
        "",
        "## Setup",
        "",
        *[f"- **{k}**: {v}" for k, v in _setup(exp)],
        *([f"- **notes**: {r['notes']}"] if r.get("notes") else []),
        "",
        "## Final figures",
        "",
        _md_table(rows),
        "",
        "Intervals: Welch's t interval (unequal variances) for the difference of means; "
        "'tutorial' is the figure printed in the tutorial (one run); 'reference re-run' figures are other measurements quoted by the recipe.",
        "",
        *([ett_line, ""] if ett_line else []),
        *(["## Checks", "", *[f"- {c}" for c in checks], ""] if checks else []),
        "## Curves",
        "",
        *[f"![{name}](plots/{files[0].name})" for name, files in figs.items()],
        "",
    ]
    md_text = "\n".join(md)
    records.atomic_write_bytes(path / "report.md", md_text.encode())
    records.atomic_write_bytes(path / "report.html", _html(exp, md, figs, path).encode())
    return {"md": path / "report.md", "html": path / "report.html", **{k: v[0] for k, v in figs.items()}}


def _html(exp, md_lines, figs, root: Path) -> str:
    """A self-contained page: the same content, images embedded as base64 PNG."""
    body = []
    in_list = False
    for line in md_lines:
        if line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            k, _, v = line[2:].partition(": ")
            body.append(f"<li>{_inline(k)}: {_inline(v)}</li>")
            continue
        if in_list:
            body.append("</ul>")
            in_list = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("| ") and line.count("|") > 2:
            cells = [c.strip() for c in line.strip("|").split("|")]
            tag = "th" if cells[0] == _HEAD[0] else "td"
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("!["):
            name = line[2 : line.index("]")]
            png = (root / "plots" / f"{name}.png").read_bytes()
            body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>')
        elif line.startswith("> "):
            body.append(f"<p class='warn'>{_inline(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    page = "\n".join(body)
    # wrap consecutive table rows in one table
    page = page.replace("</tr>\n<tr>", "</tr><tr>")
    page = page.replace("<tr><th>", "<table><tr><th>", 1)
    if "<table>" in page:
        end = page.rindex("</tr>") + len("</tr>")
        page = page[:end] + "</table>" + page[end:]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}.warn{background:#fff3cd;padding:0.5em}"
    )
    title = html.escape(f"bnlab report: {exp.recipe['name']}")
    return f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>\n<body>\n{page}\n</body></html>\n"


def _inline(text: str) -> str:
    out = html.escape(text)
    while "**" in out:
        out = out.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
    return out
