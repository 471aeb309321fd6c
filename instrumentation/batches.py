"""The Batch API: a batch's calls are metered when its output file is read.

``client.files.content(output_file_id)`` (or ``retrieve_content``) returns the JSONL output of
a batch: one line per request, ``{"custom_id", "response": {"status_code", "request_id",
"body"}}``.  Each line becomes a ledger row, priced at the batch price, in the scope that reads
the file, with the provider's request id, so reading a file twice (in any process) counts each
line once: the ledger keeps one row per request id, and this process skips lines it recorded.
A file that is not a batch output (any other JSON or text) records nothing.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from .capture import PendingCall, get, record_parsed
from .context import current_scope

#: The output body's ``object`` -> the ledger's operation.
_OPERATIONS = {
    "chat.completion": "chat",
    "response": "responses",
    "list": "embedding",
    "text_completion": "completion",
}
_SEEN_MAX = 100_000
_seen: OrderedDict[str, None] = OrderedDict()  # request ids recorded by this process
_lock = threading.Lock()


def is_file_content(options: Any) -> bool:
    """A ``GET /files/{id}/content`` request (a file's bytes: maybe a batch's output)."""
    url = str(getattr(options, "url", ""))
    method = str(getattr(options, "method", "")).lower()
    return method == "get" and url.startswith("/files/") and url.rstrip("/").endswith("/content")


def _text(result: Any) -> str | None:
    if isinstance(result, str):
        return result
    content = getattr(result, "content", None)
    if isinstance(content, bytes):
        return content.decode("utf-8", "replace")
    return None


def _first_time(request_id: str) -> bool:
    with _lock:
        if request_id in _seen:
            return False
        _seen[request_id] = None
        if len(_seen) > _SEEN_MAX:
            _seen.popitem(last=False)
    return True


def record_output(result: Any) -> int:
    """Record every line of a batch output file in the current scope; returns how many."""
    text = _text(result)
    if not text or '"custom_id"' not in text:
        return 0
    scope = current_scope()
    recorded = 0
    for raw in text.splitlines():
        try:
            line = json.loads(raw) if raw.strip() else None
        except ValueError:
            return recorded  # not JSONL: not a batch output
        response = get(line, "response") if isinstance(line, dict) else None
        request_id = get(response, "request_id")
        if not isinstance(response, dict) or not request_id or not _first_time(request_id):
            continue
        body = get(response, "body") or {}
        operation = _OPERATIONS.get(str(get(body, "object")), "chat")
        pending = PendingCall(operation, get(body, "model"), False, False, scope, {}, batch=True)
        created = get(body, "created") or get(body, "created_at")
        if created:  # priced by the day the provider processed it, not the day it is read
            pending.created_at = datetime.fromtimestamp(created, UTC)
        status = get(response, "status_code")
        if status == 200:
            record_parsed(pending, body, request_id)
        else:
            pending.record(
                request_id=request_id,
                status="error",
                error_type="BatchLineFailed",
                http_status=status,
                usage_reported=False,
            )
        recorded += 1
    return recorded
