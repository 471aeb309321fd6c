"""A loopback server that speaks enough of OpenAI's HTTP API for the real ``openai`` SDK.

Endpoints: ``POST /v1/chat/completions`` (plain, streaming, JSON mode, ``n``, tools),
``POST /v1/responses`` (plain and streaming), ``POST /v1/embeddings`` (float and base64),
``POST /v1/images/generations`` (dall-e-2, dall-e-3, gpt-image-1), ``POST /v1/images/edits``
(gpt-image-1, multipart: the input images bill image input tokens).  Every response carries a
unique ``x-request-id``; what each successful request billed is kept in a
:class:`~sandbox.ground_truth.Ledger` (``GET /_sandbox/ledger``).

Token rules (deterministic, no tokenizer; see sandbox/README.md):

- text tokens of a string: ``ceil(len(chars) / 4)``.
- chat prompt: ``3 + sum(4 + text tokens of each message's text)`` (+ text tokens of the JSON
  of ``tools``).  Responses input: ``text tokens of instructions + sum(4 + text tokens)``.
- completion: each choice is ``5 + h % 36`` words (``h`` a hash of the request and the choice
  index), one token per word, capped by ``max_tokens`` / ``max_completion_tokens`` /
  ``max_output_tokens``.  JSON-mode content: its text tokens.  A tool call: text tokens of its
  arguments + 5.
- reasoning models (``o1*``, ``o3*``, ``o4*``, ``gpt-5*``): ``64 * (1 + h % 4)`` reasoning
  tokens per choice, included in completion tokens (as OpenAI reports them).
- prompt caching: a prompt of at least 1024 tokens whose first 4,096 characters were seen before
  gets ``cached_tokens`` = the shared prefix with the previous such prompt, in tokens, rounded
  down to a multiple of 128.  On the models that bill cache writes (the GPT-5.6 family on)
  the rest of the prompt's cacheable part (its tokens rounded down to a multiple of 128) is
  written: ``cache_write_tokens`` in ``prompt_tokens_details`` (chat) and
  ``input_tokens_details`` (Responses, where the field is always present).
- embeddings: text tokens of each input (token-id lists count their length).
- images: dall-e bills per image by size and quality; gpt-image-1 bills text input tokens and
  image output tokens per image (1024x1024: low 272, medium 1056, high 4160; 1024x1536 and
  1536x1024: low 408, medium 1584, high 6240), ``auto`` meaning 1024x1024 / medium.  An edit
  also bills ``IMAGE_INPUT_TOKENS_PER_IMAGE`` (323) image input tokens per input image, counted
  in ``input_tokens`` and shown in ``input_tokens_details.image_tokens`` as OpenAI reports them.

Faults (header ``X-Sandbox-Fault`` or :class:`FaultPlan`): ``429`` (with ``retry-after``),
``500``, ``drop`` (connection cut: before the response, or after two chunks of a stream),
``slow=<ms>``, ``no-usage``, ``null-usage``, ``bad-json``.  Failed and dropped requests bill
nothing; ``no-usage``/``null-usage`` responses are billed (the provider did the work) but hide
their numbers, as a broken proxy would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import usage
from .batches import ENDPOINTS, BatchStore, batch_object, output_line
from .billing import writes_surcharged
from .ground_truth import BilledRequest, Ledger
from .http import DroppedConnection, JSONHandler, SandboxHTTPServer

REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-4-turbo": "gpt-4-turbo-2024-04-09",
    "gpt-4": "gpt-4-0613",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "o1": "o1-2024-12-17",
    "o1-mini": "o1-mini-2024-09-12",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "gpt-5.4": "gpt-5.4-2026-03-05",
    "gpt-5.6": "gpt-5.6-sol",  # the family's name serves its sol model (no dated snapshot)
}
#: Snapshots served on the flex and priority tiers (as the price list has them); any other
#: request for a tier is served on default, and the response says so (the SDK documents that
#: the served tier may differ from the one asked for).
FLEX = frozenset(
    {"gpt-5-2025-08-07", "gpt-5-mini-2025-08-07", "gpt-5-nano-2025-08-07", "gpt-5.6-sol"}
)
PRIORITY = frozenset(
    {"gpt-5-2025-08-07", "gpt-5-mini-2025-08-07", "gpt-4.1-2025-04-14", "gpt-5.6-sol"}
)


def served_tier(snapshot: str, asked: object) -> str:
    """The tier a request is served on: ``fast`` is served as ``priority``."""
    if asked == "flex" and snapshot in FLEX:
        return "flex"
    if asked in ("priority", "fast") and snapshot in PRIORITY:
        return "priority"
    return "default"


WORDS = [
    "handmade",
    "knitted",
    "wooden",
    "ceramic",
    "cozy",
    "gift",
    "idea",
    "scarf",
    "mug",
    "candle",
    "print",
    "poster",
    "charm",
    "bracelet",
    "lamp",
    "quilt",
    "journal",
    "sticker",
    "tote",
    "planter",
    "coaster",
    "basket",
    "ornament",
    "soap",
    "card",
    "pattern",
    "colour",
    "warm",
    "bright",
    "simple",
    "bold",
    "gentle",
    "rustic",
    "modern",
    "classic",
    "little",
    "lovely",
]
GPT_IMAGE_OUTPUT_TOKENS = {
    "1024x1024": {"low": 272, "medium": 1056, "high": 4160},
    "1024x1536": {"low": 408, "medium": 1584, "high": 6240},
    "1536x1024": {"low": 408, "medium": 1584, "high": 6240},
}
IMAGE_INPUT_TOKENS_PER_IMAGE = 323
DALLE_SIZES = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
}
# 1x1 transparent PNG: what every generated "image" is.
TINY_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6300010000050001a5f645400000000049454e44ae426082"
    )
).decode()
DEPLOYMENTS = {"prod-dalle3": "dall-e-3", "prod-chat": "gpt-4o-mini"}
WEB_SEARCH_TOOLS = ("web_search", "web_search_preview")
FAULTS = ("429", "500", "drop", "lost", "no-usage", "null-usage", "bad-json", "trailing-chunk")
#: OpenAI's header for a caller's own id of a request (ASCII, at most 512 characters; another
#: value is refused with a 400): logged with the request, so a call whose answer never arrived
#: can still be traced to what was billed.
CLIENT_REQUEST_ID = "X-Client-Request-Id"
CLIENT_REQUEST_ID_MAX = 512


class AnswerLost(ConnectionError):
    """The ``lost`` fault: the request was completed and billed, the answer never left."""


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _hash(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def is_reasoning(model: str) -> bool:
    return model.startswith(REASONING_PREFIXES)


def snapshot_of(model: str) -> str:
    return SNAPSHOTS.get(model, model)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# -- faults --------------------------------------------------------------------------------------
@dataclass
class _PlannedFault:
    fault: str
    remaining: int
    path: str | None
    model: str | None


@dataclass
class FaultPlan:
    """Programmatic faults: the next N matching requests fail; or a seeded error rate."""

    _planned: list[_PlannedFault] = field(default_factory=list)
    _rate: float = 0.0
    _rate_faults: tuple[str, ...] = ("429", "500")
    _rng: random.Random = field(default_factory=lambda: random.Random(0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self, fault: str, times: int = 1, *, path: str | None = None, model: str | None = None
    ) -> None:
        _parse_fault(fault)  # validate now, not at request time
        with self._lock:
            self._planned.append(_PlannedFault(fault, times, path, model))

    def set_error_rate(
        self, rate: float, *, seed: int = 0, faults: tuple[str, ...] = ("429", "500")
    ) -> None:
        with self._lock:
            self._rate, self._rate_faults, self._rng = rate, faults, random.Random(seed)

    def clear(self) -> None:
        with self._lock:
            self._planned.clear()
            self._rate = 0.0

    def take(self, path: str, model: str | None) -> str | None:
        with self._lock:
            for planned in self._planned:
                if planned.path and planned.path != path:
                    continue
                if planned.model and planned.model != model:
                    continue
                planned.remaining -= 1
                if planned.remaining <= 0:
                    self._planned.remove(planned)
                return planned.fault
            if self._rate and self._rng.random() < self._rate:
                return self._rng.choice(self._rate_faults)
        return None


def _valid_client_request_id(value: str) -> bool:
    return value.isascii() and 0 < len(value) <= CLIENT_REQUEST_ID_MAX


def _parse_fault(value: str | None) -> tuple[str | None, float]:
    """``(fault, delay_seconds)`` from a header value like ``429`` or ``slow=250``."""
    if not value:
        return None, 0.0
    fault, delay = None, 0.0
    for part in value.split(","):
        part = part.strip()
        if part.startswith("slow="):
            delay = int(part.split("=", 1)[1]) / 1000
        elif part in FAULTS:
            fault = part
        elif part:
            raise ValueError(f"unknown sandbox fault {part!r}; use one of {FAULTS} or slow=<ms>")
    return fault, delay


# -- the server state ------------------------------------------------------------------------
class OpenAISandbox:
    """State shared by the request handlers: ledger, prompt cache, faults."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.faults = FaultPlan()
        self._cache: dict[str, str] = {}
        self._cache_lock = threading.Lock()
        self.requests_served = 0
        self._in_flight = 0  # POSTs being handled (a client that gave up does not end one)
        self._in_flight_lock = threading.Lock()
        self.batches = BatchStore()
        #: Azure OpenAI deployments (``/openai/deployments/{name}/...``) and the model each serves.
        self.deployments: dict[str, str] = dict(DEPLOYMENTS)
        #: How long a billed request takes to show in the Usage and Costs APIs (the provider's
        #: books lag; 0: at once).
        self.usage_lag_s = 0.0

    @property
    def in_flight(self) -> int:
        """Requests still being handled: one whose client timed out bills when it ends, so what
        was billed is final only once this is 0."""
        return self._in_flight

    def handling(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    def prompt_cache(self, prompt_text: str, prompt_tokens: int, model: str) -> tuple[int, int]:
        """(cached, written) input tokens of a prompt: read from the cache, and newly written
        to it.  Writes are reported by the models that bill them (``billing.writes_surcharged``:
        the GPT-5.6 family on): the prompt's cacheable part (a multiple of 128 tokens, from
        1,024) less what was read."""
        cached = self.cached_tokens(prompt_text, prompt_tokens)
        if not writes_surcharged(model) or prompt_tokens < 1024:
            return cached, 0
        return cached, max(0, prompt_tokens // 128 * 128 - cached)

    def cached_tokens(self, prompt_text: str, prompt_tokens: int) -> int:
        if prompt_tokens < 1024:
            return 0
        key = hashlib.sha256(prompt_text[:4096].encode()).hexdigest()
        with self._cache_lock:
            previous = self._cache.get(key)
            self._cache[key] = prompt_text
        if previous is None:
            return 0
        shared = 0
        for a, b in zip(previous, prompt_text, strict=False):
            if a != b:
                break
            shared += 1
        return min(prompt_tokens, (shared // 4) // 128 * 128)

    def reset(self) -> None:
        self.ledger.clear()
        self.faults.clear()
        self.batches.clear()
        with self._cache_lock:
            self._cache.clear()


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


# -- chat ------------------------------------------------------------------------------------------
@dataclass
class ChatChoice:
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    visible_tokens: int
    reasoning_tokens: int
    finish_reason: str


def _schema_instance(schema: dict[str, Any], root: dict[str, Any], h: int, depth: int = 0) -> Any:
    """A deterministic instance of a JSON schema (structured outputs), from hash ``h``."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _schema_instance(root.get("$defs", {}).get(name, {}), root, h, depth)
    if "anyOf" in schema:
        return _schema_instance(schema["anyOf"][0], root, h, depth)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if "enum" in schema:
        return schema["enum"][h % len(schema["enum"])]
    if kind == "object":
        props = schema.get("properties", {})
        return {
            name: _schema_instance(sub, root, _hash(h, name), depth + 1)
            for name, sub in props.items()
        }
    if kind == "array":
        count = max(int(schema.get("minItems", 0)), min(3, int(schema.get("maxItems", 3))))
        item = schema.get("items", {})
        return [_schema_instance(item, root, _hash(h, i), depth + 1) for i in range(count)]
    if kind == "integer":
        low, high = int(schema.get("minimum", 0)), int(schema.get("maximum", 10))
        return low + h % (high - low + 1)
    if kind == "number":
        return round(5 + (h % 9500) / 100, 2)
    if kind == "boolean":
        return bool(h % 2)
    return " ".join(WORDS[(h >> (3 * i)) % len(WORDS)] for i in range(3 + h % 4))


def _json_content(body: dict[str, Any], h: int, bad: bool) -> str:
    if bad:
        return "Sure! Here is the JSON you asked for: {rating: 7,"
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return json.dumps(_schema_instance(schema, schema, h))
    last_user = next(
        (m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), None
    )
    text = _message_text(last_user.get("content")) if last_user else ""
    for line in text.splitlines():
        if line.startswith("SANDBOX_JSON:"):
            return json.dumps(json.loads(line.split(":", 1)[1]))
    return json.dumps(
        {
            "relevance": h % 11,
            "quality": (h >> 8) % 11,
            "fit": (h >> 16) % 11,
            "summary": " ".join(WORDS[(h >> (4 * i)) % len(WORDS)] for i in range(6)),
        }
    )


def _content_key(body: dict[str, Any]) -> dict[str, Any]:
    """What determines an answer's content: not how it is delivered (stream, usage chunk)."""
    return {k: v for k, v in body.items() if k not in {"stream", "stream_options"}}


def _chat_choices(body: dict[str, Any], fault: str | None) -> list[ChatChoice]:
    model = body.get("model", "")
    n = int(body.get("n") or 1)
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    json_mode = (body.get("response_format") or {}).get("type") in {"json_object", "json_schema"}
    tools = body.get("tools") or []
    wants_tool = (
        bool(tools)
        and body.get("tool_choice") != "none"
        and not any(m.get("role") == "tool" for m in body.get("messages", []))
    )
    choices = []
    for index in range(n):
        h = _hash(_content_key(body), index)
        reasoning = 64 * (1 + h % 4) if is_reasoning(model) else 0
        if wants_tool:
            fn = tools[0].get("function", {}).get("name", "tool")
            args = json.dumps({"query": WORDS[h % len(WORDS)]})
            call = {
                "id": f"call_{h % 10**12}",
                "type": "function",
                "function": {"name": fn, "arguments": args},
            }
            choices.append(ChatChoice(None, [call], text_tokens(args) + 5, reasoning, "tool_calls"))
            continue
        if json_mode:
            content = _json_content(body, h, fault == "bad-json")
            visible = text_tokens(content)
            finish = "stop"
        else:
            count = 5 + h % 36
            finish = "stop"
            if cap is not None and count > int(cap):
                count, finish = int(cap), "length"
            content = " ".join(WORDS[(h + i * 7) % len(WORDS)] for i in range(count))
            visible = count
        choices.append(ChatChoice(content, None, visible, reasoning, finish))
    return choices


def _chat_prompt(body: dict[str, Any]) -> tuple[str, int]:
    texts = [_message_text(m.get("content")) for m in body.get("messages", [])]
    tokens = 3 + sum(4 + text_tokens(t) for t in texts)
    if body.get("tools"):
        tokens += text_tokens(json.dumps(body["tools"]))
    return "\n".join(texts), tokens


def _usage_json(usage: dict[str, Any], fault: str | None) -> dict[str, Any] | None:
    if fault == "no-usage":
        return None
    if fault == "null-usage":
        return {k: None for k in usage}
    return usage


# -- the handler ----------------------------------------------------------------------------------
class OpenAIHandler(JSONHandler):
    sandbox: OpenAISandbox  # set on the subclass built by make_server

    def do_GET(self) -> None:
        path = self.path_only
        if path == "/_sandbox/health":
            self.send_json(200, {"ok": True, "requests": self.sandbox.requests_served})
        elif path == "/_sandbox/ledger":
            wanted = self.query.get("request_id")
            rows = self.sandbox.ledger.rows(wanted) if wanted else self.sandbox.ledger.rows()
            self.send_json(200, [r.to_json() for r in rows])
        elif path.startswith("/_sandbox/images/"):
            png = base64.b64decode(TINY_PNG)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)
        elif path.startswith("/v1/batches/"):
            batch = self.sandbox.batches.batch(path.removeprefix("/v1/batches/"))
            if batch is None:
                self._error(404, "No batch found", "invalid_request_error", new_request_id())
            else:
                self.send_json(200, {**batch, "status": "completed", **batch["_done"]})
        elif path.startswith("/v1/files/") and path.endswith("/content"):
            stored = self.sandbox.batches.file(path.removeprefix("/v1/files/")[: -len("/content")])
            if stored is None:
                self._error(404, "No such File object", "invalid_request_error", new_request_id())
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(stored.content)))
                self.end_headers()
                self.wfile.write(stored.content)
        elif path in ("/v1/organization/usage/completions", "/v1/organization/costs"):
            self._organization_usage(path)
        elif path == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "sandbox"} for m in SNAPSHOTS]
            self.send_json(200, {"object": "list", "data": data})
        else:
            self._error(404, f"no route {path}", "invalid_request_error", new_request_id())

    def do_POST(self) -> None:
        self.sandbox.handling(+1)
        try:
            self._post()
        finally:
            self.sandbox.handling(-1)

    def _post(self) -> None:
        path = self.path_only
        request_id = new_request_id()
        if path == "/_sandbox/reset":
            self.read_body()
            self.sandbox.reset()
            self.send_json(200, {"ok": True})
            return
        if path == "/v1/files":
            self._files_create(request_id)
            return
        if path == "/v1/batches":
            self._batches_create(self.read_json(), request_id)
            return
        routes: dict[str, Callable[..., Any]] = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/embeddings": self._embeddings,
            "/v1/images/generations": self._images,
        }
        deployment = None
        if path.startswith("/openai/deployments/"):  # Azure OpenAI: the deployment names the model
            deployment, _, rest = path.removeprefix("/openai/deployments/").partition("/")
            path = f"/v1/{rest}"
        route = routes.get(path)
        try:
            if path == "/v1/images/edits":
                fields, files = self.read_form()
                route = self._images
                body: dict[str, Any] = {**fields, "_input_images": len(files.get("image", []))}
            else:
                body = self.read_json()
        except json.JSONDecodeError:
            self._error(
                400,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                request_id,
            )
            return
        if route is None:
            self._error(404, f"Invalid URL (POST {path})", "invalid_request_error", request_id)
            return
        if deployment is not None:
            model = self.sandbox.deployments.get(deployment)
            if model is None:
                self._error(
                    404,
                    "The API deployment for this resource does not exist.",
                    "invalid_request_error",
                    request_id,
                    code="DeploymentNotFound",
                )
                return
            body["model"] = model  # what the deployment serves, whatever the body said
        try:
            fault, delay = _parse_fault(self.headers.get("X-Sandbox-Fault"))
        except ValueError as exc:
            self._error(400, str(exc), "invalid_request_error", request_id)
            return
        self.client_request_id = self.headers.get(CLIENT_REQUEST_ID)
        if self.client_request_id is not None and not _valid_client_request_id(
            self.client_request_id
        ):
            self._error(
                400,
                f"{CLIENT_REQUEST_ID} must be ASCII and at most {CLIENT_REQUEST_ID_MAX} characters",
                "invalid_request_error",
                request_id,
            )
            return
        if fault is None:  # a programmatic fault (it may be slow=<ms> too)
            planned, planned_delay = _parse_fault(self.sandbox.faults.take(path, body.get("model")))
            fault, delay = planned, delay or planned_delay
        if delay:
            time.sleep(delay)
        self.sandbox.requests_served += 1
        if self._status_fault(fault, request_id, {"retry-after": "1"}):
            return
        if fault == "drop" and not body.get("stream"):
            self.drop_connection()
            return
        self.lose_answer = fault == "lost"
        try:
            route(body, request_id, fault)
        except BadRequest as exc:
            self.lose_answer = False
            self._error(400, str(exc), "invalid_request_error", request_id, param=exc.param)
        except (DroppedConnection, AnswerLost):
            self.drop_connection()
        finally:
            self.lose_answer = False

    # -- billing and delivery ----------------------------------------------------------------------
    client_request_id: str | None = None
    lose_answer = False

    def _bill(self, billed: BilledRequest) -> None:
        """Bill a completed request, once, with the caller's own id if it sent one, to the key
        and project that made it."""
        if self.sandbox.ledger.get(billed.request_id) is None:
            self.sandbox.ledger.add(
                replace(
                    billed,
                    client_request_id=self.client_request_id,
                    api_key_id=usage.api_key_id(self.headers.get("Authorization")),
                    project_id=self.headers.get("OpenAI-Project") or usage.DEFAULT_PROJECT,
                )
            )

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if self.lose_answer and status == 200:
            raise AnswerLost("the answer never left the server (fault 'lost')")
        super().send_json(status, payload, headers)

    def start_sse(self, headers: dict[str, str] | None = None) -> None:
        if self.lose_answer:
            raise AnswerLost("the stream never left the server (fault 'lost')")
        super().start_sse(headers)

    def _deliver_stream(self, billed: BilledRequest, send: Callable[[], None]) -> None:
        """Send a stream; a client that went away (timed out, gave up, or the answer was lost)
        does not stop the generation: it runs to its end and is billed, as OpenAI bills it.
        An upstream crash (the ``drop`` fault) bills nothing."""
        try:
            send()
        except DroppedConnection:
            raise
        except OSError as exc:
            self._bill(billed)
            if isinstance(exc, AnswerLost):
                raise
            self.close_connection = True

    def _status_fault(self, fault: str | None, request_id: str, retry: dict[str, str]) -> bool:
        """Answer a planned ``429`` (with ``retry`` as its retry-after header) or ``500``;
        True when the fault was one of them and is answered."""
        if fault == "429":
            self._error(
                429,
                "Rate limit reached for requests (sandbox).",
                "requests",
                request_id,
                code="rate_limit_exceeded",
                headers=retry,
            )
            return True
        if fault == "500":
            self._error(
                500,
                "The server had an error while processing your request.",
                "server_error",
                request_id,
            )
            return True
        return False

    def _error(
        self,
        status: int,
        message: str,
        kind: str,
        request_id: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.send_json(status, payload, {"x-request-id": request_id, **(headers or {})})

    # -- the organization Usage and Costs APIs ---------------------------------------------------
    def _organization_usage(self, path: str) -> None:
        request_id = new_request_id()
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not key:
            self._error(401, "You didn't provide an API key.", "invalid_request_error", request_id)
            return
        if not key.startswith(usage.ADMIN_KEY_PREFIX):
            self._error(
                403,
                "This endpoint requires an admin API key (sk-admin-...).",
                "invalid_request_error",
                request_id,
                code="insufficient_permissions",
            )
            return
        fault, delay = _parse_fault(self.sandbox.faults.take(path, None))
        if delay:
            time.sleep(delay)
        if self._status_fault(fault, request_id, {"retry-after-ms": "10"}):
            return
        answer = usage.completions if path.endswith("/completions") else usage.costs
        try:
            page = answer(self.sandbox.ledger.rows(), self.query, lag_s=self.sandbox.usage_lag_s)
        except usage.UsageQueryError as exc:
            self._error(400, str(exc), "invalid_request_error", request_id, param=exc.param)
            return
        self.send_json(200, page, {"x-request-id": request_id})

    # -- files and batches ----------------------------------------------------------------------
    def _files_create(self, request_id: str) -> None:
        fields, files = self.read_form()
        uploads = files.get("file") or []
        if not uploads:
            self._error(400, "'file' is required", "invalid_request_error", request_id)
            return
        stored = self.sandbox.batches.add_file(
            fields.get("purpose", "batch"), "input.jsonl", uploads[0]
        )
        self.send_json(200, stored.to_json(), {"x-request-id": request_id})

    def _batches_create(self, body: dict[str, Any], request_id: str) -> None:
        source = self.sandbox.batches.file(str(body.get("input_file_id")))
        if source is None or body.get("endpoint") not in ENDPOINTS:
            self._error(
                400,
                f"input_file_id must name an uploaded file and endpoint be one of {ENDPOINTS}",
                "invalid_request_error",
                request_id,
            )
            return
        lines, counts = [], {"total": 0, "completed": 0, "failed": 0}
        for raw in source.content.decode().splitlines():
            if not raw.strip():
                continue
            item = json.loads(raw)
            counts["total"] += 1
            line_id = new_request_id()
            try:
                answer = self._chat(dict(item["body"], stream=False), line_id, None, send=False)
            except BadRequest as exc:
                error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
                lines.append(output_line(item["custom_id"], line_id, 400, error))
                counts["failed"] += 1
                continue
            assert answer is not None
            payload, billed = answer
            self._bill(replace(billed, batch=True, service_tier="default"))
            payload["service_tier"] = "default"
            lines.append(output_line(item["custom_id"], line_id, 200, payload))
            counts["completed"] += 1
        output = self.sandbox.batches.add_file(
            "batch_output", "output.jsonl", ("\n".join(lines) + "\n").encode()
        )
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        created = batch_object(batch_id, body, "validating", counts, output.id)
        done = batch_object(batch_id, body, "completed", counts, output.id)
        self.sandbox.batches.add_batch(
            {
                **created,
                "_done": {k: done[k] for k in ("output_file_id", "in_progress_at", "completed_at")},
            }
        )
        self.send_json(200, created, {"x-request-id": request_id})

    # -- chat completions -----------------------------------------------------------------------
    def _chat(
        self, body: dict[str, Any], request_id: str, fault: str | None, *, send: bool = True
    ) -> tuple[dict[str, Any], BilledRequest] | None:
        """A chat completion; with ``send=False`` (a batch line) its answer and bill, unsent."""
        model = body.get("model")
        if not model or not body.get("messages"):
            raise BadRequest("'model' and 'messages' are required", "messages")
        prompt_text, prompt_tokens = _chat_prompt(body)
        response_model = snapshot_of(model)
        cached, written = self.sandbox.prompt_cache(prompt_text, prompt_tokens, response_model)
        choices = _chat_choices(body, fault)
        completion = sum(c.visible_tokens + c.reasoning_tokens for c in choices)
        reasoning = sum(c.reasoning_tokens for c in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {
                "cached_tokens": cached,
                "audio_tokens": 0,
                **({"cache_write_tokens": written} if writes_surcharged(response_model) else {}),
            },
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        tier = served_tier(response_model, body.get("service_tier"))
        billed = BilledRequest(
            request_id=request_id,
            operation="chat",
            model=response_model,
            service_tier=tier,
            input_tokens=prompt_tokens,
            cached_input_tokens=cached,
            cache_write_tokens=written,
            output_tokens=completion,
            reasoning_tokens=reasoning,
            stream=bool(body.get("stream")),
        )
        created = int(time.time())
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        if body.get("stream") and send:
            self._chat_stream(body, choices, usage, billed, completion_id, created, fault)
            return None
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": response_model,
            "service_tier": tier,
            "system_fingerprint": "fp_sandbox",
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": c.content,
                        "refusal": None,
                        **({"tool_calls": c.tool_calls} if c.tool_calls else {}),
                    },
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
        }
        shown = _usage_json(usage, fault)
        if shown is not None:
            payload["usage"] = shown
        if not send:
            return payload, billed
        self._bill(billed)
        self.send_json(200, payload, {"x-request-id": request_id})
        return None

    def _chat_stream(
        self,
        body: dict[str, Any],
        choices: list[ChatChoice],
        usage: dict[str, Any],
        billed: BilledRequest,
        completion_id: str,
        created: int,
        fault: str | None,
    ) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": billed.model,
            "service_tier": billed.service_tier,  # in every chunk, as OpenAI sends it
            "system_fingerprint": "fp_sandbox",
        }

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            out = {
                **base,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                out["usage"] = None
            return out

        def send() -> None:
            self.start_sse({"x-request-id": billed.request_id})
            sent = 0
            for index, choice in enumerate(choices):
                pieces: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
                if choice.tool_calls:
                    pieces.append({"tool_calls": [{"index": 0, **choice.tool_calls[0]}]})
                else:
                    words = (choice.content or "").split(" ")
                    pieces += [
                        {"content": (" " if i else "") + " ".join(words[i : i + 4])}
                        for i in range(0, len(words), 4)
                    ]
                for delta in pieces:
                    if fault == "drop" and sent == 2:
                        raise DroppedConnection
                    self.send_sse(chunk(index, delta))
                    sent += 1
                self.send_sse(chunk(index, {}, choice.finish_reason))
            if include_usage:
                shown = _usage_json(usage, fault)
                self.send_sse({**base, "choices": [], "usage": shown})
            if fault == "trailing-chunk":  # a chunk after the usage (as a proxy may add one)
                self.send_sse(chunk(0, {}))
            self._bill(billed)
            self.send_sse("[DONE]")
            self.end_chunks()

        self._deliver_stream(billed, send)

    # -- responses -------------------------------------------------------------------------------
    def _responses(self, body: dict[str, Any], request_id: str, fault: str | None) -> None:
        model = body.get("model")
        if not model or body.get("input") is None:
            raise BadRequest("'model' and 'input' are required", "input")
        raw = body["input"]
        items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
        texts = [body.get("instructions") or ""] + [_message_text(i.get("content")) for i in items]
        prompt_text = "\n".join(texts)
        input_tokens = text_tokens(texts[0]) + sum(4 + text_tokens(t) for t in texts[1:])
        snapshot = snapshot_of(model)
        cached, written = self.sandbox.prompt_cache(prompt_text, input_tokens, snapshot)
        h = _hash(_content_key(body))
        json_mode = ((body.get("text") or {}).get("format") or {}).get("type") == "json_object"
        if json_mode:
            text = _json_content({"messages": items}, h, fault == "bad-json")
            visible = text_tokens(text)
        else:
            visible = 5 + h % 36
            cap = body.get("max_output_tokens")
            if cap is not None:
                visible = min(visible, int(cap))
            text = " ".join(WORDS[(h + i * 7) % len(WORDS)] for i in range(visible))
        reasoning = 64 * (1 + h % 4) if is_reasoning(model) else 0
        output_tokens = visible + reasoning
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens,
        }
        searches = [t for t in body.get("tools") or [] if t.get("type") in WEB_SEARCH_TOOLS]
        billed = BilledRequest(
            request_id=request_id,
            operation="responses",
            model=snapshot,
            service_tier=served_tier(snapshot, body.get("service_tier")),
            input_tokens=input_tokens,
            cached_input_tokens=cached,
            cache_write_tokens=written,
            output_tokens=output_tokens,
            reasoning_tokens=reasoning,
            web_search_calls=1 if searches else 0,  # one search per answer (deterministic)
            stream=bool(body.get("stream")),
        )
        response_id = "resp_" + uuid.uuid4().hex
        message_id = "msg_" + uuid.uuid4().hex[:24]
        search_call = {
            "type": "web_search_call",
            "id": "ws_" + uuid.uuid4().hex[:24],
            "status": "completed",
            "action": {"type": "search", "query": _message_text(items[-1].get("content"))[:80]},
        }

        def response_obj(status: str, with_output: bool) -> dict[str, Any]:
            message = {
                "type": "message",
                "id": message_id,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
            obj = {
                "id": response_id,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "model": billed.model,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "output": ([search_call] if searches else []) + [message] if with_output else [],
                "service_tier": billed.service_tier,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": body.get("tools") or [],
                "temperature": 1.0,
                "top_p": 1.0,
                "text": {"format": {"type": "json_object" if json_mode else "text"}},
                "usage": None,
            }
            if with_output:
                obj["usage"] = _usage_json(usage, fault)
            return obj

        if not body.get("stream"):
            self._bill(billed)
            self.send_json(200, response_obj("completed", True), {"x-request-id": request_id})
            return

        def send() -> None:
            self.start_sse({"x-request-id": request_id})
            seq = iter(range(10**6))

            def event(kind: str, **fields: Any) -> None:
                self.send_sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

            event("response.created", response=response_obj("in_progress", False))
            event("response.in_progress", response=response_obj("in_progress", False))
            item = {
                "type": "message",
                "id": message_id,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            event("response.output_item.added", output_index=0, item=item)
            event(
                "response.content_part.added",
                item_id=message_id,
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
            words = text.split(" ")
            for n, i in enumerate(range(0, len(words), 4)):
                if fault == "drop" and n == 1:
                    raise DroppedConnection
                delta = (" " if i else "") + " ".join(words[i : i + 4])
                event(
                    "response.output_text.delta",
                    item_id=message_id,
                    output_index=0,
                    content_index=0,
                    delta=delta,
                    logprobs=[],
                )
            event(
                "response.output_text.done",
                item_id=message_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            )
            final = response_obj("completed", True)
            event("response.output_item.done", output_index=0, item=final["output"][-1])
            self._bill(billed)
            event("response.completed", response=final)
            self.end_chunks()

        self._deliver_stream(billed, send)

    # -- embeddings --------------------------------------------------------------------------------
    def _embeddings(self, body: dict[str, Any], request_id: str, fault: str | None) -> None:
        model = body.get("model")
        raw = body.get("input")
        if not model or raw in (None, "", []):
            raise BadRequest("'model' and a non-empty 'input' are required", "input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]
        tokens = sum(len(x) if isinstance(x, list) else text_tokens(str(x)) for x in raw)
        dims = int(body.get("dimensions") or 8)
        data = []
        for index, item in enumerate(raw):
            rng = random.Random(_hash(model, item))
            vector = [rng.uniform(-1, 1) for _ in range(dims)]
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        payload: dict[str, Any] = {"object": "list", "data": data, "model": model}
        shown = _usage_json({"prompt_tokens": tokens, "total_tokens": tokens}, fault)
        if shown is not None:
            payload["usage"] = shown
        self._bill(
            BilledRequest(
                request_id=request_id, operation="embedding", model=model, input_tokens=tokens
            )
        )
        self.send_json(200, payload, {"x-request-id": request_id})

    # -- images ------------------------------------------------------------------------------------
    def _images(self, body: dict[str, Any], request_id: str, fault: str | None) -> None:
        model = body.get("model") or "dall-e-2"
        if "_input_images" in body and not model.startswith("gpt-image"):
            raise BadRequest("the sandbox edits images with gpt-image-1 only", "model")
        if "_input_images" in body and not body["_input_images"]:
            raise BadRequest("'image' is required", "image")
        prompt = body.get("prompt")
        if not prompt:
            raise BadRequest("'prompt' is required", "prompt")
        n = int(body.get("n") or 1)
        if model == "dall-e-3" and n != 1:
            raise BadRequest("dall-e-3 only supports n=1.", "n")
        if not 1 <= n <= 10:
            raise BadRequest("n must be between 1 and 10", "n")
        payload: dict[str, Any] = {"created": int(time.time())}
        if model.startswith("gpt-image"):
            size = body.get("size") or "auto"
            quality = body.get("quality") or "auto"
            size = "1024x1024" if size == "auto" else size
            quality = "medium" if quality == "auto" else quality
            if size not in GPT_IMAGE_OUTPUT_TOKENS or quality not in ("low", "medium", "high"):
                raise BadRequest(f"invalid size/quality {size}/{quality} for {model}", "size")
            text_in = text_tokens(prompt)
            image_in = IMAGE_INPUT_TOKENS_PER_IMAGE * int(body.get("_input_images") or 0)
            output = GPT_IMAGE_OUTPUT_TOKENS[size][quality] * n
            usage = {
                "input_tokens": text_in + image_in,
                "input_tokens_details": {"text_tokens": text_in, "image_tokens": image_in},
                "output_tokens": output,
                "total_tokens": text_in + image_in + output,
            }
            shown = _usage_json(usage, fault)
            if shown is not None:
                payload["usage"] = shown
            payload.update(size=size, quality=quality, output_format="png", background="opaque")
            payload["data"] = [{"b64_json": TINY_PNG} for _ in range(n)]
            billed = BilledRequest(
                request_id=request_id,
                operation="image",
                model=model,
                input_tokens=text_in + image_in,
                input_image_tokens=image_in,
                output_tokens=output,
                image_count=n,
                image_size=size,
                image_quality=quality,
                stream=str(body.get("stream")).lower() == "true",
            )
            if billed.stream:
                if n != 1:
                    raise BadRequest("the sandbox streams one image at a time (n = 1)", "n")
                kind = "image_edit" if "_input_images" in body else "image_generation"
                self._image_stream(kind, billed, usage, fault, int(body.get("partial_images") or 0))
                return
        elif model in DALLE_SIZES:
            size = body.get("size") or "1024x1024"
            quality = body.get("quality") or "standard"
            if size not in DALLE_SIZES[model]:
                raise BadRequest(f"{size} is not a supported size for {model}", "size")
            if quality not in ("standard", "hd") or (model == "dall-e-2" and quality == "hd"):
                raise BadRequest(f"quality {quality} is not supported for {model}", "quality")
            as_b64 = body.get("response_format") == "b64_json"
            host = self.headers.get("Host", "127.0.0.1")
            payload["data"] = [
                {"b64_json": TINY_PNG}
                if as_b64
                else {"url": f"http://{host}/_sandbox/images/{request_id}-{i}.png"}
                for i in range(n)
            ]
            if model == "dall-e-3":
                for item in payload["data"]:
                    item["revised_prompt"] = prompt
            billed = BilledRequest(
                request_id=request_id,
                operation="image",
                model=model,
                image_count=n,
                image_size=size,
                image_quality=quality,
            )
        else:
            raise BadRequest(f"The model {model} does not exist", "model")
        self._bill(billed)
        self.send_json(200, payload, {"x-request-id": request_id})

    def _image_stream(
        self,
        kind: str,
        billed: BilledRequest,
        usage: dict[str, Any],
        fault: str | None,
        partial_images: int,
    ) -> None:
        """``stream=true`` image generation or edit: partial images, then the completed image
        with the request's token usage (``image_generation.completed``)."""
        common = {
            "background": "opaque",
            "created_at": int(time.time()),
            "output_format": "png",
            "quality": billed.image_quality,
            "size": billed.image_size,
        }

        def send() -> None:
            self.start_sse({"x-request-id": billed.request_id})
            for index in range(min(partial_images, 3)):
                event = f"{kind}.partial_image"
                body = {"type": event, "b64_json": TINY_PNG, "partial_image_index": index}
                self.send_sse({**body, **common}, event=event)
            event = f"{kind}.completed"
            completed = {"type": event, "b64_json": TINY_PNG, **common}
            shown = _usage_json(usage, fault)
            if shown is not None:
                completed["usage"] = shown
            self._bill(billed)
            self.send_sse(completed, event=event)
            self.end_chunks()

        self._deliver_stream(billed, send)


def make_server(host: str = "127.0.0.1", port: int = 0) -> tuple[SandboxHTTPServer, OpenAISandbox]:
    state = OpenAISandbox()
    handler = type("BoundOpenAIHandler", (OpenAIHandler,), {"sandbox": state})
    return SandboxHTTPServer(host, port, handler), state
