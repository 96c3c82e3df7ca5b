"""Records: atomic writes that honour the umask; readers that check what they load and name what is wrong."""

import json
import os
import stat

import pytest
import torch

from bnlab import lab
from bnlab.lab import experiment, records


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_records_get_the_permissions_the_umask_gives(tmp_path, umask_022):
    out = experiment.run_experiment(lab.with_overrides(lab.get("blobs"), ["epochs=1"]), tmp_path / "r", seeds=[0], arms=["bn"])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "env.json", "history.csv", "final.json", "weights.safetensors"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}  # as open(path, "w") would make them, not 0600
    os.umask(0o077)
    records.write_json(tmp_path / "private.json", {})
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "final.json"
    records.write_json(path, {"a": 1})

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        records.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["final.json"]


def _history(tmp_path, text):
    path = tmp_path / "history.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,kwargs,problem", [
    ("", {}, "is empty (no header row)"),
    ("epoch,loss\n", {}, "has a header but no epochs"),
    ("epoch,loss,val_loss\n1,0.5,0.6\n2,0.4", {}, "row 2 has 2 values, the header has 3 (cut short?)"),
    ("epoch,loss\n1,0.5\n3,0.4\n", {}, "row 2 is numbered '3', expected 2"),
    ("epoch,loss\n1,0.5\n2,abc\n", {}, "row 2, column 'loss': 'abc' is not a number"),
    ("epoch,loss\n1,0.5\n2,nan\n", {}, "row 2, column 'loss': nan is not finite"),
    ("epoch,loss\n1,inf\n2,0.4\n", {"diverged_epoch": 2}, "row 1, column 'loss': inf is not finite"),
    ("epoch,loss\n1,0.5\n2,0.4\n", {"epochs": 3}, "has 2 epoch rows, expected 3 (cut short?)"),
    ("epoch,loss,loss\n1,0.5,0.5\n", {}, "header must be 'epoch' and one distinct name per metric"),
    ("loss,epoch\n0.5,1\n", {}, "header must be 'epoch'"),
])
def test_read_history_names_what_is_wrong(tmp_path, text, kwargs, problem):
    path = _history(tmp_path, text)
    with pytest.raises(records.RecordError) as err:
        records.read_history(path, **kwargs)
    assert str(err.value) == f"{path}: {problem}" if not problem.startswith("header") else str(err.value).startswith(f"{path}: {problem}")


def test_read_history_round_trip_and_a_diverged_last_row(tmp_path):
    hist = {"loss": [0.5, 0.25, 1 / 3], "val_loss": [0.6, 0.5, 0.4]}
    records.write_history(tmp_path / "h.csv", hist)
    assert records.read_history(tmp_path / "h.csv", epochs=3) == hist  # exact floats
    records.write_history(tmp_path / "d.csv", {"loss": [0.5, float("nan")]})
    assert records.read_history(tmp_path / "d.csv", diverged_epoch=2)["loss"][0] == 0.5


@pytest.mark.parametrize("content,problem", [
    (b"", "is empty"),
    (b'{"arm": "bn", "seed": 0, "loss"', "is not valid JSON: Expecting ':' delimiter at line 1, column 32 (cut short?)"),
    (b"\xff\xfe\x00garbage", "is not UTF-8 text (byte 0 is 0xff); the file is damaged"),
    (b'{"loss": NaN}', "is not valid JSON: the non-standard number NaN"),
])
def test_read_json_names_what_is_wrong(tmp_path, content, problem):
    path = tmp_path / "final.json"
    path.write_bytes(content)
    with pytest.raises(records.RecordError, match="^") as err:
        records.read_json(path)
    assert str(err.value) == f"{path}: {problem}"


@pytest.mark.parametrize("final,problem", [
    ([1, 2], "expected a JSON object (a run's final figures), found list"),
    ({"arm": "no_bn", "seed": 0}, "'arm' is 'no_bn', expected 'bn'"),
    ({"arm": "bn", "seed": "0"}, "'seed' is '0', expected 0"),
    ({"arm": "bn", "seed": 0, "loss": "nan"}, "figures ['loss'] are not finite numbers (found 'nan')"),
    ({"arm": "bn", "seed": 0, "diverged_epoch": 0}, "'diverged_epoch' must be null or an int >= 1, found 0"),
    ({"arm": "bn", "seed": 0, "checks": {"x": "y"}}, "'checks' must map names to numbers"),
])
def test_read_final_names_what_is_wrong(tmp_path, final, problem):
    path = tmp_path / "final.json"
    path.write_text(json.dumps(final))
    with pytest.raises(records.RecordError) as err:
        records.read_final(path, "bn", 0)
    assert str(err.value) == f"{path}: {problem}"


def test_read_config_checks_the_recipe_arms_and_seeds(tmp_path):
    good = {"recipe": lab.get("blobs").to_dict(), "seeds": [0, 1], "arms": ["bn", "no_bn"]}
    path = tmp_path / "config.json"
    records.write_json(path, good)
    assert records.read_config(path)["recipe"]["name"] == "blobs"
    for change, problem in [
        ({"seeds": [0, 0]}, "'seeds' must be a non-empty list of distinct ints >= 0"),
        ({"arms": ["bn", "other"]}, "'arms' must be a non-empty list drawn from ['bn', 'no_bn']"),
        ({"recipe": {**good["recipe"], "epochs": 0}}, "holds an invalid recipe: epochs=0: expected an int >= 1"),
        ({"recipe": {**good["recipe"], "norm": 3}}, "holds an invalid recipe: norm=3: expected one of"),
        ({"recipe": {**good["recipe"], "bogus": 1}}, "holds an invalid recipe: recipe record has unknown fields ['bogus']"),
        ({"recipe": {**good["recipe"], "reported": [1]}}, "holds an invalid recipe: recipe record: 'reported' must map arms"),
    ]:
        records.write_json(path, {**good, **change})
        with pytest.raises(records.RecordError) as err:
            records.read_config(path)
        assert str(err.value).startswith(f"{path}: {problem}")


def test_damaged_weights_and_checkpoints_are_named(tmp_path):
    model = torch.nn.Linear(2, 3)
    records.save_weights(tmp_path / "w.safetensors", model)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) - 5])
    with pytest.raises(records.RecordError, match=r"w.safetensors: is not a readable safetensors file"):
        records.load_weights(tmp_path / "w.safetensors")
    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(records.RecordError, match=r"c.pt: is not a readable checkpoint"):
        records.load_checkpoint(tmp_path / "c.pt")
    records.save_checkpoint(tmp_path / "c.pt", {"model": {}})
    with pytest.raises(records.RecordError, match=r"c.pt: lacks \['arm', 'seed', 'epochs_done', 'optimizer', 'rng', 'history'\]"):
        records.load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(records.RecordError, match=r"missing.pt: missing"):
        records.load_checkpoint(tmp_path / "missing.pt")


_SAVE_IN_A_PROCESS = """
import sys, torch
from bnlab.lab import records
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
records.save_weights(sys.argv[1], model, {k: k * 2 for k in ("recipe", "arm", "seed", "alpha", "beta", "gamma", "ünï")})
"""


def test_the_same_weights_saved_by_different_processes_are_the_same_bytes(tmp_path):
    """safetensors orders its metadata by a per-process hash: 7 keys gave one of 5040 orders per process."""
    import subprocess
    import sys

    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", _SAVE_IN_A_PROCESS, str(p)], check=True, timeout=120)
    assert len({p.read_bytes() for p in paths}) == 1
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:  # the metadata reads back whole
        assert f.metadata() == {k: k * 2 for k in ("recipe", "arm", "seed", "alpha", "beta", "gamma", "ünï")}
    loaded = records.load_weights(paths[0])
    torch.manual_seed(0)
    want = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_a_run_records_when_it_started(tmp_path):
    import datetime

    before = datetime.datetime.now().astimezone().replace(microsecond=0)
    out = experiment.run_experiment(lab.with_overrides(lab.get("blobs"), ["epochs=1"]), tmp_path / "r", seeds=[0], arms=["bn"])
    started = datetime.datetime.fromisoformat(records.read_env(out / "env.json")["started"])
    assert started.utcoffset() is not None and before <= started <= datetime.datetime.now().astimezone()
