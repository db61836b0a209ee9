"""Block files read and checked by one native call per file (checked_read), against the Python
calls it replaces: the same bytes in the same places, the same damage found and named, and the
Python calls taking over where the native loop cannot go on."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mcp_semantic import block_files, checked_read
from mcp_semantic.sqlite_store import SQLiteStore
from tests.test_store import EXACT, load, make_cache, names, save

needs_native = pytest.mark.skipif(not checked_read.available(), reason="numba (or the xxhash wheel's XXH3) is missing")


@pytest.fixture(params=["native", "python"])
def read_path(request, monkeypatch) -> list[int] | None:
    """Each test twice: read by the native loop (where it can be had), and by Python's calls.
    Gives the list the native calls' results go to (checked_read.OK is -1), or None."""
    calls: list[int] = []
    if request.param == "native":
        if not checked_read.available():
            pytest.skip("numba (or the xxhash wheel's XXH3) is missing")
        real = checked_read.read_checked
        monkeypatch.setattr(checked_read, "read_checked", lambda *a: calls.append(real(*a)) or calls[-1])
        return calls
    monkeypatch.setattr(checked_read, "available", lambda: False)
    return None


def working_cache_targets(files: list, n_tokens: int) -> tuple[dict[str, np.ndarray], list]:
    """A working cache's arrays (1, heads, room, head_dim), and for each file its arrays' places
    in them: rows of heads at the file's tokens, as cache_build makes them."""
    cache = {name: np.full((1, 2, n_tokens + 3, 4), 7, np.float32) for name in sorted(names())}
    targets, at = [], 0
    for p in files:
        targets.append([(name, cache[name][0, :, at : at + len(p.tokens)]) for name in sorted(names())])
        at += len(p.tokens)
    return cache, targets


def test_blocks_read_by_either_path_are_the_same(tmp_path: Path, read_path: list[int] | None, monkeypatch) -> None:
    """Arrays into buffers of their own, files whole into one buffer, and a working cache's heads:
    each byte where it belongs, nothing around it touched; whatever the size of a native read
    (an array each, or all at once)."""
    store = SQLiteStore(tmp_path)
    cache = make_cache(10)
    save(store, "a", cache, list(range(10)))
    record = store.kv_record("a")
    for group in (1, checked_read.GROUP_BYTES, 1 << 30):
        monkeypatch.setattr(checked_read, "GROUP_BYTES", group)
        for original, c in zip(cache, load(store, "a")):
            assert mx.array_equal(c.keys, original.keys[..., :10, :]).item()
            assert mx.array_equal(c.values, original.values[..., :10, :]).item()
        files = store.blocks.open_blocks(record.blocks, EXACT, names())
        buffer, problems = store.blocks.read_into_one(files, gpu=False)
        whole = store.blocks.blocks_in_one(files, buffer)
        assert problems == [None] * 3 and mx.array_equal(whole[2].arrays["layers.1.keys"], cache[1].keys[..., 8:10, :]).item()
        arrays, targets = working_cache_targets(files, 10)
        assert store.blocks.fill_blocks(files, targets) == [None] * 3
        for i, original in enumerate(cache):
            assert np.array_equal(arrays[f"layers.{i}.keys"][:, :, :10], np.array(original.keys[..., :10, :]))
            assert np.array_equal(arrays[f"layers.{i}.values"][:, :, :10], np.array(original.values[..., :10, :]))
            assert (arrays[f"layers.{i}.keys"][:, :, 10:] == 7).all()
    if read_path is not None:
        assert len(read_path) == 3 * 3 * 3 and set(read_path) == {checked_read.OK}  # the native loop read every file
    store.close()


def test_a_damaged_array_is_found_and_named_by_either_path(tmp_path: Path, read_path: list[int] | None) -> None:
    """One flipped bit in one array's data: the file is a miss naming that array, and deleted;
    the other files read."""
    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(10), list(range(10)))
    record = store.kv_record("a")
    files = store.blocks.open_blocks(record.blocks, EXACT, names())
    p = files[1]
    _, _, begin, end = p.layout["layers.1.keys"]
    with open(p.path, "r+b") as f:
        f.seek(p.start + (begin + end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    _, targets = working_cache_targets(files, 10)
    problems = store.blocks.fill_blocks(files, targets)
    assert problems[0] is None and problems[2] is None
    assert "fails its checksum (layers.1.keys)" in problems[1] and p.path.name in problems[1]
    assert not p.path.exists()
    in_file_order = sorted(p.layout, key=lambda name: p.layout[name][2])
    assert read_path is None or sorted(read_path) == [checked_read.OK] * 2 + [in_file_order.index("layers.1.keys")]
    store.close()


@needs_native
def test_a_file_cut_short_after_it_was_opened_is_read_by_python_s_calls(tmp_path: Path, monkeypatch) -> None:
    """The native loop stops at a read that comes short; Python's calls read the file again and
    say what is wrong with it (here: shorter than when it was opened)."""
    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(10), list(range(10)))
    files = store.blocks.open_blocks(store.kv_record("a").blocks, EXACT, names())
    size = files[0].path.stat().st_size
    os.truncate(files[0].path, size - 8)
    calls: list[int] = []
    real = checked_read.read_checked
    monkeypatch.setattr(checked_read, "read_checked", lambda *a: calls.append(real(*a)) or calls[-1])
    fallback = []
    monkeypatch.setattr(block_files, "_fill_group", lambda *a, real=block_files._fill_group: fallback.append(1) or real(*a))
    _, targets = working_cache_targets(files, 10)
    problems = store.blocks.fill_blocks(files, targets)
    assert "shorter than when it was opened" in problems[0] and problems[1:] == [None, None]
    assert sorted(calls) == [checked_read.SHORT, checked_read.OK, checked_read.OK] and fallback
    store.close()


def test_what_the_native_loop_cannot_take_is_left_to_python() -> None:
    """A read-only buffer, or rows that are not contiguous, have no runs: Python's calls then
    raise what is wrong. Rows of a working cache's heads are runs a stride apart."""
    assert checked_read.runs_of([b"read only"]) is None
    assert checked_read.runs_of(np.zeros((2, 4, 4), np.float32)[:, :, :2]) is None
    heads = np.zeros((1, 3, 10, 4), np.float32)[0, :, 2:6]
    runs = checked_read.runs_of(heads)
    assert runs == [(heads.ctypes.data + h * 160, 64) for h in range(3)]
    buffers = [bytearray(5), np.zeros(3, np.float32)]
    assert [n for _, n in checked_read.runs_of(buffers)] == [5, 12]


@needs_native
def test_a_loop_numba_cannot_compile_leaves_python_s_calls(tmp_path: Path, monkeypatch, caplog) -> None:
    """Where numba fails to compile the loop, blocks read by Python's calls, with a warning:
    never a crash."""
    import numba

    def broken(*args, **kwargs):
        raise RuntimeError("no target for this CPU")

    checked_read._kernel.cache_clear()
    monkeypatch.setattr(numba, "njit", broken)
    try:
        assert not checked_read.available()
        assert "could not compile the block-file reader" in caplog.text
        store = SQLiteStore(tmp_path)
        cache = make_cache(6)
        save(store, "a", cache, list(range(6)))
        assert mx.array_equal(load(store, "a")[1].values, cache[1].values[..., :6, :]).item()
        store.close()
    finally:
        monkeypatch.undo()
        checked_read._kernel.cache_clear()
    assert checked_read.available()
