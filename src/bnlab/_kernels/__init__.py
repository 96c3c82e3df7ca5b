"""bnlab's compiled CPU kernels: plain C, built once per machine, called through ctypes.

Why this technology (see also the README's "Speed" section):

* The C source (``bn_cpu.c`` + ``bn_cpu_impl.h``) includes no PyTorch or Python
  headers, so a C compiler builds it in a few seconds (its three storage
  types' parts compile at the same time, then link; see ``bn_cpu.c``), and the result
  does not depend on the installed torch version.
* It is built on first use with the system's compiler (``$CC``, else ``cc``;
  split like a shell command, so ``CC="gcc -O2"`` and ``CC="ccache gcc"``
  work as in make) and cached in a per-user directory, ``$BNLAB_KERNEL_CACHE``
  or else ``$XDG_CACHE_HOME/bnlab/kernels`` or ``~/.cache/bnlab/kernels``
  (created with mode 0700). The file is named by a hash of the sources, the
  compiler (its resolved path, arguments and ``--version`` output), the flags
  and the CPU, so the cost is paid once per machine and compiler; it is written
  under a temporary name and renamed, so concurrent first uses race harmlessly.
* A library runs inside the process, so it is loaded only from a file owned by
  the current user in a directory owned by the current user, neither writable
  by group or others (:func:`_why_unsafe`). A cache that fails this (a shared
  or world-writable one, or a file of another user) is not loaded from: the
  kernels are built in a private temporary directory (``mkdtemp``, 0700) for
  this process, with a :class:`KernelWarning` saying why.
* Where there is no compiler, the compiler fails, or the cache directory cannot
  be used (a file in its way, a read-only or forbidden path), bnlab runs its
  pure-PyTorch paths (same results, tested against each other) with one
  :class:`KernelWarning` per process saying why; ``BNLAB_KERNELS=0`` turns the
  kernels off without a word. :func:`status` says which is in use and why.
* OpenMP threads: loaded after PyTorch, the library binds to the libgomp that
  PyTorch already uses (same soname), so the two share one thread pool.
  Work is split in fixed ranges by thread count: results are deterministic for
  a given number of threads.
* Outputs of at least half the last-level cache (:func:`stream_min_bytes`;
  ``BNLAB_STREAM_MIN_BYTES`` overrides, ``0`` turns it off), and the backward's
  ``dx`` from a quarter of that size, are written with non-temporal stores on x86-64;
  the values are the same bits either way.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["get", "status", "cache_dir", "threads_for", "stream_min_bytes", "ACTIVATION_CODES", "KernelWarning"]

log = logging.getLogger("bnlab.kernels")

ABI_VERSION = 6  # must match bnlab_abi_version() in bn_cpu.c
_HERE = Path(__file__).resolve().parent
_SOURCES = ("bn_cpu.c", "bn_cpu_impl.h")
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC"]
#: The parts compiled at the same time (``-DBNLAB_UNIT=n``: float32 with the shared entry points,
#: float64, bfloat16; see bn_cpu.c), then linked into one library.
_UNITS = (1, 2, 3)
# Tried in order: the best first, then what older or non-GCC compilers accept.
_FLAG_SETS = (
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native"],
    [],
)

#: Activations the kernels fuse (``bn_cpu.c``): the piecewise-linear ones. Others run after the kernel.
ACTIVATION_CODES = {None: 0, "identity": 0, "relu": 1, "leaky_relu": 2}

#: Below this many elements a call runs on one thread (a fork/join costs more than it saves).
PARALLEL_MIN_NUMEL = 1 << 15


class Kernels:
    """The loaded library: ``train_fwd``, ``train_bwd``, ``infer``, ``update_moving``: ctypes functions by dtype."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib = lib
        self.path = path
        self.openmp = bool(lib.bnlab_has_openmp())
        p, i64, d, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
        sigs = {
            "bnlab_train_fwd": [p, p, i64, i64, i64, p, p, d, p, p, p, p, p, d, d, i, d, i, p],
            "bnlab_infer": [p, p, i64, i64, i64, p, p, p, p, d, i, d, i],
            "bnlab_train_bwd": [p, p, p, i64, i64, i64, p, p, p, p, p, p, i, d, i],
            "bnlab_update_moving": [p, p, p, p, i64, d, d, p],
        }
        tables = {}
        for name, argtypes in sigs.items():
            table = {}
            for dtype, sfx in ((torch.float32, "f32"), (torch.float64, "f64"), (torch.bfloat16, "bf16")):
                fn = getattr(lib, f"{name}_{sfx}")
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int
                table[dtype] = fn
            tables[name] = table
        self.train_fwd = tables["bnlab_train_fwd"]
        self.train_bwd = tables["bnlab_train_bwd"]
        self.infer = tables["bnlab_infer"]
        self.update_moving = tables["bnlab_update_moving"]
        lib.bnlab_set_stream_min_bytes.argtypes = [i64]
        lib.bnlab_set_stream_min_bytes.restype = None
        lib.bnlab_get_stream_min_bytes.restype = i64
        lib.bnlab_set_stream_min_bytes(stream_min_bytes())

    @property
    def stream_min_bytes(self) -> int:
        """Outputs of at least this many bytes (the backward's ``dx``: a quarter) are written with streaming stores (0: never)."""
        return int(self.lib.bnlab_get_stream_min_bytes())


def last_level_cache_bytes(root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the largest CPU cache as Linux reports it for CPU 0 (sysfs), or ``None`` if unknown.

    (glibc's ``sysconf(_SC_LEVEL3_CACHE_SIZE)`` is not used: on the AMD EPYC here it
    reports 320 MB for a 32 MB L3.)
    """
    best = None
    for index in sorted(Path(root).glob("index*")):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            size = int(digits) * scale
            best = size if best is None or size > best else best
    return best


def stream_min_bytes() -> int:
    """Smallest output the kernels write with streaming (non-temporal) stores; 0 means never.

    Half the last-level cache: an output that large cannot stay cached next to its
    input (see ``stream_copy`` in ``bn_cpu.c`` for the measurements). The backward,
    with ``x``, ``dy`` and ``dx`` in play, streams ``dx`` from a quarter of this size
    (``STREAM_DX`` there). 32 MB where the cache size is unknown.
    ``BNLAB_STREAM_MIN_BYTES`` overrides it (``0`` turns streaming off).
    """
    env = os.environ.get("BNLAB_STREAM_MIN_BYTES", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"BNLAB_STREAM_MIN_BYTES must be a whole number of bytes, got {env!r}") from None
    llc = last_level_cache_bytes()
    return 32 << 20 if llc is None else llc // 2


_lock = threading.Lock()
_state: dict = {"tried": False, "kernels": None, "reason": "not loaded yet", "seconds": None}

#: Mode bits that let someone other than the owner change a file or a directory's entries.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class KernelWarning(RuntimeWarning):
    """The compiled kernels are not used (or not from the cache); the message says why. Once per process."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$BNLAB_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/bnlab/kernels``, else ``~/.cache/bnlab/kernels``."""
    env = os.environ.get("BNLAB_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnlab" / "kernels"


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU that shares the cache directory.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            wanted = {}
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in wanted:
                    wanted[key] = value.strip()
        if wanted:
            return repr(sorted(wanted.items()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> tuple[list[str] | None, str]:
    """The compiler command, ``(argv, "")``, or ``(None, why not)``.

    ``$CC`` (else ``cc``) is split as a shell would split it (``shlex``), so a
    compiler with arguments (``CC="gcc -O2"``) or behind a wrapper
    (``CC="ccache gcc"``) works as it does in make; the first word must be on
    ``PATH`` (or a path to an executable) and is replaced by its full path.
    """
    raw = os.environ.get("CC", "").strip()
    where = f"CC={raw!r}" if raw else "the default, as CC is not set"
    try:
        words = shlex.split(raw or "cc")
    except ValueError as err:
        return None, f"no C compiler: CC={raw!r} is not a command line ({err}); using the PyTorch paths"
    exe = shutil.which(words[0]) if words else None
    if exe is None:
        first = words[0] if words else ""
        return None, f"no C compiler: {first!r} ({where}) is not on PATH (set CC to use another); using the PyTorch paths"
    return [exe, *words[1:]], ""


def _compiler_identity(argv: list[str]) -> str:
    """What names the compiler in the cache key: its resolved path, its arguments and what ``--version`` prints."""
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
        version = f"exit {out.returncode}: {out.stdout}{out.stderr}"
    except (OSError, subprocess.SubprocessError) as err:
        version = f"{type(err).__name__}: {err}"
    return repr((os.path.realpath(argv[0]), argv[1:], version))


def _library_name(compiler: str, flags: list[str]) -> str:
    """``bn_cpu-<hash>.so``: the hash of the sources, the compiler (:func:`_compiler_identity`), the flags and the CPU."""
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_HERE / name).read_bytes())
    h.update(repr((compiler, flags, _BASE_FLAGS, _UNITS, "-lm", sys.platform, platform.machine(), _cpu_signature())).encode())
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return f"bn_cpu-{h.hexdigest()[:20]}{suffix}"


def _complaint(proc: subprocess.CompletedProcess | subprocess.Popen, text: str, cc: str) -> str:
    """The compiler's first error line (or the end of what it said), at most 300 characters."""
    text = text.strip()
    first_error = next((ln for ln in text.splitlines() if "error" in ln.lower()), None)
    return (first_error or text[-300:] or f"{cc} exited with {proc.returncode}")[:300]


def _compile(cc: str | list[str], flags: list[str], out: Path) -> str | None:
    """Build into ``out`` (its directory must exist) atomically; return None on success, else the complaint.

    ``cc`` is the compiler command (a string is split as a shell would). The
    storage types' parts are compiled by concurrent processes (one compilation
    of the whole file takes several seconds, almost all of it in the optimizer),
    then linked under a temporary name in ``out``'s directory, made mode 0700
    and renamed to ``out``: nothing but the finished library is left there.
    """
    argv = shlex.split(cc) if isinstance(cc, str) else list(cc)
    name = os.path.basename(argv[0])
    src = str(_HERE / "bn_cpu.c")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        with tempfile.TemporaryDirectory(prefix="bnlab-build-") as work:
            objects = [os.path.join(work, f"unit{n}.o") for n in _UNITS]
            procs = []
            complaint = None
            try:
                for n, obj in zip(_UNITS, objects):
                    procs.append(subprocess.Popen([*argv, *_BASE_FLAGS, *flags, f"-DBNLAB_UNIT={n}", "-c", "-o", obj, src],
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                deadline = time.monotonic() + 120
                for proc in procs:
                    stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                    if proc.returncode != 0 and complaint is None:
                        complaint = _complaint(proc, stderr or stdout, name)
            except subprocess.TimeoutExpired:
                complaint = f"{name} took more than 120 s"
            finally:
                for proc in procs:  # none left running (a timeout, or a part that could not start)
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
            if complaint is not None:
                return complaint
            link = subprocess.run([*argv, "-shared", *flags, "-o", tmp, *objects, "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if link.returncode != 0:
                return _complaint(link, link.stderr or link.stdout, name)
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _why_not_private(path: Path, st: os.stat_result, what: str) -> str | None:
    """Why ``path`` (with ``st``, its stat) is not private to the current user, or ``None``."""
    uid = os.getuid() if hasattr(os, "getuid") else None  # (no owner check where there are no uids)
    if uid is not None and st.st_uid != uid:
        return f"the {what} {path} belongs to uid {st.st_uid}, not to you (uid {uid})"
    if st.st_mode & _WRITABLE_BY_OTHERS:
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "everyone")) if st.st_mode & bit)
        return f"the {what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):03o})"
    return None


def _why_unsafe(path: Path) -> str | None:
    """Why the library at ``path`` must not be loaded, or ``None`` when it may be.

    Loading a library runs its code in this process, so it must be this
    user's: a regular file (not a link) owned by the current user, in a
    directory owned by the current user, neither writable by the group or by
    others. A directory only its owner can write also means nobody else can
    swap the file between this check and the load.
    """
    try:
        file_st = os.lstat(path)
        dir_st = os.stat(path.parent)
    except OSError as err:
        return f"cannot inspect {path} ({type(err).__name__}: {err})"
    if not stat.S_ISREG(file_st.st_mode):
        return f"{path} is not a regular file"
    return _why_not_private(path.parent, dir_st, "directory") or _why_not_private(path, file_st, "library")


def _open(path: Path) -> Kernels:
    lib = ctypes.CDLL(str(path))
    if lib.bnlab_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI {lib.bnlab_abi_version()}, expected {ABI_VERSION}")
    return Kernels(lib, path)


def _build_and_open(cc: list[str], compiler: str, directory: Path, writable: bool) -> tuple[Kernels | None, list[str], str | None]:
    """Load the first flag set's library in ``directory`` that is there or builds; ``(kernels, errors, unsafe)``.

    ``unsafe`` says why a library there must not be loaded (then nothing is).
    """
    errors = []
    for flags in _FLAG_SETS:
        path = directory / _library_name(compiler, flags)
        if not path.exists():
            if not writable:
                continue
            err = _compile(cc, flags, path)
            if err is not None:
                errors.append(f"{' '.join(flags) or 'no extra flags'}: {err}")
                continue
        unsafe = _why_unsafe(path)
        if unsafe is not None:
            return None, errors, unsafe
        try:
            return _open(path), errors, None
        except OSError as err:
            errors.append(f"{path}: {err}")
    return None, errors, None


def _private_build(cc: list[str], compiler: str, why: str) -> tuple[Kernels | None, str]:
    """Build and load in a fresh directory only this user can enter (``mkdtemp``: 0700), removed after loading."""
    try:
        work = Path(tempfile.mkdtemp(prefix="bnlab-kernels-"))
    except OSError as err:
        return None, f"{why}, and no private directory could be made to build in ({err}); using the PyTorch paths"
    try:
        kernels, errors, unsafe = _build_and_open(cc, compiler, work, writable=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a loaded library stays mapped
    if kernels is not None:
        return kernels, f"{why}: not loaded from the cache; built in a private temporary directory for this process instead"
    problems = " | ".join(errors + ([unsafe] if unsafe else []))
    return None, f"{why}: not loaded from the cache, and a private build failed; using the PyTorch paths. {problems}"


def _load() -> tuple[Kernels | None, str, bool]:
    """``(kernels or None, reason, whether to warn)``."""
    setting = os.environ.get("BNLAB_KERNELS", "").strip().lower()
    if setting in ("0", "off", "false", "no", "torch"):
        return None, f"disabled by BNLAB_KERNELS={os.environ['BNLAB_KERNELS']}", False
    cc, why = _compiler()
    if cc is None:
        return None, why, True
    compiler = _compiler_identity(cc)
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # (parents as the umask makes them)
        dir_st = os.stat(directory)
    except OSError as err:
        return None, (f"the kernel cache {directory} cannot be used ({type(err).__name__}: {err}); "
                      "set BNLAB_KERNEL_CACHE to a directory of yours; using the PyTorch paths"), True
    unsafe = _why_not_private(directory, dir_st, "cache directory")
    if unsafe is None:
        writable = os.access(directory, os.W_OK | os.X_OK)
        kernels, errors, unsafe = _build_and_open(cc, compiler, directory, writable)
        if kernels is not None:
            return kernels, f"loaded {kernels.path}", False
        if unsafe is None:
            if not writable and not errors:
                return None, (f"the kernel cache {directory} is not writable and holds no build for this compiler "
                              "and CPU; set BNLAB_KERNEL_CACHE to a directory of yours; using the PyTorch paths"), True
            return None, "could not build the kernels; using the PyTorch paths. " + " | ".join(errors), True
    kernels, reason = _private_build(cc, compiler, unsafe)
    return kernels, reason, True


def get() -> Kernels | None:
    """The kernels, building them on first call; ``None`` where they cannot be had (see :func:`status`).

    The first call that cannot use the cache or the kernels issues one
    :class:`KernelWarning` saying why (none for ``BNLAB_KERNELS=0``).
    """
    if _state["tried"]:
        return _state["kernels"]
    with _lock:
        if not _state["tried"]:
            t0 = time.perf_counter()
            kernels, reason, warn = _load()
            _state.update(kernels=kernels, reason=reason, seconds=time.perf_counter() - t0, tried=True)
            log.debug("bnlab kernels: %s", reason)
            if warn:
                warnings.warn(f"bnlab kernels: {reason}", KernelWarning, stacklevel=2)
    return _state["kernels"]


def status() -> dict:
    """Whether the compiled kernels are in use, and why (builds them if not tried yet).

    >>> sorted(status())
    ['available', 'openmp', 'path', 'reason', 'seconds']
    """
    k = get()
    return {
        "available": k is not None,
        "openmp": bool(k and k.openmp),
        "path": str(k.path) if k else None,
        "reason": _state["reason"],
        "seconds": _state["seconds"],
    }


def _reset() -> None:
    """Forget the loaded state so the next :func:`get` loads again (tests)."""
    with _lock:
        _state.update(tried=False, kernels=None, reason="not loaded yet", seconds=None)


def threads_for(numel: int) -> int:
    """Threads a kernel call uses: PyTorch's intra-op count, or 1 for small tensors."""
    return 1 if numel < PARALLEL_MIN_NUMEL else torch.get_num_threads()
