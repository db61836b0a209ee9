"""Stored K/V into a float32 working cache on the host: numba's kernels against MLX's own
dequantization and cast, and against the numpy fallback, bit for bit, into strided regions."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mcp_semantic import dequantize
from mcp_semantic.block_pool import host_view
from mcp_semantic.cache_build import _host_threads
from mcp_semantic.dequantize import copy_into, dequantize_into

needs_numba = pytest.mark.skipif(not dequantize._kernels(), reason="numba is not installed")


@pytest.fixture(params=["kernels", "numpy"])
def path(request, monkeypatch) -> str:
    """Each test twice: with numba's kernels (where installed), and with the numpy fallback."""
    if request.param == "kernels" and not dequantize._kernels():
        pytest.skip("numba is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(dequantize, "_kernels", lambda: {})
    return request.param


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [64, 32, 128])  # group size 64, 32, and two groups a row
def test_host_dequantization_is_mlx_s(bits: int, head_dim: int, path: str) -> None:
    """dequantize_into gives what mx.dequantize gives, into a strided region, nothing around it
    touched: the region's heads are apart, as in a working cache with room."""
    a = mx.random.normal((1, 3, 40, head_dim), key=mx.random.key(bits + head_dim))
    group = 64 if head_dim % 64 == 0 else 32
    w, scales, biases = mx.quantize(a, group_size=group, bits=bits)
    expected = np.array(mx.dequantize(w, scales, biases, group_size=group, bits=bits))
    target = np.zeros((1, 3, 100, head_dim), np.float32)
    _host_threads().submit(dequantize_into, target[:, :, 30:70, :], *(host_view(x) for x in (w, scales, biases)), bits).result()
    assert np.allclose(target[:, :, 30:70, :], expected, rtol=1e-6, atol=1e-6)
    assert not target[:, :, :30].any() and not target[:, :, 70:].any()


@needs_numba
@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernels_equal_numpy_bit_for_bit(bits: int, monkeypatch) -> None:
    """The compiled loops round as numpy does (a multiply, then an add: no fused multiply-add), on
    inputs that are strided views too (blocks stacked from rows of one buffer)."""
    rng = np.random.default_rng(bits)
    rows = rng.integers(0, 256, (5, 4 * 2 * 30 * 64 // (8 // bits) + 64), dtype=np.uint8)  # a buffer of block files
    w = rows[:, 64:].reshape(5, 4, 2, 30, -1)[:, 0].transpose(1, 0, 2, 3)  # (heads, blocks, tokens, packed), strided
    scales = rng.standard_normal((5, 2, 30, 1), np.float32).transpose(1, 0, 2, 3)
    biases = rng.standard_normal((2, 5, 30, 1), np.float32)
    got, expected = (np.full((2, 5, 40, 64), 7, np.float32) for _ in range(2))
    kernels, calls = dequantize._kernels(), []
    monkeypatch.setattr(dequantize, "_kernels", lambda: {k: lambda *a, k=k: calls.append(k) or kernels[k](*a) for k in kernels})
    dequantize_into(got[:, :, 5:35], w, scales, biases, bits)
    assert calls == [f"dequantize{bits}"]
    dequantize_into(np.zeros((2, 5, 30, 64), np.float32), w, scales[:, ::-1], biases, bits)  # a negative stride: numpy's
    assert calls == [f"dequantize{bits}"]
    monkeypatch.setattr(dequantize, "_kernels", lambda: {})
    dequantize_into(expected[:, :, 5:35], w, scales, biases, bits)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_float16_widening_is_bit_exact_for_every_value(path: str) -> None:
    """copy_into's float16 -> float32 equals numpy's cast and MLX's for all 65,536 float16s
    (subnormals, infinities, NaN payloads), into a strided region, on a copy thread."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(1, 4, 256, 64)
    target = np.zeros((1, 4, 300, 64), np.float32)
    _host_threads().submit(copy_into, target[:, :, 20:276], every).result()
    got = target[:, :, 20:276].view(np.uint32)
    assert np.array_equal(got, every.astype(np.float32).view(np.uint32))
    finite = np.isfinite(every)
    assert np.array_equal(got[finite], np.array(mx.array(every).astype(mx.float32)).view(np.uint32)[finite])
    assert not target[:, :, :20].any() and not target[:, :, 276:].any()


def test_other_shapes_and_dtypes_are_copied_as_they_are(path: str) -> None:
    """What the kernels do not take (a recurrent state of 3 axes, float32 into float32) is numpy's."""
    state = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    out = np.zeros((2, 3, 4), np.float32)
    copy_into(out, state)
    assert np.array_equal(out, state.astype(np.float32))
    same = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    out = np.zeros_like(same)
    copy_into(out, same)
    assert np.array_equal(out, same)


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_arrays_read_into_one_buffer_convert_from_it(bits: int, path: str) -> None:
    """As block_files' Sinks hand them: arrays one after another in one buffer (a block file's
    weight, scales and biases, or float16), each given by a row of its places there, converted
    into two outputs at once (a working cache's keys and values) from token 7 on."""
    from mcp_semantic.cache_build import _steps
    from mcp_semantic.dequantize import dequantize_rows, outputs, row, widen_rows

    a = [mx.random.normal((1, 2, 16, 128), key=mx.random.key(bits + k)) for k in range(2)]
    stored = [mx.quantize(x, group_size=64, bits=bits) if bits != 16 else (x.astype(mx.float16),) for x in a]
    parts = [host_view(x).view(np.uint8).reshape(-1) for s in stored for x in s]
    memory = np.concatenate([np.zeros(8, np.uint8), *parts])  # the arrays from byte 8 on
    places = np.cumsum([8] + [len(p) for p in parts])
    caches = [np.zeros((1, 2, 40, 128), np.float32) for _ in a]
    out = (7 * 128, _steps(caches[0].shape))
    if bits == 16:
        rows = np.stack([row(k, [out, (places[k] // 2, _steps((1, 2, 16, 128)))], [1, 2, 16, 128]) for k in range(2)])
        widen_rows(outputs([c.reshape(-1) for c in caches]), rows, memory)
        expected = [np.array(x.astype(mx.float16).astype(mx.float32)) for x in a]
    else:
        groups = _steps((1, 2, 16, 2))
        rows = np.stack([row(k, [out, (places[3 * k], _steps((1, 2, 16, 128 * bits // 8))), (places[3 * k + 1] // 4, groups),
                                 (places[3 * k + 2] // 4, groups)], [1, 2, 16, 128, 2]) for k in range(2)])
        dequantize_rows(outputs([c.reshape(-1) for c in caches]), rows, memory, bits)
        expected = [np.array(mx.dequantize(*s, group_size=64, bits=bits)) for s in stored]
    for cache, x in zip(caches, expected):
        assert np.allclose(cache[:, :, 7:23], x, rtol=1e-6, atol=1e-6)
        assert not cache[:, :, :7].any() and not cache[:, :, 23:].any()


@needs_numba
@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("shift", [0, 1, 5, 13])  # floats: the output at each alignment to 64 bytes
@pytest.mark.parametrize("apart", [False, True])  # a head's rows one run, or apart (a row at a time)
def test_the_kernels_equal_numpy_in_any_layout(bits: int, shift: int, apart: bool, monkeypatch) -> None:
    """The kernels make rows in the CPU's cache and stream them out by 64-byte stores where the
    output is aligned to them: whatever its alignment, whether a head's tokens are one run or
    not, and rows of float16 not a multiple of 16 long, they write what numpy writes, bit for
    bit, and nothing around it."""
    rng = np.random.default_rng(bits + shift)
    dim, tokens = (72, 41) if bits == 16 else (96, 40)
    width = dim + 5 if apart else dim
    memory = np.full(shift + 3 * 50 * width + 16, 7, np.float32)
    got = memory[shift : shift + 3 * 50 * width].reshape(1, 3, 50, width)
    expected = np.full_like(got, 7)
    a = mx.array(rng.standard_normal((1, 3, tokens, dim), np.float32))
    if bits == 16:
        data = np.array(a.astype(mx.float16))
        convert = lambda out: copy_into(out[:, :, 4 : 4 + tokens, :dim], data)  # noqa: E731
    else:
        stored = [host_view(x) for x in mx.quantize(a, group_size=32, bits=bits)]
        convert = lambda out: dequantize_into(out[:, :, 4 : 4 + tokens, :dim], *stored, bits)  # noqa: E731
    kernels, calls = dequantize._kernels(), []
    monkeypatch.setattr(dequantize, "_kernels", lambda: {k: lambda *x, k=k: calls.append(k) or kernels[k](*x) for k in kernels})
    convert(got)
    assert calls == ["widen" if bits == 16 else f"dequantize{bits}"]
    monkeypatch.setattr(dequantize, "_kernels", lambda: {})
    convert(expected)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert (memory[:shift] == 7).all() and (memory[shift + got.size :] == 7).all()


@needs_numba
def test_kernels_numba_cannot_compile_leave_numpy_s(monkeypatch, caplog) -> None:
    """Where numba fails to compile the kernels, numpy converts, with a warning: never a crash."""
    def broken(*args):
        raise RuntimeError("no target for this CPU")

    dequantize._kernels.cache_clear()
    monkeypatch.setattr(dequantize, "_compile", broken)
    try:
        assert dequantize._kernels() == {}
        assert "could not compile the dequantization kernels" in caplog.text
        data = np.arange(64, dtype=np.float16).reshape(1, 1, 1, 64)
        out = np.zeros((1, 1, 1, 64), np.float32)
        copy_into(out, data)
        assert np.array_equal(out, data.astype(np.float32))
    finally:
        monkeypatch.undo()
        dequantize._kernels.cache_clear()
    assert dequantize._kernels()
