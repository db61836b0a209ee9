"""Host-to-GPU copies through the CUDA runtime, for MLX's CUDA backend.

Why this exists: MLX has no Python call that copies host memory into a GPU array. An array made
from host memory lives in CUDA managed memory written by the CPU, and moves to the GPU page by
page when a kernel first reads it: about 2 GB/s on an H200, where a DMA copy from pinned host
memory runs at 55. So where MLX runs on CUDA, `Store.read_into_one` reads block files into pinned
buffers of its own and copies them with `cudaMemcpy` into a buffer MLX made on the GPU (managed
memory, the same address on host and GPU, moved to the GPU first by `cudaMemPrefetchAsync`).

The runtime is the libcudart MLX's CUDA build loads; nothing here is used on the CPU or on Apple
silicon (`available()` is False there) and no CUDA package is a dependency.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
import threading

import mlx.core as mx
import numpy as np

_DEFAULT = 4  # cudaMemcpyDefault: the runtime tells host from GPU memory by address
_MEM_LOCATION_DEVICE = 1


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CudaError(RuntimeError):
    pass


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library MLX's CUDA backend uses (already loaded by it), or None."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for root in sys.path:  # the nvidia-cuda-runtime wheel MLX's CUDA build depends on
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*")))
        names += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaDeviceSynchronize.argtypes = []
        version = ctypes.c_int()
        lib.cudaRuntimeGetVersion(ctypes.byref(version))
        if version.value >= 13000:  # CUDA 13 names the destination by a cudaMemLocation
            lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint, ctypes.c_void_p]
        else:
            lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.version = version.value
        return lib
    return None


def _check(code: int) -> None:
    if code != 0:
        lib = _runtime()
        raise CudaError(f"CUDA error {code}: {lib.cudaGetErrorString(code).decode() if lib else '?'}")


@functools.cache
def available() -> bool:
    """Whether MLX runs on a CUDA GPU here and its runtime can be called."""
    if mx.default_device() != mx.gpu or mx.metal.is_available():
        return False
    lib = _runtime()
    if lib is None:
        return False
    device = ctypes.c_int()
    return lib.cudaGetDevice(ctypes.byref(device)) == 0


def _device() -> int:
    device = ctypes.c_int()
    _check(_runtime().cudaGetDevice(ctypes.byref(device)))
    return device.value


class Pinned:
    """A page-locked host buffer (DMA reads it at the bus's speed), kept for reuse."""

    def __init__(self, nbytes: int):
        self.pointer = ctypes.c_void_p()
        _check(_runtime().cudaHostAlloc(ctypes.byref(self.pointer), nbytes, 0))
        self.nbytes = nbytes
        self.view = memoryview((ctypes.c_char * nbytes).from_address(self.pointer.value)).cast("B")

    def __del__(self) -> None:
        lib = _runtime()
        if lib is not None and self.pointer.value:
            lib.cudaFreeHost(self.pointer)


_local = threading.local()


def staging(nbytes: int) -> Pinned:
    """This thread's pinned buffer of at least `nbytes` (made once, then reused)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _local.buffer = Pinned(nbytes)
    return buffer


def gpu_buffer(shape: tuple[int, ...]) -> tuple[mx.array, int]:
    """A uint8 MLX array of `shape` whose pages are on the GPU, and its address: copies into it
    with `copy_in` go to GPU memory directly."""
    a = mx.zeros(shape, mx.uint8)
    mx.eval(a)
    address = np.array(a, copy=False).ctypes.data  # MLX moves the buffer to managed memory: one address
    prefetch(address, a.nbytes)
    return a, address


def prefetch(address: int, nbytes: int) -> None:
    lib = _runtime()
    if lib.version >= 13000:
        _check(lib.cudaMemPrefetchAsync(address, nbytes, _MemLocation(_MEM_LOCATION_DEVICE, _device()), 0, None))
    else:
        _check(lib.cudaMemPrefetchAsync(address, nbytes, _device(), None))


def copy_in(address: int, source: Pinned, nbytes: int, offset: int = 0) -> None:
    """Copy `nbytes` of `source` from `offset` to `address` on the GPU (by DMA; returns when done)."""
    _check(_runtime().cudaMemcpy(address, source.pointer.value + offset, nbytes, _DEFAULT))


def synchronize() -> None:
    _check(_runtime().cudaDeviceSynchronize())
