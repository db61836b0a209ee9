"""Which server serves which agent in the shared mode (issue 15): a lease per agent, a row in
PostgreSQL naming the server that holds it and when it expires.

A server takes an agent's lease before a call for it runs and renews it while it works for the
agent; a call that reaches another server meanwhile waits for the lease (up to a bound), then
runs, or gets AgentBusy and changes nothing. A server that dies loses its leases when they
expire, and another server then serves its agents. Expiry is the database's clock (`now()`),
never a server's: their clocks may differ. Why PostgreSQL and not Redis (Redlock): the
transcript a lease guards is committed there too, and a Redis that loses its data loses cached
blocks, never a lock.

A transcript is saved only while its server's lease holds (PostgresStore.save_agent checks it in
the saving transaction): a server whose lease expired while it could not renew it never commits
a turn over the next server's.

A server counts its own holds of a lease (several calls naming the agent, and the agent's save
after a call): the row goes when the last is released. A thread renews the leases held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Iterable

from psycopg_pool import ConnectionPool

from mcp_semantic.postgres import using
from mcp_semantic.store import AgentBusy, StoreUnavailable

log = logging.getLogger(__name__)

TTL_S = 30.0
"""How long a lease lasts unless renewed: how long a dead server's agents wait for another."""

WAIT_S = 10.0
"""How long a call waits for an agent another server is serving before it is refused."""


class Leases:
    def __init__(self, pool: ConnectionPool, holder: str, ttl_s: float = TTL_S, wait_s: float = WAIT_S,
                 poll_s: float = 0.1, renew: bool = True):
        self.pool = pool
        self.holder = holder  # this server's id, unique among the servers sharing the database
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.held: Counter[str] = Counter()  # agent -> this server's holds of its lease
        self.lost: set[str] = set()  # held, but found taken by another server since: taken anew next
        # a take and a release of ours in the database never cross: a release that finds a take of
        # ours under way leaves the row to it, and a take waits for a release's delete to end
        self._taking: Counter[str] = Counter()
        self._releasing: set[str] = set()
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._stop = threading.Event()
        if renew:
            threading.Thread(target=self._renew_held, name="mcp-semantic-leases", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def take(self, agent: str, wait_s: float | None = None) -> bool:
        """Take the agent's lease (or hold ours once more), waiting up to `wait_s` for another
        server's to end or expire; AgentBusy after that. Returns whether it was taken anew (no
        hold of ours before, or ours was lost: another server may have served the agent since)."""
        with self._lock:
            if self.held[agent] and agent not in self.lost:
                self.held[agent] += 1
                return False
            while agent in self._releasing:
                self._released.wait()
            self._taking[agent] += 1
        try:
            wait_s = self.wait_s if wait_s is None else wait_s
            deadline = time.monotonic() + wait_s
            while not self._try(agent):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentBusy(f"agent {agent} is busy on another server (still after {wait_s:g} s); "
                                    "nothing was changed, try again shortly")
                time.sleep(min(self.poll_s, left))
        except BaseException:
            with self._lock:
                self._taking -= Counter([agent])
            raise
        with self._lock:
            self._taking -= Counter([agent])
            anew = not self.held[agent] or agent in self.lost
            self.held[agent] += 1
            self.lost.discard(agent)
            return anew

    def mark_lost(self, agent: str) -> None:
        """Our lease of the agent was found taken by another server (a renewal, or a save refused):
        the next call takes it anew, and reads the agent again."""
        with self._lock:
            if self.held[agent]:
                self.lost.add(agent)

    def _renew_held(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and not self.pool.closed:
            with self._lock:
                agents = [a for a, n in self.held.items() if n > 0]
            try:
                for lost in self.renew(agents):
                    self.mark_lost(lost)
                    log.error("the lease of agent %s expired and another server took it: this server's "
                              "PostgreSQL was out of reach for over %g s", lost, self.ttl_s)
            except StoreUnavailable as e:
                log.warning("could not renew %d leases: %s", len(agents), e)

    def _try(self, agent: str) -> bool:
        with using(self.pool) as db:
            row = db.execute(
                """INSERT INTO leases (agent, holder, expires_at) VALUES (%s, %s, now() + make_interval(secs => %s))
                   ON CONFLICT (agent) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                   WHERE leases.holder = EXCLUDED.holder OR leases.expires_at <= now()
                   RETURNING agent""",
                (agent, self.holder, self.ttl_s),
            ).fetchone()
        return row is not None

    def renew(self, agents: Iterable[str]) -> list[str]:
        """Extend our leases of `agents`; returns those we no longer hold (expired and taken by
        another server: their calls must not commit)."""
        agents = sorted(set(agents))
        if not agents:
            return []
        with using(self.pool) as db:
            kept = {row[0] for row in db.execute(
                """UPDATE leases SET expires_at = now() + make_interval(secs => %s)
                   WHERE holder = %s AND agent = ANY(%s) RETURNING agent""",
                (self.ttl_s, self.holder, agents),
            )}
        return [a for a in agents if a not in kept]

    def release(self, agent: str) -> None:
        """One hold of ours fewer; at the last, the agent goes at once to whichever server asks
        next (a PostgreSQL out of reach: it expires)."""
        with self._lock:
            self.held[agent] -= 1
            if self.held[agent] > 0:
                return
            del self.held[agent]
            self.lost.discard(agent)
            if self._taking[agent]:  # a take of ours is taking it again: the row is that one's
                return
            self._releasing.add(agent)
        try:
            with using(self.pool) as db:
                db.execute("DELETE FROM leases WHERE agent = %s AND holder = %s", (agent, self.holder))
        except StoreUnavailable as e:
            log.warning("could not release the lease of agent %s (it expires in %g s): %s", agent, self.ttl_s, e)
        finally:
            with self._lock:
                self._releasing.discard(agent)
                self._released.notify_all()

    def holder_of(self, agent: str) -> str | None:
        """The server holding a lease of the agent that has not expired; None if none does."""
        with using(self.pool) as db:
            row = db.execute("SELECT holder FROM leases WHERE agent = %s AND expires_at > now()", (agent,)).fetchone()
        return row[0] if row else None
