"""Dataset loaders on small files in the real formats (gzip IDX, CIFAR-10 binary in a tar.gz)."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import datasets as D
from bnlab.data import download, formats

from ..fakes import _fake_cifar, _fake_idx_set


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", ["mnist", "kmnist"])
def test_idx_loader_end_to_end(name, tmp_path, cache, monkeypatch):
    arrays, res = _fake_idx_set(tmp_path)
    monkeypatch.setitem(D.RESOURCES, name, res)
    ds = D.load(name)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy() * 255, arrays["train-images"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test-labels"])
    assert ds.y_train.dtype == torch.int64
    assert sorted(p.name for p in (cache / name).iterdir()) == sorted(r.filename for r in res.values())
    ds2 = D.load(name)  # second time from the cache
    assert torch.equal(ds.x_train, ds2.x_train)


def test_cifar10_loader_end_to_end(tmp_path, cache, monkeypatch):
    (xtr, ytr), (xte, yte), res = _fake_cifar(tmp_path)
    monkeypatch.setitem(D.RESOURCES, "cifar10", {"archive": res})
    ds = D.cifar10(tutorial_normalize=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(ds.x_train.numpy().transpose(0, 2, 3, 1) * 255, xtr, atol=1e-3)
    np.testing.assert_array_equal(ds.y_train.numpy(), ytr)
    np.testing.assert_array_equal(ds.y_test.numpy(), yte)
    ds_t = D.cifar10()  # the tutorial's keras.utils.normalize(x, axis=1): unit L2 norm down each column
    col_norms = np.linalg.norm(ds_t.x_train.numpy().transpose(0, 2, 3, 1), axis=1)
    np.testing.assert_allclose(col_norms, 1.0, rtol=1e-5)


def test_corrupted_cache_file_is_rejected_with_a_clear_error(tmp_path, cache, monkeypatch):
    _, res = _fake_idx_set(tmp_path)
    monkeypatch.setitem(D.RESOURCES, "mnist", res)
    D.load("mnist")
    victim = cache / "mnist" / "train-labels-idx1-ubyte.gz"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(download.DownloadError, match=r"corrupted or not the expected file: SHA-256 [0-9a-f]{64}, expected"):
        D.load("mnist")


def test_download_with_wrong_digest_leaves_nothing_in_cache(tmp_path, cache):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"x" * 1000)
    res = download.Resource("blob.bin", (src.as_uri(),), 1000, "0" * 64)
    with pytest.raises(download.DownloadError, match="SHA-256"):
        download.fetch(res, "t")
    assert list((cache / "t").iterdir()) == []  # no partial or unverified file


def test_offline_error_names_url_digest_and_where_to_put_the_file(tmp_path, cache):
    res = download.Resource("file.gz", ("http://127.0.0.1:9/file.gz",), 10, "a" * 64)
    with pytest.raises(download.DownloadError) as err:
        download.fetch(res, "t", timeout=2)
    msg = str(err.value)
    assert "http://127.0.0.1:9/file.gz" in msg and "a" * 64 in msg and str(cache / "t" / "file.gz") in msg
    assert list((cache / "t").iterdir()) == []


def test_truncated_download_is_not_kept(tmp_path, cache):
    full = b"y" * 5000
    src = tmp_path / "short.bin"
    src.write_bytes(full[:1234])  # the server sends a truncated file
    res = download.Resource("short.bin", (src.as_uri(),), len(full), hashlib.sha256(full).hexdigest())
    with pytest.raises(download.DownloadError, match="size 1234 bytes, expected 5000"):
        download.fetch(res, "t")
    assert not (cache / "t" / "short.bin").exists() and list((cache / "t").iterdir()) == []


def test_idx_parser_rejects_bad_files(tmp_path):
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")  # says 5 values, has 2
    with pytest.raises(ValueError, match="IDX header says shape"):
        formats.read_idx(p)
    p2 = tmp_path / "bad2"
    p2.write_bytes(b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="not an IDX file"):
        formats.read_idx(p2)


def test_cifar_parser_rejects_partial_records():
    with pytest.raises(ValueError, match="not a whole number"):
        formats.read_cifar_records(b"\x00" * 3000)


def test_pinned_digests_are_well_formed():
    for name, resources in D.RESOURCES.items():
        for r in resources.values():
            assert len(r.sha256) == 64 and int(r.sha256, 16) >= 0 and r.size > 0, (name, r)
            assert r.urls and all(u.startswith(("http://", "https://")) for u in r.urls)


def test_no_pickle_anywhere_in_the_package():
    src = Path(__file__).resolve().parents[2] / "src" / "bnlab"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
