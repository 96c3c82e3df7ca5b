"""The bnlab command, driven through main(argv): every command and every bad-input case."""

import json
import subprocess
import sys

import pytest
import torch

from bnlab import lab
from bnlab.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for name in ("diabetes", "cifar10-sigmoid", "bn-params", "blobs-deep", "kmnist-cnn", "mnist-mlp", "digits28-mlp"):
        assert name in out
    assert "download" in out and "yes" in out


def test_help_has_examples(capsys):
    for cmd in ("run", "report", "summary", "inspect", "demo", "list"):
        assert main([cmd, "--help"]) == 0
        assert "example" in capsys.readouterr().out


@pytest.fixture(scope="module")
def blobs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "blobs"
    assert main(["run", "blobs", "--seeds", "2", "epochs=4", "--out", str(out), "--quiet"]) == 0
    return out


def test_run_writes_records_and_report(blobs_run):
    cfg = json.loads((blobs_run / "config.json").read_text())
    assert cfg["recipe"]["epochs"] == 4 and cfg["seeds"] == [0, 1] and cfg["arms"] == ["bn", "no_bn"]
    env = json.loads((blobs_run / "env.json").read_text())
    assert {"bnlab", "torch", "numpy", "platform"} <= set(env)
    for arm in ("bn", "no_bn"):
        for seed in (0, 1):
            rd = blobs_run / arm / f"seed-{seed}"
            assert (rd / "weights.safetensors").exists() and not (rd / "checkpoint.pt").exists()
            rows = (rd / "history.csv").read_text().splitlines()
            assert rows[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(rows) == 5
            assert "test_accuracy" in json.loads((rd / "final.json").read_text())
    assert (blobs_run / "report.md").exists() and (blobs_run / "report.html").exists()
    assert (blobs_run / "plots" / "curves-loss.png").exists() and (blobs_run / "plots" / "curves-loss.svg").exists()


def test_rerun_into_finished_directory_refuses(capsys, blobs_run):
    code, _, err = run_cli(capsys, "run", "blobs", "--seeds", "2", "epochs=4", "--out", str(blobs_run), "--quiet")
    assert code == 1 and "already holds a run of 'blobs'" in err and "--resume" in err


def test_records_directory_from_another_recipe(capsys, blobs_run):
    code, _, err = run_cli(capsys, "run", "diabetes", "--seeds", "1", "epochs=1", "--out", str(blobs_run), "--quiet")
    assert code == 1 and "holds records of recipe 'blobs', not 'diabetes'" in err


def test_report_rebuilds_from_records_alone(capsys, blobs_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(blobs_run, copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.md").unlink()
    code, out, _ = run_cli(capsys, "report", str(copy))
    assert code == 0 and "report:" in out
    assert (copy / "report.md").read_text() == (blobs_run / "report.md").read_text()


def test_summary(capsys):
    code, out, _ = run_cli(capsys, "summary", "diabetes")
    assert code == 0
    assert "Total params: 19,137" in out and "Non-trainable params: 768" in out and "Total params: 17,601" in out


def test_inspect_names_the_moving_statistics_in_an_aligned_table(capsys, tmp_path):
    from bnlab.lab import inspect, records, runner
    from bnlab.lab.recipes import Recipe

    out_dir = tmp_path / "bnp"
    assert main(["run", "bn-params", "--seeds", "1", "--out", str(out_dir), "--quiet", "--no-report"]) == 0
    code, out, _ = run_cli(capsys, "inspect", str(out_dir))
    assert code == 0 and "(matches)" in out and "E[h]" not in out
    lines = out.splitlines()
    rows = {label: next(line for line in lines if line.startswith(f"  {label} ")) for label in
            ("feature", "gamma (γ)", "beta (β)", "moving mean", "moving variance")}
    assert len({len(r) for r in rows.values()}) == 1  # one column per feature, every row as wide as the header
    head = rows["feature"]
    ends = [i for i in range(len("  moving variance"), len(head)) if head[i] != " " and (i + 1 == len(head) or head[i + 1] == " ")]
    assert len(ends) == 4  # bn-params' BN layer has 4 features
    for row in rows.values():  # each value ends where its feature number ends: right-aligned columns
        assert all(row[i] != " " and (i + 1 == len(row) or row[i + 1] == " ") for i in ends)
    cfg = records.read_config(out_dir / "config.json")
    model = runner.build_model(Recipe.from_dict(cfg["recipe"]), "bn", 0)
    model.load_state_dict(records.load_weights(out_dir / "bn" / "seed-0" / "weights.safetensors"))
    (layer,) = inspect.inspect_bn(model, torch.zeros(1, 3))
    shown = [float(v) for v in rows["moving variance"][len("  moving variance"):].split()]
    assert shown == pytest.approx(layer["moving_variance"].tolist(), rel=1e-3)  # the layer's own moving variance
    code, out, _ = run_cli(capsys, "inspect", str(out_dir / "no_bn" / "seed-0"))
    assert code == 0 and "no BN layers" in out


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["run", "blob"], 2, "Did you mean 'blobs'"),
        (["run", "blobs", "epochs=ten"], 2, "epochs='ten': expected an int"),
        (["run", "blobs", "epoch=3"], 2, "unknown override 'epoch'"),
        (["run", "blobs", "--seeds", "0"], 2, "--seeds must be >= 1"),
        (["summary", "nope"], 2, "unknown recipe"),
        (["report", "/nonexistent/dir"], 1, "holds no bnlab records"),
        (["inspect", "/nonexistent/dir"], 1, "neither a bnlab records directory"),
        (["frobnicate"], 2, "invalid choice"),
        (["run", "blobs", "--bogus"], 2, "unrecognized arguments"),
        # every one of these once trained (or tried to) before failing with a traceback, or ran and ignored the value
        (["run"], 2, "'run' needs a recipe name first, e.g. 'bnlab run diabetes"),
        (["run", "epochs=3"], 2, "'run' needs a recipe name first"),
        (["run", "diabetes", "epochs=0"], 2, "epochs=0: expected an int >= 1"),
        (["run", "diabetes", "learning_rate=nan"], 2, "learning_rate=nan: expected a finite number > 0"),
        (["run", "diabetes", "learning_rate=-1"], 2, "learning_rate=-1.0: expected a finite number > 0"),
        (["run", "blobs", "learning_rate=inf"], 2, "learning_rate=inf: expected a finite number > 0"),
        (["run", "diabetes", "validation_split=1.5"], 2, "validation_split=1.5: expected a fraction with 0 < validation_split < 1"),
        (["run", "diabetes", "validation_split=1.0"], 2, "validation_split=1.0: expected a fraction with 0 < validation_split < 1"),
        (["run", "blobs", "validation_split=0.3"], 2, "validation_split=0.3: blobs validates on the test set (validation=test)"),
        (["run", "blobs", "validation=split"], 2, "validation='split': blobs has no validation split"),
        (["run", "diabetes", "augment=true"], 2, "augment=True: the augmentation shears, zooms and flips images"),
        (["run", "digits28-cnn", "norm=scratch"], 2, "norm=scratch: digits28-cnn's model (kmnist_cnn) cannot train a batch"),
        (["run", "diabetes", "validation_split=0.999"], 2, "validation_split=0.999: of diabetes's 397 training rows it leaves 0 to train on"),
        (["run", "diabetes", "validation_split=1e-17"], 2, "it leaves 397 to train on and 0 to validate on; both need at least one"),
        (["run", "diabetes", "optimizer=adagrad"], 2, "optimizer='adagrad': expected one of adam, rmsprop, sgd"),
        (["run", "diabetes", "norm=ghost:0"], 2, "norm='ghost:0': expected one of bnlab"),
        (["run", "diabetes", "dataset=blobs"], 2, "dataset cannot be overridden: it defines the recipe"),
        (["run", "diabetes", "epochs=2", "epochs=3"], 2, "epochs is given twice"),
        (["summary", "digits28-cnn", "norm=scratch"], 2, "norm=scratch: digits28-cnn's model"),
        (["demo", "--seeds", "0"], 2, "--seeds must be >= 1"),
        (["demo", "validation_split=0.5"], 2, "validation_split=0.5: blobs-deep validates on the test set"),
        (["inspect", "/nonexistent/dir", "--batch", "0"], 2, "--batch must be >= 1"),
    ],
)
def test_bad_input_gives_message_and_exit_code(capsys, tmp_path, monkeypatch, argv, code, message):
    """One line on stderr, naming what came and what is allowed; nothing trained, printed or written before it."""
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("run", "demo"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    got, out, err = run_cli(capsys, *argv)
    assert got == code and message in err and "Traceback" not in err
    if argv[0] != "frobnicate" and "--bogus" not in argv:
        assert err.startswith("bnlab: error: ") and err.count("\n") == 1 and out == ""
    assert list(tmp_path.iterdir()) == []  # no output directory, no runs/


def test_dataset_not_available_offline(capsys, tmp_path, monkeypatch):
    from bnlab.data import datasets as D
    from bnlab.data import download

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "empty-cache"))
    dead = {k: download.Resource(r.filename, ("http://127.0.0.1:9/" + r.filename,), r.size, r.sha256) for k, r in D.RESOURCES["mnist"].items()}
    monkeypatch.setitem(D.RESOURCES, "mnist", dead)
    out = tmp_path / "m"
    code, _, err = run_cli(capsys, "run", "mnist-mlp", "--out", str(out), "--quiet")
    assert code == 1 and "needs the mnist dataset" in err and "SHA-256" in err
    offline = [n for n, r in lab.RECIPES.items() if r.offline]
    assert len(offline) >= 7 and f"Recipes that run offline: {', '.join(offline)}." in err  # all of them, from the registry
    assert not out.exists()  # nothing half-made


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "run", "blobs", "--seeds", "1", "epochs=1", "--out", str(blocker / "sub"), "--quiet")
    assert code == 1 and "cannot write to" in err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "bnlab", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "blobs-deep" in r.stdout


def test_list_keeps_whole_lines_when_piped(capsys):
    """Written to a pipe or a file (not a terminal), no column is wrapped or cut at 80 characters."""
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "…" not in out
    for r in lab.RECIPES.values():
        figs = "; ".join(f"{arm}: " + ", ".join(f"{k} {v}" for k, v in f.items()) for arm, f in r.reported.items()) or "curves only"
        assert any(r.name in line and r.dataset in line and figs in line for line in out.splitlines()), r.name


def test_progress_off_a_terminal_is_one_plain_line_per_epoch(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "blobs", "--seeds", "1", "--bn-only", "epochs=3", "--no-report", "--out", str(tmp_path / "p"))
    assert code == 0 and "…" not in err and "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert [line.split(" loss ")[0] for line in lines] == [f"blobs bn seed 0: epoch {e}/3" for e in (1, 2, 3)]
    assert all("accuracy" in line and "val_loss" in line for line in lines)


def test_report_prints_the_verdict_it_writes(capsys, blobs_run):
    from bnlab.lab import analysis

    code, out, err = run_cli(capsys, "report", str(blobs_run))
    assert code == 0 and err == ""
    for sentence in analysis.verdict_sentences(analysis.load(blobs_run)):
        assert sentence in out
    assert analysis.verdict(analysis.load(blobs_run)) in (blobs_run / "report.md").read_text()


@pytest.mark.parametrize("damage", ["history cut mid-line", "final.json cut", "config.json garbage", "epochs=0 in config.json"])
def test_report_on_damaged_records_names_the_file(capsys, blobs_run, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(blobs_run, copy)
    if damage == "history cut mid-line":
        path = copy / "no_bn" / "seed-1" / "history.csv"
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "final.json cut":
        path = copy / "bn" / "seed-0" / "final.json"
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "config.json garbage":
        path = copy / "config.json"
        path.write_bytes(b"\x00\xff garbage {")
    else:
        path = copy / "config.json"
        cfg = json.loads(path.read_text())
        cfg["recipe"]["epochs"] = 0
        path.write_text(json.dumps(cfg))
    code, out, err = run_cli(capsys, "report", str(copy))
    assert code == 1 and f"{path}: " in err and "Traceback" not in err
    if path.name == "config.json":  # nothing can be reported without it
        assert err.startswith("bnlab: error: ") and out == ""
    else:  # the rest is reported, that seed left out of n
        assert err.startswith("bnlab: warning: ") and "Left out because their records are unreadable" in out
        assert "(n=1)" in (copy / "report.md").read_text()


def test_a_diverged_run_is_a_result_and_is_not_retrained(capsys, tmp_path):
    """A loss that is no longer finite ends the run there; records, report and verdict say so; --resume keeps it."""
    args = ["run", "diabetes", "--seeds", "2", "epochs=4", "optimizer=sgd", "learning_rate=1e6", "--quiet", "--out", str(tmp_path / "d")]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    final = json.loads((tmp_path / "d" / "bn" / "seed-0" / "final.json").read_text())
    assert final["diverged_epoch"] == 1 and final["epochs"] == 1 and "loss" not in final
    rows = (tmp_path / "d" / "bn" / "seed-0" / "history.csv").read_text().splitlines()
    assert len(rows) == 2 and "nan" in rows[1]  # the history up to the epoch that diverged
    assert "BN diverged in 2/2 seeds, no-BN in 2/2" in out
    assert "- **BN arm**: 0 of 2 finished; diverged: seed 0 at epoch 1, seed 1 at epoch 1" in (tmp_path / "d" / "report.md").read_text()
    before = (tmp_path / "d" / "bn" / "seed-0" / "final.json").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert (tmp_path / "d" / "bn" / "seed-0" / "final.json").read_bytes() == before  # not run again


def test_run_with_two_processes(capsys, tmp_path):
    args = ["run", "digits28-mlp", "--seeds", "1", "--bn-only", "epochs=2", "--quiet"]
    assert main([*args, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    report = (tmp_path / "two" / "report.md").read_text()
    assert "**processes**: 2 (torch.distributed with gloo" in report
    assert json.loads((tmp_path / "two" / "config.json").read_text())["nproc"] == 2
    assert main([*args, "--out", str(tmp_path / "one"), "--no-report"]) == 0
    two = json.loads((tmp_path / "two" / "bn" / "seed-0" / "final.json").read_text())
    one = json.loads((tmp_path / "one" / "bn" / "seed-0" / "final.json").read_text())
    assert two["loss"] == pytest.approx(one["loss"], rel=0.05)  # the same training up to the uneven last batch
    assert abs(two["val_accuracy"] - one["val_accuracy"]) < 0.03
    code, _, err = run_cli(capsys, "run", "blobs", "--nproc", "0")
    assert code == 2 and "--nproc must be >= 1" in err


def test_info_says_whether_the_kernels_are_in_use(capsys, monkeypatch):
    from bnlab import _kernels

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bnlab" in out and "threads:" in out
    assert ("CPU kernels: in use" in out) == _kernels.status()["available"]
    monkeypatch.setenv("BNLAB_KERNELS", "0")
    _kernels._reset()
    try:
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert "PyTorch paths in use" in out and "BNLAB_KERNELS=0" in out
    finally:
        monkeypatch.delenv("BNLAB_KERNELS")
        _kernels._reset()
