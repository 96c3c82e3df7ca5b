"""kill -9 and --resume: the resumed run's history.csv is the same bytes as an uninterrupted run's.

The run to kill is a real ``bnlab run`` in a child process that sends itself SIGKILL at a seeded random
optimizer step (mid-epoch), or between writing a checkpoint's temporary file and renaming it. Checkpoints
are taken after every epoch there (``CHECKPOINT_SECONDS = 0``), so the kill lands at a random epoch.
diabetes has dropout (torch's generator), digits28-cnn convolutions and batches of 250, blobs-deep 11 BN
layers; all draw their data order from the run's own generator.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bnlab import lab
from bnlab.cli import main
from bnlab.lab import experiment, records

_CHILD = textwrap.dedent("""
    import os, signal, sys
    from bnlab.lab import experiment, training
    experiment.CHECKPOINT_SECONDS = 0
    mode, at = sys.argv[1], int(sys.argv[2])
    count = [0]
    def die_at(n):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    if mode == "step":  # after the at-th optimizer step, i.e. mid-epoch
        make = training.get_optimizer
        def get_optimizer(spec, params):
            opt = make(spec, params)
            opt.register_step_post_hook(lambda *a: die_at(at))
            return opt
        training.get_optimizer = get_optimizer
    else:  # "write": the at-th checkpoint is written to its temporary file, then the process dies before the rename
        replace = os.replace
        def killing_replace(src, dst, *a, **k):
            if str(dst).endswith("checkpoint.pt"):
                die_at(at)
            return replace(src, dst, *a, **k)
        os.replace = killing_replace
    from bnlab.cli import main
    sys.exit(main(sys.argv[3:]))
""")

CASES = [  # recipe, overrides, how to kill
    ("diabetes", ["epochs=6"], "step"),
    ("digits28-cnn", ["epochs=2"], "step"),
    ("blobs-deep", ["epochs=4"], "write"),
]


@pytest.mark.parametrize("name,overrides,mode", CASES)
def test_kill_9_then_resume_gives_the_same_history_bytes(tmp_path, name, overrides, mode):
    recipe = lab.with_overrides(lab.get(name), overrides)
    steps = math.ceil(int(len(lab.load_data(recipe).x_train) * (1 - recipe.validation_split)) / recipe.batch_size)
    rng = random.Random(f"kill {name}")  # random, but the same every time the test runs
    at = rng.randint(steps + 1, steps * recipe.epochs - 1) if mode == "step" else rng.randint(2, recipe.epochs - 1)
    args = ["run", name, *overrides, "--seeds", "1", "--bn-only", "--quiet", "--no-report"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main([*args, "--out", str(ref)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run([sys.executable, "-c", _CHILD, mode, str(at), *args, "--out", str(killed)], env=env,
                           capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    rd = killed / "bn" / "seed-0"
    assert not (rd / "final.json").exists() and (rd / "checkpoint.pt").exists()
    done = records.load_checkpoint(rd / "checkpoint.pt")["epochs_done"]
    assert 1 <= done < recipe.epochs
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    final = json.loads((rd / "final.json").read_text())
    assert final["resumed_from_epoch"] == done
    assert (rd / "history.csv").read_bytes() == (ref / "bn" / "seed-0" / "history.csv").read_bytes()
    a = records.load_weights(ref / "bn" / "seed-0" / "weights.safetensors")
    b = records.load_weights(rd / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same trained weights, bit for bit
    assert not list(rd.glob(".*.tmp"))  # a temporary file left by the kill is cleared on resume


def test_checkpoint_restores_every_generator(tmp_path):
    """torch's, NumPy's and Python's generators come back from a checkpoint: the next draws are the same."""
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.normal()  # a cached Gaussian in NumPy's state too
    saved = experiment.rng_state()
    records.save_checkpoint(tmp_path / "c.pt", {"rng": saved})
    want = (torch.rand(3), np.random.rand(3), np.random.normal(), [random.random() for _ in range(3)], random.gauss(0, 1))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    experiment.set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


def test_checkpoints_are_spaced_in_time(tmp_path, monkeypatch):
    """After the first epoch a checkpoint is written only when CHECKPOINT_SECONDS have passed (and at divergence)."""
    written = []
    save = records.save_checkpoint
    monkeypatch.setattr(records, "save_checkpoint", lambda path, payload: (written.append(payload["epochs_done"]), save(path, payload)))
    monkeypatch.setattr(experiment, "CHECKPOINT_SECONDS", 3600.0)
    experiment.run_experiment(lab.with_overrides(lab.get("blobs"), ["epochs=4"]), tmp_path / "a", seeds=[0], arms=["bn"])
    assert written == [1]
    written.clear()
    monkeypatch.setattr(experiment, "CHECKPOINT_SECONDS", 0.0)
    experiment.run_experiment(lab.with_overrides(lab.get("blobs"), ["epochs=4"]), tmp_path / "b", seeds=[0], arms=["bn"])
    assert written == [1, 2, 3, 4]


def test_a_damaged_checkpoint_stops_the_resume_with_its_name(tmp_path, capsys):
    args = ["run", "blobs", "epochs=3", "--seeds", "1", "--bn-only", "--quiet", "--no-report", "--out", str(tmp_path / "r")]
    stop = experiment._checkpoint_callback

    def interrupting(*a, **k):  # the run is interrupted after its first epoch's checkpoint
        cb = stop(*a, **k)

        def callback(epoch, *rest):
            cb(epoch, *rest)
            raise KeyboardInterrupt

        return callback

    mp = pytest.MonkeyPatch()
    mp.setattr(experiment, "_checkpoint_callback", interrupting)
    try:
        assert main(args) == 130
    finally:
        mp.undo()
    ckpt = tmp_path / "r" / "bn" / "seed-0" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"bnlab: error: {ckpt}: is not a readable checkpoint" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_checkpoint_restores_the_cuda_generators(tmp_path):
    torch.cuda.manual_seed_all(3)
    records.save_checkpoint(tmp_path / "c.pt", {"rng": experiment.rng_state()})
    want = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(0)
    experiment.set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), want)
