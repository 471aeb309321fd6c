"""The Batch API of the OpenAI sandbox: files in, a batch run, an output file of JSONL lines.

``POST /v1/files`` (multipart, ``purpose=batch``) keeps a JSONL input file; ``POST /v1/batches``
(``input_file_id``, ``endpoint`` ``/v1/chat/completions``, ``completion_window`` ``24h``) runs
every line at once, bills each answered line at the **batch** price (the ground truth marks
it ``batch``), and writes the output file; ``GET /v1/batches/{id}`` reports it ``completed``
with its ``output_file_id``; ``GET /v1/files/{id}/content`` returns the file.  Output lines
have OpenAI's shape: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``.  The sandbox runs a batch at creation (status ``validating`` in the create
answer, ``completed`` from the first retrieve on).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ENDPOINTS = ("/v1/chat/completions",)


@dataclass
class StoredFile:
    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class BatchStore:
    """Files and batches of one sandbox."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, dict[str, Any]] = {}

    def add_file(self, purpose: str, filename: str, content: bytes) -> StoredFile:
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", purpose, filename, content)
        with self._lock:
            self.files[stored.id] = stored
        return stored

    def file(self, file_id: str) -> StoredFile | None:
        with self._lock:
            return self.files.get(file_id)

    def add_batch(self, batch: dict[str, Any]) -> None:
        with self._lock:
            self.batches[batch["id"]] = batch

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.batches.get(batch_id)

    def clear(self) -> None:
        with self._lock:
            self.files.clear()
            self.batches.clear()


def batch_object(
    batch_id: str,
    body: dict[str, Any],
    status: str,
    counts: dict[str, int],
    output_file_id: str | None,
) -> dict[str, Any]:
    now = int(time.time())
    done = status == "completed"
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": body["endpoint"],
        "errors": None,
        "input_file_id": body["input_file_id"],
        "completion_window": body.get("completion_window", "24h"),
        "status": status,
        "output_file_id": output_file_id if done else None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": now if done else None,
        "expires_at": now + 24 * 3600,
        "completed_at": now if done else None,
        "request_counts": counts,
        "metadata": body.get("metadata"),
    }


def output_line(custom_id: str, request_id: str, status: int, body: dict[str, Any]) -> str:
    ok = status == 200
    line = {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None if ok else {"code": "invalid_request", "message": str(body)},
    }
    return json.dumps(line, separators=(",", ":"))
