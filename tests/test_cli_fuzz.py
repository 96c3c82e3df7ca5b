"""Fuzzing the bnlab command, in process (``main(argv)``), from a seeded generator.

Two families of cases, every one of which must end with a non-zero exit code, a message and no traceback,
and leave every file outside the run's directory as it was:

* generated bad command lines for every subcommand: bad recipe names, options with bad values or
  missing values, conflicting options, and key=value overrides that are unknown, fixed by the recipe,
  of the wrong type, out of range, not among the choices, malformed, repeated, or not honourable by
  the recipe (a validation split on a recipe that validates on the test set, augmenting non-images, a
  BN layer the model cannot take, a split that leaves no rows). Training is replaced by a function
  that fails the test, so a case that slipped through validation cannot train quietly;
* every record file of a small finished run (and the checkpoint of an interrupted one) emptied, cut at
  a random byte, cut in half, or filled with random bytes, random text or well-formed JSON/CSV of the
  wrong shape, then read by ``report``, ``inspect`` and ``run --resume``.
"""

import hashlib
import json
import random
import shutil
import string
from pathlib import Path

import pytest

from bnlab import lab
from bnlab.cli import main
from bnlab.lab import experiment, records, training

SEED = 2026
RECIPES = lab.names()
OFFLINE = [n for n, r in lab.RECIPES.items() if r.offline]


# ----------------------------------------------------------------------------- what must hold after every case


def _snapshot(root: Path, skip: Path | None = None) -> dict:
    """path -> SHA-256 of every file under ``root`` except those under ``skip``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and (skip is None or skip not in p.parents):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check(capsys, argv, root: Path, run_dir: Path | None = None):
    """Run one case; assert: exit code != 0, a message, no traceback, nothing outside ``run_dir`` changed."""
    before = _snapshot(root, run_dir)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    where = f"case {argv!r}\nstdout: {out[-500:]}\nstderr: {err[-1500:]}"
    assert code != 0, where
    assert "Traceback" not in err and "Traceback" not in out, where
    assert err.strip(), where
    assert all(line.startswith(("bnlab: error: ", "bnlab: warning: ", "usage: ", "bnlab ", " ")) or not line.strip()
               for line in err.splitlines()), where
    assert _snapshot(root, run_dir) == before, where
    return code, err


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory; no training allowed; datasets that need a download are simply not there."""
    from bnlab.data import download

    def no_training(*a, **k):
        raise AssertionError("a fuzz case reached training: validation let a bad configuration through")

    def offline(res, *a, **k):
        raise download.DownloadError(f"could not download {res.filename} (the fuzz test runs offline)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "data-cache"))
    monkeypatch.setattr(training, "fit", no_training)
    monkeypatch.setattr(lab.runner, "fit", no_training)
    monkeypatch.setattr(download, "fetch", offline)
    (tmp_path / "keep.txt").write_text("a file the command must not touch")
    return tmp_path


# ----------------------------------------------------------------------------- generated command lines

_WORDS = ["", " ", "x", "none", "nan", "inf", "-inf", "1e400", "-0", "0x10", "1_0", "½", "é", "epochs", "=", "==",
          "--", "-1", "3.5", "1,5", "true", "yes", "None", "ghost:", "ghost:-2", "ghost:x", "ghost:1.5", "\t", "'", '"', "\\"]


def _junk(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_WORDS)
    return "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " é") for _ in range(rng.randint(1, 12)))


_INT = {"epochs": 1, "batch_size": 1, "steps_per_epoch": 1, "data_seed": 0}
_FLOAT = {"learning_rate": "positive", "validation_split": "fraction"}
_BOOL = ("augment", "shuffle", "evaluate_test")
_CHOICE = ("optimizer", "validation", "norm", "check")


def _bad_override(rng: random.Random, recipe: str) -> tuple[str, str]:
    """One override that ``recipe`` must refuse, and the kind of mistake it is."""
    r = lab.get(recipe)
    kind = rng.choice(["unknown", "fixed", "type", "range", "choice", "malformed", "twice", "dishonoured"])
    if kind == "unknown":
        key = rng.choice(["epoch", "lr", "seed", "seeds", "batchsize", "Epochs", "momentum", "é", "batch-size", "x"])
        return f"{key}={_junk(rng)}", kind
    if kind == "fixed":
        return f"{rng.choice(['name', 'dataset', 'model', 'loss', 'metrics', 'title', 'notes', 'reported'])}={_junk(rng)}", kind
    if kind == "type":
        key = rng.choice([*_INT, *_FLOAT, *_BOOL])
        if key in _INT:
            value = rng.choice(["ten", "1.5", "", "1e3", "0x10", "nan", "--3", "3 3", "½", "inf"])
        elif key in _FLOAT:
            value = rng.choice(["abc", "1,5", "0.5.1", "1/2", "½", "true", "0..5"])
        else:
            value = rng.choice(["maybe", "2", "", "-1", "truee", "nan", "none"])
        if key == "steps_per_epoch" and value == "":
            value = "1.5"  # an empty value means "none" for this optional field
        return f"{key}={value}", kind
    if kind == "range":
        key = rng.choice([*_INT, *_FLOAT])
        if key == "data_seed":
            value = rng.choice([-1, -7, 2**32, 10**30])
        elif key in _INT:
            value = rng.choice([0, -1, -10**9])
        elif key == "learning_rate":
            value = rng.choice([0, -1, "nan", "inf", "-inf", "1e400", -1e-9])
        else:
            value = rng.choice([0, 1, 1.5, -0.1, "nan", "inf", 1e300, -1e-300])
        return f"{key}={value}", kind
    if kind == "choice":
        key = rng.choice(_CHOICE)
        value = _junk(rng)
        ok = {"optimizer": training.OPTIMIZERS, "validation": ("split", "test"), "check": ("", "recompute"),
              "norm": tuple(lab.NORM_LAYERS)}[key]
        if value.strip() in ok or value.strip().lower() in ("none", "null") and key == "check":
            value = "nope"
        return f"{key}={value}", kind
    if kind == "malformed":
        return rng.choice(["=3", "=", "==", " = ", "epochs", "epochs==3", "=epochs", "batch_size=3=4", "norm", "epochs=3\x00"]), kind
    if kind == "twice":
        return "epochs=2 epochs=2", kind
    # a value the type allows but this recipe cannot honour
    if r.validation == "test" and rng.random() < 0.5:
        return f"validation_split={rng.choice([0.1, 0.3, 0.5])}", kind
    if r.validation == "test":
        return "validation=split", kind
    if r.model in ("kmnist_cnn", "cifar_cnn") and rng.random() < 0.5:
        return "norm=scratch", kind
    if not r.augment and r.dataset in ("diabetes", "blobs", "observations"):
        return "augment=true", kind
    if r.dataset in OFFLINE_DATA and r.validation == "split" and r.validation_split:
        return f"validation_split={rng.choice([0.9999, 1e-17])}", kind  # no rows to train on, or none to validate on
    return "epochs=0", "range"


OFFLINE_DATA = ("diabetes", "blobs", "observations", "digits28")


def _bad_option(rng: random.Random, command: str) -> list[str]:
    opts = {
        "run": [["--seeds", "0"], ["--seeds", "-3"], ["--seeds", "x"], ["--seeds"], ["--nproc", "0"], ["--nproc", "two"],
                ["--bn-only", "--no-bn"], ["--compare", "--no-bn"], ["--bogus"], ["--out"], ["-z"], ["--seeds", "1.5"]],
        "summary": [["--bogus"], ["--seeds", "3"], ["-x"]],
        "demo": [["--seeds", "0"], ["--seeds", "-1"], ["--seeds", "x"], ["--seeds"], ["--out"], ["--bogus"], ["--nproc", "2"]],
        "report": [["--bogus"], ["--seeds", "2"]],
        "inspect": [["--arm", "maybe"], ["--seed", "x"], ["--batch", "0"], ["--batch", "-5"], ["--batch", "y"], ["--arm"]],
    }[command]
    return list(rng.choice(opts))


def _command_line(rng: random.Random, root: Path) -> list[str]:
    """A bad command line for some subcommand."""
    command = rng.choice(["run", "run", "run", "summary", "demo", "report", "inspect", "list", "info", "top"])
    if command == "top":
        return rng.choice([[], [_junk(rng) or "x"], ["--bogus"], ["run-it"], ["lists"], ["-h-"], ["--version"]])
    if command in ("list", "info"):
        return [command, rng.choice(["extra", "--bogus", "epochs=3", "-x", "diabetes"])]
    if command == "report":
        target = rng.choice([root / "nowhere", root / "keep.txt", root, root / "empty-dir", _junk(rng) or "x"])
        (root / "empty-dir").mkdir(exist_ok=True)
        return ["report", target, *(_bad_option(rng, "report") if rng.random() < 0.3 else [])]
    if command == "inspect":
        target = rng.choice([root / "nowhere", root / "keep.txt", root / "empty-dir", root / "bn" / "seed-0", _junk(rng) or "x"])
        (root / "empty-dir").mkdir(exist_ok=True)
        return ["inspect", target, *(_bad_option(rng, "inspect") if rng.random() < 0.5 else [])]
    recipe = rng.choice(RECIPES)
    if command == "demo":
        recipe = rng.choice(["diabetes", "blobs-deep", "digits28-mlp"])
    args = [command] if command == "demo" else [command, recipe]
    how = rng.random()
    if command != "demo" and how < 0.15:  # a recipe name that is not one
        args[1] = rng.choice([recipe[:-1], recipe.upper(), recipe + "x", _junk(rng) or "x", "", "-"])
    elif how < 0.3 and command in ("run", "demo"):
        args += _bad_option(rng, command)
    else:
        override, _ = _bad_override(rng, recipe)
        good = rng.sample(["epochs=2", "batch_size=16", "shuffle=false", "data_seed=3"], rng.randint(0, 2))
        args += [*good, *override.split(" ")]
        rng.shuffle(args[1 if command == "demo" else 2:])
    if command in ("run", "demo"):
        args += ["--out", root / "out", "--quiet"]
    return args


def test_fuzz_command_lines(sandbox, capsys):
    rng = random.Random(SEED)
    seen = set()
    codes = {}
    while len(seen) < 520:
        argv = _command_line(rng, sandbox)
        key = tuple(str(a) for a in argv)
        if key in seen:
            continue
        seen.add(key)
        code, _ = _check(capsys, argv, sandbox)
        codes[code] = codes.get(code, 0) + 1
        assert not (sandbox / "out").exists() and not (sandbox / "runs").exists(), argv  # nothing half-made
    assert codes.get(2, 0) > 400  # almost all are usage errors; the rest: missing records or data (exit 1)
    assert set(codes) <= {1, 2}


# ----------------------------------------------------------------------------- damaged records


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory):
    """A finished blobs run (2 seeds, both arms, 2 epochs) and an interrupted one (its checkpoint after epoch 1)."""
    base = tmp_path_factory.mktemp("fuzz-records")
    recipe = lab.with_overrides(lab.get("blobs"), ["epochs=2"])
    experiment.run_experiment(recipe, base / "finished", seeds=[0, 1])

    def interrupt(arm, seed, epoch, logs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(lab.with_overrides(lab.get("blobs"), ["epochs=3"]), base / "interrupted", seeds=[0],
                                  arms=["bn"], on_epoch=interrupt)
    assert (base / "interrupted" / "bn" / "seed-0" / "checkpoint.pt").exists()
    return base


_FINISHED = ["config.json", "env.json", "bn/seed-0/history.csv", "bn/seed-0/final.json", "bn/seed-0/weights.safetensors",
             "no_bn/seed-1/history.csv", "no_bn/seed-1/final.json", "no_bn/seed-1/weights.safetensors"]
_WRONG_SHAPE = {".json": [b"[]", b"{}", b"null", b'"text"', b'{"arm": [], "seed": {}}', b'{"recipe": 1, "seeds": "0", "arms": 2}'],
                ".csv": [b"epoch\n", b"a,b\n1,2\n", b"epoch,loss\n1\n", b"epoch,loss\n1,0.5\n1,0.4\n"],
                ".safetensors": [b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", b"{}"], ".pt": [b"PK\x05\x06" + bytes(18)]}


def _damage(data: bytes, how: str, suffix: str, rng: random.Random) -> bytes:
    content = len(data.rstrip(b"\n"))  # cutting only the final newline loses nothing
    if how == "empty":
        return b""
    if how == "cut at random":
        return data[: rng.randint(1, content - 1)]
    if how == "cut in half":
        return data[: len(data) // 2]
    if how == "random bytes":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096)))
    if how == "random text":
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 400))).encode()
    return rng.choice(_WRONG_SHAPE[suffix])


_HOW = ["empty", "cut at random", "cut in half", "random bytes", "random text", "wrong shape"]


def _commands(name: str, run: Path) -> list[list]:
    """The commands that read the damaged file ``name`` of the finished run copied at ``run``."""
    resume = ["run", "blobs", "epochs=2", "--seeds", "2", "--out", run, "--resume", "--quiet"]
    out = [["report", run], resume]
    if name in ("config.json", "bn/seed-0/final.json", "bn/seed-0/weights.safetensors"):
        out += [["inspect", run], ["inspect", run / "bn" / "seed-0"]]
    return out


def test_fuzz_damaged_records(made_runs, sandbox, capsys, monkeypatch):
    from bnlab.lab import report

    rng = random.Random(SEED + 1)
    cases = 0
    plotted = False
    for name in _FINISHED:
        for how in _HOW:
            for command in _commands(name, sandbox / "run"):
                run = sandbox / "run"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(made_runs / "finished", run)
                command = [run if a == sandbox / "run" else a for a in command]
                path = run / name
                path.write_bytes(_damage(path.read_bytes(), how, path.suffix, rng))
                # plots are pure functions of checked records, and slow: drawn once (a seed left out), skipped after
                plots = command[0] == "report" and name.endswith("history.csv") and not plotted
                plotted = plotted or plots
                with monkeypatch.context() as mp:
                    if not plots:
                        mp.setattr(report, "plot_all", lambda exp, out: {})
                    code, err = _check(capsys, command, sandbox, run)
                assert code == 1 and str(path) in err, (name, how, command, err)
                cases += 1
    for how in _HOW:  # the checkpoint of an interrupted run, read by --resume
        run = sandbox / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(made_runs / "interrupted", run)
        path = run / "bn" / "seed-0" / "checkpoint.pt"
        path.write_bytes(_damage(path.read_bytes(), how, ".pt", rng))
        code, err = _check(capsys, ["run", "blobs", "epochs=3", "--seeds", "1", "--bn-only", "--out", run, "--resume", "--quiet"],
                           sandbox, run)
        assert code == 1 and f"bnlab: error: {path}: " in err, (how, err)
        cases += 1
    assert cases >= 100
