"""The compiled CPU kernel: batch normalization in C + OpenMP (`bn_cpu.c`), called through ctypes
or, where they build, its C++ entry points (`bn_cpu_ext.cpp`, `extension()`).

Per channel c over the m = numel / C values of every other axis:

    training forward    mean_c = 1/m sum x,  var_c = 1/m sum (x - mean_c)**2   (biased)
                        y = (x - mean_c) * invstd_c * w_c + b_c,  invstd_c = (var_c + eps)**-1/2
                        optionally running = (1 - momentum) * running + momentum * batch
                        (unbiased var), skipped if the batch's statistics are not finite
    training backward   s1_c = sum dy,  s2_c = sum dy * (x - mean_c)
                        dx = k*dy + b*x + c,  k = w_c*invstd_c,  b = -k*invstd_c**2*s2_c/m,
                                              c = -k*s1_c/m - b*mean_c
                        (dbias = s1, dweight = s2 * invstd)
    inference           y = x * scale_c + shift_c
    eval                the same with scale = w * (var + eps)**-1/2, shift = b - mean * scale
    statistics          the training forward's mean, var and invstd alone, also in float64
                        (`statistics`)
    ghost batches       the training forward and backward of each block of k samples along
                        axis 0, with its own statistics, in one call (`ghost_forward`,
                        `ghost_backward`; axis 0 outermost in memory)
    masks               the training forward, backward and eval over the real values of a
                        bool mask with x's shape without the channel axis, 0 at the padding
                        (`masked_forward`, `masked_backward`, `masked_eval`; planes of a
                        contiguous x, or rows with the channels last: `masked_layout`)
    apply               y = (x - centre_c) * scale_c + shift_c with coefficients from elsewhere
                        (`apply`, `centred`: SyncBN's global statistics; `renorm_coefficients`:
                        batch renormalization's r and d folded in)
    input gradient      dx = k_c*dy + b_c*(x - centre_c) + c_c with given coefficients
                        (`input_grad`: SyncBN's global sums)
    BN + ReLU           y = relu(BN(x) + residual) (residual optional) from the apply pass of
                        the training forward or eval (`train_forward_relu`, `eval_forward`
                        with relu=True), and relu(BN(x))'s backward with the ReLU's test
                        recomputed from x (`train_backward` with relu_gate): the ResNet block
                        tail in the passes of BN alone

Layouts: every tensor the kernel accepts is a dense array that, read in memory order, is a
contiguous (A, C, B) block with C the channel axis: NCHW is (N, C, H*W), channels_last and
channels_last_3d are (N*H*W, C, 1), (N, L, C) with axis=-1 is (N*L, C, 1). `supports` says
whether a tensor is one of these (no copy is ever made of x); outputs have x's strides.

Numerics: statistics from two passes over L1/L2-sized chunks (the chunk mean, then squared
deviations from it), float32 within a chunk, chunks merged in float64 with Chan's formula;
never E[x^2] - E[x]^2. bfloat16 is computed in float32 and rounded to nearest even once.
Parameters and statistics are float32 (C,) vectors.

Memory: outputs have x's strides. Those of the C++ entry points come from a pool of the buffers
of freed outputs (BATCHNORM_OUTPUT_POOL_MB, default 256 MiB kept at most; 0: none; at run time
`set_output_pool_limit`), so a call's output is mapped memory, not pages the OS must fault in
and zero (see bn_cpu_ext.cpp). Where a pass's tensors (x and y; x, dy and dx) do not fit in
the last-level cache together, the output is written with streaming (non-temporal) stores, and
outputs of 8 MiB and more are advised MADV_HUGEPAGE before their first write (Linux): with 4 KiB
pages the page faults of a fresh 100 MB output cost more than the pass itself.
BATCHNORM_NO_HUGEPAGES=1 turns the advice off.

Build: on first use (`available()`, `supports()` or a kernel call) `bn_cpu.c` is compiled with
$CC (default `cc`, else `gcc`) and `-O3 -march=native -fno-math-errno -fopenmp -shared -fPIC` (plus
$BATCHNORM_KERNEL_CFLAGS) into $BATCHNORM_CACHE (default ~/.cache/batchnorm)/<hash of source,
compiler, flags, CPU>/libbn_cpu.so, about 1.5 s, once per machine and source version (old
directories may be deleted). Compiling goes to a temporary name and is renamed into place
under a file lock, so parallel processes may race safely. If that fails, or
BATCHNORM_NO_KERNEL=1 is set, `available()` is False and `why_unavailable()` says why;
nothing here raises at import. The C++ entry points are built the same way with $CXX against
the installed torch (~10-15 s; see `extension()`); `train_forward_update` and `train_backward`
call them when they are there and fall back to ctypes for calls they decline.
Threads: torch.get_num_threads() per call (fewer for small inputs); the library's OpenMP
runtime is the libgomp torch has loaded, so they share one thread pool. Not for tensors being
traced (torch.compile's fake tensors have no data): there `cpu_ops` wraps the kernel as torch
operators with fake implementations.

>>> import torch
>>> from batchnorm.kernels import cpu
>>> x = torch.randn(8, 3, 5, 5)
>>> if cpu.available():
...     y, mean, var = cpu.train_forward(x, None, None, 1e-5, axis=1)
...     assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-6)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "available",
    "can_update",
    "eval_forward",
    "ghost_backward",
    "ghost_forward",
    "inference",
    "layout",
    "library_path",
    "statistics",
    "supports",
    "train_backward",
    "train_forward",
    "train_forward_update",
    "update_running",
    "why_unavailable",
]

SOURCE = Path(__file__).with_name("bn_cpu.c")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
_ABI_VERSION = 14  # bn_abi_version() of a library built from the current bn_cpu.c
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the `dt` argument of the C entry points
_COMPILE_TIMEOUT_S = 120
# What batchnorm warns when a training batch's statistics are not finite and the running
# statistics are left as they were (functional, and kernels/cpu_ops.py at run time).
NOT_FINITE_MESSAGE = (
    "batchnorm: the batch statistics contain NaN or Inf (non-finite values in the "
    "input); running_mean and running_var were left unchanged for this batch"
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why: str | None = None
_path: Path | None = None
_extra_flags: list[str] = []  # $BATCHNORM_KERNEL_CFLAGS as the loaded library was built with them
_tried = False


class _UnavailableError(Exception):
    """Why the kernel cannot be used; becomes why_unavailable()."""


# --------------------------------------------------------------------------- availability


def available() -> bool:
    """True if the compiled kernel is loaded (compiling it on the first call, about 1.5 s)."""
    return _library() is not None


def why_unavailable() -> str | None:
    """None if `available()`, else the reason: disabled, no compiler, the compiler's error, ..."""
    _library()
    return _why


def library_path() -> Path | None:
    """The loaded shared library (in the cache directory), or None."""
    _library()
    return _path


def _library() -> ctypes.CDLL | None:
    if _tried:
        return _lib
    if torch.compiler.is_compiling():  # not while Dynamo traces this code (it cannot take the lock): see below
        return None
    return _build_once()


def loaded_for_graphs() -> bool:
    """`available()` for code torch.compile or torch.export trace (`cpu_ops.applies`): Dynamo calls
    this as plain Python at trace time, so the kernel is built and loaded then, and records the
    answer as a constant. (Otherwise a process whose first call is compiled finds no kernel
    loaded, and its graphs keep torch ops.)"""
    return _lib is not None if _tried else _build_once() is not None


# What torch.compiler.assume_constant_result does (it sets this attribute, which Dynamo reads; the
# same from torch 2.0's torch._dynamo.assume_constant_result to 2.13), without importing
# torch._dynamo here (1 s, and Triton, which must not load before TRITON_INTERPRET is set).
loaded_for_graphs._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _build_once() -> ctypes.CDLL | None:
    global _lib, _why, _path, _tried
    with _lock:
        if not _tried:
            try:
                _lib, _path = _build_and_load()
            except _UnavailableError as exc:
                _why = str(exc)
            except Exception as exc:  # anything unforeseen: fall back, never break the caller
                _why = f"unexpected {type(exc).__name__} while building the CPU kernel: {exc}"
            _tried = True
    return _lib


def _build_and_load() -> tuple[ctypes.CDLL, Path]:
    global _extra_flags
    flag = os.environ.get("BATCHNORM_NO_KERNEL", "")
    if flag not in ("", "0"):
        raise _UnavailableError(f"disabled by BATCHNORM_NO_KERNEL={flag}")
    compiler = _compiler("CC", ("cc", "gcc"))
    extra = shlex.split(os.environ.get("BATCHNORM_KERNEL_CFLAGS", ""))
    lib_path = _cached_build(SOURCE, compiler, [*CFLAGS, *extra], (), "libbn_cpu.so", "the CPU kernel")
    lib = _load(lib_path)
    _extra_flags = extra
    return lib, lib_path


def _read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UnavailableError(
            f"kernel source {path} is missing ({exc.strerror}); the package was installed "
            f"without its package data (batchnorm/kernels/*{path.suffix})"
        ) from None


def _cached_build(
    source_path: Path,
    compiler: list[str],
    flags: list[str],
    libs: Sequence[str],
    name: str,
    what: str,
    depends: Sequence[str] = (),
    slow: bool = False,
) -> Path:
    """The shared library `name` built from the source file: from the cache, or compiled into it.

    `compiler *flags -o name source *libs`; the cache directory is named by a hash of all of them
    and of `depends` (versions of what the build reads besides the source). `slow`: say on a
    terminal's stderr that a compile is under way.
    """
    source = _read_source(source_path)
    key = _cache_key(source, compiler, [*flags, *libs, *depends])
    errors = []
    for root in _cache_roots():
        directory = root / key
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"{directory}: {exc.strerror}")
            continue
        lib_path = directory / name
        with _file_lock(directory / ".lock"):
            if not lib_path.exists():
                if slow and sys.stderr.isatty():
                    print(f"batchnorm: compiling {what} (once per machine and torch version) ...", file=sys.stderr)
                _compile(compiler, flags, libs, source, source_path.name, directory, lib_path, what)
        return lib_path
    raise _UnavailableError(f"no writable cache directory for {what}: " + "; ".join(errors))


def _compiler(variable: str, defaults: tuple[str, ...]) -> list[str]:
    """$variable split into words (it may carry flags), else the first of `defaults` on PATH."""
    words = shlex.split(os.environ.get(variable, ""))
    if not words:
        found = next(filter(None, map(shutil.which, defaults)), None)
        if found is None:
            raise _UnavailableError(f"no compiler: neither ${variable} nor {' nor '.join(defaults)} is on PATH")
        words = [found]
    exe = shutil.which(words[0])
    if exe is None:
        raise _UnavailableError(f"compiler {words[0]!r} (from ${variable}) not found on PATH")
    return [exe, *words[1:]]


def _cache_key(source: bytes, compiler: list[str], flags: list[str]) -> str:
    """Hash of everything the binary depends on: source, compiler (path, size, mtime), flags, CPU."""
    h = hashlib.sha256(source)
    st = os.stat(compiler[0])
    cpu_flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # -march=native depends on these
                cpu_flags = line
                break
    for part in (*compiler, str(st.st_size), str(st.st_mtime_ns), *flags, platform.machine(), cpu_flags):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _cache_roots() -> Iterator[Path]:
    env = os.environ.get("BATCHNORM_CACHE")
    if env:
        yield Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        yield (Path(xdg) if xdg else Path.home() / ".cache") / "batchnorm"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    yield Path(tempfile.gettempdir()) / f"batchnorm-cache-{uid}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (fcntl), or nothing where there is none.

    Without it, concurrent builds would still be safe (each compiles to its own
    temporary file, os.replace is atomic), only wasteful.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(
    compiler: list[str],
    flags: list[str],
    libs: Sequence[str],
    source: bytes,
    source_name: str,
    directory: Path,
    lib_path: Path,
    what: str,
) -> None:
    """Compile a copy of the source (the bytes that were hashed) to a temporary name, then rename."""
    stem, suffix = os.path.splitext(source_name)
    fd, tmp_src = tempfile.mkstemp(prefix=stem + ".", suffix=suffix, dir=directory)
    tmp_lib = tmp_src[: -len(suffix)] + ".so"
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        cmd = [*compiler, *flags, "-o", tmp_lib, tmp_src, *libs]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _UnavailableError(f"compiling {what} failed: {' '.join(cmd)}: {exc}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise _UnavailableError(f"compiling {what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        os.replace(tmp_lib, lib_path)
        os.replace(tmp_src, directory / source_name)  # kept for reference beside the binary
    finally:
        for leftover in (tmp_src, tmp_lib):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _load(lib_path: Path) -> ctypes.CDLL:
    # torch is imported above, so the library's libgomp.so.1 binds to the one torch loaded.
    try:
        lib = ctypes.CDLL(str(lib_path))
        version = lib.bn_abi_version()
    except (OSError, AttributeError) as exc:
        raise _UnavailableError(f"loading the CPU kernel {lib_path} failed: {exc}") from None
    if version != _ABI_VERSION:
        raise _UnavailableError(f"{lib_path} has ABI version {version}, expected {_ABI_VERSION}; delete it")
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.bn_train_forward.argtypes = [i32, p, p, i64, i64, i64, p, p, f64, p, p, p, p, p, f64, i32]
    lib.bn_train_forward_relu.argtypes = [i32, p, p, p, i64, i64, i64, p, p, f64, p, p, p, p, p, f64, p, i32]
    lib.bn_train_backward.argtypes = [i32, p, p, p, i64, i64, i64, p, p, p, p, p, i32]
    lib.bn_train_backward_relu.argtypes = [i32, p, p, p, i64, i64, i64, p, p, p, p, p, p, p, i32]
    lib.bn_inference.argtypes = [i32, p, p, i64, i64, i64, p, p, i32]
    lib.bn_eval.argtypes = [i32, p, p, i64, i64, i64, p, p, p, p, f64, i32]
    lib.bn_eval_relu.argtypes = [i32, p, p, p, i64, i64, i64, p, p, p, p, f64, i32]
    lib.bn_update_running.argtypes = [i64, f64, f64, p, p, p, p, f64]
    lib.bn_update_running_unbiased.argtypes = [i32, i64, p, p, p, p, f64]
    lib.bn_statistics.argtypes = [i32, p, i64, i64, i64, f64, p, p, p, p, p, i32]
    lib.bn_ghost_forward.argtypes = [i32, p, p, i64, i64, i64, i64, p, p, f64, p, p, p, p, p, i32]
    lib.bn_ghost_backward.argtypes = [i32, p, p, p, i64, i64, i64, i64, p, p, p, p, p, i32]
    lib.bn_masked_forward.argtypes = [i32, p, p, p, i64, i64, i64, p, p, f64, p, p, p, i32]
    lib.bn_masked_backward.argtypes = [i32, p, p, p, p, i64, i64, i64, p, p, p, p, p, i32]
    lib.bn_masked_eval.argtypes = [i32, p, p, p, i64, i64, i64, p, p, p, p, f64, i32]
    lib.bn_apply.argtypes = [i32, p, p, i64, i64, i64, p, p, p, i32]
    lib.bn_renorm_coefficients.argtypes = [i64, p, p, p, p, p, p, f64, f64, f64, p, p, p, p, p, p]
    lib.bn_renorm_coefficients.restype = None
    lib.bn_input_grad.argtypes = [i32, p, p, p, i64, i64, i64, p, p, p, p, i32]
    for fn in (
        lib.bn_train_forward,
        lib.bn_train_forward_relu,
        lib.bn_train_backward,
        lib.bn_train_backward_relu,
        lib.bn_inference,
        lib.bn_eval,
        lib.bn_eval_relu,
        lib.bn_update_running,
        lib.bn_update_running_unbiased,
        lib.bn_statistics,
        lib.bn_ghost_forward,
        lib.bn_ghost_backward,
        lib.bn_masked_forward,
        lib.bn_masked_backward,
        lib.bn_masked_eval,
        lib.bn_apply,
        lib.bn_input_grad,
    ):
        fn.restype = i32
    lib.bn_set_cache_bytes.argtypes = [i64]
    lib.bn_set_cache_bytes.restype = None
    lib.bn_set_cache_bytes(_last_level_cache_bytes())
    lib.bn_set_group_bytes.argtypes = [i64]
    lib.bn_set_group_bytes.restype = None
    lib.bn_channel_group.argtypes = [i32, i64, i64, i64, i32]
    lib.bn_channel_group.restype = i64
    lib.bn_set_hugepages.argtypes = [i32]
    lib.bn_set_hugepages.restype = None
    lib.bn_set_hugepages(0 if os.environ.get("BATCHNORM_NO_HUGEPAGES", "") not in ("", "0") else 1)
    return lib


# --------------------------------------------------------------------------- C++ entry points

EXT_SOURCE = Path(__file__).with_name("bn_cpu_ext.cpp")
EXT_CXXFLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H")
_ext: ModuleType | None = None
_ext_why: str | None = None
_ext_tried = False
_ext_lock = threading.Lock()


def extension() -> ModuleType | None:
    """The kernel's C++ entry points (`bn_cpu_ext.cpp`), or None where they cannot be built.

    `eval`, `train` and `backward` take tensors and do in one C++ call what `eval_forward`,
    `train_forward_update` and `train_backward` do in Python around a ctypes call;
    `train_step` is functional's whole training call (with autograd, one C++ autograd node);
    `act_train_step` and `act_eval` are the BN + ReLU layers' (act.py) fused calls.
    Each returns None for a call it does not take (then the Python path runs). Built on first use, like the
    kernel, against the installed torch's headers and libraries, with $CXX (default `c++`, else
    `g++`): about 15 s on 2 cores, once per machine, torch version and source version.
    BATCHNORM_NO_EXTENSION=1 turns them off (the ctypes path then runs every call).
    """
    global _ext, _ext_why, _ext_tried
    if _ext_tried:
        return _ext
    with _ext_lock:  # not _lock: the build takes it (through library_path)
        if not _ext_tried:
            try:
                _ext = _build_and_import_extension()
            except _UnavailableError as exc:
                _ext_why = str(exc)
            except Exception as exc:  # anything unforeseen: fall back to the ctypes path
                _ext_why = f"unexpected {type(exc).__name__} while building the C++ entry points: {exc}"
            _ext_tried = True
    return _ext


def extension_why_unavailable() -> str | None:
    """None if `extension()` is loaded, else the reason."""
    extension()
    return _ext_why


def _build_and_import_extension() -> ModuleType:
    flag = os.environ.get("BATCHNORM_NO_EXTENSION", "")
    if flag not in ("", "0"):
        raise _UnavailableError(f"disabled by BATCHNORM_NO_EXTENSION={flag}")
    kernel = library_path()
    if kernel is None:
        raise _UnavailableError(f"the C kernel they call is not available: {_why}")
    compiler = _compiler("CXX", ("c++", "g++"))
    torch_dir = Path(torch.__file__).parent
    include = torch_dir / "include"
    flags = [
        *EXT_CXXFLAGS,
        f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_path('include')}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *shlex.split(os.environ.get("BATCHNORM_EXTENSION_CXXFLAGS", "")),
    ]
    lib = torch_dir / "lib"
    # The kernel by its path: the loader then maps the copy ctypes already loaded.
    libs = [str(kernel), f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    name = "_bn_cpu_ext" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    depends = (torch.__version__, str(torch.version.git_version), sys.version)
    path = _cached_build(EXT_SOURCE, compiler, flags, libs, name, "the C++ entry points", depends, slow=True)
    try:
        spec = importlib.util.spec_from_file_location("_bn_cpu_ext", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        version = module.abi_version()
    except (ImportError, OSError, AttributeError) as exc:
        raise _UnavailableError(f"loading the C++ entry points {path} failed: {exc}") from None
    if version != _ABI_VERSION:
        raise _UnavailableError(f"{path} calls a kernel of ABI version {version}, expected {_ABI_VERSION}")
    _self_test(module)
    module.set_output_pool_limit(_output_pool_limit())
    return module


DEFAULT_OUTPUT_POOL_MB = 256  # an output and an input gradient of (32, 64, 112, 112) float32, 103 MB each


def _output_pool_limit() -> int:
    """The bytes of freed outputs the C++ entry points keep: BATCHNORM_OUTPUT_POOL_MB MiB, or the default."""
    text = os.environ.get("BATCHNORM_OUTPUT_POOL_MB", "").strip()
    try:
        mib = float(text) if text else DEFAULT_OUTPUT_POOL_MB
        if not mib >= 0 or math.isinf(mib):
            raise ValueError
    except ValueError:
        warnings.warn(
            f"BATCHNORM_OUTPUT_POOL_MB={text!r} is not a size in MiB (e.g. 64, or 0 for no pool); "
            f"using {DEFAULT_OUTPUT_POOL_MB}",
            stacklevel=2,
        )
        mib = DEFAULT_OUTPUT_POOL_MB
    return int(mib * (1 << 20))


def set_output_pool_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of freed outputs for reuse (BATCHNORM_OUTPUT_POOL_MB sets the start);
    lowering it frees the oldest kept buffers at once, and 0 frees them all and keeps none. Nothing
    to do where the C++ entry points are not loaded (their outputs are the pool's only users)."""
    if nbytes < 0:
        raise ValueError(f"set_output_pool_limit: expected a number of bytes >= 0, got {nbytes}")
    ext = extension()
    if ext is not None:
        ext.set_output_pool_limit(int(nbytes))


def _self_test(module: ModuleType) -> None:
    """One small eval against torch's ops: a build that links but misreads tensors is refused, not used."""
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 1.0, 0.25])
    with torch.no_grad():
        y = module.eval(x, mean, var, None, None, 0.0, 1)
    want = (x - mean.view(3, 1)) / var.sqrt().view(3, 1)
    if y is None or not torch.allclose(y, want):
        raise _UnavailableError("the C++ entry points failed their self-test (wrong eval output); not used")


def _last_level_cache_bytes() -> int:
    """The largest CPU cache from Linux sysfs (32 MiB where unknown).

    Passes whose tensors fill or exceed it write their output with streaming stores. sysfs, not
    sysconf: in virtual machines sysconf(_SC_LEVEL3_CACHE_SIZE) can report the host's cache.
    """
    best = (0, 32 << 20)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()  # e.g. '32768K'
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (OSError, ValueError, IndexError):
            continue
        if level > best[0]:
            best = (level, nbytes)
    return best[1]


def _set_streaming_threshold(nbytes: int) -> None:
    """Set the cache size the kernel assumes: passes whose tensors fill or exceed it get streaming stores.

    0: always, -1: never; the default is the last-level cache size. For tests and benchmarks.
    """
    lib = _library()
    if lib is not None:
        lib.bn_set_cache_bytes(nbytes)


def _set_channel_group_bytes(nbytes: int | None) -> None:
    """Set the input size of a channel group: for float32 inputs larger than the cache, the training
    backward takes groups of channels through both its phases while these are cached. 0: no groups
    (phase by phase), None: the kernel's default. For tests and benchmarks.
    """
    lib = _library()
    if lib is not None:
        lib.bn_set_group_bytes(-1 if nbytes is None else nbytes)


def _channel_group(x: Tensor, axis: int) -> int:
    """Channels per group of the training backward of x, 0 for phase by phase. For tests."""
    lib = _library()
    A, C, B = _canonical(x, axis)
    return lib.bn_channel_group(_DTYPES[x.dtype], A, C, B, torch.get_num_threads())


# --------------------------------------------------------------------------- layouts


_canonical_cache: dict[tuple, tuple[int, int, int] | None] = {}


def _canonical(x: Tensor, axis: int) -> tuple[int, int, int] | None:
    """`_layout`, memoized on (shape, strides, axis) for the supported devices and dtypes."""
    if not isinstance(x, Tensor) or not x.is_cpu or x.layout != torch.strided:
        return None
    if x.dtype not in _DTYPES:
        return None
    key = (x.shape, x.stride(), axis)
    try:
        return _canonical_cache[key]
    except KeyError:
        pass
    acb = _layout(x, axis)
    if len(_canonical_cache) >= 512:
        _canonical_cache.clear()
    _canonical_cache[key] = acb
    return acb


def _layout(x: Tensor, axis: int) -> tuple[int, int, int] | None:
    """(A, C, B) if x is a dense array that reads in memory order as contiguous (A, C, B), else None.

    A = product of the sizes of the dims laid out outside the channel dim, B inside it.
    Contiguous tensors, channels_last(_3d) and every other dense permutation qualify;
    sliced, expanded or overlapping tensors do not.
    """
    if x.dim() == 0 or x.numel() == 0:
        return None
    if not -x.dim() <= axis < x.dim():
        return None
    axis %= x.dim()
    shape, strides = x.shape, x.stride()
    C = shape[axis]
    if x.is_contiguous():
        return math.prod(shape[:axis]), C, math.prod(shape[axis + 1 :])
    dims: list[int] = []  # the dims of size > 1, innermost first: an insertion sort of plain comparisons,
    for d in range(x.dim()):  # which torch.compile traces on symbolic strides (sorted's keys it cannot)
        if shape[d] != 1:
            i = len(dims)
            while i > 0 and strides[dims[i - 1]] > strides[d]:
                i -= 1
            dims.insert(i, d)
    expected = 1
    for d in dims:  # dense: each stride is the product of the sizes inside it
        if strides[d] != expected:
            return None
        expected *= shape[d]
    if C == 1:
        return 1, 1, x.numel()
    B = 1
    for d in dims:  # (a loop, not math.prod of a generator: torch.compile traces this in cpu_ops.applies)
        if strides[d] < strides[axis]:
            B *= shape[d]
    return x.numel() // (B * C), C, B


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1 (so the same memory order)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


def _empty_like(x: Tensor) -> Tensor:
    """An output with x's strides; of a dense plain CPU tensor, from the C++ entry points' allocator
    (their pool of freed outputs) where they are loaded. Not of fake tensors: those trace."""
    if type(x) is Tensor and (ext := extension()) is not None:
        out = ext.output_like(x)
        if out is not None:
            return out
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    if not x.is_contiguous() and not _same_layout(out, x):  # empty_like keeps dense strides; make sure
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out


def layout(x: Tensor, axis: int) -> tuple[int, int, int] | None:
    """(A, C, B) of x if `supports(x, axis)`, else None: what `eval_forward` may be handed as `acb`."""
    acb = _canonical(x, axis)
    return acb if acb is not None and available() else None


def supports(x: Tensor, axis: int) -> bool:
    """True if the kernel is available and runs on x as it is (no copy of x).

    Needs a CPU float32 or bfloat16 tensor with elements, dense and laid out as a contiguous
    (A, C, B) block in memory order (contiguous, channels_last, channels_last_3d, (N, L, C)
    with axis=-1, any dense permutation). Compiles the kernel on the first call.
    """
    return layout(x, axis) is not None


def _prepare(x: Tensor, axis: int) -> tuple[ctypes.CDLL, int, int, int]:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the batchnorm CPU kernel is not available: {_why}")
    acb = _canonical(x, axis)
    if acb is None:
        raise ValueError(
            "the CPU kernel needs a CPU float32/bfloat16 tensor laid out densely with the channel "
            f"axis as one block (contiguous or channels_last), got dtype {x.dtype}, device "
            f"{x.device}, shape {tuple(x.shape)}, strides {x.stride()}, axis {axis}; check "
            "supports() first, or use x.contiguous()"
        )
    return lib, *acb


def _vector(t: Tensor | None, C: int, name: str) -> Tensor | None:
    """A per-channel vector as float32 (C,) contiguous on the CPU (None stays None)."""
    if t is None:
        return None
    if t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() and t.numel() == C:
        return t  # the common case, as it is: only its C contiguous values are read
    if t.numel() != C:
        raise ValueError(f"{name} must have one value per channel, {C}, got shape {tuple(t.shape)}")
    return t.detach().to(device="cpu", dtype=torch.float32).reshape(C).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"the batchnorm CPU kernel could not allocate scratch memory for {what}")


# --------------------------------------------------------------------------- kernels


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: (y, mean, var) with the batch's statistics.

    y has x's dtype, shape and strides; mean and var (biased) are float32 (C,).
    weight and bias: None or (C,) of any float dtype (used as float32).
    Reads x twice and writes y once. Raises ValueError if not supports(x, axis),
    RuntimeError if the kernel is not available.
    """
    y, mean, var, _, _ = train_forward_update(x, weight, bias, eps, axis, None, None, 0.0)
    return y, mean, var


def statistics(x: Tensor, eps: float, axis: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training forward's statistics alone, x read once: (mean, var, invstd), float32 (C,),
    bitwise the forward's, and (mean64, var64), float64 (C,): the same before their rounding to
    float32 (var biased; float32 sums within chunks, merged in float64). With those, `apply` and
    `centred` give the forward's y for any scale and shift."""
    lib, A, C, B = _prepare(x, axis)
    mean, var, invstd = (torch.empty(C, dtype=torch.float32) for _ in range(3))
    mean64, var64 = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    rc = lib.bn_statistics(
        _DTYPES[x.dtype], x.data_ptr(), A, C, B, float(eps), mean.data_ptr(), var.data_ptr(), invstd.data_ptr(),
        mean64.data_ptr(), var64.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the statistics")
    return mean, var, invstd, mean64, var64


def can_update(running: Tensor | None, C: int) -> bool:
    """True if `train_forward_update` can update this running-statistics buffer in place.

    It must be a float32, contiguous CPU tensor of shape (C,) that does not require grad.
    """
    return isinstance(running, Tensor) and _float32_vector(running, C) and not running.requires_grad


def _float32_vector(t: Tensor, C: int) -> bool:
    return t.dtype is torch.float32 and t.shape == (C,) and t.is_cpu and t.is_contiguous()


def train_forward_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool | None]:
    """`train_forward` that also returns invstd and updates the running statistics in place.

    (y, mean, var, invstd, updated): invstd = (var + eps)**-1/2, float32 (C,). When both
    running buffers `can_update`, PyTorch's rule runs in the same call:
    running = (1 - momentum) * running + momentum * batch, with the unbiased variance
    var * m / (m - 1); `updated` is True, or False if some channel's statistics were not
    finite (then nothing is written). Otherwise (None, or another dtype or layout) the
    buffers are not touched and `updated` is None: the caller updates them.
    """
    ext = None if torch.compiler.is_compiling() else extension()
    if ext is not None:  # the same call in C++, unless it declines (then as below)
        r = ext.train(x, weight, bias, running_mean, running_var, eps, momentum, axis)
        if r is not None:
            y, mean, var, invstd, updated = r
            return y, mean, var, invstd, None if updated < 0 else updated == 1
    return _train_forward(x, weight, bias, eps, axis, running_mean, running_var, momentum)[:5]


def train_forward_relu(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool | None, Tensor]:
    """`train_forward_update` with y = relu(BN(x) + residual) (residual None: relu(BN(x))) from
    the same apply pass, in float32 and rounded once: the traffic of BN alone.

    (y, mean, var, invstd, updated, scale_shift): scale_shift is float32 (2, C), the apply pass's
    y = (x - mean) * scale + shift before the ReLU, which `train_backward(relu_gate=...)` needs.
    The residual is first copied into x's dtype and memory order if it differs (`in_layout_of`).
    """
    return _train_forward(x, weight, bias, eps, axis, running_mean, running_var, momentum, True, residual)


def _train_forward(x, weight, bias, eps, axis, running_mean, running_var, momentum, relu=False, residual=None):
    lib, A, C, B = _prepare(x, axis)
    fused = can_update(running_mean, C) and can_update(running_var, C)
    w, b = _vector(weight, C, "weight"), _vector(bias, C, "bias")
    y = _empty_like(x)
    mean, var, invstd = (torch.empty(C, dtype=torch.float32) for _ in range(3))
    args = (
        y.data_ptr(), A, C, B, _ptr(w), _ptr(b), float(eps), mean.data_ptr(), var.data_ptr(), invstd.data_ptr(),
        _ptr(running_mean) if fused else None, _ptr(running_var) if fused else None, float(momentum),
    )  # fmt: skip
    scale_shift = None
    if relu:
        r = None if residual is None else in_layout_of(residual, x, "residual")
        scale_shift = torch.empty(2, C, dtype=torch.float32)
        rc = lib.bn_train_forward_relu(
            _DTYPES[x.dtype], x.data_ptr(), _ptr(r), *args, scale_shift.data_ptr(), torch.get_num_threads()
        )
    else:
        rc = lib.bn_train_forward(_DTYPES[x.dtype], x.data_ptr(), *args, torch.get_num_threads())
    if rc == 1:
        _check(rc, "the forward")
    return y, mean, var, invstd, (rc == 0) if fused else None, scale_shift


def update_running(
    mean: Tensor,
    invstd: Tensor,
    count: int,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
) -> bool | None:
    """PyTorch's running-statistics rule from a forward's float32 (C,) mean and invstd (torch's kernel's outputs).

    var = invstd**-2 - eps (at least 0), unbiased with count / (count - 1):
    running = (1 - momentum) * running + momentum * batch. True if updated, False if some
    channel's statistics were not finite (nothing written), None if the kernel cannot do it
    (unavailable, or buffers that fail `can_update`, or statistics not float32 (C,) on the CPU):
    then the caller updates them.
    """
    lib, C = _library(), mean.numel()
    if lib is None or not (can_update(running_mean, C) and can_update(running_var, C)):
        return None
    if not (_float32_vector(mean, C) and _float32_vector(invstd, C)):
        return None
    rc = lib.bn_update_running(
        C, float(count), float(eps), mean.data_ptr(), invstd.data_ptr(), running_mean.data_ptr(),
        running_var.data_ptr(), float(momentum),
    )  # fmt: skip
    if rc == 1:
        _check(rc, "the running statistics")
    return rc == 0


def update_running_unbiased(
    mean: Tensor, unbiased: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float
) -> bool | None:
    """PyTorch's running-statistics rule from a batch's mean and unbiased variance (float32 or
    float64 (C,) on the CPU): running = (1 - momentum) * running + momentum * batch, in one C
    call instead of a handful of torch ops. True if updated, False if some value was not finite
    (nothing written), None if the kernel cannot do it (unavailable, buffers that fail
    `can_update`, statistics of another dtype, shape or device, a tensor momentum): then the
    caller updates them."""
    lib, C = _library(), mean.numel()
    if lib is None or not isinstance(momentum, float):
        return None
    if not (can_update(running_mean, C) and can_update(running_var, C)):
        return None
    if not (
        mean.dtype == unbiased.dtype in (torch.float32, torch.float64)
        and mean.shape == unbiased.shape == (C,)
        and mean.is_cpu
        and unbiased.is_cpu
        and mean.is_contiguous()
        and unbiased.is_contiguous()
    ):
        return None
    rc = lib.bn_update_running_unbiased(
        int(mean.dtype == torch.float64), C, mean.data_ptr(), unbiased.data_ptr(), running_mean.data_ptr(),
        running_var.data_ptr(), momentum,
    )  # fmt: skip
    return rc == 0


def train_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    axis: int,
    need_dx: bool = True,
    relu_gate: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Training-mode backward: (dx or None, s1, s2), s1 = sum(dy), s2 = sum(dy * (x - mean)) per channel.

    dx = k*dy + b*x + c (module docstring), computed as k*dy + b*(x - mean) - k*s1/m, which
    keeps float32 precision when the data have a large offset. Parameter gradients follow:
    dbias = s1, dweight = s2 * invstd. s1, s2 are float32 (C,); dx has x's dtype and strides.
    mean and invstd are the forward's (float32 (C,)); weight None means 1.

    dy must have x's shape; if its dtype or memory layout differs from x's (e.g. a contiguous
    dy for a channels_last x) it is first copied into x's layout: one more read and write.
    Reads x and dy twice and writes dx once (once each, without dx, if need_dx is False).

    relu_gate: the backward of relu(BN(x)): `train_forward_relu`'s scale_shift. dy then counts
    where (x - mean) * scale + shift > 0, the forward's ReLU test recomputed bitwise from x: no
    mask or output is stored, and the passes are BN's alone.
    """
    ext = None if relu_gate is not None or torch.compiler.is_compiling() else extension()
    if ext is not None:  # the same call in C++, unless it declines (then as below)
        r = ext.backward(dy, x, weight, mean, invstd, axis, need_dx)
        if r is not None:
            return r
    lib, A, C, B = _prepare(x, axis)
    dy = in_layout_of(dy, x)
    w = _vector(weight, C, "weight")
    mu, istd = _vector(mean, C, "mean"), _vector(invstd, C, "invstd")
    dx = _empty_like(x) if need_dx else None
    s1 = torch.empty(C, dtype=torch.float32)
    s2 = torch.empty(C, dtype=torch.float32)
    args = (_DTYPES[x.dtype], dy.data_ptr(), x.data_ptr(), _ptr(dx), A, C, B, _ptr(w), _ptr(mu), _ptr(istd))
    if relu_gate is None:
        rc = lib.bn_train_backward(*args, s1.data_ptr(), s2.data_ptr(), torch.get_num_threads())
    else:
        if relu_gate.dtype != torch.float32 or relu_gate.shape != (2, C) or not relu_gate.is_contiguous():
            raise ValueError(f"relu_gate must be train_forward_relu's float32 (2, {C}), got {relu_gate.shape}")
        scale, shift = relu_gate[0].data_ptr(), relu_gate[1].data_ptr()
        rc = lib.bn_train_backward_relu(*args, scale, shift, s1.data_ptr(), s2.data_ptr(), torch.get_num_threads())
    _check(rc, "the backward")
    return dx, s1, s2


def in_layout_of(dy: Tensor, x: Tensor, name: str = "dy") -> Tensor:
    """dy as the kernel reads it beside x: x's dtype and memory order, copied into it if needed."""
    if dy.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(dy.shape)} but x has {tuple(x.shape)}")
    same = dy.dtype == x.dtype and dy.is_cpu and ((dy.is_contiguous() and x.is_contiguous()) or _same_layout(dy, x))
    return dy if same else _empty_like(x).copy_(dy)  # the documented copy into x's layout


def _ghost_rows(x: Tensor, A: int, k: int) -> tuple[int, int]:
    """(rows of the (A, C, B) view per ghost batch of k samples, number of ghost batches)."""
    N = x.shape[0]
    return k * (A // N), -(-N // k)


def ghost_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`train_forward` of each ghost batch (k consecutive samples along axis 0, the last may have
    fewer) with its own statistics, in one call: (y, mean, invstd, total_mean, total_m2), mean and
    invstd float32 (G, C), row g for ghost batch g; total_mean and total_m2 (the sum of squared
    deviations) float64 (C,) of the whole batch, merged from the ghost batches' moments, for the
    running statistics, which are not updated here. x must have axis 0 outermost in memory (each
    ghost batch a dense block).
    """
    lib, A, C, B = _prepare(x, axis)
    rows, G = _ghost_rows(x, A, k)
    w, b = _vector(weight, C, "weight"), _vector(bias, C, "bias")
    y = _empty_like(x)
    mean, var, invstd = (torch.empty(G, C, dtype=torch.float32) for _ in range(3))
    total_mean, total_m2 = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    rc = lib.bn_ghost_forward(
        _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), A, C, B, rows, _ptr(w), _ptr(b), float(eps),
        mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), total_mean.data_ptr(), total_m2.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the forward")
    return y, mean, invstd, total_mean, total_m2


def ghost_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, axis: int, k: int, need_dx: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """`train_backward` of each ghost batch, in one call: (dx or None, s1, s2), s1 and s2 float32
    (G, C); mean, invstd the (G, C) of `ghost_forward`. dy is first copied into x's layout if
    its dtype or memory order differs."""
    lib, A, C, B = _prepare(x, axis)
    rows, G = _ghost_rows(x, A, k)
    dy = in_layout_of(dy, x)
    w = _vector(weight, C, "weight")
    mu, istd = mean.contiguous(), invstd.contiguous()
    dx = _empty_like(x) if need_dx else None
    s1, s2 = torch.empty(G, C, dtype=torch.float32), torch.empty(G, C, dtype=torch.float32)
    rc = lib.bn_ghost_backward(
        _DTYPES[x.dtype], dy.data_ptr(), x.data_ptr(), _ptr(dx), A, C, B, rows, _ptr(w), mu.data_ptr(),
        istd.data_ptr(), s1.data_ptr(), s2.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the backward")
    return dx, s1, s2


# From planes of 2 values on, the masked kernels beat the general path: fwd+bwd of (4096, 64, 2)
# 4.6 against 11.7 ms, (2048, 64, 4) 3.2 against 8.5, (1024, 128, 8) 3.7 against 16.5 (2-core
# EPYC). Planes of one value are rows with the channels last, which the masked kernels take as
# rows (one mask byte per row of C values).
MASKED_MIN_PLANE = 2


def masked_layout(x: Tensor, axis: int, acb: tuple[int, int, int]) -> bool:
    """Whether the masked kernels (`masked_forward`, `masked_backward`, `masked_eval`) take x of
    kernel layout acb (`layout`, or `_layout` where no memo may be read: `cpu_ops`), a mask having
    x's shape without the channel axis: a layout whose order follows the mask's, either contiguous
    with planes of at least MASKED_MIN_PLANE values (value e of row a's planes has mask element
    a*B + e: (N, C, L) and mask (N, L), (N, C, H, W) and mask (N, H, W)), or rows with the channels
    last (B = 1, row a has mask element a: (N, L, C) with axis=-1, channels_last, 2-D)."""
    return (x.is_contiguous() and acb[2] >= MASKED_MIN_PLANE) or (acb[2] == 1 and x.movedim(axis, -1).is_contiguous())


def _mask_bytes(mask: Tensor, A: int, B: int) -> Tensor:
    """The bool mask as A*B contiguous bytes (1 = real), the kernel's view of it."""
    if mask.dtype != torch.bool or mask.numel() != A * B:
        raise ValueError(f"the mask must be bool with {A * B} elements, got {mask.dtype} of shape {tuple(mask.shape)}")
    return mask.contiguous().view(torch.uint8)


def masked_forward(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`train_forward` over the real values of x (`masked_layout`; mask: x's shape without the
    channel axis, True = real): (y, mean, var, invstd), the last three float32 (C,) over the real
    values. y is 0 at the padding, whose values are never read into a result (NaN is fine); no
    real value at all gives mean 0, var 0 and y 0. No running statistics."""
    lib, A, C, B = _prepare(x, axis)
    m = _mask_bytes(mask, A, B)
    w, b = _vector(weight, C, "weight"), _vector(bias, C, "bias")
    y = _empty_like(x)
    mean, var, invstd = (torch.empty(C, dtype=torch.float32) for _ in range(3))
    rc = lib.bn_masked_forward(
        _DTYPES[x.dtype], x.data_ptr(), m.data_ptr(), y.data_ptr(), A, C, B, _ptr(w), _ptr(b), float(eps),
        mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the forward")
    return y, mean, var, invstd


def masked_backward(
    dy: Tensor, x: Tensor, mask: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, axis: int, need_dx: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """`train_backward` over the real values: (dx or None, s1, s2), the sums float32 (C,) over the
    real values, dx 0 at the padding. dy is first copied into x's layout if its dtype or memory
    order differs."""
    lib, A, C, B = _prepare(x, axis)
    m = _mask_bytes(mask, A, B)
    dy = in_layout_of(dy, x)
    w = _vector(weight, C, "weight")
    mu, istd = _vector(mean, C, "mean"), _vector(invstd, C, "invstd")
    dx = _empty_like(x) if need_dx else None
    s1, s2 = torch.empty(C, dtype=torch.float32), torch.empty(C, dtype=torch.float32)
    rc = lib.bn_masked_backward(
        _DTYPES[x.dtype], dy.data_ptr(), x.data_ptr(), m.data_ptr(), _ptr(dx), A, C, B, _ptr(w), _ptr(mu),
        _ptr(istd), s1.data_ptr(), s2.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the backward")
    return dx, s1, s2


def masked_eval(
    x: Tensor,
    mask: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    """`eval_forward` with the mask (`masked_layout`): y = x * scale + shift at the real values,
    0 at the padding (never read). One read of x, one write of y."""
    lib, A, C, B = _prepare(x, axis)
    m = _mask_bytes(mask, A, B)
    rm, rv = _vector(running_mean, C, "running_mean"), _vector(running_var, C, "running_var")
    w, b = _vector(weight, C, "weight"), _vector(bias, C, "bias")
    y = _empty_like(x)
    rc = lib.bn_masked_eval(
        _DTYPES[x.dtype], x.data_ptr(), m.data_ptr(), y.data_ptr(), A, C, B, rm.data_ptr(), rv.data_ptr(), _ptr(w),
        _ptr(b), float(eps), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the eval forward")
    return y


def apply(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor, axis: int) -> Tensor:
    """y = (x - centre) * scale + shift per channel (float32 (C,) vectors): one read, one write.

    For training BN with statistics computed elsewhere (other processes, batch renormalization):
    centre the mean rounded to float32 and shift = beta - (mean - centre) * scale keep float32
    precision in y for data with a large offset (`centred`). y has x's dtype, shape and strides.
    """
    lib, A, C, B = _prepare(x, axis)
    vectors = [_vector(v, C, name) for v, name in ((centre, "centre"), (scale, "scale"), (shift, "shift"))]
    y = _empty_like(x)
    rc = lib.bn_apply(
        _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), A, C, B, *map(_ptr, vectors), torch.get_num_threads()
    )
    _check(rc, "the apply pass")
    return y


def renorm_coefficients(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch renormalization's coefficients in one C call, from the batch's float64 mean and biased
    var (C,) (`statistics`) and the running statistics: sigma = sqrt(running_var + eps),
    r = clip(sqrt(var + eps) / sigma, 1/r_max, r_max), d = clip((mean - running_mean) / sigma,
    -d_max, d_max). Returns float32 (C,) (w * r, r, d, centre, scale, shift): the first three for
    the backward, the last three for `apply` (y = x_hat * w r + w d + b, centred as in `centred`).
    The per-channel vectors are used as float32."""
    C = mean.numel()
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    vectors = [_vector(v, C, name) for name, v in named]
    outputs = [torch.empty(C, dtype=torch.float32) for _ in range(6)]
    _library().bn_renorm_coefficients(
        C, mean.data_ptr(), var.data_ptr(), *map(_ptr, vectors), float(eps), float(r_max), float(d_max),
        *(t.data_ptr() for t in outputs),
    )  # fmt: skip
    return tuple(outputs)


def centred(mean: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(centre, scale, shift) float32 for `apply` from float64 (C,) vectors: y = (x - mean) *
    scale + shift as (x - centre) * scale + (shift - (mean - centre) * scale), centre = the
    float32 mean (x - centre is exact for x near it)."""
    centre = mean.float()
    return centre, scale.float(), (shift - (mean - centre.double()) * scale).float()


def input_grad(dy: Tensor, x: Tensor, centre: Tensor, k: Tensor, b: Tensor, c: Tensor, axis: int) -> Tensor:
    """dx = k * dy + b * (x - centre) + c per channel (float32 (C,)): `train_backward`'s dx pass
    with coefficients the caller computed (e.g. from sums over several processes). dy is first
    copied into x's layout if its dtype or memory order differs."""
    lib, A, C, B = _prepare(x, axis)
    dy = in_layout_of(dy, x)
    vectors = [_vector(v, C, name) for v, name in ((centre, "centre"), (k, "k"), (b, "b"), (c, "c"))]
    dx = _empty_like(x)
    rc = lib.bn_input_grad(
        _DTYPES[x.dtype], dy.data_ptr(), x.data_ptr(), dx.data_ptr(), A, C, B, *map(_ptr, vectors),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "the input gradient")
    return dx


def inference(x: Tensor, scale: Tensor, shift: Tensor, axis: int) -> Tensor:
    """y = x * scale + shift per channel (scale, shift (C,), used as float32): one read, one write.

    For eval-mode BN: scale = weight * (running_var + eps)**-1/2, shift = bias - running_mean * scale.
    y has x's dtype, shape and strides.
    """
    lib, A, C, B = _prepare(x, axis)
    sc, sh = _vector(scale, C, "scale"), _vector(shift, C, "shift")
    y = _empty_like(x)
    rc = lib.bn_inference(
        _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), A, C, B, _ptr(sc), _ptr(sh), torch.get_num_threads()
    )
    _check(rc, "inference")
    return y


def eval_forward(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    acb: tuple[int, int, int] | None = None,
    relu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """Eval-mode BN in one call: y = x * scale + shift, scale = w * (var + eps)**-1/2, shift = b - mean * scale.

    mean, var (the running statistics), weight and bias: (C,) of any float dtype (used as float32;
    weight, bias may be None). The coefficients are computed in float64 inside the kernel.
    acb: `layout(x, axis)` if the caller has it (saves the lookup). relu: y = relu(BN(x) +
    residual) in the same pass, as in `train_forward_relu`.
    """
    if acb is None:
        lib, A, C, B = _prepare(x, axis)
    else:
        lib, (A, C, B) = _lib, acb
    mu, v = _vector(mean, C, "mean"), _vector(var, C, "var")
    w, b = _vector(weight, C, "weight"), _vector(bias, C, "bias")
    y = _empty_like(x)
    args = (y.data_ptr(), A, C, B, _ptr(mu), _ptr(v), _ptr(w), _ptr(b), float(eps), torch.get_num_threads())
    if relu:
        r = None if residual is None else in_layout_of(residual, x, "residual")
        rc = lib.bn_eval_relu(_DTYPES[x.dtype], x.data_ptr(), _ptr(r), *args)
    else:
        rc = lib.bn_eval(_DTYPES[x.dtype], x.data_ptr(), *args)
    _check(rc, "eval")
    return y
