"""The bnlab command, driven through main(argv): every command and every bad-input case."""

import json
import os
import signal
import subprocess
import sys
import time
import pytest
import torch

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


def test_inspect(capsys, tmp_path):
    out_dir = tmp_path / "bnp"
    assert main(["run", "bn-params", "--seeds", "1", "--out", str(out_dir), "--quiet", "--no-report"]) == 0
    code, out, _ = run_cli(capsys, "inspect", str(out_dir))
    assert code == 0 and "(matches)" in out and "E[h]" in out and "V[h]" in out
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
    ],
)
def test_bad_input_gives_message_and_exit_code(capsys, argv, code, message):
    got, _, err = run_cli(capsys, *argv)
    assert got == code and message in err and "Traceback" not in err


def test_dataset_not_available_offline(capsys, tmp_path, monkeypatch):
    from bnlab.data import datasets as D
    from bnlab.data import download

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "empty-cache"))
    dead = {k: download.Resource(r.filename, ("http://127.0.0.1:9/" + r.filename,), r.size, r.sha256) for k, r in D.RESOURCES["mnist"].items()}
    monkeypatch.setitem(D.RESOURCES, "mnist", dead)
    out = tmp_path / "m"
    code, _, err = run_cli(capsys, "run", "mnist-mlp", "--out", str(out), "--quiet")
    assert code == 1 and "needs the mnist dataset" in err and "SHA-256" in err and "digits28-mlp" in err
    assert not out.exists()  # nothing half-made


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "run", "blobs", "--seeds", "1", "epochs=1", "--out", str(blocker / "sub"), "--quiet")
    assert code == 1 and "cannot write to" in err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "bnlab", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "blobs-deep" in r.stdout


def test_killed_run_resumes_to_the_same_history(tmp_path):
    """Kill a run mid-way (SIGKILL, a subprocess), resume it, compare with an uninterrupted run."""
    args = ["run", "digits28-cnn", "--seeds", "1", "--bn-only", "epochs=5", "--quiet", "--no-report"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main([*args, "--out", str(ref)]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    history = killed / "bn" / "seed-0" / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until at least two epochs are checkpointed, then kill mid-epoch
        if history.exists() and len(history.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "bn" / "seed-0" / "final.json").exists(), "the run finished before it could be killed"
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    final = json.loads((killed / "bn" / "seed-0" / "final.json").read_text())
    assert final["resumed_from_epoch"] >= 2
    assert history.read_text() == (ref / "bn" / "seed-0" / "history.csv").read_text()
    from bnlab.lab import records

    a = records.load_weights(ref / "bn" / "seed-0" / "weights.safetensors")
    b = records.load_weights(killed / "bn" / "seed-0" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same trained weights, bit for bit


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
