"""Bit-for-bit repeatable decoding on a CPU: the same seed, batch size and thread count give the same codes,
however loaded the machine is.

Why it is needed. Floating-point sums split over another number of threads round differently; AR's one-token
step is where this shows: its attention (the CPU flash kernel of ``scaled_dot_product_attention`` with one query,
one small MKL GEMM per head inside an OpenMP region) gives other last bits with a team of 1 thread than with 2,
and a last bit can move a sampled code across a CDF step. The thread count a run *reports*
(``torch.get_num_threads()``, results.json's ``device``) need not be the one its parallel regions *get*:

* OpenMP's dynamic adjustment (``OMP_DYNAMIC=true`` in the environment, or ``omp_set_dynamic(1)`` by any library
  in the process) sizes every parallel region's team from the machine's load -- libgomp gives
  ``CPUs - 15-minute load average`` threads, at least 1 -- so a loaded machine silently decodes on fewer threads;
* MKL's own dynamic mode (``MKL_DYNAMIC``, on unless ``torch.set_num_threads`` was called) lets MKL choose how
  many threads each call uses.

:func:`pin_threads` turns both off and sets torch's thread count explicitly, so every parallel region runs on
exactly that many threads. Importing :mod:`hawkspec.decoding` (every decoder) calls :func:`pin_dynamic` (the
count kept); ``hawkspec-eval`` calls :func:`pin_threads` with ``eval.threads``. Both act on the calling thread's
settings: decode on the thread that imported the decoders, or call :func:`pin_dynamic` on yours.

Not covered: another thread count, another CPU (instruction set: AVX2 vs AVX-512 kernels), another torch / MKL
build, or another batch size (other shapes, other kernels) may give other last bits and so, rarely, other codes.
Nothing here concerns a GPU (cuBLAS / SDPA kernel choice, atomics): GPU runs are not claimed repeatable.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger("hawkspec")

#: What child processes (Hydra launcher jobs, DataLoader workers, sharded evaluation) inherit: read by OpenMP and
#: MKL when they start, so a child is pinned before its first parallel region.
PINNED_ENV = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}

_OPENMP_PREFIXES = ("libgomp", "libiomp", "libomp")


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux); empty elsewhere."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split(None, 5)[-1].strip() for line in text.splitlines() if "/" in line}
    return sorted(p for p in paths if p.startswith("/") and ".so" in os.path.basename(p))


def openmp_runtimes() -> list[tuple[str, ctypes.CDLL]]:
    """(name, handle) of every OpenMP runtime loaded in this process: torch's bundled libgomp, and any other
    (Intel's libiomp5, LLVM's libomp, a vendored ``libgomp-<hash>.so``) a library brought along. Each has its own
    dynamic-adjustment setting."""
    import torch  # noqa: F401  (loads torch's own runtime first)

    found = [p for p in _loaded_libraries() if os.path.basename(p).startswith(_OPENMP_PREFIXES)]
    handles: list[tuple[str, ctypes.CDLL]] = []
    for path in found:
        try:
            lib = ctypes.CDLL(path)  # the already-loaded instance (same file), not a second copy
        except OSError:
            continue
        if hasattr(lib, "omp_set_dynamic"):
            handles.append((os.path.basename(path), lib))
    if not handles:  # no /proc (macOS) or a statically linked runtime: whatever the process exports
        try:
            lib = ctypes.CDLL(None)
            if hasattr(lib, "omp_set_dynamic"):
                handles.append(("process", lib))
        except (OSError, TypeError):  # TypeError: Windows has no handle for the process itself
            pass
    return handles


def _torch_cpu_library() -> ctypes.CDLL | None:
    """torch's CPU library, where an MKL build of torch links MKL's service functions statically."""
    import torch

    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def mkl_dynamic() -> bool | None:
    """Whether MKL may choose fewer threads than asked (``MKL_DYNAMIC``); None when torch has no MKL to ask."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    lib = _torch_cpu_library()
    fn = getattr(lib, "mkl_serv_get_dynamic", None) if lib is not None else None
    return None if fn is None else bool(fn())


def thread_settings() -> dict:
    """What decides the CPU thread teams of this process, for results files: torch's thread count, each OpenMP
    runtime's dynamic adjustment and MKL's."""
    import torch

    return {"threads": torch.get_num_threads(),
            "omp_dynamic": {name: bool(lib.omp_get_dynamic()) for name, lib in openmp_runtimes()
                            if hasattr(lib, "omp_get_dynamic")},
            "mkl_dynamic": mkl_dynamic()}


def pin_dynamic() -> None:
    """Turn off OpenMP's and MKL's dynamic adjustment for the parallel regions this thread starts, keeping
    torch's thread count, and export ``OMP_DYNAMIC=FALSE MKL_DYNAMIC=FALSE`` to child processes. Importing
    :mod:`hawkspec.decoding` calls it."""
    import torch

    for key, value in PINNED_ENV.items():
        if os.environ.get(key, value).strip().lower() not in ("false", "0", "no", "off"):
            log.warning("%s=%s: overridden with %s so that a loaded machine decodes on the same number of threads "
                        "(hawkspec.determinism)", key, os.environ[key], value)
        os.environ[key] = value
    for _, lib in openmp_runtimes():
        lib.omp_set_dynamic(0)  # this thread's setting: the one every region it starts reads
    if torch.backends.mkl.is_available():
        lib = _torch_cpu_library()
        # MKL_Set_Dynamic is the C entry (flag by value); the lower-case mkl_set_dynamic symbol is the Fortran one
        fn = getattr(lib, "MKL_Set_Dynamic", None) if lib is not None else None
        if fn is not None:
            fn(0)


def pin_threads(threads: int | None = None) -> dict:
    """Make every CPU parallel region this thread starts (and those of the processes it starts) run on exactly
    ``threads`` threads, whatever the machine's load: :func:`pin_dynamic`, then torch's thread count set
    explicitly (which also keeps MKL's dynamic mode off: torch calls ``mkl_set_dynamic(0)``).

    Args:
        threads: torch's CPU threads (``eval.threads``); None or 0 keeps the current count.

    Returns:
        :func:`thread_settings` after pinning (what results.json can record).
    """
    import torch

    n = int(threads) if threads else torch.get_num_threads()
    if n < 1:
        raise ValueError(f"threads must be >= 1 (or null: torch's default), got {threads}")
    pin_dynamic()
    torch.set_num_threads(n)
    return thread_settings()
