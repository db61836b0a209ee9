"""The store: names, atomic transcripts, KV blocks written once, checked before use, collected when unreferenced."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache

from mcp_semantic.block_pool import Storage, array_names, cut_blocks
from mcp_semantic.cache_build import reconstruct
from mcp_semantic.cache_kinds import Layout
from mcp_semantic.block_files import host_block
from mcp_semantic.store import NAME_RULE, Agent, InvalidName, KVRecord, Store, Writer, check_name
from mcp_semantic.sqlite_store import SQLiteStore

EXACT = Storage("fp", "float32")
B = 4  # tokens per block in these tests


def layout(layers: int = 2, head_dim: int = 4, dtype: mx.Dtype = mx.float32) -> Layout:
    return Layout.full_attention(layers, 2, head_dim, dtype)


def names(storage: Storage = EXACT, layers: int = 2) -> set[str]:
    """The arrays a block of `layers` layers holds: what the store checks a file against."""
    return array_names(layout(layers), storage)


def save(store: Store, name: str, cache: list[KVCache], tokens: list[int], storage: Storage = EXACT, block_tokens: int = B) -> int:
    """What the engine does: cut the cache into blocks, hand them and the list to the store."""
    blocks = cut_blocks(layout(len(cache), cache[0].keys.shape[3]), cache, tokens, storage, block_tokens)
    return store.commit_kv(name, KVRecord([b.id for b in blocks], tokens), [host_block(b) for b in blocks], storage)


def load(store: Store, name: str, storage: Storage = EXACT, layers: int = 2, head_dim: int = 4,
         block_tokens: int = B) -> list[KVCache]:
    blocks = []
    record = store.kv_record(name)
    for bid in record.blocks:
        block, problem = store.blocks.read_block(bid, storage, names(storage, layers))
        assert problem is None, problem
        blocks.append(block)
    n = len(record.tokens)
    return reconstruct(layout(layers, head_dim), storage, blocks, n, n, block_tokens)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path: Path):
    """Open a store of each database on a cache dir: SQLite, or a fresh PostgreSQL database
    (a real server, tests/servers.py). What a store does is the same in both."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    opened: list[Store] = []

    def open_(root: Path = tmp_path) -> Store:
        from mcp_semantic.postgres import PostgresStore

        store = SQLiteStore(root) if url is None else PostgresStore(root, url)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        if getattr(store, "pool", None) is not None:
            store.pool.close()


def make_cache(n: int, layers: int = 2) -> list[KVCache]:
    cache = []
    for i in range(layers):
        c = KVCache()
        k = mx.arange(n, dtype=mx.float32)[None, None, :, None] + mx.zeros((1, 2, n, 4)) + 100 * i
        c.update_and_fetch(k, -k)
        cache.append(c)
    return cache


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 64, "0", "a.."])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "x" * 65, "-a", "a\x00", "\u0430", "a b"])
def test_bad_names_name_the_rule(name: str) -> None:
    with pytest.raises(InvalidName, match="rule"):
        check_name(name)


@given(st.text(max_size=80))
def test_any_accepted_name_is_a_plain_file_name(name: str) -> None:
    try:
        check_name(name)
    except InvalidName:
        return
    assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
    assert Path(name).name == name and name not in (".", "..")


def raw(store: Store, sql: str) -> None:
    """Run SQL on the store's database behind its back (damage, as a bad disk or hand would do)."""
    if isinstance(store, SQLiteStore):
        store.db.execute(sql)
    else:
        with store.pool.connection() as db:
            db.execute(sql)


def test_transcript_round_trip_and_corruption(open_store) -> None:
    store = open_store()
    agent = Agent("a", system="s", messages=[{"role": "user", "content": "hi \u0000 ünï"}], tokens=[1, 2, 3])
    store.save_agent(agent)
    store.save_agent(Agent("b"))
    assert store.load_agent("a") == agent and store.names() == ["a", "b"] and store.exists("a") and store.count() == 2
    assert open_store().load_agent("a") == agent  # another connection sees the committed row
    raw(store, "UPDATE agents SET messages = '{not json' WHERE name = 'a'")
    assert store.load_agent("a") is None  # unreadable: logged, not raised
    raw(store, "UPDATE agents SET messages = '[{\"role\": \"user\"}]' WHERE name = 'a'")
    assert store.load_agent("a") is None
    assert store.load_agent("b") == Agent("b", created_at=store.load_agent("b").created_at, last_used_at=store.load_agent("b").last_used_at)
    assert store.load_agent("missing") is None and not store.exists("missing")


def test_names_page_in_byte_order(open_store) -> None:
    """list_agents' pages: the same order in both databases (bytes: upper case first), whatever
    PostgreSQL's locale."""
    store = open_store()
    for name in ["b", "B", "a-2", "a.1", "A", "_x"[1:]]:
        store.save_agent(Agent(name))
    assert store.names() == sorted(["b", "B", "a-2", "a.1", "A", "x"])
    assert store.names(after="B", limit=2) == ["a-2", "a.1"] and store.names(after="b") == ["x"]



def test_a_corrupt_database_is_moved_aside_and_the_server_starts(tmp_path: Path, caplog) -> None:
    store = SQLiteStore(tmp_path)
    store.save_agent(Agent("a"))
    save(store, "a", make_cache(4), list(range(4)))
    store.close()
    for extra in tmp_path.glob("store.db-*"):
        extra.unlink()
    (tmp_path / "store.db").write_bytes(b"this is not a database" * 100)
    store = SQLiteStore(tmp_path)
    assert store.names() == []
    assert list(tmp_path.glob("store.db.corrupt-*"))
    assert "transcripts lost for" in caplog.text
    store.save_agent(Agent("b"))
    assert store.names() == ["b"]


def test_stale_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    store.save_agent(Agent("a"))
    save(store, "a", make_cache(4), list(range(4)))
    stale = tmp_path / "blocks" / ".0123.safetensors.abc.tmp"
    stale.write_bytes(b"half")
    store.close()
    store = SQLiteStore(tmp_path)
    assert not stale.exists() and store.load_agent("a") is not None and store.kv_record("a") is not None


def test_blocks_round_trip(open_store) -> None:
    store = open_store()
    cache = make_cache(10)
    written = save(store, "a", cache, list(range(10)))
    record = store.kv_record("a")
    assert record.tokens == list(range(10)) and len(record.blocks) == 3  # 4 + 4 + a partial block of 2
    assert written == sum(store.blocks.path(b).stat().st_size for b in record.blocks)
    rebuilt = load(store, "a")
    for original, c in zip(cache, rebuilt):
        assert c.offset == 10 and mx.array_equal(c.keys, original.keys[..., :10, :]).item()
        assert mx.array_equal(c.values, original.values[..., :10, :]).item()
    assert save(store, "a", cache, list(range(10))) == 0  # nothing new: nothing written


def test_a_shared_prefix_is_stored_once(open_store) -> None:
    store = open_store()
    cache = make_cache(10)
    save(store, "a", cache, list(range(10)))
    files = {p.name for p in store.blocks.dir.iterdir()}
    other = make_cache(10)  # same first 8 positions, then its own
    for c in other:
        c.keys[..., 8:, :] = 7.0
    written = save(store, "b", other, list(range(8)) + [70, 71])
    new = {p.name for p in store.blocks.dir.iterdir()} - files
    assert len(new) == 1 and written == store.blocks.path(Path(new.pop()).stem).stat().st_size  # only b's tail
    total, shared = store.kv_bytes("b")
    assert 0 < shared < total and store.kv_bytes("a")[1] == shared
    assert mx.array_equal(load(store, "b")[0].keys[..., 8:, :], mx.full((1, 2, 2, 4), 7.0)).item()


def test_gc_removes_exactly_the_unreferenced_blocks(open_store) -> None:
    store = open_store()
    save(store, "a", make_cache(10), list(range(10)))
    first = store.kv_record("a")
    store.commit_kv("fork", first, [], EXACT)  # a fork: the same list, no block written
    save(store, "a", make_cache(14), list(range(14)))  # a moves on: a new tail, its old one is the fork's
    assert all(store.blocks.path(b).exists() for b in first.blocks + store.kv_record("a").blocks)

    sizes = {b: store.blocks.path(b).stat().st_size for b in first.blocks}
    freed = store.delete_kv("fork")
    only_fork = set(first.blocks) - set(store.kv_record("a").blocks)
    assert only_fork == {first.blocks[-1]} and freed == sizes[first.blocks[-1]]
    assert not store.blocks.path(first.blocks[-1]).exists()
    assert {p.stem for p in store.blocks.dir.iterdir()} == set(store.kv_record("a").blocks)
    assert load(store, "a")[1].offset == 14

    store.save_agent(Agent("a"))
    freed = store.delete_agent("a")
    assert freed > 0 and list(store.blocks.dir.iterdir()) == [] and store.kv_record("a") is None


def test_a_commit_waits_for_blocks_it_does_not_have(open_store, caplog) -> None:
    store = open_store()
    save(store, "a", make_cache(6), list(range(6)))
    before = store.kv_record("a")
    blocks = cut_blocks(layout(), make_cache(10), list(range(10)), EXACT, B)
    store.commit_kv("a", KVRecord([b.id for b in blocks], list(range(10))), [host_block(blocks[0])], EXACT)
    assert store.kv_record("a") == before and "not saved" in caplog.text  # the old list stays whole


def test_unreferenced_blocks_and_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    """What a crash between the block files and the commit of the list leaves."""
    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(6), list(range(6)))
    kept = {p.name for p in store.blocks.dir.iterdir()}
    orphans = cut_blocks(layout(), make_cache(9), list(range(100, 109)), EXACT, B)
    for block in orphans:  # written, never committed
        store.commit_kv("x", KVRecord([block.id], block.tokens), [host_block(block)], EXACT)
    store.db.execute("DELETE FROM kv WHERE agent = 'x'")
    (store.blocks.dir / ".abc.safetensors.tmp").write_bytes(b"half")
    store.close()
    store = SQLiteStore(tmp_path)
    assert {p.name for p in store.blocks.dir.iterdir()} == kept
    assert load(store, "a")[0].offset == 6


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[: len(b) // 2], "unreadable"),
        (lambda b: b"", "unreadable"),
        (lambda b: b"\x00" * len(b), "unreadable"),
        (lambda b: b.replace(b'"tokens":"[4,5', b'"tokens":"[9,5'), "does not hold the tokens"),
        (lambda b: b.replace(b"mcp-semantic-block/3", b"mcp-semantic-block/9"), "format"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 0x10]) + b[-4:], "checksum"),  # one flipped bit in the data
    ],
)
def test_damaged_blocks_are_misses(tmp_path: Path, damage, why: str) -> None:
    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(6), list(range(6)))
    bid = store.kv_record("a").blocks[1]
    path = store.blocks.path(bid)
    damaged = damage(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    block, problem = store.blocks.read_block(bid, EXACT, names())
    assert block is None and why in problem and path.name in problem
    assert not path.exists()  # deleted: the next save of an agent holding it writes it again
    assert save(store, "a", make_cache(6), list(range(6))) > 0 and store.blocks.read_block(bid, EXACT, names())[0] is not None


def test_foreign_blocks_are_misses_and_go(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    for storage, n_layers, why in [
        (Storage("another", "float32"), 3, "another model or precision"),
        (Storage("fp", "float32", 16), 3, "another model or precision"),
        (Storage("fp", "bfloat16"), 3, "another model or precision"),  # another dtype
        (EXACT, 2, "other arrays than the model's cache"),  # another layer count
    ]:
        save(store, "a", make_cache(5, layers=3), list(range(5)))
        bid = store.kv_record("a").blocks[0]
        assert why in store.blocks.read_block(bid, storage, names(storage, n_layers))[1]
        assert not store.blocks.path(bid).exists()  # gone: the next save writes it anew
        store.delete_kv("a")
    assert "missing" in store.blocks.read_block("0" * 32, EXACT, names(EXACT, 3))[1]
    with pytest.raises(ValueError, match="invalid block id"):
        store.blocks.path("../../etc/passwd")


def test_name_rule_is_the_published_one() -> None:
    assert NAME_RULE == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def test_blocks_are_copies_the_cache_can_move_on_from(tmp_path: Path) -> None:
    """The engine keeps using a cache after its blocks are cut; the blocks must not change."""
    store = SQLiteStore(tmp_path)
    cache = make_cache(10)
    blocks = cut_blocks(layout(), cache, list(range(10)), EXACT, B)
    for c in cache:  # trim and overwrite positions the blocks cover
        c.trim(5)
        c.update_and_fetch(mx.full((1, 2, 3, 4), 7.0), mx.full((1, 2, 3, 4), 7.0))
    mx.eval([c.state for c in cache])
    store.commit_kv("a", KVRecord([b.id for b in blocks], list(range(10))), [host_block(b) for b in blocks], EXACT)
    assert mx.array_equal(load(store, "a")[1].keys, make_cache(10)[1].keys[..., :10, :]).item()


def test_bfloat16_round_trip(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    c = KVCache()
    k = mx.random.normal((1, 2, 6, 4)).astype(mx.bfloat16)
    c.update_and_fetch(k, -k)
    storage = Storage("fp", "bfloat16")
    save(store, "a", [c], list(range(6)), storage)
    rebuilt = load(store, "a", storage, 1)
    assert rebuilt[0].keys.dtype == mx.bfloat16 and mx.array_equal(rebuilt[0].values[..., :6, :], -k).item()


def test_writer_runs_jobs_in_order_and_waits(caplog) -> None:
    writer = Writer()
    done: list[int] = []
    for n in (3, 4, 5):
        writer.put("a", lambda n=n: done.append(n))
    writer.put("b", lambda: 1 / 0)  # a failing job is logged; the writer goes on
    writer.put("b", lambda: done.append(6))
    writer.wait()
    assert done == [3, 4, 5, 6]  # in order, and past the failing job
    assert "could not save" in caplog.text and writer.take_error("b") and writer.take_error("b") is None
    writer.close()


@pytest.mark.parametrize("bits, ratio, tolerance", [(16, 0.55, 1e-2), (8, 0.32, 5e-2), (4, 0.2, 0.5)])
def test_kv_bits_store_smaller_and_close(tmp_path: Path, bits: int, ratio: float, tolerance: float) -> None:
    store = SQLiteStore(tmp_path)
    c = KVCache()
    k = mx.random.normal((1, 2, 300, 64))
    c.update_and_fetch(k, -k)
    small = Storage("fp", "float32", bits)
    lossless = save(store, "exact", [c], list(range(300)), block_tokens=256)
    smaller = save(store, "small", [c], list(range(300)), small, block_tokens=256)
    assert smaller < ratio * lossless
    rebuilt = load(store, "small", small, 1, 64, 256)[0]
    assert rebuilt.keys.dtype == mx.float32 and rebuilt.offset == 300
    assert mx.abs(rebuilt.keys - k).max().item() < tolerance
    assert mx.abs(rebuilt.values + k).max().item() < tolerance


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_a_block_file_is_a_miss_or_the_same_data(tmp_path: Path, data) -> None:
    """Fuzzing the parser: truncations, flipped bytes and junk never crash a read, and a read
    that succeeds gives back exactly the data that was written (the checksum's promise)."""
    root = tmp_path / data.draw(st.uuids()).hex
    store = SQLiteStore(root)
    cache = make_cache(6)
    save(store, "a", cache, list(range(6)))
    bid = store.kv_record("a").blocks[0]
    path = store.blocks.path(bid)
    raw = bytearray(path.read_bytes())
    action = data.draw(st.sampled_from(["truncate", "flip", "junk"]))
    if action == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = bytearray(data.draw(st.binary(max_size=512)))
    path.write_bytes(bytes(raw))
    block, problem = store.blocks.read_block(bid, EXACT, names())
    if block is None:
        assert problem and path.name in problem
    else:
        assert mx.array_equal(block.arrays["layers.1.keys"], cache[1].keys[..., :4, :]).item()
    store.close()


def test_block_files_are_plain_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    store = SQLiteStore(tmp_path)
    cache = make_cache(6)
    save(store, "a", cache, list(range(6)))
    path = store.blocks.path(store.kv_record("a").blocks[0])
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["format"] == "mcp-semantic-block/3"
        assert (f.get_tensor("layers.1.values") == np.array(cache[1].values[..., :4, :])).all()
    arrays = mx.load(str(path))
    assert mx.array_equal(arrays["layers.0.keys"], cache[0].keys[..., :4, :]).item()


@pytest.mark.parametrize("old", [b"mcp-semantic-block/1", b"mcp-semantic-block/2"])
def test_blocks_of_older_formats_are_a_clear_miss(tmp_path: Path, old: bytes) -> None:
    """Formats /1 (a CRC-32 per array) and /2 (one checksum over all the data) are not read: a
    miss that says so, and the file goes."""
    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(4), list(range(4)))
    bid = store.kv_record("a").blocks[0]
    path = store.blocks.path(bid)
    path.write_bytes(path.read_bytes().replace(b"mcp-semantic-block/3", old))
    block, problem = store.blocks.read_block(bid, EXACT, names())
    assert block is None and f"'{old.decode()}', expected mcp-semantic-block/3" in problem and not path.exists()


def test_read_blocks_reads_many_and_says_which_failed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    cache = make_cache(20)
    save(store, "a", cache, list(range(20)))
    ids = store.kv_record("a").blocks
    damaged = store.blocks.path(ids[2])
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1
    damaged.write_bytes(bytes(raw))
    results = store.blocks.read_blocks(ids + ["0" * 32], EXACT, names())
    assert [b is not None for b, _ in results] == [True, True, False, True, True, False]
    assert "checksum" in results[2][1] and "missing" in results[5][1] and not damaged.exists()
    for i in (0, 1, 3, 4):
        assert mx.array_equal(results[i][0].arrays["layers.1.keys"], cache[1].keys[..., 4 * i : 4 * i + 4, :]).item()


def test_a_branch_is_saved_counted_and_collected_with_its_list(open_store) -> None:
    """A record's branch (the partial block where a recurrent model's turn began) is written with
    the list, counted as a reference, and its file goes when no list names it."""
    store = open_store()
    cache = make_cache(10)
    blocks = cut_blocks(layout(), cache, list(range(10)), EXACT, B)
    (branch,) = cut_blocks(layout(), cache, list(range(6)), EXACT, B, skip=[blocks[0].id])
    record = KVRecord([b.id for b in blocks], list(range(10)), branch.id, 6)
    store.commit_kv("a", record, [host_block(b) for b in (*blocks, branch)], EXACT)
    assert store.kv_record("a") == record
    assert store.blocks.path(branch.id).exists() and store.kv_bytes("a")[0] > sum(store.blocks.size(b.id) for b in blocks)
    store.commit_kv("a", KVRecord(record.blocks, record.tokens), [], EXACT)  # the next list has no branch
    assert not store.blocks.path(branch.id).exists() and store.blocks.path(blocks[0].id).exists()


def test_a_store_of_before_branches_opens_and_reads(tmp_path: Path) -> None:
    """store.db of version 0.1 has no `branch` column: it is added, and the lists read as they were."""
    import sqlite3

    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(6), list(range(6)))
    before = store.kv_record("a")
    store.close()
    db = sqlite3.connect(tmp_path / "store.db")
    db.executescript("CREATE TABLE old AS SELECT agent, blocks, tokens FROM kv; DROP TABLE kv; ALTER TABLE old RENAME TO kv;")
    db.close()
    store = SQLiteStore(tmp_path)
    assert store.kv_record("a") == before and before.branch is None
    assert load(store, "a")[0].offset == 6


def test_short_reads_are_read_on_to_the_end(tmp_path: Path, monkeypatch) -> None:
    """A read may return fewer bytes than asked (the OS's right): what is missing is read on,
    into the right places, by every way the store reads (arrays into buffers of their own,
    one file whole, a working cache's regions)."""
    import os

    from mcp_semantic import block_files

    real = os.preadv

    def short(fd: int, buffers: list, offset: int) -> int:
        return real(fd, [memoryview(buffers[0]).cast("B")[:3]], offset)  # 3 bytes at most

    store = SQLiteStore(tmp_path)
    cache = make_cache(10)
    save(store, "a", cache, list(range(10)))
    monkeypatch.setattr(block_files.os, "preadv", short)
    for original, c in zip(cache, load(store, "a")):
        assert mx.array_equal(c.keys, original.keys[..., :10, :]).item()
        assert mx.array_equal(c.values, original.values[..., :10, :]).item()
    files = store.blocks.open_blocks(store.kv_record("a").blocks, EXACT, names())
    buffer, problems = store.blocks.read_into_one(files, gpu=False)
    whole = store.blocks.blocks_in_one(files, buffer)
    assert problems == [None] * 3 and mx.array_equal(whole[1].arrays["layers.1.values"], cache[1].values[..., 4:8, :]).item()
    out = np.zeros((1, 2, 12, 4), np.float32)  # a working cache's array: each file's tokens go to both heads
    regions = [[(name, [out[0, h, 4 * i : 4 * i + 4] for h in range(2)] if name == "layers.0.keys"
                 else [np.zeros((1, 2, 4, 4), np.float32)]) for name in sorted(names())] for i in range(2)]
    assert store.blocks.fill_blocks(files[:2], regions) == [None, None]
    assert np.array_equal(out[:, :, :8], np.array(cache[0].keys[..., :8, :]))
    store.close()


def test_blocks_read_where_the_os_has_no_preadv(tmp_path: Path, monkeypatch) -> None:
    from mcp_semantic import block_files

    store = SQLiteStore(tmp_path)
    cache = make_cache(10)
    save(store, "a", cache, list(range(10)))
    monkeypatch.delattr(block_files.os, "preadv")
    for original, c in zip(cache, load(store, "a")):
        assert mx.array_equal(c.keys, original.keys[..., :10, :]).item()
    store.close()


def test_targets_that_do_not_fit_are_the_caller_s_error_not_the_file_s(tmp_path: Path) -> None:
    """Targets made on the reading thread (a function of the opened file) that cannot be made
    raise to the caller; the file is not called damaged, nor deleted."""
    store = SQLiteStore(tmp_path)
    save(store, "a", make_cache(4), list(range(4)))
    (bid,) = store.kv_record("a").blocks
    files = store.blocks.open_blocks([bid], EXACT, names())

    def misfit(p):
        raise ValueError(f"a block's arrays of {p.bid} do not fit this cache")

    with pytest.raises(ValueError, match="do not fit this cache"):
        store.blocks.fill_blocks(files, [misfit])
    assert store.blocks.path(bid).exists()
    assert store.blocks.read_block(bid, EXACT, names())[1] is None  # and it reads as before
    store.close()


def test_gc_across_servers_waits_for_a_commit_in_flight(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    """Server B commits a list naming blocks only Redis and A hold (a fork of A's agent) while A
    deletes its own list: A's collection waits for B's commit, then keeps the blocks B's list
    names, in Redis too; a third server reads them. Once no list names them, they go."""
    from mcp_semantic.postgres import PostgresStore

    a, b, c = (PostgresStore(tmp_path / n, postgres_url, redis_url) for n in "abc")
    save(a, "x", make_cache(10), list(range(10)))
    record = a.kv_record("x")
    in_flight, go_on = threading.Event(), threading.Event()
    missing = b.remote.missing

    def slow_missing(ids: list[str]) -> list[str]:  # B is mid-commit, the GC lock held shared
        in_flight.set()
        go_on.wait(10)
        return missing(ids)

    b.remote.missing = slow_missing
    commit = threading.Thread(target=b.commit_kv, args=("y", record, [], EXACT))
    commit.start()
    assert in_flight.wait(10)
    delete = threading.Thread(target=a.delete_kv, args=("x",))
    delete.start()
    delete.join(0.5)
    assert delete.is_alive()  # waiting for B's commit
    go_on.set()
    commit.join(10)
    delete.join(10)
    assert b.kv_record("y") == record and a.kv_record("x") is None
    assert b.remote.missing(record.ids) == []  # still in Redis: y names them
    remote = c.remote_blocks(record.blocks)
    assert set(remote) == set(record.blocks)
    assert all(problem is None for _, problem in c.blocks.read_blocks(record.blocks, EXACT, names(EXACT, 2), remote=remote))
    b.delete_kv("y")
    assert set(b.remote.missing(record.ids)) == set(record.ids)  # no list names them: gone from Redis
    assert not any(b.blocks.path(bid).exists() for bid in record.ids)


def test_a_list_naming_a_block_nowhere_to_be_found_is_not_committed(tmp_path: Path, postgres_url: str, redis_url: str,
                                                                    caplog) -> None:
    """In the shared mode a block may be in Redis rather than here; one in neither leaves the old list."""
    from mcp_semantic.postgres import PostgresStore

    store = PostgresStore(tmp_path, postgres_url, redis_url)
    save(store, "a", make_cache(6), list(range(6)))
    before = store.kv_record("a")
    blocks = cut_blocks(layout(), make_cache(10), list(range(10)), EXACT, B)
    store.commit_kv("a", KVRecord([b.id for b in blocks], list(range(10))), [host_block(blocks[0])], EXACT)
    assert store.kv_record("a") == before and "neither here nor in Redis" in caplog.text
