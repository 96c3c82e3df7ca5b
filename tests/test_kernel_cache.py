"""Where the compiled kernels come from: the per-user cache, what is loaded from it, and every way out.

The kernels are shared-library code run inside the process, so a library is
loaded only from a private place (owned by the current user, not writable by
group or others) and any failure falls back to the PyTorch paths with one
:class:`bnlab._kernels.KernelWarning`. The compiler here is a fake one (a shell
script: an empty object for each part, the library this process already loaded
for the link), so these tests cost no compilation; it logs how it was called.

Some failures need a permission that root ignores (a read-only directory);
where the tests run as root those cases are simulated by making ``os.mkdir`` or
``os.access`` answer as they would for another user. A file of another user is
made with ``os.chown`` as root and simulated through ``os.lstat``/``os.stat``
otherwise.
"""

import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

import bnlab
from bnlab import _kernels
from bnlab import functional as F

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="file ownership checks need POSIX uids")

_FAKE_CC = """#!/bin/sh
echo "fakecc $*" >> "{log}"
case " $* " in
  *" --version "*) echo "fakecc {version}"; exit 0;;
  *" -c "*) while [ "$1" != -o ]; do shift; done; : > "$2"; exit 0;;
  *" -shared "*) while [ "$1" != -o ]; do shift; done; cp "{good}" "$2"; exit 0;;
esac
exit 1
"""

_WRAPPER = """#!/bin/sh
echo "wrapper $*" >> "{log}"
exec "$@"
"""


@pytest.fixture
def good_library(tmp_path_factory):
    """A copy of the library this process loaded (what the fake compiler 'builds')."""
    kernels = _kernels.get()
    if kernels is None:
        pytest.skip(f"kernels unavailable: {_kernels.status()['reason']}")
    path = tmp_path_factory.mktemp("good") / "good.so"
    shutil.copyfile(kernels.path, path)
    _kernels._reset()  # the test loads afresh
    return path


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakecc(tmp_path, good_library):
    """``(make(version) -> path of a fake compiler, log file)``."""
    log = tmp_path / "cc.log"

    def make(version="1.0", name="fakecc"):
        return _script(tmp_path / name, _FAKE_CC.format(log=log, version=version, good=good_library))

    return make, log


@pytest.fixture
def fresh(monkeypatch):
    """Environment for a fresh load: no BNLAB_KERNELS; the loaded state forgotten before and after."""
    monkeypatch.delenv("BNLAB_KERNELS", raising=False)
    _kernels._reset()
    yield
    _kernels._reset()


def _load_counting_warnings():
    """Load, ask twice more and run a layer; ``(status, [KernelWarning messages])``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _kernels.get()
        st = _kernels.status()
        _kernels.get()
        x = torch.randn(6, 3, 5)
        y = bnlab.BatchNorm(axis=1)(x)  # whatever the route, the layer computes
        torch.testing.assert_close(y, F.batch_norm_train(x, axis=1, impl="composite")[0])
    return st, [str(w.message) for w in caught if issubclass(w.category, _kernels.KernelWarning)]


# --------------------------------------------------------------------------- the cache itself


def test_cache_directory_and_library_are_private(fresh, monkeypatch, tmp_path, fakecc):
    make, _ = fakecc
    monkeypatch.setenv("CC", str(make()))
    monkeypatch.delenv("BNLAB_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    st, warned = _load_counting_warnings()
    assert st["available"] and warned == [], st["reason"]
    cache = tmp_path / "xdg" / "bnlab" / "kernels"
    assert Path(st["path"]).parent == cache
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    libs = list(cache.iterdir())
    assert [p.name for p in libs] == [Path(st["path"]).name]  # nothing half-written beside it
    assert stat.S_IMODE(libs[0].stat().st_mode) == 0o700


def test_library_name_follows_the_compilers_version_and_arguments(fresh, monkeypatch, tmp_path, fakecc):
    """Same compiler path, other ``--version`` (an upgraded compiler) or other arguments: another library."""
    make, _ = fakecc
    names = {}
    for key, version, extra in (("v1", "1.0", ""), ("v1 again", "1.0", ""), ("v2", "2.0", ""), ("v1 -O2", "1.0", " -O2")):
        cc = make(version)  # rewritten in place: one path
        monkeypatch.setenv("CC", f"{cc}{extra}")
        monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path / "cache"))
        _kernels._reset()
        st = _kernels.status()
        assert st["available"], st["reason"]
        names[key] = Path(st["path"]).name
    assert names["v1"] == names["v1 again"]
    assert len({names["v1"], names["v2"], names["v1 -O2"]}) == 3, names


def test_cc_with_arguments_and_behind_a_wrapper(fresh, monkeypatch, tmp_path, fakecc):
    """``CC="gcc -O2"`` and ``CC="ccache gcc"``, as make takes them: every call carries the words."""
    make, log = fakecc
    cc = make()
    wrapper = _script(tmp_path / "wrapper", _WRAPPER.format(log=log))
    for spec, first in ((f"{cc} -O2 -DBNLAB_FROM_CC=1", "fakecc"), (f"{wrapper} {cc} -O2", "wrapper")):
        log.unlink(missing_ok=True)
        monkeypatch.setenv("CC", spec)
        monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path / f"cache-{first}"))
        _kernels._reset()
        st = _kernels.status()
        assert st["available"], st["reason"]
        builds = [ln for ln in log.read_text().splitlines() if ln.startswith(first) and "--version" not in ln]
        assert len(builds) == len(_kernels._UNITS) + 1  # each part, then the link
        if first == "wrapper":
            assert all(ln.startswith(f"wrapper {cc} -O2 ") for ln in builds), builds
        else:
            assert all(ln.startswith("fakecc -O2 -DBNLAB_FROM_CC=1 ") for ln in builds), builds


def test_cc_not_on_path_says_which_word(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "bnlab-no-such-compiler -O2")
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path))
    st, warned = _load_counting_warnings()
    assert not st["available"]
    assert "no C compiler: 'bnlab-no-such-compiler'" in st["reason"]
    assert len(warned) == 1 and "bnlab-no-such-compiler" in warned[0]


# --------------------------------------------------------------------------- an unusable cache: PyTorch paths, one warning


def _file_in_the_way(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")
    return tmp_path / "cache"


def _file_as_a_parent(tmp_path, monkeypatch):
    (tmp_path / "parent").write_text("not a directory")
    return tmp_path / "parent" / "kernels"


def _read_only_parent(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    target = parent / "kernels"
    if IS_ROOT:  # root may write anyway: answer as the kernel would for anyone else
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    return target


def _read_only_directory(tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir(mode=0o700)
    target.chmod(0o500)
    if IS_ROOT:
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if Path(path) == target and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return target


def _forbidden_path(tmp_path, monkeypatch):
    if not os.path.isdir("/sys/devices"):
        pytest.skip("needs Linux sysfs, where nobody (not even root) can make a directory")
    return Path("/sys/bnlab-kernel-cache-test/kernels")


@pytest.mark.parametrize("setup", [_file_in_the_way, _file_as_a_parent, _read_only_parent, _read_only_directory, _forbidden_path],
                         ids=lambda f: f.__name__.strip("_"))
def test_an_unusable_cache_falls_back_with_one_warning(fresh, monkeypatch, tmp_path, fakecc, setup):
    make, log = fakecc
    monkeypatch.setenv("CC", str(make()))
    cache = setup(tmp_path, monkeypatch)
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(cache))
    try:
        st, warned = _load_counting_warnings()
    finally:
        for p in (tmp_path / "ro",):
            if p.exists():
                p.chmod(0o700)  # let pytest clean up
    assert not st["available"]
    assert str(cache) in st["reason"] and "BNLAB_KERNEL_CACHE" in st["reason"], st["reason"]
    assert len(warned) == 1 and str(cache) in warned[0], warned
    built = [ln for ln in log.read_text().splitlines() if "--version" not in ln] if log.exists() else []
    assert built == []  # the compiler is not run for a library that cannot be written


def test_a_failing_compiler_warns_once(fresh, monkeypatch, tmp_path):
    broken = _script(tmp_path / "broken", "#!/bin/sh\necho 'error: broken on purpose' >&2\nexit 1\n")
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    st, warned = _load_counting_warnings()
    assert not st["available"] and "broken on purpose" in st["reason"]
    assert len(warned) == 1 and "broken on purpose" in warned[0]


def test_kernels_switched_off_say_nothing(fresh, monkeypatch):
    monkeypatch.setenv("BNLAB_KERNELS", "0")
    st, warned = _load_counting_warnings()
    assert not st["available"] and "BNLAB_KERNELS" in st["reason"] and warned == []


# --------------------------------------------------------------------------- an unsafe library: never loaded, rebuilt privately


def _restat(st: os.stat_result, uid: int) -> os.stat_result:
    values = list(st)
    values[stat.ST_UID] = uid
    return os.stat_result(values)


def _owned_by_another_user(path: Path, monkeypatch):
    other = os.getuid() + 4321
    if IS_ROOT:
        os.chown(path, other, -1)
        return
    real_stat, real_lstat = os.stat, os.lstat

    def fake(real):
        def call(p, *args, **kwargs):
            st = real(p, *args, **kwargs)
            return _restat(st, other) if Path(p) == path else st
        return call

    monkeypatch.setattr(os, "stat", fake(real_stat))
    monkeypatch.setattr(os, "lstat", fake(real_lstat))


def _group_writable_library(cache, lib, monkeypatch):
    lib.chmod(0o770)
    return "writable by its group"


def _world_writable_library(cache, lib, monkeypatch):
    lib.chmod(0o706)
    return "writable by everyone"


def _group_writable_directory(cache, lib, monkeypatch):
    cache.chmod(0o770)
    return "writable by its group"


def _world_writable_directory(cache, lib, monkeypatch):
    cache.chmod(0o1777)  # as /tmp
    return "writable by its group and everyone"


def _library_of_another_user(cache, lib, monkeypatch):
    _owned_by_another_user(lib, monkeypatch)
    return "belongs to uid"


def _directory_of_another_user(cache, lib, monkeypatch):
    _owned_by_another_user(cache, monkeypatch)
    return "belongs to uid"


def _library_is_a_link(cache, lib, monkeypatch):
    elsewhere = cache.parent / "elsewhere.so"
    lib.rename(elsewhere)
    lib.symlink_to(elsewhere)
    return "not a regular file"


UNSAFE = [_group_writable_library, _world_writable_library, _group_writable_directory, _world_writable_directory,
          _library_of_another_user, _directory_of_another_user, _library_is_a_link]


@pytest.mark.parametrize("make_unsafe", UNSAFE, ids=lambda f: f.__name__.strip("_"))
def test_an_unsafe_library_is_not_loaded_but_rebuilt_privately(fresh, monkeypatch, tmp_path, fakecc, make_unsafe):
    make, _ = fakecc
    monkeypatch.setenv("CC", str(make()))
    cache = tmp_path / "cache"
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(cache))
    first = _kernels.status()
    assert first["available"], first["reason"]
    cached = Path(first["path"])
    why = make_unsafe(cache, cached, monkeypatch)

    builds = []
    real_compile = _kernels._compile

    def recording_compile(cc, flags, out):
        st = os.stat(out.parent)
        builds.append((out.parent, stat.S_IMODE(st.st_mode), st.st_uid))
        return real_compile(cc, flags, out)

    monkeypatch.setattr(_kernels, "_compile", recording_compile)
    _kernels._reset()
    try:
        st, warned = _load_counting_warnings()
    finally:
        cache.chmod(0o700)
    assert st["available"], st["reason"]
    assert Path(st["path"]).parent != cache  # not the cached file
    assert len(builds) == 1
    where, mode, uid = builds[0]
    assert where != cache and mode == 0o700 and uid == os.getuid()  # built where only we can write
    assert not where.exists()  # and tidied away once loaded
    assert why in st["reason"] and "private" in st["reason"], st["reason"]
    assert len(warned) == 1 and why in warned[0], warned
