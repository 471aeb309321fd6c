"""Which ledger is this?  Its id, read from the database once, remembered in the data dir.

A worker that starts while its database is down still knows its ledger from the last time (a
file per database URL in ``$TOKENMETER_DATA_DIR/ledgers/``); one that never reached it uses a
name derived from the database URL (without its password), which any process of the same URL
derives alike.  Redis keys are ``tokenmeter:<ledger>:...``.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.engine import make_url

from .db import get_engine, normalize_url
from .settings import get_settings

logger = logging.getLogger("tokenmeter.identity")
_lock = threading.Lock()
_known: dict[str, str] = {}


def _url_key(url: str) -> str:
    redacted = make_url(normalize_url(url)).render_as_string(hide_password=True)
    return hashlib.sha256(redacted.encode()).hexdigest()[:16]


def redis_namespace(ledger: str | None) -> str:
    """The prefix of a ledger's Redis keys (``tokenmeter`` alone for a sink without one)."""
    return f"tokenmeter:{ledger}" if ledger else "tokenmeter"


def fallback_identity(url: str | None = None) -> str:
    """The name a ledger goes by before its id could ever be read."""
    return f"url-{_url_key(url or get_settings().ledger_url)}"


def ledger_identity(url: str | None = None) -> str:
    """The id of the ledger at ``url`` (default: DATABASE_URL)."""
    from .ledger import LedgerIdentity

    url = url or get_settings().ledger_url
    key = _url_key(url)
    with _lock:
        if key in _known:
            return _known[key]
    cache = get_settings().tokenmeter_data_dir / "ledgers" / f"{key}.id"
    ident: str | None = None
    try:
        with get_engine(url, readonly=True).connect() as conn:  # creates nothing
            ident = conn.execute(select(LedgerIdentity.id)).scalar()
    except sa_exc.SQLAlchemyError as exc:
        logger.info("ledger id not read from the database (%s); using the last one known", exc)
    if ident:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(ident)
        except OSError:
            logger.warning("could not remember the ledger id in %s", cache)
    elif cache.is_file():
        ident = cache.read_text().strip() or None
    if not ident:
        ident = fallback_identity(url)
        logger.warning(
            "the ledger's id is not known yet (database unreachable at first start): "
            "this worker's Redis keys use %s until it is",
            ident,
        )
        return ident  # not remembered: the real id is read next time
    with _lock:
        _known[key] = ident
    return ident


def accepted(ident: str | None, url: str | None = None) -> bool:
    """May an entry stamped ``ident`` be written into the ledger at ``url``?"""
    if ident is None:  # written before ledgers had identities
        return True
    return ident in (ledger_identity(url), fallback_identity(url))
