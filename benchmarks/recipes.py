"""What BN did in every offline recipe, at full length: run them (or read their records) and tabulate.

    python benchmarks/recipes.py --out runs/recipes --jobs 2          # run, then write the table
    python benchmarks/recipes.py --out runs/recipes --table-only      # the table from existing records

Runs ``bnlab run RECIPE --seeds 5`` (``--seeds 3`` for ``digits28-cnn``, whose
CNN costs most) into ``OUT/RECIPE`` for each offline recipe, then writes
``recipes.md`` and ``recipes.json`` (``--results``, default
``benchmarks/results``): for every recipe the final figures the tutorial
printed, and the one the verdict is about, with and without BN (mean ± standard
deviation over seeds, ``n``), BN − no-BN with Welch's 95% interval, the
tutorial's figure and the verdict. The table is a pure function of the
records, computed by ``bnlab.lab.analysis`` as the reports are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bnlab.lab import analysis, records

RECIPES = {"diabetes": 5, "blobs": 5, "blobs-scratch": 5, "blobs-deep": 5, "bn-params": 5, "digits28-mlp": 5,
           "digits28-cnn": 3}


# checks a recipe's run makes (final.json "checks"), named for the table
CHECKS = {"recompute_max_abs_diff": "largest abs(layer output − by hand)"}
CHECK_NOTES = {"recompute_max_abs_diff": "\"This matches r above\" (the tutorial's by-hand check)"}


def _figures(values: dict, d: int) -> str:
    return ", ".join(f"{analysis.ARM_NAMES.get(a, a)} {analysis.fmt_value(v, d)}" for a, v in values.items())


def rows_of(path: Path) -> list[dict]:
    """The table rows of one experiment: the verdict's figure and every figure the tutorial printed."""
    exp = analysis.load(path)
    cmp = analysis.compare(exp)
    out = []
    for row in analysis.figure_rows(exp, cmp):
        if not (row.verdict or row.tutorial or row.reference) or not row.stats:
            continue
        d = row.decimals
        n = {arm: s["n"] for arm, s in row.stats.items()}
        out.append({
            "recipe": exp.recipe["name"], "figure": row.label, "better": row.direction, "verdict_figure": row.verdict,
            "n": n, "bn": row.stats.get("bn"), "no_bn": row.stats.get("no_bn"), "diff": row.diff,
            "tutorial": dict(row.tutorial), "reference": dict(row.reference),
            "text": {
                "bn": analysis.fmt_stat(row.stats.get("bn"), d), "no_bn": analysis.fmt_stat(row.stats.get("no_bn"), d),
                "diff": analysis.fmt_interval(row.diff, d),
                "tutorial": "; ".join(part for part in (
                    _figures(row.tutorial, d), f"Keras 3 re-run: {_figures(row.reference, d)}" if row.reference else "")
                    if part) or ("none (offline stand-in)" if exp.recipe.get("stands_in_for") else "none"),
                "verdict": analysis.outcome(exp, cmp) if row.verdict else "",
            },
        })
    for key in sorted({k for a in exp.arms.values() for f in a.finals for k in (f.get("checks") or {})}):
        worst = {arm: max((abs(f["checks"][key]) for f in a.finals if key in (f.get("checks") or {})), default=None)
                 for arm, a in exp.arms.items()}
        worst = {arm: v for arm, v in worst.items() if v is not None}
        n = {arm: sum(key in (f.get("checks") or {}) for f in exp.arms[arm].finals) for arm in worst}
        text = {arm: f"{v:.1e}" for arm, v in worst.items()}
        out.append({"recipe": exp.recipe["name"], "figure": CHECKS.get(key, key), "better": "lower", "verdict_figure": False,
                    "n": n, "bn": None, "no_bn": None, "diff": None, "tutorial": {}, "reference": {}, "check": worst,
                    "text": {"bn": text.get("bn", "—"), "no_bn": text.get("no_bn", "—"), "diff": "—",
                             "tutorial": CHECK_NOTES.get(key, "—"), "verdict": ""}})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| recipe | figure | n (BN / no-BN) | with BN | without BN | BN − no-BN [95% CI] | tutorial (one run) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(r["better"] or "", "")
        n = " / ".join(str(r["n"].get(a, 0)) for a in ("bn", "no_bn"))
        t = r["text"]
        lines.append(f"| `{r['recipe']}` | {r['figure']}{arrow} | {n} | {t['bn']} | {t['no_bn']} | {t['diff']} | "
                     f"{t['tutorial']} | {t['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs, one experiment per recipe")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (bnlab run --jobs)")
    p.add_argument("--table-only", action="store_true", help="do not run: tabulate the records in --out")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"), help="where recipes.md/.json go")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.table_only:
        for name, seeds in RECIPES.items():
            subprocess.run([sys.executable, "-m", "bnlab", "run", name, "--seeds", str(seeds), "--jobs", str(args.jobs),
                            "--out", str(out / name), "--quiet"], check=True)
    rows = [r for name in RECIPES for r in rows_of(out / name)]
    env = records.read_env(out / next(iter(RECIPES)) / "env.json")
    head = (f"# What BN did in the offline recipes\n\nFull-length runs of every offline recipe, with and without BN "
            f"(`python benchmarks/recipes.py --out runs/recipes --jobs 2`; bnlab {env.get('bnlab')}, torch "
            f"{env.get('torch')}, {env.get('started', 'date not recorded')[:10]}). Mean ± standard deviation over seeds; "
            f"BN − no-BN with Welch's t 95% interval; ↑/↓: which direction is better; the verdict is about the figure "
            f"that carries it. The tutorial's figure is its single run.\n\n")
    results = Path(args.results)
    records.atomic_write_bytes(results / "recipes.md", (head + table(rows)).encode())
    records.write_json(results / "recipes.json", {"env": env, "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
