"""Stored K/V into a float32 working cache on the host: blocks saved with --kv-bits 8 or 4
(MLX's affine quantization) dequantized, --kv-bits 16 (float16) widened, straight into the
cache's memory (a strided region of it), on the copy or reading threads.

Why numba: on the CPU this is most of a quantized agent's resume, and it must run at memory
speed for a smaller cache to load no slower than a lossless one (issue 14). Measured here for a
4K-token agent of the default model (189 MB of float32 K/V, 2 threads): numba's fused loops 18
to 19 ms at every level, as fast as a plain float32 copy of the same bytes (15 to 17 ms), where
numpy's vectorized passes took 36 to 53 ms (a cast, a multiply and an add, each a pass with its
own temporaries) and MLX's CPU ops 100 to 225 ms (`mx.dequantize` goes element by element). The
numpy versions stay as the fallback where numba is missing (it is a Linux dependency: only the
CPU path runs this), and as the reference the kernels are tested against, bit for bit.

Since the lossless load got faster (checked_read.py), the kernels compute 16 values at a time
by LLVM vector code numba lets us write (`_intrinsics`: float16 widened by the CPU's own
conversion, codes times scale plus bias), a head's rows in the CPU's cache, then streamed into
the working cache by non-temporal stores (`_stream`). Measured here (a scratch script,
`/tmp/s14/kbench2.py`: 189 MB of float32 out, 2 threads): 8 bits 13.6 ms before, 9.4 after;
float16 15.9 before, 7.3 after; with plain stores instead of streamed ones, 17.8 and 15.1.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

# every float16's float32, by its bits: numpy's own cast, so the table is exact by construction
# (subnormals, infinities, NaN payloads); 256 KB, it stays in the CPU's cache
_WIDE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


Operand = tuple[np.ndarray, int, np.ndarray]
"""An array as the kernels take it: contiguous 1-D memory, the place of its element [0, 0, 0, 0]
in it, and its 4 strides in elements (the last 1). The kernels index it by hand, so that their
innermost loop runs over memory the compiler knows is contiguous (numba's own strided arrays are
not vectorized: 1.5-2x slower); and a caller that reads many arrays into one buffer (block
files, block_files.Sink) passes the buffer itself, with no numpy view made per array."""


def operand(a: np.ndarray) -> Operand:
    """A 4-D array's Operand (its strides whole elements, none negative: `takes`)."""
    steps = np.array(a.strides, np.int64) // a.itemsize
    extent = 1 + int(np.dot(np.array(a.shape, np.int64) - 1, steps))
    return np.lib.stride_tricks.as_strided(a, (extent,), (a.itemsize,)), 0, steps


def takes(*arrays: np.ndarray) -> bool:
    """Whether the kernels take these arrays: they are compiled (numba is installed), and each
    array has 4 axes, the last contiguous, the strides whole elements, none negative, no axis empty."""
    return bool(_kernels()) and all(
        a.ndim == 4 and a.size and a.strides[-1] == a.itemsize and all(s >= 0 and s % a.itemsize == 0 for s in a.strides)
        for a in arrays)


def dequantize(out: Operand, q: Operand, scales: Operand, biases: Operand, shape: np.ndarray, bits: int) -> None:
    """MLX's affine dequantization (`mx.dequantize`: each group of the last axis is q * scale +
    bias, q packed `bits` to a uint32 from the low bits up, here its bytes) into `out`, float32;
    `shape`: out's 4 axes, then the groups a row. Where numba is missing, numpy's."""
    kernels = _kernels()
    if kernels:
        kernels[f"dequantize{bits}"](*out, *q, *scales, *biases, shape)
        return
    groups = (*shape[:3], shape[4])
    _dequantize_numpy(_view(out, shape[:4]), _view(q, (*shape[:3], shape[3] * bits // 8)), _view(scales, groups),
                      _view(biases, groups), bits)


def widen(out: Operand, data: Operand, shape: np.ndarray) -> None:
    """float16 (`data`'s bits, uint16) to float32 into `out`, through _WIDE; `shape`: out's 4 axes."""
    kernels = _kernels()
    if kernels:
        kernels["widen"](*out, *data, _WIDE, shape)
    else:
        np.take(_WIDE, _view(data, shape[:4]), out=_view(out, shape[:4]), mode="wrap")  # not "raise": it buffers


def dequantize_into(out: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> None:
    """`dequantize` from numpy arrays: `out` a float32 region (of a working cache), `w` as MLX
    packs it (uint32), `scales` and `biases` float32."""
    packed = w.view(np.uint8)  # little-endian: the elements in order, a byte each (8 bits) or two (4)
    if out.dtype == scales.dtype == biases.dtype == np.float32 and takes(out, packed, scales, biases):
        dequantize(operand(out), operand(packed), operand(scales), operand(biases), np.array([*out.shape, scales.shape[-1]]), bits)
    else:
        _dequantize_numpy(out, packed, scales, biases, bits)


def copy_into(out: np.ndarray, data: np.ndarray) -> None:
    """np.copyto(out, data); float16 into float32 by `widen` (numpy's float16 cast runs an element
    at a time: 2.8 GB/s here; at --kv-bits 16 it was most of a resume's load)."""
    if data.dtype != np.float16 or out.dtype != np.float32:
        np.copyto(out, data)
    elif takes(out, data):
        widen(operand(out), operand(data.view(np.uint16)), np.array(out.shape))
    else:
        np.take(_WIDE, data.view(np.uint16), out=out, mode="wrap")


def _view(a: Operand, shape: Any) -> np.ndarray:
    """The numpy array an Operand describes (for numpy's loops, where numba is missing)."""
    memory, offset, steps = a
    return np.lib.stride_tricks.as_strided(memory[offset:], tuple(int(n) for n in shape), tuple(int(s) * memory.itemsize for s in steps))


def _dequantize_numpy(out: np.ndarray, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> None:
    if bits == 8:
        q = packed
    else:  # byte 0xab as the uint16 0x0a0b, whose bytes are b, a: 1.5x the speed of two strided writes
        wide, shifted = _scratch(packed.shape, np.uint16, 2)
        np.copyto(wide, packed)
        np.left_shift(wide, 4, out=shifted)
        np.bitwise_or(wide, shifted, out=wide)
        np.bitwise_and(wide, 0x0F0F, out=wide)
        q = wide.view(np.uint8)
    grouped = out.reshape(out.shape[:-1] + (scales.shape[-1], -1))  # a view: the last axis is contiguous
    np.multiply(q.reshape(grouped.shape), scales[..., None], out=grouped)
    grouped += biases[..., None]


# The kernels: each array as an Operand, then `shape`; a multiply then an add in float32 (numpy's
# rounding: no fused multiply-add). A head's rows (or, where they are not one run, each row) are
# made in `slab`, in the CPU's cache, 16 values at a time by an intrinsic (the few left over, and
# float16 rows that are not one run, by plain loops), then streamed out (_stream).


def _dequantize8_loops(out, o, os, q, w, qs, scales, s, ss, biases, b, bs, shape):  # compiled by numba (_kernels)
    size = shape[3] // shape[4]  # a group's elements
    whole = os[2] == shape[3]  # out's rows of a head one run: streamed at once
    slab = np.empty(shape[2] * shape[3] if whole else shape[3], np.float32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            for t in range(shape[2]):
                ot, wt = o + i * os[0] + j * os[1] + t * os[2], w + i * qs[0] + j * qs[1] + t * qs[2]
                st, bt = s + i * ss[0] + j * ss[1] + t * ss[2], b + i * bs[0] + j * bs[1] + t * bs[2]
                for g in range(shape[4]):
                    scale, bias = scales[st + g * ss[3]], biases[bt + g * bs[3]]
                    at, e = t * shape[3] * whole + g * size, 0
                    while e + 16 <= size:
                        _affine8(slab, at + e, q, wt + g * size + e, scale, bias)
                        e += 16
                    for k in range(e, size):
                        slab[at + k] = np.float32(q[wt + g * size + k]) * scale + bias
                if not whole:
                    _stream(out, ot, slab)
            if whole:
                _stream(out, o + i * os[0] + j * os[1], slab)
    _fence()


def _dequantize4_loops(out, o, os, q, w, qs, scales, s, ss, biases, b, bs, shape):  # compiled by numba (_kernels)
    size = shape[3] // shape[4]
    whole = os[2] == shape[3]
    slab = np.empty(shape[2] * shape[3] if whole else shape[3], np.float32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            for t in range(shape[2]):
                ot, wt = o + i * os[0] + j * os[1] + t * os[2], w + i * qs[0] + j * qs[1] + t * qs[2]
                st, bt = s + i * ss[0] + j * ss[1] + t * ss[2], b + i * bs[0] + j * bs[1] + t * bs[2]
                for g in range(shape[4]):
                    scale, bias = scales[st + g * ss[3]], biases[bt + g * bs[3]]
                    at, e, data = t * shape[3] * whole + g * size, 0, wt + g * size // 2
                    while e + 16 <= size:
                        _affine4(slab, at + e, q, data + e // 2, scale, bias)
                        e += 16
                    for k in range(e // 2, size // 2):  # two a byte, the low four bits first
                        slab[at + 2 * k] = np.float32(q[data + k] & np.uint8(15)) * scale + bias
                        slab[at + 2 * k + 1] = np.float32(q[data + k] >> np.uint8(4)) * scale + bias
                if not whole:
                    _stream(out, ot, slab)
            if whole:
                _stream(out, o + i * os[0] + j * os[1], slab)
    _fence()


def _widen_loops(out, o, os, bits, h, hs, table, shape):  # compiled by numba (_kernels)
    whole = os[2] == shape[3]
    slab = np.empty(shape[2] * shape[3] if whole else shape[3], np.float32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            if whole and hs[2] == shape[3]:  # a head's tokens one run in and out: one loop
                ht, n = h + i * hs[0] + j * hs[1], shape[2] * shape[3]
                e = 0
                while e + 16 <= n:
                    _widen16(slab, e, bits, ht + e)
                    e += 16
                for k in range(e, n):
                    slab[k] = table[bits[ht + k]]
                _stream(out, o + i * os[0] + j * os[1], slab)
                continue
            for t in range(shape[2]):
                ot, ht = o + i * os[0] + j * os[1] + t * os[2], h + i * hs[0] + j * hs[1] + t * hs[2]
                line, data = slab[t * shape[3] : (t + 1) * shape[3]] if whole else slab, bits[ht : ht + shape[3]]
                for e in range(shape[3]):
                    line[e] = table[data[e]]
                if not whole:
                    _stream(out, ot, line)
            if whole:
                _stream(out, o + i * os[0] + j * os[1], slab)
    _fence()


def _stream_loops(out, at, line):  # compiled by numba (_kernels)
    """out[at:at + len(line)] = line, by non-temporal stores of 64 bytes where `out` is aligned to
    them, plain stores before and after. Why: a converted load writes a whole working cache it
    will not read back soon; a plain store first reads each line of it from memory (a
    read-for-ownership), a non-temporal one does not. Measured here (`/tmp/s14/writes.py`, a
    scratch script: 189 MB of float32 from the CPU's cache into memory used before, 2 threads):
    plain stores 11.1 ms, memcpy 13.3, non-temporal 5.1."""
    n = line.shape[0]
    head = min(n, ((-(out.ctypes.data + at * 4)) & 63) // 4)
    for e in range(head):
        out[at + e] = line[e]
    e = head
    while e + 16 <= n:
        _store64(out, at + e, line, e)
        e += 16
    for k in range(e, n):
        out[at + k] = line[k]


# Many arrays at a call, from one buffer (block_files.Sink's scratch: a block file's arrays, a
# megabyte of them): the outputs in a list, a row of `rows` each (_row says what it holds). A
# call per array cost about 3 us of Python's time under the GIL, 960 of them for a 4K-token
# agent of the default model.


def _dequantize8_rows_loops(outs, rows, q, f):  # compiled by numba (_kernels)
    for r in range(rows.shape[0]):
        x = rows[r]
        _dequantize8(outs[x[0]], x[1], x[2:6], q, x[6], x[7:11], f, x[11], x[12:16], f, x[16], x[17:21], x[21:26])


def _dequantize4_rows_loops(outs, rows, q, f):  # compiled by numba (_kernels)
    for r in range(rows.shape[0]):
        x = rows[r]
        _dequantize4(outs[x[0]], x[1], x[2:6], q, x[6], x[7:11], f, x[11], x[12:16], f, x[16], x[17:21], x[21:26])


def _widen_rows_loops(outs, rows, bits, table):  # compiled by numba (_kernels)
    for r in range(rows.shape[0]):
        x = rows[r]
        _widen(outs[x[0]], x[1], x[2:6], bits, x[6], x[7:11], table, x[21:25])


ROW = 26
"""A row of `rows`: the output's index in `outs`, then each array's place and 4 strides (out, q or
the float16 bits, scales, biases: 5 numbers each), then out's shape and its groups a row."""


def row(out: int, operands: list[tuple[int, np.ndarray]], shape: list[int]) -> np.ndarray:
    """A row of `rows` for `dequantize_rows` (operands: out, q, scales, biases) or `widen_rows`
    (out, bits), each as (place, strides in elements), places in the memory the call is given."""
    x = np.zeros(ROW, np.int64)
    x[0] = out
    for k, (place, steps) in enumerate(operands):
        x[1 + 5 * k], x[2 + 5 * k : 6 + 5 * k] = place, steps
    x[21 : 21 + len(shape)] = shape
    return x


def dequantize_rows(outs: Any, rows: np.ndarray, memory: np.ndarray, bits: int) -> None:
    """`dequantize` of each row's arrays: out from `outs` (made by `outputs`), q from `memory`
    (bytes), scales and biases from it viewed as float32; their places in elements."""
    kernels = _kernels()
    if kernels:
        kernels[f"dequantize{bits}_rows"](outs, rows, memory, memory.view(np.float32))
        return
    f32 = memory.view(np.float32)
    for x in rows:
        dequantize((outs[x[0]], x[1], x[2:6]), (memory, x[6], x[7:11]), (f32, x[11], x[12:16]), (f32, x[16], x[17:21]), x[21:26], bits)


def widen_rows(outs: Any, rows: np.ndarray, memory: np.ndarray) -> None:
    """`widen` of each row's arrays: out from `outs`, the float16 bits from `memory` as uint16."""
    kernels = _kernels()
    bits = memory.view(np.uint16)
    if kernels:
        kernels["widen_rows"](outs, rows, bits, _WIDE)
        return
    for x in rows:
        widen((outs[x[0]], x[1], x[2:6]), (bits, x[6], x[7:11]), x[21:25])


def outputs(arrays: list[np.ndarray]) -> Any:
    """The list of outputs the row kernels take (contiguous 1-D float32 arrays): numba's typed
    list where it is installed."""
    kernels = _kernels()
    return kernels["List"](arrays) if kernels else list(arrays)


# what the kernels call, made first by _kernels: the per-array kernels (called by the row
# kernels), _stream, and the intrinsics (_intrinsics)
_dequantize8 = _dequantize4 = _widen = _stream = None
_store64 = _fence = _widen16 = _affine8 = _affine4 = None


def _intrinsics(numba: Any) -> tuple[Any, ...]:
    """LLVM code for what numba's loops did slower (kbench2 above, one thread: 8 bits by numba's
    loop over a row 22.4 ms, by `_affine8` 17.1; float16 through the table 18.8, by `_widen16` 13.2):
    - `_store64(out, i, line, k)`: the 16 float32 line[k:k + 16] to out[i:i + 16], out 64-byte
      aligned there, by one non-temporal store (LLVM's `!nontemporal`: a hint, a plain store
      where the CPU has none);
    - `_fence()`: a full memory fence, so that the streamed stores are done before the thread
      that waits on this one reads them;
    - `_widen16(out, i, bits, k)`: 16 float16 (their bits) to float32 by the CPU's conversion;
    - `_affine8`, `_affine4` `(out, i, q, k, scale, bias)`: 16 codes times scale plus bias."""
    from llvmlite import ir
    from numba.core.extending import intrinsic
    t = numba.types

    @intrinsic
    def store64(typingctx, out, i, line, k):
        def codegen(context, builder, signature, args):
            into = context.make_array(signature.args[0])(context, builder, args[0])
            source = context.make_array(signature.args[2])(context, builder, args[2])
            vector = ir.VectorType(ir.FloatType(), 16)
            value = builder.load(builder.bitcast(builder.gep(source.data, [args[3]]), vector.as_pointer()), align=4)
            store = builder.store(value, builder.bitcast(builder.gep(into.data, [args[1]]), vector.as_pointer()), align=64)
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()
        return t.void(out, i, line, k), codegen

    @intrinsic
    def widen16(typingctx, out, i, bits, k):
        def codegen(context, builder, signature, args):
            into = context.make_array(signature.args[0])(context, builder, args[0])
            source = context.make_array(signature.args[2])(context, builder, args[2])
            i16, i32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(32), 16)
            h = builder.load(builder.bitcast(builder.gep(source.data, [args[3]]), i16.as_pointer()), align=2)
            f = builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(ir.FloatType(), 16))
            w = builder.zext(h, i32)
            splat = lambda v: ir.Constant(i32, [v] * 16)  # noqa: E731
            # a signaling NaN comes out quiet from the CPU's conversion, as it is from numpy's: put its bit back
            signaling = builder.and_(builder.icmp_unsigned("==", builder.and_(w, splat(0x7E00)), splat(0x7C00)),
                                     builder.icmp_unsigned("!=", builder.and_(w, splat(0x3FF)), splat(0)))
            x = builder.bitcast(f, i32)
            x = builder.select(signaling, builder.and_(x, splat(~0x400000 & 0xFFFFFFFF)), x)
            builder.store(x, builder.bitcast(builder.gep(into.data, [args[1]]), i32.as_pointer()), align=4)
            return context.get_dummy_value()
        return t.void(out, i, bits, k), codegen

    def affine(bits: int):
        """16 codes of `bits` (8: a byte each; 4: two a byte, the low four bits first) from q[k]
        on, each as float32 times `scale` plus `bias` (a multiply, then an add: no fused
        multiply-add, as numpy rounds), to out[i:i + 16]."""
        @intrinsic
        def codes(typingctx, out, i, q, k, scale, bias):
            def codegen(context, builder, signature, args):
                into = context.make_array(signature.args[0])(context, builder, args[0])
                source = context.make_array(signature.args[2])(context, builder, args[2])
                u8, f32 = ir.IntType(8), ir.VectorType(ir.FloatType(), 16)
                at = builder.bitcast(builder.gep(source.data, [args[3]]), ir.VectorType(u8, 2 * bits).as_pointer())  # 16 codes
                packed = builder.load(at, align=1)
                if bits == 4:
                    low = builder.and_(packed, ir.Constant(packed.type, [15] * 8))
                    high = builder.lshr(packed, ir.Constant(packed.type, [4] * 8))
                    packed = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 16),
                                                                           [n // 2 + 8 * (n % 2) for n in range(16)]))
                x = builder.uitofp(packed, f32)
                splat = lambda v: builder.shuffle_vector(  # noqa: E731
                    builder.insert_element(ir.Constant(f32, ir.Undefined), v, ir.Constant(ir.IntType(32), 0)),
                    ir.Constant(f32, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
                x = builder.fadd(builder.fmul(x, splat(args[4])), splat(args[5]))
                builder.store(x, builder.bitcast(builder.gep(into.data, [args[1]]), f32.as_pointer()), align=4)
                return context.get_dummy_value()
            return t.void(out, i, q, k, scale, bias), codegen
        return codes

    @intrinsic
    def fence(typingctx):
        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()
        return t.void(), codegen

    return store64, fence, widen16, affine(8), affine(4)


@functools.cache
def _kernels() -> dict[str, Callable[..., None]]:
    """The compiled kernels, or {} where numba is missing. Compiled once (numba's cache keeps
    them beside this file for the next process: a few seconds the first time, a fraction of one
    after); Caches compiles them at start where it will need them. The per-array kernels are
    module globals, set here before the row kernels that call them are compiled."""
    try:
        import numba
        from numba.typed import List
    except ImportError:
        log.info("numba is not installed: quantized blocks are dequantized by numpy, 2-3x slower")
        return {}
    try:
        kernels = _compile(numba, List)
    except Exception as e:  # noqa: BLE001 - a compiler that fails here (a CPU LLVM cannot target) leaves numpy's
        log.warning("numba could not compile the dequantization kernels (%s): numpy does it, 2-3x slower", e)
        return {}
    return kernels


def _compile(numba: Any, List: Any) -> dict[str, Callable[..., None]]:
    """_kernels' work: what the kernels call first (module globals), then the kernels."""
    global _dequantize8, _dequantize4, _widen, _stream, _store64, _fence, _widen16, _affine8, _affine4
    i64, steps = numba.int64, numba.int64[::1]
    f32, u8, u16 = ((t[::1], i64, steps) for t in (numba.float32, numba.uint8, numba.uint16))  # Operands
    one = numba.void(*f32, *u8, *f32, *f32, steps)
    jit = functools.partial(numba.njit, nogil=True, cache=True)
    _store64, _fence, _widen16, _affine8, _affine4 = _intrinsics(numba)
    _stream = jit(numba.void(numba.float32[::1], i64, numba.float32[::1]))(_stream_loops)
    _dequantize8, _dequantize4 = jit(one)(_dequantize8_loops), jit(one)(_dequantize4_loops)
    _widen = jit(numba.void(*f32, *u16, numba.float32[::1], steps))(_widen_loops)
    outs, rows = numba.types.ListType(numba.float32[::1]), numba.int64[:, ::1]
    many = numba.void(outs, rows, numba.uint8[::1], numba.float32[::1])
    kernels = {
        "dequantize8": _dequantize8, "dequantize4": _dequantize4, "widen": _widen,
        "dequantize8_rows": jit(many)(_dequantize8_rows_loops), "dequantize4_rows": jit(many)(_dequantize4_rows_loops),
        "widen_rows": jit(numba.void(outs, rows, numba.uint16[::1], numba.float32[::1]))(_widen_rows_loops),
        "List": List,
    }
    kernels["List"]([np.zeros(1, np.float32)])  # numba compiles the typed list's methods at its first use
    return kernels


_local = threading.local()


def _scratch(shape: tuple[int, ...], dtype: Any, count: int = 1, slot: int = 0) -> list[np.ndarray]:
    """`count` arrays of `shape` in this thread's scratch memory `slot`, reused from call to call:
    fresh memory costs page faults (on this VM more than the work done in it)."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    buffers = _local.__dict__.setdefault("scratch", {})
    if slot not in buffers or len(buffers[slot]) < n * count:
        buffers[slot] = np.empty(n * count, np.uint8)
    return [buffers[slot][i * n : (i + 1) * n].view(dtype).reshape(shape) for i in range(count)]
