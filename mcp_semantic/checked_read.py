"""A block file's arrays read into their places and checked against their xxh3_64 checksums in
one native call per file: numba, calling libc's `preadv` and the xxhash wheel's own XXH3 (the
library the checksums were written with, so the result is the same by construction), with the
GIL released for the whole file. block_files falls back to its Python calls where this is
missing (no numba: it is a Linux dependency; the wheel's XXH3 not found; not a 64-bit system).

Why not Python's calls: a lossless resume is hundreds of megabytes in thousands of reads and
checksums on two reading threads, and each of Python's calls hands the GIL over twice. Reads
of about a megabyte kept those calls few, but what the kernel's copy writes leaves the CPU's
cache before a megabyte is done, so each checksum read its array again from memory. Here arrays
are read about 256 KB at a time and checksummed at once, still in the cache, with no Python
between. Measured here (`benchmarks/bench_load.py --tokens 4096`, a 4K-token agent of the
default model, 16 files, 189 MB; medians of 9, timed in turns): the load 35.6 ms by Python's
calls, 26.7 ms by this; one thread's `readinto` of the same files into memory used before
28.4 ms. A scratch script that only read the files into the heads, without checksums, took
16.9 ms; with Python's checksums 24.7; with this loop 18.1.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

# Arrays read by one preadv: consecutive in the file, about this many bytes (an array more if
# it alone is larger): what one read leaves in the CPU's cache (L2, 1-2 MB a core, also holds
# the source pages) for the checksums that follow. At most IOV_MAX (1024 on Linux) runs.
GROUP_BYTES, MAX_RUNS = 256 << 10, 1024

OK, SHORT, TOO_MANY_RUNS = -1, -2, -3


def _read_loops(fd: int, arrays: np.ndarray, runs: np.ndarray, state: int, group_bytes: int) -> int:  # numba's (_kernel)
    """`arrays` rows: file offset, bytes, checksum (xxh3_64's bits as int64), first run, runs;
    in file order. `runs` rows: address, bytes: where an array's bytes go, in order. Returns OK,
    the row of the first array whose checksum failed, SHORT (a read failed or came short), or
    TOO_MANY_RUNS (an array in more runs than one read takes)."""
    iov = np.empty((MAX_RUNS, 2), np.uint64)  # struct iovec: base, length
    a, count = 0, arrays.shape[0]
    while a < count:
        first, offset, n, k = a, arrays[a, 0], 0, 0
        while a < count and (a == first or (arrays[a, 0] == offset + n and n + arrays[a, 1] <= group_bytes
                                            and k + arrays[a, 4] <= MAX_RUNS)):
            if arrays[a, 4] > MAX_RUNS:
                return TOO_MANY_RUNS
            for r in range(arrays[a, 3], arrays[a, 3] + arrays[a, 4]):
                iov[k, 0], iov[k, 1] = runs[r, 0], runs[r, 1]
                k += 1
            n += arrays[a, 1]
            a += 1
        if _preadv(fd, iov.ctypes.data, k, offset) != n:
            return SHORT
        for b in range(first, a):
            _reset(state)
            for r in range(arrays[b, 3], arrays[b, 3] + arrays[b, 4]):
                _update(state, runs[r, 0], runs[r, 1])
            if _digest(state) != np.uint64(arrays[b, 2]):
                return b
    return OK


_preadv = _reset = _update = _digest = None  # numba's declarations of the C functions (_kernel)


@functools.cache
def _kernel() -> tuple[Callable[..., int], Callable[[], int], Callable[[int], None]] | None:
    """The compiled loop and the functions that make and free an XXH3 state, or None where they
    cannot be had. The C functions are named to numba by symbol (llvmlite's add_symbol), not as ctypes
    pointers, so that numba's cache keeps the compiled loop for the next process."""
    global _preadv, _reset, _update, _digest
    if ctypes.sizeof(ctypes.c_void_p) != 8 or not hasattr(os, "preadv"):
        return None
    try:
        import llvmlite.binding as llvm
        import numba
        import xxhash._xxhash as wheel
    except ImportError:
        log.info("numba is not installed: block files are read and checksummed by Python's calls")
        return None
    try:
        lib = ctypes.CDLL(wheel.__file__)  # the module Python has loaded: its XXH3, exported
        update = "XXH3_64bits_update_dispatch" if hasattr(lib, "XXH3_64bits_update_dispatch") else "XXH3_64bits_update"
        functions = {name: getattr(lib, name) for name in
                     ("XXH3_64bits_reset", update, "XXH3_64bits_digest", "XXH3_createState", "XXH3_freeState")}
        ctypes.CDLL(None).preadv  # noqa: B018 - the JIT finds it by name, in the process
    except (OSError, AttributeError) as e:
        log.info("block files are read and checksummed by Python's calls: %s", e)
        return None
    for name in ("XXH3_64bits_reset", update, "XXH3_64bits_digest"):
        llvm.add_symbol(f"mcp_semantic_{name}", ctypes.cast(functions[name], ctypes.c_void_p).value)
    t = numba.types
    _reset = t.ExternalFunction("mcp_semantic_XXH3_64bits_reset", t.int32(t.uintp))
    _update = t.ExternalFunction(f"mcp_semantic_{update}", t.int32(t.uintp, t.uintp, t.uintp))
    _digest = t.ExternalFunction("mcp_semantic_XXH3_64bits_digest", t.uint64(t.uintp))
    _preadv = t.ExternalFunction("preadv", t.intp(t.intc, t.uintp, t.intc, t.int64))
    create, free = functions["XXH3_createState"], functions["XXH3_freeState"]
    create.restype, free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    try:
        signature = t.int64(t.intc, t.int64[:, ::1], t.int64[:, ::1], t.uintp, t.int64)
        loop = numba.njit(signature, nogil=True, cache=True)(_read_loops)
    except Exception as e:  # noqa: BLE001 - a compiler that fails here leaves Python's calls
        log.warning("numba could not compile the block-file reader (%s): Python's calls read block files", e)
        return None
    return loop, create, free


def available() -> bool:
    """Whether block files are read by the native loop (compiling it now if not yet)."""
    return _kernel() is not None


class _State:
    """A reading thread's XXH3 state (a few hundred bytes), freed with the thread."""

    def __init__(self) -> None:
        _, create, self._free = _kernel()
        self.address = create()
        if not self.address:
            raise MemoryError("XXH3_createState")

    def __del__(self) -> None:
        self._free(self.address)


_local = threading.local()


def read_checked(fd: int, arrays: np.ndarray, runs: np.ndarray) -> int:
    """Read and check a file's arrays (`_read_loops`' rows); only where `available()`."""
    if getattr(_local, "state", None) is None:
        _local.state = _State()
    return _kernel()[0](fd, arrays, runs, _local.state.address, GROUP_BYTES)


def runs_of(into: list[Any] | np.ndarray) -> list[tuple[int, int]] | None:
    """(address, bytes) of each run where an array goes (block_files.Into: a list of buffers, or
    an array of 2 or more axes whose rows are contiguous), or None where one is not a writable,
    contiguous buffer (the Python calls then raise the error)."""
    if isinstance(into, np.ndarray):
        if into.ndim < 2 or not into.flags.writeable or not (len(into) == 0 or into[0].flags.c_contiguous):
            return None
        address, step, size = into.ctypes.data, into.strides[0], into[0].nbytes if len(into) else 0
        return [(address + i * step, size) for i in range(len(into))]
    out = []
    for b in into:
        a = b if isinstance(b, np.ndarray) else np.frombuffer(b, np.uint8)
        if not (a.flags.writeable and a.flags.c_contiguous):
            return None
        out.append((a.ctypes.data, a.nbytes))
    return out
