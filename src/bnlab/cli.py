"""The ``bnlab`` command: a thin front over the library (``bnlab.lab``).

Each sub-command is a few lines that call the library; errors all pass through
:func:`main`, which prints ``bnlab: error: ...`` and returns a non-zero code
instead of a traceback: usage errors (a bad command line, an unknown recipe, an
override the recipe cannot take) exit 2, requests that cannot be carried out
(damaged records, a busy output directory, a missing dataset) exit 1. Output
goes through one rich console; written to a file or a pipe it is plain text
with whole lines.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2  # bad command line, unknown recipe, bad override
EXIT_FAILURE = 1  # the request was well formed but could not be carried out


class CLIError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def _console(stderr=False):
    """The rich console for stdout (or stderr). Writing to a file, a pipe or CI it never cuts a line at 80 columns."""
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not con.is_terminal:
        con = Console(stderr=stderr, highlight=False, soft_wrap=True, width=1000)
    return con


def _warn(message: str) -> None:
    print(f"bnlab: warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


def _recipe(name: str | None, overrides=(), command: str = "run"):
    """The recipe ``name`` with ``key=value`` overrides, validated (usage errors exit 2)."""
    from .lab import recipes

    if name is None or "=" in name:
        raise CLIError(f"'{command}' needs a recipe name first, e.g. 'bnlab {command} diabetes epochs=20'; "
                       f"'bnlab list' shows the recipes: {', '.join(recipes.RECIPES)}", EXIT_USAGE)
    try:
        return recipes.with_overrides(recipes.get(name), list(overrides))
    except ValueError as exc:  # OverrideError, or an unknown recipe
        raise CLIError(str(exc), EXIT_USAGE) from None


def _at_least_one(option: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{option} must be >= 1, got {value}", EXIT_USAGE)


def _final_table(exp, cmp, title: str):
    """The final figures as ``report.md`` shows them: one precision per metric, the verdict's row marked."""
    from rich.table import Table

    from .lab import analysis

    t = Table(title=title, title_justify="left")
    t.add_column("figure")
    arms = list(exp.arms)
    for arm in arms:
        t.add_column({"bn": "with BN", "no_bn": "without BN"}.get(arm, arm), justify="right")
    if len(arms) == 2:
        t.add_column("BN − no-BN [95% CI]", justify="right")
    for row in analysis.figure_rows(exp, cmp):
        if not row.stats:  # a figure only the tutorial gives
            continue
        d = row.decimals
        cells = [row.label + {"higher": " ↑", "lower": " ↓"}.get(row.direction or "", "") + (" (verdict)" if row.verdict else "")]
        for a in arms:
            s = row.stats.get(a) or {}
            cells.append(f"{analysis.fmt(s['mean'], d)} ± {analysis.fmt(s['std'], d)} (n={s['n']})" if s.get("n") else "—")
        if len(arms) == 2:
            cells.append(analysis.fmt_interval(row.diff, d))
        t.add_row(*cells, style="bold" if row.verdict else None)
    return t


def _report(out: Path):
    """Read the records once, build the report; ``(experiment, comparison, report paths)``."""
    from .lab import analysis, report

    exp = analysis.load(out)
    paths = report.build_report(out, exp)
    return exp, analysis.compare(exp), paths


def _show(exp, cmp, title: str) -> int:
    """Print the final figures and the verdict; warn about unreadable records. 1 if there were any, else 0."""
    from .lab import analysis

    for problem in exp.problems:
        _warn(problem)
    con = _console()
    if cmp["table"]:
        con.print(_final_table(exp, cmp, title))
    for sentence in analysis.verdict_sentences(exp, cmp):
        con.print(sentence, markup=False)
    return EXIT_FAILURE if exp.problems else 0


_SHOWN = ("loss", "val_loss", "accuracy", "val_accuracy", "mae", "val_mae")


class _Progress:
    """Progress over all runs and epochs: a live rich bar on a terminal, one plain line per epoch otherwise.

    Nothing is shown before the first run starts, so a configuration refused
    before training prints no progress.
    """

    def __init__(self, recipe, n_runs: int, enabled: bool):
        self.recipe, self.n_runs = recipe, n_runs
        self.console = _console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.plain = enabled and not self.live
        self.progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            return self.progress.__exit__(*exc)
        return None

    def _start_live(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, transient=False,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task(self.recipe.name, total=self.n_runs * self.recipe.epochs, status="")

    def run_start(self, arm, seed, done):
        if self.live:
            if self.progress is None:
                self._start_live()
            self.progress.update(self.task, description=f"{self.recipe.name} [{arm}, seed {seed}]", advance=done)
        elif self.plain and done:
            print(f"{self.recipe.name} {arm} seed {seed}: resumed after epoch {done}", file=sys.stderr, flush=True)

    def epoch(self, arm, seed, epoch, logs):
        status = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k in _SHOWN)
        if self.live:
            self.progress.update(self.task, advance=1, status=status)
        elif self.plain:
            print(f"{self.recipe.name} {arm} seed {seed}: epoch {epoch + 1}/{self.recipe.epochs} {status}", file=sys.stderr, flush=True)

    def run_end(self, arm, seed, final):
        if final.get("diverged_epoch") is None:
            return
        line = f"{self.recipe.name} {arm} seed {seed}: diverged at epoch {final['diverged_epoch']} (non-finite figures)"
        if self.live:
            self.progress.update(self.task, advance=self.recipe.epochs - final["epochs"])
            self.progress.console.print(line, markup=False)
        elif self.plain:
            print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    from rich.table import Table

    from .lab import recipes

    t = Table(title="bnlab recipes: every experiment of the five tutorials, and the original BN paper's Figure 1 (tutorial 'paper')",
              title_justify="left")
    t.add_column("recipe", no_wrap=True, min_width=15)
    for col in ("tutorial", "dataset", "offline", "epochs"):
        t.add_column(col, no_wrap=True)
    t.add_column("tutorial's figures")
    for r in recipes.RECIPES.values():
        figs = "; ".join(f"{arm}: " + ", ".join(f"{k} {v}" for k, v in f.items()) for arm, f in r.reported.items()) or "curves only"
        t.add_row(r.name, r.tutorial, r.dataset, "yes" if r.offline else "download", str(r.epochs), figs)
    _console().print(t)
    return 0


def _arms(args):
    if args.no_bn:
        return ("no_bn",)
    if args.bn_only:
        return ("bn",)
    return ("bn", "no_bn")


def _missing_dataset(recipe, exc) -> CLIError:
    from .lab import recipes

    offline = ", ".join(n for n, r in recipes.RECIPES.items() if r.offline)
    return CLIError(f"recipe {recipe.name!r} needs the {recipe.dataset} dataset, which is not available here: {exc} "
                    f"Recipes that run offline: {offline}.")


def _run_one(recipe, out: Path, seeds, arms, *, resume, overwrite, quiet, argv, jobs=1, only=None):
    from concurrent.futures.process import BrokenProcessPool

    from .data import DownloadError
    from .lab import experiment

    n_runs = len(experiment.select_runs(arms, seeds, only)) if only is not None else len(seeds) * len(arms)
    try:
        with _Progress(recipe, n_runs, enabled=not quiet) as prog:
            experiment.run_experiment(
                recipe, out, seeds=seeds, arms=arms, resume=resume, overwrite=overwrite, argv=argv,
                on_epoch=prog.epoch, on_run_start=prog.run_start, on_run_end=prog.run_end, jobs=jobs, only=only,
            )
    except experiment.ExperimentError as exc:
        raise CLIError(str(exc)) from None
    except DownloadError as exc:
        raise _missing_dataset(recipe, exc) from None
    except BrokenProcessPool:
        raise CLIError(f"a worker process died (killed, or out of memory?); finished runs are kept: continue with the same "
                       f"command and --resume (records in {out})") from None
    return out


def _only(spec: str | None, what: str = "SEED/ARM") -> list[str] | None:
    """``--only`` as its comma-separated items (checked by the library against the experiment's runs)."""
    if spec is None:
        return None
    items = [t.strip() for t in spec.split(",")]
    if not all(items):
        raise CLIError(f"--only {spec!r}: expected {what} items separated by commas, e.g. --only 0/bn,1/no_bn", EXIT_USAGE)
    return items


def _runs_of(items, arms, seeds) -> list[tuple[str, int]] | None:
    """``SEED/ARM`` or ``SEED`` (every arm) items as (arm, seed) pairs."""
    if items is None:
        return None
    pairs = []
    for item in items:
        seed_text, _, arm = item.partition("/")
        try:
            seed = int(seed_text)
        except ValueError:
            raise CLIError(f"--only {item!r}: expected SEED/ARM or SEED, e.g. 3/bn or 3 (seeds 0 to {max(seeds)}, arms "
                           f"{', '.join(arms)})", EXIT_USAGE) from None
        pairs += [(a, seed) for a in ([arm] if arm else arms)]
    return pairs


def _dist_worker(rank: int, nproc: int, init: str, recipe_dict: dict, out: str, seeds, arms, resume, overwrite, argv):
    """One process of ``bnlab run --nproc N`` (spawned): gloo, synchronized BN, records from rank 0."""
    import os

    import torch.distributed as dist

    from .lab import experiment
    from .lab.recipes import Recipe

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the processes share this machine
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=nproc)
    try:
        experiment.run_experiment(Recipe.from_dict(recipe_dict), Path(out), seeds=seeds, arms=arms, resume=resume,
                                  overwrite=overwrite, argv=argv)
    finally:
        dist.destroy_process_group()


def _run_distributed(recipe, out: Path, seeds, arms, *, nproc, resume, overwrite, quiet, argv):
    import tempfile

    import torch.multiprocessing as mp

    from .data import DownloadError
    from .lab import runner

    try:  # fail here, with the usual messages, rather than in every worker
        runner.check_runnable(recipe, runner.load_data(recipe))
    except DownloadError as exc:
        raise _missing_dataset(recipe, exc) from None
    if not quiet:
        _console(stderr=True).print(f"{recipe.name}: {nproc} processes (torch.distributed, gloo), synchronized BN -> {out}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_dist_worker, args=(nproc, str(Path(tmp) / "init"), recipe.to_dict(), str(out), list(seeds), list(arms),
                                         resume, overwrite, argv), nprocs=nproc, join=True)
        except mp.ProcessRaisedException as exc:
            last = str(exc).strip().splitlines()[-1]
            if "ExperimentError" in last or "RecordError" in last:
                raise CLIError(last.split(":", 1)[1].strip()) from None
            raise CLIError(f"a worker process failed: {last}") from None
    return out


_DIAGNOSTIC_DEFAULTS = {"probes": 100, "landscape": 1}  # --probes alone: every 100 steps; --landscape alone: every epoch


def _diagnostic_overrides(args) -> list[str]:
    """``--probes[=N]`` and ``--landscape[=E]`` as the recipe overrides they stand for.

    The option's value is optional, so argparse hands it the next word: a
    ``key=value`` there is an override that followed the option, not its value.
    """
    extra = []
    for option, default in _DIAGNOSTIC_DEFAULTS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        if "=" in value:
            args.overrides = [*args.overrides, value]
            value = str(default)
        try:
            n = int(value)
        except ValueError:
            raise CLIError(f"--{option} {value!r}: expected an int >= 1, e.g. --{option}={default}", EXIT_USAGE) from None
        _at_least_one(f"--{option}", n)
        extra.append(f"{option}={n}")
    return extra


def cmd_run(args) -> int:
    from .lab import experiment

    diagnostics = _diagnostic_overrides(args)
    recipe = _recipe(args.recipe, [*args.overrides, *diagnostics], "run")
    _at_least_one("--seeds", args.seeds)
    _at_least_one("--nproc", args.nproc)
    _at_least_one("--jobs", args.jobs)
    if args.nproc > 1 and (args.jobs > 1 or args.only):
        raise CLIError("--nproc trains each run with several processes; --jobs and --only run several runs at once: "
                       "choose one", EXIT_USAGE)
    seeds, arms = list(range(args.seeds)), _arms(args)
    only = _runs_of(_only(args.only), arms, seeds)
    out = Path(args.out) if args.out else experiment.default_out(recipe)
    t0 = time.perf_counter()
    run = _run_distributed if args.nproc > 1 else _run_one
    extra = {"nproc": args.nproc} if args.nproc > 1 else {"jobs": args.jobs, "only": only}
    run(recipe, out, seeds, arms, resume=args.resume, overwrite=args.overwrite,
        quiet=args.quiet, argv=["run", *args.argv_raw], **extra)
    if args.no_report:
        _console().print(f"records: {out}")
        return 0
    exp, cmp, paths = _report(out)
    code = _show(exp, cmp, f"{recipe.name}: final figures ({time.perf_counter() - t0:.0f} s)")
    _console().print(f"report: {paths['html']}")
    return code


def cmd_report(args) -> int:
    out = Path(args.dir)
    if not (out / "config.json").is_file():
        raise CLIError(f"{out} holds no bnlab records (no config.json); give the --out directory of a 'bnlab run'")
    exp, cmp, paths = _report(out)
    code = _show(exp, cmp, f"{exp.recipe['name']}: final figures")
    _console().print(f"report: {paths['html']}\n        {paths['md']}")
    return code


def cmd_report_dirs(args) -> int:
    """``bnlab report DIR [DIR...] [--out MERGED]``: merge first when asked, report a sweep or an experiment."""
    from .lab import diagnostics_report, experiment

    dirs = [Path(d) for d in args.dirs]
    if len(dirs) > 1 and not args.out:
        raise CLIError(f"{len(dirs)} directories: give --out MERGED, the directory to merge their runs into "
                       f"(e.g. bnlab report {' '.join(args.dirs[:2])} --out runs/merged)", EXIT_USAGE)
    out = dirs[0]
    if args.out:
        for d in dirs:
            if not ((d / "config.json").is_file() or (d / experiment.SWEEP_JSON).is_file()):
                raise CLIError(f"{d} holds no bnlab records (no config.json or sweep.json); give directories written by "
                               "'bnlab run' or 'bnlab sweep'")
        try:
            out, copied = experiment.merge(dirs, Path(args.out))
        except experiment.ExperimentError as exc:
            raise CLIError(str(exc)) from None
        _console().print(f"merged {len(copied)} runs from {len(dirs)} directories into {out}")
    if (out / experiment.SWEEP_JSON).is_file():
        paths = diagnostics_report.build_sweep_report(out)
        return _show_sweep(out, paths)
    args.dir = str(out)
    return cmd_report(args)


def _show_sweep(out: Path, paths: dict) -> int:
    """Print a sweep's cells (mean and interval per cell) and where its report is; 1 if records were unreadable."""
    from rich.table import Table

    from .lab import analysis, diagnostics_report

    cfg, rows, unfinished, problems = diagnostics_report.sweep_rows(out)
    for problem in problems:
        _warn(problem)
    keys = list(cfg["grid"])
    t = Table(title=f"{cfg['recipe']['name']} sweep: final {cfg['metric']}, mean [95% CI] over seeds", title_justify="left")
    for k in [*keys, "n", "mean", "95% CI", "diverged"]:
        t.add_column(k, justify="right" if k not in keys else "left")
    for r in rows:
        ci = "—" if math.isnan(r["low"]) else f"[{analysis.fmt(r['low'], 4)}, {analysis.fmt(r['high'], 4)}]"
        t.add_row(*[str(r[k]) for k in keys], str(r["n"]), analysis.fmt(r["mean"], 4), ci, str(r["nonfinite"]))
    con = _console()
    con.print(t)
    if unfinished:
        con.print(f"{len(unfinished)} runs have no result yet; continue with 'bnlab sweep ... --resume'", markup=False)
    con.print(f"report: {paths['html']}\n        {paths['md']}\ndata:   {paths['csv']}")
    return EXIT_FAILURE if problems else 0


class _SweepProgress:
    """One line per run that ends: which of how many, its figure, time elapsed and an estimate of the time left.

    The estimate weighs each run by its rough work (``sweep.work``: steps x
    (batch + per-step overhead)) and assumes the rest goes at the pace so far.
    """

    def __init__(self, metric: str, quiet: bool, header: str = ""):
        self.metric, self.quiet, self.header = metric, quiet, header
        self.t0 = time.perf_counter()
        self.done = self.done_work = 0
        self.total = 0
        self.work: dict = {}

    def plan(self, tasks, works):
        self.total, self.work = len(tasks), {id(t): w for t, w in zip(tasks, works, strict=True)}
        self.remaining_work = sum(works)
        self.ids = {id(t): i for i, t in enumerate(tasks)}
        if not self.quiet:  # printed once every cell has been checked, so a refused sweep prints nothing but its error
            print(f"{self.header}\nsweep: {len(tasks)} runs to go", file=sys.stderr, flush=True)

    def _task_done(self, task) -> None:
        w = self.work.get(id(task), 0)
        self.done += 1
        self.done_work += w
        self.remaining_work -= w

    def run_end(self, task, arm, seed, final):
        self._task_done(task)
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed * self.remaining_work / self.done_work if self.done_work else math.nan
        figure = (f"diverged at epoch {final['diverged_epoch']}" if final.get("diverged_epoch") is not None
                  else f"{self.metric} {final.get(self.metric, math.nan):.4f}")
        eta = f", about {_duration(left)} left" if self.done < self.total and math.isfinite(left) else ""
        print(f"[{self.done}/{self.total}] {task.out.name} seed {seed}: {figure} ({final['seconds']:.0f} s); "
              f"elapsed {_duration(elapsed)}{eta}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _cells_of(items) -> list[tuple[str, int]] | None:
    """``CELL/SEED`` items as (cell id, seed) pairs; a ``CELL`` alone stands for its every seed (expanded by the caller)."""
    if items is None:
        return None
    out = []
    for item in items:
        cell, sep, seed_text = item.rpartition("/")
        if not sep or not cell:
            raise CLIError(f"--only {item!r}: expected CELL/SEED, e.g. --only batch_size=8+norm=bn/0 (the cell ids are "
                           "the directory names 'bnlab sweep' makes)", EXIT_USAGE)
        try:
            out.append((cell, int(seed_text)))
        except ValueError:
            raise CLIError(f"--only {item!r}: the seed after the last '/' must be an int", EXIT_USAGE) from None
    return out


def cmd_sweep(args) -> int:
    from concurrent.futures.process import BrokenProcessPool

    from .lab import diagnostics_report, experiment, recipes, sweep

    if args.recipe is None or "=" in args.recipe:
        raise CLIError("'sweep' needs a recipe name first, e.g. 'bnlab sweep digits28-cnn batch_size=8,32,128 norm=bn,none'; "
                       f"'bnlab list' shows the recipes: {', '.join(recipes.RECIPES)}", EXIT_USAGE)
    recipe = _recipe(args.recipe, [], "sweep")
    _at_least_one("--seeds", args.seeds)
    _at_least_one("--jobs", args.jobs)
    args.grid = [*args.grid, *args.overrides]  # key=value items after an option come back as "overrides"
    if not args.grid:
        raise CLIError("'sweep' needs a grid after the recipe: key=v1,v2,... items, e.g. batch_size=2,4,8 norm=bn,renorm,ghost,none",
                       EXIT_USAGE)
    try:
        cells = sweep.plan(recipe, args.grid, lr_scaling=args.lr_scaling, base_batch_size=args.base_batch_size,
                           ghost_batch=args.ghost_batch)
    except sweep.SweepError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    seeds = list(range(args.seeds))
    only = _cells_of(_only(args.only, "CELL/SEED"))
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    metric = args.metric or sweep.default_metric(cells[0].recipe)
    skipped = sum(c.same_as is not None for c in cells)
    prog = _SweepProgress(metric, args.quiet, f"{recipe.name}: {len(cells)} cells ({skipped} the same model as another, not run) x "
                                              f"{len(seeds)} seeds, {args.jobs} at once -> {out}")
    try:
        experiment.run_sweep(recipe, args.grid, out, seeds=seeds, lr_scaling=args.lr_scaling, base_batch_size=args.base_batch_size,
                             ghost_batch=args.ghost_batch, metric=metric, resume=args.resume, overwrite=args.overwrite,
                             argv=["sweep", *args.argv_raw], jobs=args.jobs, only=only, on_plan=prog.plan, on_run_end=prog.run_end)
    except experiment.ExperimentError as exc:
        raise CLIError(str(exc)) from None
    except BrokenProcessPool:
        raise CLIError(f"a worker process died (killed, or out of memory?); finished runs are kept: continue with the same "
                       f"command and --resume (records in {out})") from None
    if args.no_report:
        _console().print(f"records: {out}")
        return 0
    return _show_sweep(out, diagnostics_report.build_sweep_report(out))


def cmd_summary(args) -> int:
    import bnlab
    from bnlab.data import INPUT_SHAPES

    from .lab import runner

    recipe = _recipe(args.recipe, args.overrides, "summary")
    runner.check_runnable(recipe)
    con = _console()
    shape = INPUT_SHAPES[recipe.dataset]
    for arm in ("bn", "no_bn"):
        model = runner.build_model(recipe, arm, seed=0)
        con.print(f"\n[bold]{recipe.name}[/bold] — {'with' if arm == 'bn' else 'without'} BN, input {shape}")
        bnlab.summary(model, shape, name=f"{recipe.name}-{arm}", print_fn=lambda s: con.print(s, markup=False))
    return 0


def _locate_run(path: Path, arm: str | None, seed: int | None, finished: bool = True):
    """``(records directory, config, arm, seed)`` of the run to inspect: ``path`` is a records directory or one of its runs.

    ``finished=False`` accepts a run still under way (its probes are written as it trains).
    """
    from .lab import records
    from .lab.runner import ARMS

    if path.name.startswith("seed-") and path.parent.name in ARMS and (path.parents[1] / "config.json").is_file():
        try:
            arm, seed = path.parent.name, int(path.name[len("seed-"):])
        except ValueError:
            raise CLIError(f"{path} is not a run directory (<arm>/seed-<k>)") from None
        path = path.parents[1]
    elif not (path / "config.json").is_file():
        raise CLIError(f"{path} is neither a bnlab records directory nor one of its runs")
    cfg = records.read_config(path / "config.json")
    arm = arm or ("bn" if "bn" in cfg["arms"] else cfg["arms"][0])
    seed = cfg["seeds"][0] if seed is None else seed
    if arm not in cfg["arms"] or seed not in cfg["seeds"]:
        raise CLIError(f"{path} has no run for arm {arm!r}, seed {seed}: its arms are {', '.join(cfg['arms'])} and its seeds "
                       f"{', '.join(map(str, cfg['seeds']))}", EXIT_USAGE)
    if finished and not (records.run_dir(path, arm, seed) / "final.json").exists():
        raise CLIError(f"{path} has no finished run for arm {arm!r}, seed {seed}")
    return path, cfg, arm, seed


_SPARKS = "▁▂▃▄▅▆▇█"


def _sparkline(values, width: int = 24) -> str:
    """``values`` as a line of block characters (each the mean of its share of the values); NaN as a space."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return ""
    chunks = [c for c in np.array_split(v, min(width, v.size)) if c.size]
    means = np.array([np.nan if not np.isfinite(c).all() else c.mean() for c in chunks])
    finite = means[np.isfinite(means)]
    if finite.size == 0:
        return " " * len(means)
    lo, hi = finite.min(), finite.max()
    scale = (len(_SPARKS) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join(" " if not np.isfinite(m) else _SPARKS[int(round((m - lo) * scale))] for m in means)


def _inspect_layer(args) -> int:
    """``bnlab inspect RUN --layer NAME``: what the probes recorded for one layer, a table and small plots."""
    from rich.table import Table

    from .lab import records
    from .lab.probes import PROBES_CSV, read_probes

    root, cfg, arm, seed = _locate_run(Path(args.run), args.arm, args.seed, finished=False)
    rd = records.run_dir(root, arm, seed)
    if not (rd / PROBES_CSV).exists():
        raise CLIError(f"{rd} has no probe records ({PROBES_CSV}): run the recipe with --probes (or probes=N)")
    try:
        rec = read_probes(rd)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    layers = rec.meta.get("layers", {})
    if args.layer not in layers:
        known = ", ".join(f"{name} ({' + '.join(filter(None, [d.get('activation'), 'BN' if 'bn' in d.get('kinds', []) else None]))})"
                          for name, d in layers.items())
        raise CLIError(f"{rd} has no probed layer {args.layer!r}; its probed layers: {known or 'none'}", EXIT_USAGE)
    meta = layers[args.layer]
    if not rec.quantities(args.layer):
        every = rec.meta.get("every")
        when = ("no probe step has been recorded yet: the run stopped (or is still) before its first probe step"
                + (f" (probes record every {every} steps)" if every else "") if not rec.data else
                "the other probed layers have rows, this one has none")
        raise CLIError(f"{rd / PROBES_CSV} holds no rows for layer {args.layer!r}: {when}")
    con = _console()
    kind = " + ".join(filter(None, [meta.get("activation") and f"input to {meta['activation']}", "BN" if "bn" in meta.get("kinds", []) else None]))
    con.print(f"[bold]{cfg['recipe']['name']}[/bold], arm {arm}, seed {seed}: layer {args.layer!r} ({meta.get('type')}; {kind}), "
              f"recorded every {rec.meta.get('every')} steps" + (" (a partial last line was left out)" if rec.partial else ""))
    t = Table(title_justify="left")
    for col, justify in (("quantity", "left"), ("first", "right"), ("min", "right"), ("max", "right"), ("last", "right"),
                         ("steps", "right"), ("over training", "left")):
        t.add_column(col, justify=justify, no_wrap=True)
    import numpy as np

    quantities = rec.quantities(args.layer)
    for q in quantities:
        steps, values = rec.series(args.layer, q)
        finite = values[np.isfinite(values)]
        lo, hi = (f"{finite.min():.4g}", f"{finite.max():.4g}") if finite.size else ("—", "—")
        t.add_row(q, f"{values[0]:.4g}", lo, hi, f"{values[-1]:.4g}", f"{steps[0]:,}–{steps[-1]:,}", _sparkline(values))
    con.print(t)
    if args.plot:
        from .lab import plots

        path = plots.plot_layer(rec, args.layer, Path(args.plot), f"{cfg['recipe']['name']} {arm} seed {seed}")
        con.print(f"plot: {path}")
    return 0


def cmd_inspect(args) -> int:
    from .data import DownloadError
    from .lab import inspect, records, runner
    from .lab.recipes import Recipe

    if args.layer is not None:
        return _inspect_layer(args)
    if args.plot:
        raise CLIError("--plot draws a probed layer's records: give --layer NAME too", EXIT_USAGE)
    _at_least_one("--batch", args.batch)
    root, cfg, arm, seed = _locate_run(Path(args.run), args.arm, args.seed)
    recipe = Recipe.from_dict(cfg["recipe"])
    rd = records.run_dir(root, arm, seed)
    final = records.read_final(rd / "final.json", arm, seed)
    weights = records.load_weights(rd / "weights.safetensors")
    records.check_digest(rd / "weights.safetensors", final["sha256"])
    model = runner.build_model(recipe, arm, seed)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise records.RecordError(rd / "weights.safetensors", f"does not fit the {arm} model of {recipe.name}: "
                                                              f"{str(exc).splitlines()[-1].strip()[:160]}") from None
    try:
        data = runner.load_data(recipe)
    except DownloadError as exc:
        raise _missing_dataset(recipe, exc) from None
    x = data.x_test[: args.batch] if len(data.x_test) else data.x_train[: args.batch]
    layers = inspect.inspect_bn(model, x)
    con = _console()
    con.print(f"[bold]{recipe.name}[/bold], arm {arm}, seed {seed}: {len(layers)} batch-normalization layer(s); batch of {len(x)} test inputs")
    if final["diverged_epoch"] is not None:
        con.print(f"this run diverged at epoch {final['diverged_epoch']}: its weights need not be finite", markup=False)
    if not layers:
        con.print("this model has no BN layers (the no-BN arm?): nothing to inspect")
        return 0
    for layer in layers:
        con.print("")
        for line in inspect.format_layer(layer):
            con.print(line, markup=False)
    return 0


def cmd_demo(args) -> int:
    from .lab import analysis, demo, report
    from .lab.recipes import RECIPES

    _at_least_one("--seeds", args.seeds)
    recipes = {name: _recipe(name, args.overrides, "demo") for name in demo.DEMO_RECIPES}  # all checked before any runs
    root = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    con = _console()
    con.print(f"bnlab demo: {', '.join(recipes)}, each with and without BN over {len(seeds)} seeds -> {root}")
    unit = demo.calibrate()
    expected = {name: demo.expected_seconds(name, r.epochs, RECIPES[name].epochs, len(seeds), unit) for name, r in recipes.items()}
    con.print(f"calibration {unit * 1000:.0f} ms: expect about {sum(expected.values()):.0f} s on this machine now")
    if (warning := demo.calibration_warning(unit)) is not None:
        _warn(warning)
    verdicts, code = [], 0
    for name, recipe in recipes.items():
        t_step = time.perf_counter()
        out = root / name
        _run_one(recipe, out, seeds, ("bn", "no_bn"), resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                 argv=["demo", *args.argv_raw])
        exp, cmp, paths = _report(out)
        code = max(code, _show(exp, cmp, f"{name}: final figures"))
        seconds = time.perf_counter() - t_step
        con.print(f"{name}: {2 * len(seeds)} runs and the report in {seconds:.1f} s (expected about {expected[name]:.1f} s)\n")
        if (warning := demo.pace_warning(name, seconds, expected[name])) is not None:
            _warn(warning)
        verdicts.append((name, analysis.verdict(exp, cmp), seconds))
    elapsed = time.perf_counter() - t0
    report.build_index(root, list(recipes), title="bnlab demo: what batch normalization did",
                       note=f"{len(recipes)} tutorial experiments, each trained with and without BN over {len(seeds)} seeds, "
                            f"in {elapsed:.0f} s (expected about {sum(expected.values()):.0f} s on this machine).",
                       seconds={name: s for name, _, s in verdicts})
    con.print(f"demo finished in {elapsed:.0f} s\nreport: {(root / 'index.html').resolve()}")
    return code


def cmd_info(args) -> int:
    """Versions, threads, and whether bnlab's compiled CPU kernels are in use (building them if needed)."""
    import platform

    import torch

    import bnlab
    from bnlab import _kernels

    st = _kernels.status()
    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()} (torch.get_num_threads())")
    print(f"CPU kernels: {'in use' if st['available'] else 'not available, PyTorch paths in use'}"
          f"{' (OpenMP)' if st['openmp'] else ''}")
    print(f"  {st['reason']}")
    if st["available"]:
        print(f"  took {st['seconds']:.2f} s to build or load")
    return 0


# ----------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="bnlab", formatter_class=fmt,
        description="bnlab: batch normalization, and a lab that runs the tutorials' experiments with and without BN.",
        epilog="examples:\n  bnlab demo\n  bnlab list\n  bnlab run diabetes --seeds 5\n  bnlab report runs/diabetes-20261122-101500\n",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", help="the recipes: tutorial, dataset, offline or not, reported figures", formatter_class=fmt,
                       epilog="example:\n  bnlab list\n")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("run", help="run a recipe with and/or without BN over several seeds", formatter_class=fmt,
                       epilog="examples:\n  bnlab run blobs\n  bnlab run diabetes --seeds 3 epochs=20 --out runs/diabetes-short\n"
                              "  bnlab run digits28-mlp --no-bn batch_size=64\n  bnlab run blobs norm=renorm\n  bnlab run blobs norm=ghost:32\n  bnlab run blobs-deep --out runs/deep --resume\n"
                              "  bnlab run paper-fig1-digits28 --jobs 2          # the paper's Figure 1 (probes on), two runs at once\n"
                              "  bnlab run digits28-mlp --probes=50 --landscape   # probes every 50 steps, the landscape every epoch\n"
                              "  bnlab run blobs --seeds 4 --only 2/bn --out runs/blobs-task5   # one task of a job array\n\n"
                              "overrides (key=value): epochs, batch_size, learning_rate, optimizer, validation_split, validation,\n"
                              "  steps_per_epoch, augment, shuffle, norm (bnlab|renorm|ghost:K|scratch|scratch-bnlab|torch), data_seed,\n"
                              "  probes (steps between probe records), landscape (epochs between landscape measurements), ...\n")
    s.add_argument("recipe", nargs="?", help="recipe name (see 'bnlab list')")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields")
    arms = s.add_mutually_exclusive_group()
    arms.add_argument("--compare", action="store_true", help="run with and without BN (default)")
    arms.add_argument("--bn-only", action="store_true", help="run only the arm with BN")
    arms.add_argument("--no-bn", action="store_true", help="run only the arm without BN")
    s.add_argument("--seeds", type=int, default=5, help="number of seeds per arm (default 5)")
    s.add_argument("--out", help="records directory (default runs/<recipe>-<time>)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--overwrite", action="store_true", help="replace existing records in --out")
    s.add_argument("--nproc", type=int, default=1, help="train with N processes (torch.distributed, gloo, synchronized BN)")
    s.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N runs (arm, seed) at once, each in its own process; the records are the same bytes as with 1")
    s.add_argument("--only", metavar="SEED/ARM[,...]",
                   help="run only these runs of the experiment (SEED: both arms), e.g. for one task of a job array; "
                        "merge the directories with 'bnlab report DIR... --out MERGED'")
    s.add_argument("--probes", nargs="?", const="100", metavar="N",
                   help="record probes every N training steps (default N: 100): pre-activation percentiles, sigmoid/tanh "
                        "saturation, BN drift (the same as probes=N)")
    s.add_argument("--landscape", nargs="?", const="1", metavar="E",
                   help="measure the loss landscape along the gradient every E epochs (default E: 1; the same as landscape=E)")
    s.add_argument("--no-report", action="store_true", help="write records only, no plots or report")
    s.add_argument("--quiet", action="store_true", help="no live progress display")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("report", help="(re)build plots and the report of a records directory (or merge several first)",
                       formatter_class=fmt,
                       epilog="examples:\n  bnlab report runs/blobs-20261122-101500\n  bnlab report runs/sweep-digits28-cnn-20261122-101500\n"
                              "  bnlab report runs/blobs-task0 runs/blobs-task1 runs/blobs-task2 --out runs/blobs   # a job array's parts\n")
    s.add_argument("dirs", nargs="+", metavar="DIR", help="records directory written by 'bnlab run' or 'bnlab sweep'")
    s.add_argument("--out", metavar="MERGED", help="merge the runs of every DIR (one experiment or one sweep) into MERGED first, "
                                                   "then report it (needed with several DIRs)")
    s.set_defaults(func=cmd_report_dirs)

    s = sub.add_parser("sweep", help="run a recipe over a grid (e.g. batch size x normalization), one record per cell",
                       formatter_class=fmt,
                       epilog="examples:\n  bnlab sweep digits28-cnn batch_size=2,4,8,16,32,64,128 norm=bn,renorm,ghost,none --jobs 2\n"
                              "  bnlab sweep digits28-cnn batch_size=8,128 norm=bn,none epochs=5 --seeds 2\n"
                              "  bnlab sweep blobs learning_rate=0.001,0.01,0.1 --out runs/blobs-lr\n"
                              "  bnlab sweep digits28-cnn batch_size=2,128 norm=bn,none --only batch_size=2+norm=bn/0 --out runs/part0\n\n"
                              "grid: key=v1,v2,... for norm (bn, renorm, ghost, none, or any norm=... of 'bnlab run') and every\n"
                              "  override of 'bnlab run'; a key with one value sets it for every cell. The learning rate follows the\n"
                              "  batch size (--lr-scaling) unless the grid sets it. Cells are sub-directories named by their settings.\n")
    s.add_argument("recipe", nargs="?", help="recipe name (see 'bnlab list')")
    s.add_argument("grid", nargs="*", metavar="key=v1,v2,...", help="the grid")
    s.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    s.add_argument("--out", help="sweep directory (default runs/sweep-<recipe>-<time>)")
    s.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at once, each in its own process (default 1)")
    s.add_argument("--only", metavar="CELL/SEED[,...]", help="run only these runs (e.g. one task of a job array); merge the "
                                                             "directories with 'bnlab report DIR... --out MERGED'")
    s.add_argument("--lr-scaling", choices=("auto", "linear", "sqrt", "none"), default="auto",
                   help="learning rate against batch size: linear (Goyal et al. 2017, the GN paper), sqrt (Malladi et al. "
                        "2022, for Adam/RMSprop), none; auto (default): linear for SGD, sqrt for Adam and RMSprop, by each "
                        "cell's optimizer")
    s.add_argument("--base-batch-size", type=int, metavar="B", help="the batch size the recipe's learning rate is for (default: the recipe's)")
    s.add_argument("--ghost-batch", type=int, default=16, metavar="K", help="samples per ghost batch for norm=ghost (default 16)")
    s.add_argument("--metric", help="the final figure to compare (default test_accuracy for classifiers, else test_loss)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    s.add_argument("--overwrite", action="store_true", help="replace an existing sweep in --out")
    s.add_argument("--no-report", action="store_true", help="write records only")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_sweep, overrides=[])

    s = sub.add_parser("summary", help="Keras-style summary of a recipe's models (with and without BN)", formatter_class=fmt,
                       epilog="examples:\n  bnlab summary diabetes\n  bnlab summary kmnist-cnn\n")
    s.add_argument("recipe", nargs="?", help="recipe name (see 'bnlab list')")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("inspect", help="BN parameters of a trained run and its output re-computed by hand, or what probes "
                                       "recorded for one layer", formatter_class=fmt,
                       epilog="examples:\n  bnlab inspect runs/bn-params-20261122-101500\n  bnlab inspect runs/blobs-x/bn/seed-2\n"
                              "  bnlab inspect runs/paper-fig1-digits28-x --layer 9            # the last sigmoid's input, with BN\n"
                              "  bnlab inspect runs/paper-fig1-digits28-x --arm no_bn --layer 6 --plot layer6.png\n")
    s.add_argument("run", help="records directory (or one of its <arm>/seed-<k> runs)")
    s.add_argument("--arm", choices=("bn", "no_bn"), help="arm to inspect (default bn)")
    s.add_argument("--seed", type=int, help="seed to inspect (default: the first)")
    s.add_argument("--batch", type=int, default=8, help="test inputs to push through (default 8)")
    s.add_argument("--layer", metavar="NAME", help="show what the probes recorded for this layer (a run with --probes); "
                                                   "a wrong name lists the probed layers")
    s.add_argument("--plot", metavar="FILE.png", help="with --layer: also draw its records over training into this file")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("info", help="versions, threads and whether the compiled CPU kernels are in use", formatter_class=fmt,
                       epilog="examples:\n  bnlab info\n  BNLAB_KERNELS=0 bnlab info\n")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="diabetes, blobs-deep and digits28-mlp with and without BN, 3 seeds, with reports",
                       formatter_class=fmt, epilog="examples:\n  bnlab demo\n  bnlab demo --out runs/my-demo --seeds 5\n"
                                                   "  bnlab demo epochs=5          # a quicker look: overrides apply to every recipe\n")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="override the fields of every demo recipe")
    s.add_argument("--out", help="directory for the demo's records and reports (default runs/demo-<time>)")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    """Entry point of ``bnlab`` and ``python -m bnlab``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        # key=value overrides may come after options too ("--seeds 3 epochs=5")
        args, extra = parser.parse_known_args(argv)
        if extra:
            overrides = [e for e in extra if "=" in e and not e.startswith("-")]
            if hasattr(args, "overrides") and len(overrides) == len(extra):
                args.overrides = list(args.overrides) + overrides
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    args.argv_raw = argv[1:]
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return exc.code
    except ImportError as exc:
        print(f"bnlab: error: {exc}. The lab needs its extra: pip install 'bnlab[lab]'", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bnlab: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return code


def _exit_code(exc: Exception) -> int | None:
    """The exit code of an error the library raises for the user to read; None for anything else (a bug: traceback)."""
    from .lab.experiment import ExperimentError
    from .lab.recipes import OverrideError
    from .lab.records import RecordError

    if isinstance(exc, OverrideError):
        return EXIT_USAGE
    if isinstance(exc, (RecordError, ExperimentError)):
        return EXIT_FAILURE
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
