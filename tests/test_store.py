"""The store: names, atomic transcripts, KV files that are checked before use."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache

from mcp_semantic.store import NAME_RULE, MIN_ROOM, Agent, InvalidName, Store, Writer, check_name, room_for, snapshot_kv


def save(store: Store, name: str, cache: list[KVCache], tokens: list[int], fingerprint: str = "fp") -> int:
    return store.write_kv(name, snapshot_kv(cache, tokens, fingerprint))


def make_cache(n: int, layers: int = 2) -> list[KVCache]:
    cache = []
    for i in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.full((1, 2, n, 4), i, mx.float32), mx.full((1, 2, n, 4), -i, mx.float32))
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


def test_transcript_round_trip_and_corruption(tmp_path: Path) -> None:
    store = Store(tmp_path)
    agent = Agent("a", system="s", messages=[{"role": "user", "content": "hi"}], tokens=[1, 2, 3])
    store.save_agent(agent)
    store.save_agent(Agent("b"))
    assert store.load_agent("a") == agent and store.names() == ["a", "b"] and store.exists("a")
    assert Store(tmp_path).load_agent("a") == agent  # another connection sees the committed row
    store.db.execute("UPDATE agents SET messages = '{not json' WHERE name = 'a'")
    assert store.load_agent("a") is None  # unreadable: logged, not raised
    store.db.execute("UPDATE agents SET messages = '[{\"role\": \"user\"}]' WHERE name = 'a'")
    assert store.load_agent("a") is None
    assert store.load_agent("b") == Agent("b", created_at=store.load_agent("b").created_at, last_used_at=store.load_agent("b").last_used_at)
    assert store.load_agent("missing") is None


def test_a_corrupt_database_is_moved_aside_and_the_server_starts(tmp_path: Path, caplog) -> None:
    store = Store(tmp_path)
    store.save_agent(Agent("a"))
    save(store, "a", make_cache(4), list(range(4)))
    store.close()
    for extra in tmp_path.glob("store.db-*"):
        extra.unlink()
    (tmp_path / "store.db").write_bytes(b"this is not a database" * 100)
    store = Store(tmp_path)
    assert store.names() == []
    assert list(tmp_path.glob("store.db.corrupt-*"))
    assert "transcripts lost for: a" in caplog.text
    store.save_agent(Agent("b"))
    assert store.names() == ["b"]


def test_stale_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_agent(Agent("a"))
    save(store, "a", make_cache(4), list(range(4)))
    stale = tmp_path / "agents" / "a" / ".kv.safetensors.abc.tmp"
    stale.write_bytes(b"half")
    Store(tmp_path)
    assert not stale.exists() and Store(tmp_path).load_agent("a") is not None


def test_kv_round_trip_keeps_room_to_grow(tmp_path: Path) -> None:
    store = Store(tmp_path)
    cache = make_cache(10)
    written = save(store, "a", cache, list(range(10)))
    kv, problem = store.load_kv("a", "fp", 2)
    assert problem is None and kv.tokens == list(range(10))
    assert kv.cache[1].offset == 10 and kv.cache[1].keys.shape[2] == room_for(10) == 64
    assert mx.array_equal(kv.cache[1].keys[..., :10, :], cache[1].keys[..., :10, :]).item()
    assert written < 2 * 2 * 64 * 2 * 4 * 4 + 8192  # 2 layers of keys and values, 64 slots, and a header
    before = kv.cache[1].keys
    kv.cache[1].update_and_fetch(mx.zeros((1, 2, 5, 4)), mx.zeros((1, 2, 5, 4)))
    assert kv.cache[1].keys.shape == before.shape  # appended in place of the spare slots, no new buffer


@pytest.mark.parametrize("n, slots", [(1, 64), (32, 64), (100, 160), (1988, 2240), (8000, 9024)])
def test_room_for(n: int, slots: int) -> None:
    assert room_for(n) == slots and room_for(n) - n >= max(MIN_ROOM, n // 8)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[: len(b) // 2], "unreadable"),
        (lambda b: b"", "unreadable"),
        (lambda b: b"\x00" * len(b), "unreadable"),
    ],
)
def test_damaged_kv_files_are_misses(tmp_path: Path, damage, why: str) -> None:
    store = Store(tmp_path)
    save(store, "a", make_cache(5), [1, 2, 3, 4, 5])
    path = store.kv_path("a")
    path.write_bytes(damage(path.read_bytes()))
    kv, problem = store.load_kv("a", "fp", 2)
    assert kv is None and why in problem and "kv.safetensors" in problem


def test_foreign_or_inconsistent_kv_files_are_misses(tmp_path: Path) -> None:
    store = Store(tmp_path)
    save(store, "a", make_cache(5), [1, 2, 3, 4, 5])
    kv, problem = store.load_kv("a", "another-model", 2)
    assert kv is None and "another model" in problem
    snap = snapshot_kv(make_cache(5), [1, 2, 3], "fp")  # holds 3 positions, then says 300 tokens
    snap.metadata.update(tokens=str(list(range(300))), n_tokens="300")
    store.write_kv("a", snap)
    kv, problem = store.load_kv("a", "fp", 2)
    assert kv is None and "positions" in problem
    assert store.load_kv("missing", "fp", 2) == (None, None)


def test_link_kv_shares_bytes_and_survives_source_rewrites(tmp_path: Path) -> None:
    store = Store(tmp_path)
    save(store, "a", make_cache(5), [1, 2, 3, 4, 5])
    store.link_kv("a", "b")
    save(store, "a", make_cache(7), list(range(7)))  # replaces a's file, b keeps the old one
    kv_b, _ = store.load_kv("b", "fp", 2)
    kv_a, _ = store.load_kv("a", "fp", 2)
    assert kv_b.tokens == [1, 2, 3, 4, 5] and kv_a.tokens == list(range(7))


def test_name_rule_is_the_published_one() -> None:
    assert NAME_RULE == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def test_wrong_layer_count_is_a_miss(tmp_path: Path) -> None:
    store = Store(tmp_path)
    save(store, "a", make_cache(5, layers=3), [1, 2, 3, 4, 5])
    kv, problem = store.load_kv("a", "fp", 2)
    assert kv is None and "3 layers, the model 2" in problem


def test_snapshot_is_not_changed_by_later_updates(tmp_path: Path) -> None:
    """The engine keeps using a cache after handing its snapshot to the writer."""
    store = Store(tmp_path)
    cache = make_cache(10)
    snap = snapshot_kv(cache, list(range(10)), "fp")
    for c in cache:  # trim and overwrite positions the snapshot covers
        c.trim(5)
        c.update_and_fetch(mx.full((1, 2, 3, 4), 7.0), mx.full((1, 2, 3, 4), 7.0))
    mx.eval([c.state for c in cache])
    store.write_kv("a", snap)
    kv, _ = store.load_kv("a", "fp", 2)
    assert mx.array_equal(kv.cache[1].keys[..., :10, :], mx.full((1, 2, 10, 4), 1.0)).item()


def test_bfloat16_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    c = KVCache()
    k = mx.random.normal((1, 2, 6, 4)).astype(mx.bfloat16)
    c.update_and_fetch(k, -k)
    save(store, "a", [c], list(range(6)))
    kv, problem = store.load_kv("a", "fp", 1)
    assert problem is None and kv.cache[0].keys.dtype == mx.bfloat16
    assert mx.array_equal(kv.cache[0].values[..., :6, :], -k).item()


def test_writer_writes_in_order_and_waits(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = Writer(store)
    for n in (3, 4, 5):
        writer.put("a", snapshot_kv(make_cache(n), list(range(n)), "fp"))
    writer.wait("a")
    kv, _ = store.load_kv("a", "fp", 2)
    assert kv.tokens == list(range(5))
    writer.close()


@pytest.mark.parametrize("bits, ratio, tolerance", [(16, 0.55, 1e-2), (8, 0.32, 5e-2), (4, 0.2, 0.5)])
def test_kv_bits_store_smaller_and_close(tmp_path: Path, bits: int, ratio: float, tolerance: float) -> None:
    store = Store(tmp_path)
    c = KVCache()
    k = mx.random.normal((1, 2, 300, 64))
    c.update_and_fetch(k, -k)
    lossless = store.write_kv("exact", snapshot_kv([c], list(range(300)), "fp"))
    small = store.write_kv("small", snapshot_kv([c], list(range(300)), "fp", bits))
    assert small < ratio * lossless
    kv, problem = store.load_kv("small", "fp", 1, bits)
    assert problem is None and kv.cache[0].keys.dtype == mx.float32 and kv.cache[0].offset == 300
    assert mx.abs(kv.cache[0].keys[..., :300, :] - k).max().item() < tolerance
    assert mx.abs(kv.cache[0].values[..., :300, :] + k).max().item() < tolerance
    assert kv.cache[0].keys.shape[2] == room_for(300)  # the spare slots survive quantization


def test_a_cache_at_another_precision_is_a_miss(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_kv("a", snapshot_kv(make_cache(5, layers=1), list(range(5)), "fp", 16))
    kv, problem = store.load_kv("a", "fp", 1)
    assert kv is None and "kv_bits=16" in problem
    assert store.load_kv("a", "fp", 1, 16)[0] is not None


def test_kv_bits_need_a_head_dim_divisible_by_32() -> None:
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 1, 4, 16)), mx.zeros((1, 1, 4, 16)))
    with pytest.raises(ValueError, match="divisible by 32"):
        snapshot_kv([c], list(range(4)), "fp", 8)


def test_updating_a_loaded_cache_never_touches_its_file(tmp_path: Path) -> None:
    """Loaded caches are updated in place (their spare slots); the file must stay as saved."""
    store = Store(tmp_path)
    save(store, "a", make_cache(40), list(range(40)))
    before = store.kv_path("a").read_bytes()
    kv, _ = store.load_kv("a", "fp", 2)
    for c in kv.cache:
        c.trim(20)  # overwrite saved positions, then fill the spare slots
        c.update_and_fetch(mx.full((1, 2, 30, 4), 9.0), mx.full((1, 2, 30, 4), 9.0))
    mx.eval([c.state for c in kv.cache])
    assert store.kv_path("a").read_bytes() == before


def test_a_shared_file_frees_nothing_until_its_last_name_goes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    size = save(store, "a", make_cache(5), [1, 2, 3, 4, 5])
    store.link_kv("a", "b")
    assert store.kv_bytes("a") == store.kv_bytes("b") == (size, size)
    assert store.delete_kv("a") == 0  # b still holds the bytes
    assert store.load_kv("b", "fp", 2)[0] is not None and store.kv_bytes("b") == (size, 0)
    assert store.delete_kv("b") == size
