"""Recovery: replay the spool, flush executions whose worker died, retry kept rollups.

One code path for the worker (at start and periodically, see ``celery_signals``) and for
operators (``tokenmeter replay``).  Safe to run anywhere, any number of times at once: every
write is idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .filewal import FileWriteAheadLog
from .identity import ledger_identity, redis_namespace
from .settings import get_settings
from .sink import DatabaseSink, connect_redis, default_spool
from .wal import WriteAheadLog, attach_write_ahead

logger = logging.getLogger("tokenmeter.recovery")


@dataclass(frozen=True)
class RecoveryReport:
    replayed: int  # spooled batches written to the database
    recovered: int  # orphaned executions flushed from the write-ahead log
    still_spooled: int  # batches left (the database is still unreachable)
    rollups_applied: int = 0  # kept rollups that applied now
    rollups_pending: int = 0  # kept rollups still waiting (not dead)


class Recovery:
    def __init__(
        self,
        sink: DatabaseSink,
        wal: WriteAheadLog | None = None,
        file_wal: FileWriteAheadLog | None = None,
    ) -> None:
        self.sink, self.wal, self.file_wal = sink, wal, file_wal

    @classmethod
    def connect(cls, redis_url: str | None = None, database_url: str | None = None) -> Recovery:
        """Recovery over the spool and write-ahead logs: this host's files, and Redis's."""
        settings = get_settings()
        client = connect_redis(redis_url)
        ledger = ledger_identity(database_url)
        namespace = redis_namespace(ledger)
        sink = DatabaseSink(
            database_url, spool=default_spool(client, ledger, namespace), ledger_id=ledger
        )
        lease_s = settings.tokenmeter_wal_lease_s
        wal = attach_write_ahead(sink, client, lease_s, namespace) if client is not None else None
        return cls(sink, wal, FileWriteAheadLog(settings.wal_dir, ledger))

    def run_once(self) -> RecoveryReport:
        replayed = recovered = 0
        try:
            replayed = self.sink.replay()
        except Exception:
            logger.exception("spool replay failed")
        for log in (self.file_wal, self.wal):
            if log is None:
                continue
            try:
                recovered += log.recover(self.sink)
            except Exception:
                logger.exception("write-ahead recovery failed")
        applied = pending = 0
        try:
            rollups = self.sink.retry_rollups()
            applied, pending = rollups.applied, rollups.left
        except Exception:
            logger.exception("retrying kept rollups failed")
        try:
            left = len(self.sink.spool)
        except Exception:
            left = -1
        return RecoveryReport(replayed, recovered, left, applied, pending)
