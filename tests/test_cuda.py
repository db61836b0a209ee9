"""The CUDA load path (cuda.py, Store.read_into_one into a GPU buffer, cache_build.reconstruct) run on the CPU, the CUDA runtime replaced by host memory copies: the reading
threads' pinned buffers, the copies by address, and the engine's resume through them, exact."""

from __future__ import annotations

import ctypes
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mcp_semantic import cuda
from mcp_semantic.block_pool import Storage, array_names, cut_blocks
from mcp_semantic.cache_kinds import Layout
from mcp_semantic.calls import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.block_files import host_block
from mcp_semantic.store import KVRecord
from mcp_semantic.sqlite_store import SQLiteStore
from mcp_semantic.tiny_model import make_tiny_model

pytestmark = pytest.mark.anyio


class HostPinned:
    def __init__(self, nbytes: int):
        self.buffer = (ctypes.c_char * nbytes)()
        self.pointer = ctypes.c_void_p(ctypes.addressof(self.buffer))
        self.nbytes = nbytes
        self.view = memoryview(self.buffer).cast("B")


@pytest.fixture
def fake_cuda(monkeypatch):
    """cuda.py's calls done in host memory; counts the copies."""
    copies: list[int] = []

    def gpu_buffer(shape: tuple[int, ...]):
        a = mx.zeros(shape, mx.uint8, stream=mx.cpu)
        mx.eval(a)
        return a, np.array(a, copy=False).ctypes.data

    def copy_in(address: int, source, nbytes: int, offset: int = 0) -> None:
        ctypes.memmove(address, source.pointer.value + offset, nbytes)
        copies.append(nbytes)

    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "gpu_buffer", gpu_buffer)
    monkeypatch.setattr(cuda, "staging", lambda n: HostPinned(n))
    monkeypatch.setattr(cuda, "copy_in", copy_in)
    return copies


def test_blocks_read_into_a_gpu_buffer_equal_their_arrays(fake_cuda, tmp_path: Path) -> None:
    layout = Layout.full_attention(3, 2, 32)
    cache = layout.new_cache()
    for c in cache:
        c.update_and_fetch(mx.random.normal((1, 2, 40, 32)), mx.random.normal((1, 2, 40, 32)))
    storage = Storage("fp", "float32", 8)
    blocks = cut_blocks(layout, cache, list(range(40)), storage, 16)
    store = SQLiteStore(tmp_path)
    try:
        store.commit_kv("a", KVRecord([b.id for b in blocks], list(range(40))), [host_block(b) for b in blocks], storage)
        names = array_names(layout, storage)
        opened = store.blocks.open_blocks([b.id for b in blocks], storage, names)
        buffer, problems = store.blocks.read_into_one(opened, gpu=True)
        assert problems == [None] * 3 and buffer.shape[0] == 3
        for block, got in zip(blocks, store.blocks.blocks_in_one(opened, buffer)):
            for name, a in block.arrays.items():
                assert mx.array_equal(got.arrays[name], a).item(), name
        assert len(fake_cuda) == len(blocks)  # one copy per file: its arrays lie one after another
        path = store.blocks.path(blocks[1].id)  # a flipped byte in its data: that block alone fails, by name
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        opened = store.blocks.open_blocks([b.id for b in blocks], storage, names)
        _, problems = store.blocks.read_into_one(opened, gpu=True)
        assert problems[0] is None and problems[2] is None and "fails its checksum" in problems[1]
        assert not path.exists()  # deleted: the next save of an agent holding it writes it anew
    finally:
        store.close()


async def test_an_agent_resumes_exactly_through_the_cuda_path(fake_cuda, tmp_path: Path) -> None:
    """After a restart the blocks come from one buffer, gathered into the working cache (tier
    disk); the next turn and a fork build from the blocks cut from it (tier hot); every reply
    equals the reply of a server on the CPU path, token for token."""
    model = make_tiny_model(tmp_path / "m", model_type="gemma3_text", sliding_window=24)
    questions = ["Tell me about the river.", "And the mill?", "Who lives there?", "One line, please."]

    async def conversation(cache_dir: Path, gather: bool) -> list[tuple[str, str]]:
        settings = Settings(model=str(model), cache_dir=cache_dir, block_tokens=16)
        engine = open_engine(settings)
        out = []
        out.append(((await engine.ask(AskRequest("a", questions[0], system="Be brief.", max_tokens=20))).reply, "new"))
        await engine.aclose()
        engine = open_engine(settings)
        engine.caches.on_host, engine.caches.gather = not gather, gather
        for q in questions[1:3]:
            r = await engine.ask(AskRequest("a", q, max_tokens=20))
            out.append((r.reply, r.tier))
        await engine.fork("a", "b")
        r = await engine.ask(AskRequest("b", questions[3], max_tokens=20))
        out.append((r.reply, r.tier))
        await engine.aclose()
        return out

    copies_before = len(fake_cuda)
    through_cuda = await conversation(tmp_path / "cuda", gather=True)
    assert len(fake_cuda) > copies_before
    assert [tier for _, tier in through_cuda] == ["new", "disk", "hot", "hot"]
    assert through_cuda == await conversation(tmp_path / "cpu", gather=False)
