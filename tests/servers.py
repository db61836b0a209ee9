"""Real servers for the tests and benchmarks: PostgreSQL and Redis for the shared mode, each
started on a free loopback port in a temporary directory and stopped after, never a system-wide
service, never a mock (Debian's `postgresql` and `redis-server` packages; `install.sh --dev`
installs them where apt is available; PostgreSQL refuses to run as root, so as root it runs as
the `postgres` user); and `mcp-semantic serve` itself over stdio (StdioServer).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, what: str, exited: Callable[[], str | None], timeout: float = 60) -> None:
    """Until a process listens on `port`; `exited()` says why the process is gone (then this
    raises), or None while it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := exited()) is not None:
            raise RuntimeError(f"{what} exited before it listened on port {port}: {why}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on port {port} in {timeout:.0f} s")


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (Debian keeps them off PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


@dataclass
class Postgres:
    """A PostgreSQL cluster of its own: `url(db)` for a database in it."""

    port: int
    data: Path
    bin: Path
    user: str | None  # the OS user it runs as, when the tests run as root

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [*(["runuser", "-u", self.user, "--"] if self.user else []), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    @classmethod
    def start(cls) -> "Postgres":
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        user = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="mcp-semantic-pg-"))  # not under pytest's 0700 dirs: `postgres` must reach it
        data = root / "data"
        data.mkdir()
        if user:
            entry = pwd.getpwnam(user)
            for path in (root, data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        server = cls(free_port(), data, bin_dir, user)
        out = server._run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        if out.returncode:
            raise RuntimeError(f"initdb failed: {out.stderr[-2000:]}")
        server.run()
        return server

    def run(self) -> None:
        """Start the server on its data (again, after `halt`)."""
        root = self.data.parent
        options = f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        out = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(root / "log"), "-w", "start")
        if out.returncode:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {out.stderr[-1000:]} {log[-2000:]}")

    def halt(self) -> None:
        """Stop the server as a crash would (its data stays: `run` starts it again)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.data.parent, ignore_errors=True)


@dataclass
class Redis:
    """A redis-server of its own, nothing saved to disk."""

    port: int
    process: subprocess.Popen | None
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls) -> "Redis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        server = cls(free_port(), None, Path(tempfile.mkdtemp(prefix="mcp-semantic-redis-")))
        server.run()
        return server

    def run(self) -> None:
        """Start the server on its port (again, after `halt`: empty, as nothing is saved)."""
        binary = shutil.which("redis-server")
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.dir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, "redis-server", lambda: None if self.process.poll() is None else f"exit {self.process.returncode}")

    def halt(self) -> None:
        """Stop the server (its data goes with it)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)


class StdioServer:
    """`mcp-semantic serve` (its arguments after `python`) over stdio, driven by raw JSON-RPC
    lines: for tests that signal or kill it, and benchmarks. Requests may come from several
    threads at once (a reader thread hands each answer to its caller). Its log goes to a file
    (`log()`), so a long run never blocks on a full pipe."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env)
        self._id = 0
        self._lock = threading.Lock()
        self._answers: dict[int, list] = {}  # id -> [event, result]
        threading.Thread(target=self._read, daemon=True).start()
        info = {"name": "test", "version": "1"}
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": info})
        self._send({"method": "notifications/initialized"})

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
            self.proc.stdin.flush()

    def _read(self) -> None:
        for line in self.proc.stdout:  # notifications (logs, progress) are skipped
            message = json.loads(line)
            waiting = self._answers.get(message.get("id"))
            if waiting is not None and "method" not in message:
                waiting[1] = message.get("result", message.get("error"))
                waiting[0].set()
        for waiting in list(self._answers.values()):  # the server exited: nobody waits forever
            waiting[0].set()

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            rid = self._id
            self._answers[rid] = [threading.Event(), None]
        self._send({"id": rid, "method": method, "params": params})
        waiting = self._answers[rid]
        while not waiting[0].wait(1) and self.proc.poll() is None:
            pass
        del self._answers[rid]
        if waiting[1] is None:
            raise RuntimeError(f"the server exited ({self.proc.poll()}): {self.log()[-2000:]}")
        return waiting[1]

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = self.request("tools/call", {"name": tool, "arguments": arguments})
        assert not result["isError"], result
        return result["structuredContent"]

    def error(self, tool: str, arguments: dict[str, Any]) -> str:
        """The tool error's text of a call that must fail."""
        result = self.request("tools/call", {"name": tool, "arguments": arguments})
        assert result["isError"], result
        return result["content"][0]["text"]

    def close(self) -> None:
        """End of input: the server saves every cache and exits."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
