"""Claim empty Redis databases for one run, so two runs on one server never touch each other.

Tests and benchmarks flush the databases they use.  With fixed numbers two runs at once (two
developers, CI beside a session, a bench beside the tests) flushed each other's broker.  A run
now claims databases that are empty, marking each with a key that expires, and resets only
those; database 0, everybody's default, is never taken.  A claim of a run of this host whose
process is gone (killed before it could let go) is taken over at once, not after its expiry.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

CLAIM_KEY = "tokenmeter:test-claim"


@dataclass(frozen=True)
class ClaimedDB:
    url: str
    token: str
    ttl_s: int

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def reset(self) -> None:
        """Empty the database, keeping the claim."""
        client = self.client()
        pipe = client.pipeline(transaction=True)
        pipe.flushdb()
        pipe.set(CLAIM_KEY, self.token, ex=self.ttl_s)
        pipe.execute()
        client.close()


def _abandoned(claim: bytes | str | None) -> bool:
    """Is ``claim`` (``host:pid:nonce``) a run of this host whose process is gone?"""
    if not claim:
        return False
    try:
        text = claim.decode() if isinstance(claim, bytes) else claim
        host, pid, _ = text.split(":", 2)
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


@contextmanager
def claimed_databases(
    server_url: str, count: int, ttl_s: int = 6 * 3600
) -> Iterator[list[ClaimedDB]]:
    """``count`` empty databases of the Redis server at ``server_url`` (no db number)."""
    server_url = server_url.rstrip("/")
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claimed: list[ClaimedDB] = []
    try:
        for db in range(1, 16):
            if len(claimed) == count:
                break
            client = redis.Redis.from_url(f"{server_url}/{db}")
            try:
                if not client.set(CLAIM_KEY, token, nx=True, ex=ttl_s):
                    if not _abandoned(client.get(CLAIM_KEY)):
                        continue  # another run's, still running
                    client.flushdb()  # a run of this host that was killed: its data is dead
                    if not client.set(CLAIM_KEY, token, nx=True, ex=ttl_s):
                        continue
                if client.dbsize() != 1:  # someone's data: not ours to flush
                    client.delete(CLAIM_KEY)
                    continue
                claimed.append(ClaimedDB(f"{server_url}/{db}", token, ttl_s))
            finally:
                client.close()
        if len(claimed) < count:
            raise RuntimeError(
                f"only {len(claimed)} of {count} Redis databases at {server_url} are free "
                f"(empty and unclaimed); free some or start another Redis"
            )
        yield claimed
    finally:
        for db_ in claimed:
            client = db_.client()
            try:
                client.flushdb()
            finally:
                client.close()
