"""The report of an experiment (``report.md`` and a self-contained ``report.html``) and the index of several
(``index.md``, ``index.html``), from their records alone.

A report says what was asked, the verdict, the final figures beside the
tutorial's own (one precision per metric, the verdict's row marked, which
direction is better), the curves and each seed's final figure, and how to
trace every number back: the exact command, the overrides against the recipe's
defaults, date, versions, the code's commit, and links to every raw record.
The HTML page needs nothing else: figures are embedded SVG (``data:`` URIs),
there is no script and no request leaves the file; it reads on a phone
(viewport tag, tables that scroll sideways instead of widening the page).

Adding a section (the hook for other modules, e.g. the diagnostics of
probes, Figure 1, the loss landscape, a batch-size sweep): make
:class:`Section` objects and pass them to :func:`build_report` as
``sections=[...]``; they appear, in order, after the curves. A section holds
its title, paragraphs (``**bold**``, ``[label](relative/link)`` and
```code``` are understood), the stems of figures it saved under
``<experiment>/plots/`` (``<stem>.svg`` is embedded in the HTML page,
``<stem>.png`` linked from the Markdown; every ``plot_*`` function of
:mod:`bnlab.lab.plots` writes both), and optionally a trusted HTML fragment
with its Markdown twin (a table). A module that always adds its sections is called at the one place
marked ``EXTRA SECTIONS`` in :func:`build_report`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import analysis, diagnostics_report, records
from .plots import plot_all
from .recipes import render_notes

__all__ = ["Section", "build_report", "build_index"]


@dataclass
class Section:
    """A part of a report that another module adds (see the module's docstring).

    ``title``: its heading. ``text``: paragraphs (``**bold**``, ``[label](href)``
    and ```code``` understood). ``figures``: stems of figures saved under the
    experiment's ``plots/`` (``.svg`` and ``.png``). ``html`` / ``markdown``: an
    optional trusted fragment (e.g. a table), placed after the figures.
    """

    title: str
    text: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    html: str = ""
    markdown: str = ""


# ----------------------------------------------------------------------------- a page as blocks, two renderings


@dataclass
class Cell:
    text: str  # plain text (both renderings); the HTML one escapes it
    cls: str = ""  # "num" (right-aligned, never wrapped), "tutorial", ...
    html: str | None = None  # HTML to use instead of the escaped text
    header: bool = False  # a row header (<th scope=row>)


@dataclass
class Table:
    columns: list[str]  # one per column (Markdown's header; HTML's second header row)
    rows: list[tuple[str, list[Cell]]]  # (the row's class, its cells)
    groups: list[tuple[str, int]] = field(default_factory=list)  # HTML's first header row: (label, columns spanned)
    numeric: set[int] = field(default_factory=set)  # columns whose header is right-aligned like their numbers
    cls: str = ""
    md_columns: list[str] | None = None  # Markdown's header when it needs the groups' words (one header row there)


def _inline(text: str) -> str:
    """HTML of a paragraph: escaped, then ``**bold**``, ```code``` and ``[label](href)`` (relative links only)."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"([^\s(]+ ± [^\s)]+|no-BN)", r'<span class="nw">\1</span>', out)  # a figure and its spread stay on one line
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s:]+)\)", lambda m: f'<a href="{m[2].replace(chr(34), "&quot;")}">{m[1]}</a>', out)


def _markdown(blocks) -> str:
    out = []
    for kind, *content in blocks:
        if kind == "nav":
            out += [" · ".join(f"[{label}]({href})" for label, href in content[0]), ""]
        elif kind == "h1":
            out += [f"# {content[0]}", ""]
        elif kind == "h2":
            out += [f"## {content[0]}", ""]
        elif kind in ("p", "lead", "note"):
            out += [content[0], ""]
        elif kind == "verdict":
            out += [" ".join(content[0]), ""]
        elif kind == "warn":
            out += [f"> **{content[0]}**", ""]
        elif kind == "ul":
            out += [f"- **{k}**: {v}" if v else f"- {k}" for k, v in content[0]] + [""]
        elif kind == "table":
            t = content[0]
            out += ["| " + " | ".join(t.md_columns or t.columns) + " |",
                    "|" + "".join("---:|" if i in t.numeric else "---|" for i in range(len(t.columns))),
                    *["| " + " | ".join(c.text for c in cells) + " |" for _, cells in t.rows], ""]
        elif kind == "figure":
            out += [f"![{content[0]}](plots/{content[0]}.png)", ""]
            if content[1]:
                out += [content[1], ""]
        elif kind == "raw":
            if content[1]:
                out += [content[1], ""]
    return "\n".join(out).rstrip() + "\n"


def _svg_uri(path: Path) -> str | None:
    try:
        return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return None


def _svg_width(uri: str) -> float:
    """The width of an embedded SVG in CSS pixels (matplotlib writes it in points)."""
    head = base64.b64decode(uri.split(",", 1)[1][:800]).decode("utf-8", "replace")
    m = re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', head)
    return float(m[1]) * 96 / 72 if m else 0.0


def _table_html(t: Table) -> str:
    head = ""
    if t.groups:
        head += "<tr>" + "".join(f'<th colspan="{span}" scope="colgroup" class="group">{html.escape(label)}</th>' if label else
                                 f'<td colspan="{span}"></td>' for label, span in t.groups) + "</tr>"
    head += "<tr>" + "".join(f'<th scope="col"{" class=num" if i in t.numeric else ""}>{html.escape(c)}</th>'
                             for i, c in enumerate(t.columns)) + "</tr>"
    body = []
    for cls, cells in t.rows:
        tds = []
        for c, column in zip(cells, t.columns):
            tag = "th" if c.header else "td"
            attrs = (' scope="row"' if c.header else "") + (f' class="{c.cls}"' if c.cls else "")
            attrs += f' data-label="{html.escape(column)}"' if t.cls == "index" and not c.header else ""
            tds.append(f"<{tag}{attrs}>{c.html if c.html is not None else html.escape(c.text)}</{tag}>")
        body.append(f"<tr{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{''.join(tds)}</tr>")
    cls = f' class="{t.cls}"' if t.cls else ""
    return f'<div class="scroll"><table{cls}><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


# One stylesheet for reports and indexes: readable measure, right-aligned numbers that never wrap, tables that
# scroll inside their box on a narrow screen, figures as wide as the text and never wider.
CSS = (
    ":root{--ink:#1d1d1f;--muted:#5f6368;--rule:#d9dce1;--bn:#0072B2;--nobn:#D55E00;--mark:#fff6d6}"
    "*{box-sizing:border-box}"
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:var(--ink);line-height:1.5;margin:0;padding:1.2rem 1rem 3rem;"
    "font-size:16px;-webkit-text-size-adjust:100%}"
    "main{max-width:66rem;margin:0 auto}"
    "h1{font-size:1.7rem;line-height:1.25;margin:.4rem 0 .2rem}h2{font-size:1.25rem;margin:2rem 0 .6rem;border-bottom:1px solid var(--rule);"
    "padding-bottom:.2rem}"
    "p,li{max-width:48rem}.lead{color:var(--muted);margin-top:0}nav{font-size:.9rem;margin-bottom:.6rem}"
    "a{color:#0b57d0}code{font-size:.88em;background:#f3f4f6;padding:.05em .3em;border-radius:3px;overflow-wrap:anywhere}"
    "p.verdict{background:#f4f8fb;border-left:4px solid var(--bn);padding:.7rem 1rem;max-width:none}"
    ".warn{background:#fff3cd;padding:.5rem .8rem}.note{color:var(--muted);font-size:.9rem}"
    ".scroll{overflow-x:auto;max-width:100%;margin:.6rem 0}"
    "table{border-collapse:collapse;font-size:.88rem}th,td{padding:.35rem .55rem;border-bottom:1px solid var(--rule);"
    "text-align:left;vertical-align:middle}thead th{border-bottom:2px solid var(--ink);font-weight:600;white-space:nowrap}"
    "thead th.group{text-align:center;border-bottom:1px solid var(--rule);color:var(--muted);font-weight:500}"
    "thead td{border:0}"
    ".num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}"
    "tbody th{font-weight:500;white-space:nowrap}tr.verdict{background:var(--mark)}small{color:var(--muted);font-weight:400}"
    "table.records td{white-space:nowrap}"
    ".tag{font-size:.75rem;background:var(--ink);color:#fff;border-radius:3px;padding:.05em .35em;margin-left:.3em}"
    ".dir{color:var(--muted)}.tutorial{color:#444;white-space:nowrap}"
    "ul.setup{padding-left:1.1rem}ul.setup li{overflow-wrap:anywhere}"
    "figure{margin:1rem 0;text-align:center}figure img{max-width:100%;height:auto}.fig{overflow-x:auto}.nw{white-space:nowrap}"
    "@media (max-width:40rem){figure.wide img{max-width:none;width:36rem}"
    "table.index thead{display:none}table.index,table.index tbody,table.index tr,table.index th,table.index td{display:block}"
    "table.index tr{border-bottom:2px solid var(--rule);padding:.4rem 0}table.index th,table.index td{border:0;padding:.1rem 0;"
    "text-align:left}table.index td[data-label]::before{content:attr(data-label) ': ';color:var(--muted)}"
    "table.index td[data-label]::before{font-size:.8rem}}"
    "figcaption{font-size:.85rem;color:var(--muted);max-width:48rem;margin:.3rem auto 0;text-align:left}"
    "img.thumb{width:8rem;height:auto;display:block}"
)


def _html(title: str, blocks, plots_dir: Path | None) -> str:
    """A self-contained page of ``blocks``; figures embedded as SVG data URIs."""
    body = []
    for kind, *content in blocks:
        if kind == "nav":
            body.append("<nav>" + " · ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in content[0]) + "</nav>")
        elif kind == "h1":
            body.append(f"<h1>{html.escape(content[0])}</h1>")
        elif kind == "h2":
            body.append(f'<h2 id="{_slug(content[0])}">{html.escape(content[0])}</h2>')
        elif kind in ("p", "lead", "note"):
            body.append(f"<p{'' if kind == 'p' else f' class={chr(34)}{kind}{chr(34)}'}>{_inline(content[0])}</p>")
        elif kind == "verdict":
            body.append(f'<p class="verdict">{" ".join(_inline(s) for s in content[0])}</p>')
        elif kind == "warn":
            body.append(f"<p class='warn'><strong>{html.escape(content[0])}</strong></p>")
        elif kind == "ul":
            items = "".join(f"<li><strong>{html.escape(k)}</strong>: {_inline(v)}</li>" if v else f"<li>{_inline(k)}</li>" for k, v in content[0])
            body.append(f'<ul class="setup">{items}</ul>')
        elif kind == "table":
            body.append(_table_html(content[0]))
        elif kind == "figure":
            uri = _svg_uri(plots_dir / f"{content[0]}.svg") if plots_dir is not None else None
            if uri is not None:
                cap = f"<figcaption>{_inline(content[1])}</figcaption>" if content[1] else ""
                wide = ' class="wide"' if _svg_width(uri) > 700 else ""  # several panels: scrolls sideways on a phone
                body.append(f'<figure{wide}><div class="fig"><img alt="{html.escape(content[0])}" src="{uri}"></div>{cap}</figure>')
        elif kind == "raw":
            body.append(content[0])
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------- the parts of a report


def _arrow(direction: str | None) -> str:
    return {"higher": "↑", "lower": "↓"}.get(direction or "", "")


def _stat(s: dict | None, d: int, n_in_header: bool) -> str:
    text = analysis.fmt_stat(s, d)
    return text if n_in_header or text == "—" else f"{text} (n={s['n']})"


def _figures_table(exp: analysis.Experiment, rows: list[analysis.FigureRow]) -> Table:
    """Final figures: measured per arm, BN − no-BN, the tutorial's (per arm that has any) and the reference's."""
    arms = list(exp.arms)
    both = "bn" in exp.arms and "no_bn" in exp.arms
    n_of = {arm: {r.stats[arm]["n"] for r in rows if r.stats.get(arm, {}).get("n")} for arm in arms}
    uniform = {arm: len(ns) == 1 for arm, ns in n_of.items()}
    tut_arms = [a for a in ("bn", "no_bn") if any(a in r.tutorial for r in rows)]
    ref_arms = [a for a in ("bn", "no_bn") if any(a in r.reference for r in rows)]
    columns = ["figure"] + [f"{'with' if a == 'bn' else 'without'} BN" + (f" (n={next(iter(n_of[a]))})" if uniform[a] else "") for a in arms]
    groups = [("", 1), ("measured here: mean ± std over seeds", len(arms) + both)]
    if both:
        columns.append("BN − no-BN [95% CI]")
    columns += [f"{'with' if a == 'bn' else 'without'} BN" for a in (*tut_arms, *ref_arms)]
    if tut_arms:
        groups.append(("tutorial (one run)", len(tut_arms)))
    if ref_arms:
        groups.append(("reference re-run", len(ref_arms)))
    out = []
    for r in rows:
        d = r.decimals
        arrow = _arrow(r.direction)
        what = {"higher": "higher is better", "lower": "lower is better"}.get(r.direction or "", "")
        md = f"**{r.label}**" if r.verdict else r.label
        md += f" {arrow}" if arrow else ""
        md += " (verdict)" if r.verdict else ""
        label = html.escape(r.key) + (f"<br><small>= {html.escape(r.same_as)}</small>" if r.same_as else "")
        head = (f'<span class="fig">{label}</span>'
                + (f' <span class="dir" title="{what}" aria-label="{what}">{arrow}</span>' if arrow else "")
                + ('<span class="tag">verdict</span>' if r.verdict else ""))
        cells = [Cell(md, html=head, header=True)]
        cells += [Cell(_stat(r.stats.get(a), d, uniform[a]), "num") for a in arms]
        if both:
            cells.append(Cell(analysis.fmt_interval(r.diff, d), "num ci"))
        cells += [Cell(analysis.fmt_value(r.tutorial.get(a), d), "num tutorial") for a in tut_arms]
        cells += [Cell(analysis.fmt_value(r.reference.get(a), d), "num reference") for a in ref_arms]
        out.append(("verdict" if r.verdict else "", cells))
    md_columns = columns[:len(columns) - len(tut_arms) - len(ref_arms)]
    md_columns += [f"tutorial, {'with' if a == 'bn' else 'without'} BN" for a in tut_arms]
    md_columns += [f"reference, {'with' if a == 'bn' else 'without'} BN" for a in ref_arms]
    return Table(columns, out, groups if (tut_arms or ref_arms) else [], set(range(1, len(columns))), "figures", md_columns)


def _date(exp: analysis.Experiment) -> str:
    """When the run started: recorded in the records if they say, else the time ``config.json`` was written."""
    for where in (exp.config, exp.env):
        for key in ("started", "date"):
            if isinstance(where.get(key), str):
                try:
                    when = _dt.datetime.fromisoformat(where[key])
                except ValueError:
                    return where[key]
                zone = f" (UTC{when.isoformat(timespec='minutes')[-6:]})" if when.utcoffset() is not None else ""
                return when.strftime("%Y-%m-%d %H:%M") + zone
    try:
        t = (exp.path / "config.json").stat().st_mtime
    except OSError:
        return "not recorded"
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") + " (when config.json was written; the records hold no date)"


_IGNORED = ("reported", "reference", "notes", "title", "stands_in_for")  # what the recipe says, not what the run did


def _overrides(recipe: dict) -> str:
    """The fields that differ from the recipe's defaults in this bnlab's registry, as ``key=value (recipe: default)``."""
    from .recipes import RECIPES

    default = RECIPES.get(recipe["name"])
    if default is None:
        return f"unknown: this bnlab has no recipe called {recipe['name']!r} to compare with"
    base = default.to_dict()
    changed = [f"`{k}={_plain(v)}` (recipe default {_plain(base.get(k))})" for k, v in recipe.items()
               if k not in _IGNORED and base.get(k) != v]
    return "; ".join(changed) if changed else "none: the recipe's defaults"


def _plain(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_plain(x)}" for k, x in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v) or "none"
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _data_line(r: dict) -> str:
    from ..data import OFFICIAL_SPLIT

    if r["dataset"] in OFFICIAL_SPLIT:
        return f"{r['dataset']}, its official train/test split"
    return f"{r['dataset']}, made and split with data seed {r['data_seed']} (the same for every training seed)"


def _setup(exp: analysis.Experiment) -> list[tuple[str, str]]:
    r, env, cfg = exp.recipe, exp.env, exp.config
    command = cfg.get("command") or []
    val = f"validation_split={r['validation_split']} (the last fraction of the training data)" if r["validation"] == "split" else "the test set"
    opt = r["optimizer"] + (f" (learning rate {r['learning_rate']})" if r.get("learning_rate") else " (Keras defaults)")
    kwargs = dict(r.get("model_kwargs") or {})
    model = r["model"] + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")
    commit = env.get("git_commit")
    code = f"bnlab {env.get('bnlab', '?')}, " + (f"commit `{commit}`" if commit else "commit not recorded")
    return [
        ("command", f"`{shlex.join(['bnlab', *map(str, command)])}`" if command else "not recorded"),
        ("overrides", _overrides(r)),
        ("date", _date(exp)),
        ("code", code),
        ("software", f"torch {env.get('torch', '?')}, numpy {env.get('numpy', '?')}, Python {env.get('python', '?')}, "
                     f"{env.get('cpu_count', '?')} CPUs" + (f", {env['platform']}" if env.get("platform") else "")),
        ("tutorial", f"{r['tutorial']}: {r['title']}"),
        ("data", _data_line(r)),
        ("model", f"{model}; the BN arm uses norm={r['norm']}, the no-BN arm removes every BN layer"),
        ("training", f"{r['epochs']} epochs, batch {r['batch_size']}, {opt}, loss {r['loss']}"
                     + (f", {r['steps_per_epoch']} steps per epoch" if r.get("steps_per_epoch") else "")
                     + (", augmentation (shear 0.2°, zoom 0.2, horizontal flip)" if r.get("augment") else "")),
        ("validation", val),
        ("seeds", ", ".join(str(s) for s in cfg["seeds"])),
        ("processes", f"{cfg.get('nproc', 1)}" + (" (torch.distributed with gloo; synchronized BN: statistics over all processes)"
                                                  if cfg.get("nproc", 1) > 1 else " (a single process)")),
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


def _records_table(exp: analysis.Experiment, cmp: dict, decimals: int) -> Table:
    """Every planned run: how it ended, its final figure, its time, and links to its raw records."""
    metric = cmp["metric"]
    rows = []
    for arm, rec in exp.arms.items():
        finals = dict(zip(rec.seeds, rec.finals))
        for seed in exp.config["seeds"]:
            rd = records.run_dir(Path("."), arm, seed).as_posix()
            if seed in finals:
                status, value = "finished", analysis.fmt(finals[seed].get(metric), decimals)
                secs = finals[seed].get("seconds")
                secs = f"{secs:.1f}" if isinstance(secs, (int, float)) else "—"
            else:
                status = (f"diverged at epoch {rec.diverged[seed]}" if seed in rec.diverged else
                          "unreadable, left out" if seed in rec.unreadable else "not finished")
                value, secs = "—", "—"
            links = [f"[{f}]({rd}/{f})" for f in ("history.csv", "final.json")]
            rows.append(("", [Cell(analysis.ARM_NAMES.get(arm, arm)), Cell(str(seed), "num"), Cell(status), Cell(value, "num"),
                              Cell(secs, "num"), Cell(" ".join(links), html=" ".join(_inline(x) for x in links))]))
    return Table(["arm", "seed", "run", f"final {metric}", "seconds", "records"], rows, numeric={1, 3, 4}, cls="records")


def _question(r: dict, seeds: int) -> str:
    if r.get("stands_in_for"):
        start = f"This offline stand-in for {r['stands_in_for']} (tutorial {r['tutorial']}) runs its model on {r['dataset']}."
    elif r["tutorial"] == "paper":
        start = "The original BN paper (Ioffe & Szegedy 2015) compares this network with and without BN."
    else:
        start = f"Tutorial {r['tutorial']} trains this model once with BN and eyeballs the curves."
    return (f"**Question.** {start} Here both arms ran over {seeds} seeds: does BN change the result, by how much, "
            "and how sure are we?")


def _captions(rows: list[analysis.FigureRow]) -> tuple[str, str]:
    """What the curves and the per-seed plot draw, naming the tutorial's and the reference's marks only where drawn."""
    tutorial = any(not isinstance(v, (list, tuple)) for r in rows for v in r.tutorial.values())
    reference = any(r.reference for r in rows)
    curves = ("Bold: the mean over seeds; thin: each seed; band: ± 1 standard deviation (filled: with BN, hatched: "
              "without BN)" + ("; dotted line ending in a star: the tutorial's figure (one run)." if tutorial else "."))
    finals = ("Each point is one seed's final figure, labelled with its seed; the bar is the arm's mean"
              + ("; a dashed line is the tutorial's figure" if tutorial else "")
              + ("; a grey span the reference re-run's range" if reference else "") + ".")
    return curves, finals


def build_report(path: Path, exp: analysis.Experiment | None = None, *, sections=(), index_href: str | None = None) -> dict[str, Path]:
    """(Re)build plots, ``report.md`` and ``report.html`` in the experiment directory ``path`` (read unless ``exp`` is given).

    ``sections``: extra :class:`Section` objects, shown after the curves.
    ``index_href``: a link back to an index of experiments; by default
    ``../index.html`` for an experiment of ``bnlab demo`` (its records say so), none otherwise.
    The same records give the same bytes.
    """
    path = Path(path)
    exp = exp or analysis.load(path)
    cmp = analysis.compare(exp)
    rows = analysis.figure_rows(exp, cmp)
    figs = plot_all(exp, path / "plots")
    sections = list(sections)
    # EXTRA SECTIONS: a module that always contributes sections is called here.
    sections += diagnostics_report.sections(exp, path)  # probes, Figure 1, BN drift, the loss landscape (issue 23)
    r = exp.recipe
    if index_href is None and (exp.config.get("command") or [None])[0] == "demo":
        index_href = "../index.html"
    primary = next((row for row in rows if row.verdict), None)
    blocks = []
    if index_href:
        blocks.append(("nav", [("← all experiments", index_href)]))
    blocks += [("h1", f"{r['name']}: does batch normalization help?"), ("lead", f"Tutorial {r['tutorial']}: {r['title']}")]
    if not exp.complete:
        blocks.append(("warn", "Incomplete: not every run of every arm ended with readable records; the figures cover the runs that did."))
    blocks += [("p", _question(r, len(exp.config["seeds"]))), ("h2", "Verdict"), ("verdict", analysis.verdict_sentences(exp, cmp))]
    if _runs(exp, cmp):
        blocks += [("h2", "Runs"), ("ul", _runs(exp, cmp))]
    blocks += [("h2", "Final figures"), ("table", _figures_table(exp, rows))]
    legend = ["↑ higher is better, ↓ lower is better; the verdict is about the marked row."]
    if r["validation"] == "test":
        legend.append("The validation data is the test set, so each val_ figure is also the test figure.")
    legend.append("Numbers: mean ± standard deviation over the seeds that finished, one precision per metric; "
                  "BN − no-BN with Welch's t 95% interval (unequal variances).")
    if (note := analysis.tutorial_note(r)) is not None:
        blocks.append(("p", f"**{note}**"))
    else:
        legend.append("The tutorial's figure is what the tutorial printed after its own single run.")
    if any(row.reference for row in rows):
        legend.append("Reference re-run: other measurements the recipe quotes (see its notes).")
    blocks.append(("note", " ".join(legend)))
    checks = [f"{arm} seed {f['seed']}: {k} = {v:.3g}" for arm, rec in exp.arms.items() for f in rec.finals
              for k, v in (f.get("checks") or {}).items()]
    if checks:
        blocks += [("h2", "Checks"), ("ul", [(c, "") for c in checks])]
    shown = [name for name in figs if name != "thumb"]
    if shown:
        blocks.append(("h2", "Curves"))
        last_curve = max((i for i, name in enumerate(shown) if name.startswith("curves-")), default=None)
        curves, finals = _captions(rows)
        blocks += [("figure", name, curves if i == last_curve else finals if name.startswith("final-") else "")
                   for i, name in enumerate(shown)]
    for s in sections:
        blocks.append(("h2", s.title))
        blocks += [("p", t) for t in s.text]
        blocks += [("figure", stem, "") for stem in s.figures]
        if s.html or s.markdown:
            blocks.append(("raw", s.html, s.markdown))
    notes = render_notes(r["notes"], {**r, **exp.config.get("facts", {})}) if r.get("notes") else ""
    blocks += [("h2", "Setup"), ("ul", _setup(exp) + ([("notes", notes)] if notes else []))]
    blocks += [("h2", "Records"),
               ("p", "Raw records: [config.json](config.json) (recipe, seeds, command), [env.json](env.json) (versions, "
                     "commit); per run, its history.csv (one row per epoch) and final.json (final figures, time, digests)."),
               ("table", _records_table(exp, cmp, primary.decimals if primary else 4))]
    records.atomic_write_bytes(path / "report.md", _markdown(blocks).encode())
    records.atomic_write_bytes(path / "report.html", _html(f"bnlab report: {r['name']}", blocks, path / "plots").encode())
    return {"md": path / "report.md", "html": path / "report.html", **{k: v[0] for k, v in figs.items()}}


# ----------------------------------------------------------------------------- the index of several experiments


def _index_row(root: Path, name: str, seconds: float | None):
    """The summary cells of one experiment, and its verdict; a directory whose records cannot be read says so."""
    link = f"{name}/report.html"
    try:
        exp = analysis.load(root / name)
    except (OSError, records.RecordError) as exc:
        first = Cell(f"[{name}]({link})", html=f'<a href="{html.escape(link)}">{html.escape(name)}</a>', header=True)
        return [first, Cell(f"records unreadable: {exc}")] + [Cell("—") for _ in range(5)], f"Records unreadable: {exc}"
    cmp = analysis.compare(exp)
    row = next((x for x in analysis.figure_rows(exp, cmp) if x.verdict), None)
    d = row.decimals if row else 4
    what = f"{cmp['metric']} {_arrow(row.direction) if row else ''}".strip()
    ns = sorted({s["n"] for s in (row.stats.values() if row else ()) if s.get("n")})
    seeds = f"{' / '.join(map(str, ns))} seeds" if ns else "no finished runs"
    seeds += f" · {seconds:.1f} s" if seconds is not None else ""
    first = Cell(f"[{name}]({link}): {what}, {seeds}", header=True,
                 html=f'<a href="{html.escape(link)}">{html.escape(name)}</a><br><small>{html.escape(what)} · {seeds}</small>')
    if row and row.tutorial:
        parts = [f"{analysis.ARM_NAMES.get(a, a)} {analysis.fmt_value(v, d)}" for a, v in row.tutorial.items()]
        tutorial = Cell(", ".join(parts), "tutorial", html="<br>".join(html.escape(p) for p in parts))
    else:
        stand_in = bool(exp.recipe.get("stands_in_for"))
        tutorial = Cell("none (offline stand-in)" if stand_in else "none", "tutorial",
                        html="none<br><small>(offline stand-in)</small>" if stand_in else "none")
    uri = _svg_uri(root / name / "plots" / "thumb.svg")
    alt = f"{name}: {cmp['metric']} per epoch"
    thumb = Cell(f"![{alt}]({name}/plots/thumb.png)" if uri else "—",
                 html=f'<a href="{html.escape(link)}"><img class="thumb" alt="{html.escape(alt)}" src="{uri}"></a>' if uri else "—")
    cells = [first,
             Cell(_stat(row.stats.get("bn") if row else None, d, True), "num"),
             Cell(_stat(row.stats.get("no_bn") if row else None, d, True), "num"),
             Cell(analysis.fmt_interval(row.diff if row else None, d), "num ci"),
             tutorial, Cell(analysis.outcome(exp, cmp)), thumb]
    return cells, analysis.verdict(exp, cmp)


def build_index(root: Path, names, *, title: str = "bnlab: what batch normalization did", note: str = "",
                seconds: dict | None = None) -> dict[str, Path]:
    """``index.md`` and a self-contained ``index.html`` in ``root`` for the experiments ``root/<name>``: a summary table
    (experiment, the verdict's figure and its better direction, BN, no-BN, the difference with its interval, the
    tutorial's figure, the verdict, a thumbnail of the curves; the seconds each took, if given) linking every report,
    then each verdict in full. Reads the records (and each experiment's ``plots/thumb.svg``) only."""
    root = Path(root)
    rows, verdicts = [], []
    for name in names:
        cells, verdict = _index_row(root, name, (seconds or {}).get(name))
        rows.append(("", cells))
        verdicts.append((name, verdict))
    columns = ["experiment: figure", "with BN", "without BN", "BN − no-BN [95% CI]", "tutorial", "verdict", "curves"]
    table = Table(columns, rows, numeric={1, 2, 3}, cls="index")
    blocks = [("h1", title)]
    if note:
        blocks.append(("lead", note))
    blocks += [("table", table),
               ("note", "Figure: the one each verdict is about (↑ higher is better, ↓ lower is better), mean ± standard "
                        "deviation over seeds; BN − no-BN with Welch's t 95% interval" + ("; seconds: the experiment's runs and "
                        "report" if seconds else "") + ". Each name and picture opens the report.")]
    for name, verdict in verdicts:
        blocks += [("h2", name), ("p", verdict), ("p", f"The full report: [{name} report]({name}/report.html), "
                                                      f"also as Markdown: [{name}/report.md]({name}/report.md).")]
    records.atomic_write_bytes(root / "index.md", _markdown(blocks).encode())
    records.atomic_write_bytes(root / "index.html", _html(title, blocks, None).encode())
    return {"md": root / "index.md", "html": root / "index.html"}
