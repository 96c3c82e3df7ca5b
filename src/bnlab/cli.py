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

    t = Table(title="bnlab recipes: every experiment of the five tutorials", title_justify="left")
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


def _run_one(recipe, out: Path, seeds, arms, *, resume, overwrite, quiet, argv):
    from .data import DownloadError
    from .lab import experiment

    try:
        with _Progress(recipe, len(seeds) * len(arms), enabled=not quiet) as prog:
            experiment.run_experiment(
                recipe, out, seeds=seeds, arms=arms, resume=resume, overwrite=overwrite, argv=argv,
                on_epoch=prog.epoch, on_run_start=prog.run_start, on_run_end=prog.run_end,
            )
    except experiment.ExperimentError as exc:
        raise CLIError(str(exc)) from None
    except DownloadError as exc:
        raise _missing_dataset(recipe, exc) from None
    return out


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


def cmd_run(args) -> int:
    from .lab import experiment

    recipe = _recipe(args.recipe, args.overrides, "run")
    _at_least_one("--seeds", args.seeds)
    _at_least_one("--nproc", args.nproc)
    out = Path(args.out) if args.out else experiment.default_out(recipe)
    t0 = time.perf_counter()
    run = _run_distributed if args.nproc > 1 else _run_one
    extra = {"nproc": args.nproc} if args.nproc > 1 else {}
    run(recipe, out, list(range(args.seeds)), _arms(args), resume=args.resume, overwrite=args.overwrite,
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


def _locate_run(path: Path, arm: str | None, seed: int | None):
    """``(records directory, arm, seed)`` of the run to inspect: ``path`` is a records directory or one of its runs."""
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
    if not (records.run_dir(path, arm, seed) / "final.json").exists():
        raise CLIError(f"{path} has no finished run for arm {arm!r}, seed {seed}")
    return path, cfg, arm, seed


def cmd_inspect(args) -> int:
    from .data import DownloadError
    from .lab import inspect, records, runner
    from .lab.recipes import Recipe

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
                              "  bnlab run digits28-mlp --no-bn batch_size=64\n  bnlab run blobs norm=renorm\n  bnlab run blobs norm=ghost:32\n  bnlab run blobs-deep --out runs/deep --resume\n\n"
                              "overrides (key=value): epochs, batch_size, learning_rate, optimizer, validation_split, validation,\n"
                              "  steps_per_epoch, augment, shuffle, norm (bnlab|renorm|ghost:K|scratch|scratch-bnlab|torch), data_seed, ...\n")
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
    s.add_argument("--no-report", action="store_true", help="write records only, no plots or report")
    s.add_argument("--quiet", action="store_true", help="no live progress display")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("report", help="(re)build plots and the report of a records directory", formatter_class=fmt,
                       epilog="example:\n  bnlab report runs/blobs-20261122-101500\n")
    s.add_argument("dir", help="records directory written by 'bnlab run'")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("summary", help="Keras-style summary of a recipe's models (with and without BN)", formatter_class=fmt,
                       epilog="examples:\n  bnlab summary diabetes\n  bnlab summary kmnist-cnn\n")
    s.add_argument("recipe", nargs="?", help="recipe name (see 'bnlab list')")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("inspect", help="BN parameters of a trained run and its output re-computed by hand", formatter_class=fmt,
                       epilog="examples:\n  bnlab inspect runs/bn-params-20261122-101500\n  bnlab inspect runs/blobs-x/bn/seed-2\n")
    s.add_argument("run", help="records directory (or one of its <arm>/seed-<k> runs)")
    s.add_argument("--arm", choices=("bn", "no_bn"), help="arm to inspect (default bn)")
    s.add_argument("--seed", type=int, help="seed to inspect (default: the first)")
    s.add_argument("--batch", type=int, default=8, help="test inputs to push through (default 8)")
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
