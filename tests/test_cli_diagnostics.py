"""The diagnostics through the bnlab command: probes and the landscape on 'bnlab run', --jobs, --only and merging,
'bnlab sweep', 'bnlab inspect --layer' and the report's diagnostics sections (issue 23). Runs are a few epochs."""

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from bnlab import lab
from bnlab.cli import main
from bnlab.lab import experiment, landscape, records, runner, training
from bnlab.lab.probes import read_probes


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _finals_without_seconds(root):
    out = {}
    for p in sorted(root.rglob("final.json")):
        final = json.loads(p.read_text())
        final.pop("seconds")
        out[p.relative_to(root).as_posix()] = final
    return out


# ----------------------------------------------------------------------------- bnlab run --probes --landscape


@pytest.fixture(scope="module")
def diabetes_runs(tmp_path_factory):
    """diabetes (dropout, a validation split), 3 epochs, 2 seeds: plain; with probes and the landscape; the same with --jobs 2."""
    base = tmp_path_factory.mktemp("diag")
    common = ["run", "diabetes", "epochs=3", "--seeds", "2", "--quiet", "--no-report"]
    assert main([*common, "--out", str(base / "plain")]) == 0
    assert main([*common, "--probes=2", "--landscape", "--out", str(base / "probed")]) == 0
    assert main([*common, "--probes=2", "--landscape", "--jobs", "2", "--out", str(base / "jobs2")]) == 0
    return base


def test_probes_and_the_landscape_change_no_training_result(diabetes_runs):
    plain, probed = _files(diabetes_runs / "plain"), _files(diabetes_runs / "probed")
    for name in ("history.csv", "weights.safetensors"):
        keys = [k for k in plain if k.endswith(name)]
        assert len(keys) == 4 and all(plain[k] == probed[k] for k in keys)
    extra = sorted(k for k in probed if k not in plain)
    assert extra == sorted(f"{arm}/seed-{s}/{n}" for arm in lab.ARMS for s in (0, 1) for n in ("landscape.jsonl", "probes.csv", "probes.json"))
    final = json.loads(probed["bn/seed-0/final.json"])
    assert set(final["sha256"]) == {"history.csv", "weights.safetensors", "probes.csv", "probes.json", "landscape.jsonl"}
    cfg = json.loads(probed["config.json"])
    assert (cfg["recipe"]["probes"], cfg["recipe"]["landscape"]) == (2, 1)


def test_probes_record_every_nth_training_step_of_the_run(diabetes_runs):
    rd = diabetes_runs / "probed" / "bn" / "seed-0"
    steps_per_epoch = math.ceil(int(397 * 0.85) / 64)  # 337 training rows in batches of 64: 6 steps
    rec = read_probes(rd)
    steps, _ = rec.series("2", "var_ratio")
    assert steps.tolist() == list(range(0, 3 * steps_per_epoch, 2))
    assert rec.meta["every"] == 2 and rec.meta["layers"]["2"]["kinds"] == ["bn"]


def test_the_landscape_records_equal_a_direct_measurement_on_the_training_rows(diabetes_runs):
    """After epoch 2 the record is measure() on the model trained 2 epochs, on a batch of the rows fit trains on."""
    recipe = lab.with_overrides(lab.get("diabetes"), ["epochs=2"])
    ds = lab.load_data(recipe)
    model = lab.run(recipe, arm="bn", seed=1, dataset=ds).model
    train = int(len(ds.x_train) * (1 - recipe.validation_split))  # Keras: the last 15% validate
    gen = torch.Generator().manual_seed(1 * 1_000_003 + 2)
    idx = torch.randperm(train, generator=gen)[: recipe.batch_size]
    with training._threads(1):  # as fit runs this small model (a reduction over 2 threads differs in the last bits)
        want = landscape.measure(model, ds.x_train[:train][idx], ds.y_train[:train][idx], loss="mse",
                                 etas=[f * 1e-3 for f in landscape.DEFAULT_FACTORS])
    got = landscape.read_landscape(diabetes_runs / "probed" / "bn" / "seed-1")
    assert got.epochs.tolist() == [1, 2, 3] and got.steps.tolist() == [6.0, 12.0, 18.0]
    assert got.etas.tolist() == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3], rel=1e-12)
    assert got.loss[1] == pytest.approx(want.loss, rel=1e-12) and got.grad_norm[1] == pytest.approx(want.grad_norm, rel=1e-12)
    assert got.losses[1].tolist() == pytest.approx(want.losses, rel=1e-12)
    assert got.grad_diffs[1].tolist() == pytest.approx(want.grad_diffs, rel=1e-12)


def test_two_jobs_write_the_same_bytes_as_one(diabetes_runs):
    one, two = _files(diabetes_runs / "probed"), _files(diabetes_runs / "jobs2")
    assert one.keys() == two.keys()
    differ = [k for k in one if one[k] != two[k] and not k.endswith("final.json")]
    assert set(differ) <= {"config.json", "env.json"}  # the command line names --out and --jobs; when each started
    cfg = [{k: v for k, v in json.loads(c[k]).items() if k != "command"} for c in (one, two) for k in ["config.json"]]
    assert cfg[0] == cfg[1]
    env = [{k: v for k, v in json.loads(c["env.json"]).items() if k != "started"} for c in (one, two)]
    assert env[0] == env[1]
    assert _finals_without_seconds(diabetes_runs / "probed") == _finals_without_seconds(diabetes_runs / "jobs2")


def test_a_resumed_run_continues_its_probes_and_landscape_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "CHECKPOINT_SECONDS", 0.0)
    recipe = lab.with_overrides(lab.get("diabetes"), ["epochs=4", "probes=3", "landscape=1"])
    experiment.run_experiment(recipe, tmp_path / "whole", seeds=[0], arms=["bn"])

    def stop(arm, seed, epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 2's checkpoint, its landscape line and later probe rows

    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(recipe, tmp_path / "cut", seeds=[0], arms=["bn"], on_epoch=stop)
    rd = tmp_path / "cut" / "bn" / "seed-0"
    with open(rd / "probes.csv", "a") as f:
        f.write("13,2,mean_shift,0.5\n14,2,var")  # rows of a later step, and a line cut by the kill
    experiment.run_experiment(recipe, tmp_path / "cut", seeds=[0], arms=["bn"], resume=True)
    whole = tmp_path / "whole" / "bn" / "seed-0"
    for name in ("probes.csv", "landscape.jsonl", "history.csv", "weights.safetensors"):
        assert (rd / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((rd / "final.json").read_text())["resumed_from_epoch"] == 2


def test_resuming_with_other_probe_settings_is_refused(tmp_path, capsys):
    args = ["run", "blobs", "epochs=1", "--seeds", "1", "--bn-only", "--quiet", "--no-report", "--out", tmp_path / "r"]
    assert run_cli(capsys, *args, "--probes=5")[0] == 0
    code, _, err = run_cli(capsys, *args, "--probes=7", "--resume")
    assert code == 1 and "was started with another configuration" in err


# ----------------------------------------------------------------------------- --only and merging


def test_a_job_array_of_only_runs_merges_into_the_whole_experiment(tmp_path, capsys):
    common = ["run", "blobs", "epochs=2", "--seeds", "2", "--quiet", "--no-report"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    parts = {"a": "0/bn", "b": "1/bn,0/no_bn", "c": "1"}  # the last: both arms of seed 1 (its bn run again)
    for name, only in parts.items():
        assert main([*common, "--only", only, "--out", str(tmp_path / name)]) == 0
    assert sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("final.json")) == ["bn/seed-0/final.json"]
    code, out, _ = run_cli(capsys, "report", tmp_path / "a", tmp_path / "b", tmp_path / "c", "--out", tmp_path / "m")
    assert code == 0 and "merged 4 runs from 3 directories" in out and "(n=2)" in out
    whole, merged = _files(tmp_path / "whole"), _files(tmp_path / "m")
    for key in [k for k in whole if k.endswith((".csv", ".safetensors"))]:
        assert merged[key] == whole[key], key
    cfg = json.loads(merged["config.json"])
    assert cfg["seeds"] == [0, 1] and cfg["arms"] == ["bn", "no_bn"] and (tmp_path / "m" / "report.html").exists()
    assert all((tmp_path / n / "config.json").exists() for n in parts)  # the sources are only read


def test_merging_refuses_other_experiments_and_needs_out(tmp_path, capsys):
    assert main(["run", "blobs", "epochs=1", "--seeds", "1", "--quiet", "--no-report", "--out", str(tmp_path / "a")]) == 0
    assert main(["run", "blobs", "epochs=2", "--seeds", "1", "--quiet", "--no-report", "--out", str(tmp_path / "b")]) == 0
    code, _, err = run_cli(capsys, "report", tmp_path / "a", tmp_path / "b")
    assert code == 2 and "give --out MERGED" in err
    code, _, err = run_cli(capsys, "report", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m")
    assert code == 1 and "holds another experiment" in err
    assert not (tmp_path / "m").exists()  # checked before anything is written: no empty --out left behind
    code, _, err = run_cli(capsys, "report", tmp_path / "a", tmp_path / "nothing", "--out", tmp_path / "m")
    assert code == 1 and "nothing holds no bnlab records" in err


def test_merging_lists_the_union_of_the_seeds_and_refuses_a_run_changed_after_it_ended(tmp_path, capsys):
    common = ["run", "blobs", "epochs=1", "--bn-only", "--quiet", "--no-report"]
    assert main([*common, "--seeds", "2", "--out", str(tmp_path / "a")]) == 0  # seeds 0, 1
    assert main([*common, "--seeds", "4", "--only", "2,3", "--out", str(tmp_path / "b")]) == 0  # seeds 2, 3 of 0-3
    code, out, err = run_cli(capsys, "report", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m")
    assert code == 0 and "merged 4 runs from 2 directories" in out, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["seeds"] == [0, 1, 2, 3]
    assert sorted(p.parent.name for p in (tmp_path / "m").rglob("final.json")) == [f"seed-{s}" for s in range(4)]
    assert "(n=4)" in out
    run = tmp_path / "b" / "bn" / "seed-3"
    for name in ("history.csv", "weights.safetensors"):  # altered after final.json recorded its digest
        kept = (run / name).read_bytes()
        (run / name).write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
        code, _, err = run_cli(capsys, "report", tmp_path / "a", tmp_path / "b", "--out", tmp_path / f"m-{name}")
        assert code == 1 and f"{run / name}" in err and "has changed since its run finished" in err
        assert not (tmp_path / f"m-{name}").exists()  # every run is checked before the first is copied
        (run / name).write_bytes(kept)


# ----------------------------------------------------------------------------- bnlab sweep


@pytest.fixture(scope="module")
def cnn_sweep(tmp_path_factory):
    """digits28-cnn over batch 4 and 32 x the four norms, 2 seeds, one epoch of 3 steps per run, validated on 5% of the
    training rows and not on the test set (evaluating 648 images at batch 4 took most of the time)."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    argv = ["sweep", "digits28-cnn", "batch_size=4,32", "norm=bn,renorm,ghost,none", "epochs=1", "steps_per_epoch=3",
            "validation_split=0.05", "evaluate_test=false", "--seeds", "2", "--ghost-batch", "8", "--out", str(out)]
    return out, argv


def test_the_sweep_runs_each_cell_and_reports_mean_and_interval(cnn_sweep, capsys):
    out, argv = cnn_sweep
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    cfg = json.loads((out / "sweep.json").read_text())
    ids = [c["id"] for c in cfg["cells"]]
    assert len(ids) == 8 and cfg["lr_scaling"] == "auto"  # as asked; Adam's cells: square-root scaling from batch 250
    assert {(c["lr_scaling"], c["base_learning_rate"]) for c in cfg["cells"]} == {("sqrt", 1e-3)}
    ran = sorted(p.name for p in out.iterdir() if (p / "config.json").exists())
    assert "batch_size=4+norm=ghost" not in ran and len(ran) == 7  # ghost:8 holds batch 4 whole
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == [f"[{k}/14" for k in range(1, 15)]
    assert all("elapsed" in line for line in lines) and all("left" in line for line in lines[:-1])
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 8 and cfg["metric"] == "val_accuracy"
    for row in rows:  # each cell's figure against the records read by hand and a direct t interval
        cell = f"batch_size={row['batch_size']}+norm={row['norm']}"
        twin = cell.replace("norm=ghost", "norm=bn") if cell not in ran else cell
        arm = "no_bn" if row["norm"] == "none" else "bn"
        vals = [json.loads((out / twin / arm / f"seed-{s}" / "final.json").read_text())["val_accuracy"] for s in (0, 1)]
        half = stats.t.ppf(0.975, 1) * np.std(vals, ddof=1) / math.sqrt(2)
        assert float(row["mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
        assert float(row["low"]) == pytest.approx(np.mean(vals) - half, rel=1e-9, abs=1e-12)
        rc = records.read_config(out / twin / "config.json")
        want_lr = 1e-3 * (int(row["batch_size"]) / 250) ** 0.5
        assert rc["recipe"]["learning_rate"] == pytest.approx(want_lr) and rc["arms"] == [arm]
    cell_32_ghost = records.read_config(out / "batch_size=32+norm=ghost" / "config.json")
    assert cell_32_ghost["recipe"]["norm"] == "ghost:8"
    assert (out / "plots" / "batch-size-val_accuracy.png").exists() and "![batch-size-val_accuracy]" in (out / "report.md").read_text()
    md = (out / "report.md").read_text()  # each cell's updates, from the facts its own records hold; true minus signs
    for row in rows:
        cell = f"batch_size={row['batch_size']}+norm={row['norm']}"
        twin = cell.replace("norm=ghost", "norm=bn") if cell not in ran else cell
        updates = records.read_config(out / twin / "config.json")["facts"]["updates"]
        assert f"| {row['batch_size']} | {row['norm']} | " in md and f" | {updates:,} | 2 | " in md
    differences = [line for line in md.splitlines() if "minus BN per batch size" in line]
    assert differences and not any(re.search(r": -\d", line) for line in differences)
    assert "val_accuracy" in stdout and "report:" in stdout
    before = _files(out)
    code, _, err = run_cli(capsys, *argv, "--resume")  # everything finished: nothing runs again
    assert code == 0 and not [line for line in err.splitlines() if line.startswith("[")]
    assert {k: v for k, v in _files(out).items() if "final.json" in k} == {k: v for k, v in before.items() if "final.json" in k}
    code, stdout, _ = run_cli(capsys, "report", out)  # the report of a sweep, from its records alone
    assert code == 0 and "sweep: final val_accuracy" in stdout


def test_sweep_parts_run_with_only_and_merge(cnn_sweep, tmp_path, capsys):
    _, argv = cnn_sweep
    argv = argv[:argv.index("--out")] + ["--quiet", "--no-report"]
    cell = "batch_size=32+norm=none"
    assert main([*argv, "--only", f"{cell}/1", "--out", str(tmp_path / "p1")]) == 0
    assert [p.parent.name for p in (tmp_path / "p1").rglob("final.json")] == ["seed-1"]
    assert main([*argv, "--only", f"{cell}/0", "--out", str(tmp_path / "p2")]) == 0
    assert main(["report", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")]) == 0
    assert "14 runs have no result yet" in capsys.readouterr().out  # of the 8 cells x 2 seeds, the parts ran 2
    # The reference: this one cell swept whole (its own grid of one cell, so every key names it; the same recipe and rate).
    one = [a for a in argv if not a.startswith(("batch_size=", "norm="))] + ["batch_size=32", "norm=none"]
    assert main([*one, "--out", str(tmp_path / "whole")]) == 0
    (whole,) = [p for p in (tmp_path / "whole").iterdir() if (p / "config.json").is_file()]
    for s in (0, 1):
        a = (tmp_path / "m" / cell / "no_bn" / f"seed-{s}" / "weights.safetensors").read_bytes()
        assert a == (whole / "no_bn" / f"seed-{s}" / "weights.safetensors").read_bytes()


def test_an_empty_only_selects_no_run_in_a_sweep_as_in_an_experiment(tmp_path):
    with pytest.raises(experiment.ExperimentError, match="--only selects no run"):
        experiment.run_experiment(lab.get("blobs"), tmp_path / "r", seeds=[0], only=[])
    with pytest.raises(experiment.ExperimentError, match="--only selects no run"):
        experiment.run_sweep(lab.get("blobs"), "norm=bn,none", tmp_path / "s", seeds=[0], only=[])
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, code, message", [
    (["sweep"], 2, "'sweep' needs a recipe name first"),
    (["sweep", "blobs"], 2, "'sweep' needs a grid after the recipe"),
    (["sweep", "blobs", "batchsize=2,4"], 2, "grid key 'batchsize': expected norm or a recipe field"),
    (["sweep", "blobs", "norm=bn,layernorm"], 2, "norm='layernorm': expected one of"),
    (["sweep", "blobs", "batch_size=0,4"], 2, "cell batch_size=0: batch_size=0: expected an int >= 1"),
    (["sweep", "blobs", "norm=bn", "--lr-scaling", "cubic"], 2, "invalid choice: 'cubic'"),
    (["sweep", "digits28-cnn", "batch_size=1", "norm=torch"], 2, "cell batch_size=1+norm=torch: norm=torch"),
    (["sweep", "blobs", "norm=bn", "--only", "norm=bn"], 2, "--only 'norm=bn': expected CELL/SEED"),
    (["sweep", "blobs", "norm=bn", "--only", "norm=none/0"], 1, "--only norm=none/0: not a run of this sweep"),
    (["sweep", "blobs", "norm=bn,ghost", "batch_size=8", "--only", "norm=ghost/0"], 1,
     "--only norm=ghost/0: not a run of this sweep; norm=ghost is the same model as norm=bn (a ghost batch that holds the "
     "whole batch is plain BN), so it is not run and the report gives it norm=bn's results; its cells are norm=bn"),
    (["sweep", "blobs", "norm=bn", "--metric", "test_mae"], 2, "metric 'test_mae': cell norm=bn of blobs records loss, accuracy"),
    (["run", "blobs", "--jobs", "0"], 2, "--jobs must be >= 1"),
    (["run", "blobs", "--probes=0"], 2, "--probes must be >= 1"),
    (["run", "blobs", "--landscape=x"], 2, "--landscape 'x': expected an int >= 1"),
    (["run", "blobs", "probes=-1"], 2, "probes=-1: expected an int >= 1"),
    (["run", "blobs", "--only", "9/bn"], 1, "--only 9/bn: not a run of this experiment"),
    (["run", "blobs", "--only", "x/bn"], 2, "--only 'x/bn': expected SEED/ARM or SEED"),
    (["run", "blobs", "--nproc", "2", "--jobs", "2"], 2, "choose one"),
    (["report", "/nonexistent/a", "/nonexistent/b"], 2, "give --out MERGED"),
])
def test_bad_input_gives_message_and_exit_code(capsys, tmp_path, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("run", "sweep") and len(argv) > 1:
        argv = [*argv, "--out", str(tmp_path / "out")]
    got, out, err = run_cli(capsys, *argv)
    assert got == code and message in err and "Traceback" not in err
    if "--lr-scaling" not in argv:
        assert err.startswith("bnlab: error: ") and out == ""
    assert not (tmp_path / "out").exists()


def test_help_of_the_new_commands_has_examples(capsys):
    for argv in (["sweep", "--help"], ["run", "--help"], ["report", "--help"], ["inspect", "--help"]):
        assert main(argv) == 0
    out = capsys.readouterr().out
    for example in ("bnlab sweep digits28-cnn batch_size=2,4,8,16,32,64,128 norm=bn,renorm,ghost,none --jobs 2",
                    "--only 2/bn", "--probes=50 --landscape", "--out runs/blobs   # a job array's parts", "--layer 9"):
        assert example in out


# ----------------------------------------------------------------------------- the paper's Figure 1 in the report, inspect --layer


@pytest.fixture(scope="module")
def fig1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig1") / "r"
    assert main(["run", "paper-fig1-digits28", "epochs=4", "steps_per_epoch=10", "probes=5", "--landscape=2", "--seeds", "2",
                 "--quiet", "--out", str(out)]) == 0
    return out


def test_the_report_shows_figure_1_the_speed_up_and_the_landscape(fig1_run):
    md = (fig1_run / "report.md").read_text()
    assert "## Inside the network: Figure 1 of Ioffe & Szegedy (2015)" in md and "![fig1](plots/fig1.png)" in md
    assert "![bn-drift](plots/bn-drift.png)" in md and "![landscape](plots/landscape.png)" in md
    hist = {arm: [records.read_history(fig1_run / arm / f"seed-{s}" / "history.csv")["val_accuracy"] for s in (0, 1)] for arm in lab.ARMS}
    bn, nb = np.mean(hist["bn"], axis=0), np.mean(hist["no_bn"], axis=0)
    reached = [i for i, v in enumerate(bn) if v >= nb[-1]]
    if reached:
        first_nb = next(i for i, v in enumerate(nb) if v >= nb[-1])
        first = " (its first measurement)" if reached[0] == 0 else ""
        assert (f"ended at a mean test accuracy of {nb[-1]:.4f}; the BN arm's mean first reached it at step {(reached[0] + 1) * 10:,}"
                f"{first}, the no-BN arm's at step {(first_nb + 1) * 10:,}") in md
    else:
        assert f"never reached the no-BN arm's final mean test accuracy {nb[-1]:.4f}" in md
    assert f"step 40: {bn[-1]:.4f} vs {nb[-1]:.4f}" in md
    for png in ("fig1", "bn-drift", "landscape"):
        assert (fig1_run / "plots" / f"{png}.png").stat().st_size > 10_000
    html = (fig1_run / "report.html").read_text()
    assert html.count("data:image/svg+xml;base64,") == md.count("![")  # every figure embedded


def test_percentile_sentences_are_the_seed_means_of_the_records(fig1_run):
    from bnlab.lab import diagnostics_report

    recs = [read_probes(fig1_run / "no_bn" / f"seed-{s}") for s in (0, 1)]
    drift = diagnostics_report.percentile_drift(recs, "6")
    p50 = np.mean([r.series("6", "unit_p50")[1] for r in recs], axis=0)
    assert drift["unit_p50"]["first"] == pytest.approx(p50[0]) and drift["unit_p50"]["last"] == pytest.approx(p50[-1])
    assert drift["unit_p50"]["steps"] == 35 and drift["unit_p50"]["step_10pct"] == 5
    assert drift["unit_p50"]["range_after_10pct"] == pytest.approx(p50[1:].max() - p50[1:].min())


def test_inspect_layer_shows_the_probes_of_that_layer(fig1_run, capsys):
    code, out, _ = run_cli(capsys, "inspect", fig1_run, "--layer", "9", "--plot", fig1_run / "l9.png")
    assert code == 0 and "layer '9' (BatchNormAct" not in out and "layer '9'" in out
    rec = read_probes(fig1_run / "bn" / "seed-0")
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == set(rec.quantities("9"))
    steps, p50 = rec.series("9", "unit_p50")
    cells = [c.strip() for c in rows["unit_p50"].split("│")[2:6]]
    assert cells == [f"{p50[0]:.4g}", f"{p50.min():.4g}", f"{p50.max():.4g}", f"{p50[-1]:.4g}"]
    assert (fig1_run / "l9.png").stat().st_size > 5_000
    code, _, err = run_cli(capsys, "inspect", fig1_run, "--arm", "no_bn", "--layer", "9")
    assert code == 2 and "no probed layer '9'; its probed layers: 2 (sigmoid), 4 (sigmoid), 6 (sigmoid)" in err
    code, _, err = run_cli(capsys, "inspect", fig1_run, "--plot", "x.png")
    assert code == 2 and "give --layer NAME too" in err


def test_inspect_layer_without_probes_says_how_to_get_them(tmp_path, capsys):
    assert main(["run", "blobs", "epochs=1", "--seeds", "1", "--bn-only", "--quiet", "--no-report", "--out", str(tmp_path / "r")]) == 0
    code, _, err = run_cli(capsys, "inspect", tmp_path / "r", "--layer", "1")
    assert code == 1 and "has no probe records (probes.csv): run the recipe with --probes" in err


def test_inspect_layer_of_a_run_stopped_before_its_first_probe_step_says_so(tmp_path, capsys):
    assert main(["run", "blobs", "epochs=1", "--seeds", "1", "--bn-only", "--probes=5", "--quiet", "--no-report",
                 "--out", str(tmp_path / "r")]) == 0
    rd = tmp_path / "r" / "bn" / "seed-0"  # as a run killed before its first probe step leaves it: the header alone
    (rd / "probes.csv").write_text((rd / "probes.csv").read_text().splitlines()[0] + "\n")
    (rd / "final.json").unlink()
    code, out, err = run_cli(capsys, "inspect", tmp_path / "r", "--layer", "1")
    assert code == 1 and "┃" not in out  # no empty table
    assert (f"{rd / 'probes.csv'} holds no rows for layer '1': no probe step has been recorded yet: the run stopped (or is "
            "still) before its first probe step (probes record every 5 steps)") in err


def test_steps_per_epoch_follows_the_split_and_the_recipe():
    assert runner.steps_per_epoch(lab.get("diabetes"), 397) == math.ceil(337 / 64)
    assert runner.steps_per_epoch(lab.get("paper-fig1-digits28"), 1437) == 500


def test_a_damaged_probe_file_is_named_and_left_out_of_the_report(fig1_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fig1_run, copy)
    damaged = copy / "bn" / "seed-1" / "probes.csv"
    damaged.write_text("step,layer,quantity,value\n5,9,p50,0.1\n0,9,p50,0.2\n")  # steps going back
    code, _, err = run_cli(capsys, "report", copy)
    md = (copy / "report.md").read_text()
    assert code == 0 and "Traceback" not in err
    assert "## Diagnostics left out" in md and f"{damaged}:3: step 0 comes after step 5" in md
    assert "(b) without BN and (c) with BN" in md and "![fig1](plots/fig1.png)" in md  # drawn from the seeds that remain


def test_a_report_whose_only_probe_file_is_damaged_still_builds_and_names_it(tmp_path, capsys):
    # one seed, one arm: no good probe file is left for the report to draw from
    out = tmp_path / "r"
    assert main(["run", "blobs", "epochs=1", "--seeds", "1", "--bn-only", "--probes=2", "--quiet", "--no-report", "--out", str(out)]) == 0
    damaged = out / "bn" / "seed-0" / "probes.csv"
    damaged.write_text("step,layer,quantity,value\n0,1,mean_diff,abc\n")
    code, _, err = run_cli(capsys, "report", out)
    assert code == 0 and "Traceback" not in err
    md = (out / "report.md").read_text()
    assert "## Diagnostics left out" in md and f"{damaged}:2: expected an int step and a float value" in md
