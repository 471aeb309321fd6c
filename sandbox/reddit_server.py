"""A loopback server that speaks enough of Reddit's OAuth API for the real ``praw`` client.

``POST /api/v1/access_token`` (password and client-credentials grants), ``GET /r/{sub}/new``
and ``/r/{sub}/hot`` (Listings of ``t3`` things with ``after`` pagination and ``limit``),
``POST /api/comment`` (reply to a post), ``GET /api/info`` (by fullnames), ``GET /api/v1/me``.
Seeded from ``sandbox/data/posts.json``.  Posted comments are recorded for tests
(``RedditState.comments``, ``GET /_sandbox/reddit/comments``).

Point praw at it with its own settings: ``praw.Reddit(..., oauth_url=URL, reddit_url=URL,
short_url=URL)`` (see ``SandboxServers.praw_settings()``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from .http import JSONHandler, SandboxHTTPServer


@dataclass
class Comment:
    id: str
    parent_fullname: str
    body: str
    author: str
    subreddit: str
    created_utc: float


@dataclass
class RedditState:
    posts: list[dict[str, Any]] = field(default_factory=list)
    comments: list[Comment] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def seeded(cls) -> RedditState:
        return cls(posts=load_seed_posts())

    def add_post(self, subreddit: str, title: str, selftext: str = "", **extra: Any) -> str:
        post_id = uuid.uuid4().hex[:7]
        with self.lock:
            self.posts.append(
                {
                    "id": post_id,
                    "subreddit": subreddit,
                    "title": title,
                    "selftext": selftext,
                    "author": extra.get("author", "sandbox_user"),
                    "score": extra.get("score", 1),
                    "num_comments": extra.get("num_comments", 0),
                    "created_utc": extra.get("created_utc", time.time()),
                }
            )
        return post_id

    def reset(self) -> None:
        with self.lock:
            self.posts = load_seed_posts()
            self.comments.clear()

    def listing(self, subreddit: str, sort: str) -> list[dict[str, Any]]:
        with self.lock:
            wanted = [p for p in self.posts if p["subreddit"].lower() == subreddit.lower()]
        if sort == "hot":
            return sorted(wanted, key=lambda p: (-p["score"], p["id"]))
        return sorted(wanted, key=lambda p: (-p["created_utc"], p["id"]))


def load_seed_posts() -> list[dict[str, Any]]:
    text = resources.files("sandbox").joinpath("data/posts.json").read_text(encoding="utf-8")
    return list(json.loads(text))


def _t3(post: dict[str, Any]) -> dict[str, Any]:
    sub = post["subreddit"]
    permalink = f"/r/{sub}/comments/{post['id']}/"
    return {
        "kind": "t3",
        "data": {
            "id": post["id"],
            "name": f"t3_{post['id']}",
            "title": post["title"],
            "selftext": post["selftext"],
            "author": post["author"],
            "subreddit": sub,
            "subreddit_name_prefixed": f"r/{sub}",
            "score": post["score"],
            "ups": post["score"],
            "num_comments": post["num_comments"],
            "created_utc": post["created_utc"],
            "permalink": permalink,
            "url": f"https://www.reddit.com{permalink}",
            "is_self": True,
            "over_18": False,
            "stickied": False,
            "locked": False,
            "archived": False,
        },
    }


def _t1(comment: Comment) -> dict[str, Any]:
    post_id = comment.parent_fullname.split("_", 1)[1]
    return {
        "kind": "t1",
        "data": {
            "id": comment.id,
            "name": f"t1_{comment.id}",
            "body": comment.body,
            "author": comment.author,
            "parent_id": comment.parent_fullname,
            "link_id": comment.parent_fullname,
            "subreddit": comment.subreddit,
            "created_utc": comment.created_utc,
            "score": 1,
            "permalink": f"/r/{comment.subreddit}/comments/{post_id}/_/{comment.id}/",
            "replies": "",
        },
    }


class RedditHandler(JSONHandler):
    state: RedditState  # set on the subclass built by make_server

    def _form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.read_body().decode()).items()}

    def do_POST(self) -> None:
        path = self.path_only
        if path == "/api/v1/access_token":
            form = self._form()
            if "Authorization" not in self.headers or form.get("grant_type") not in {
                "password",
                "client_credentials",
                "refresh_token",
                "https://oauth.reddit.com/grants/installed_client",
            }:
                self.send_json(401, {"message": "Unauthorized", "error": 401})
                return
            self.send_json(
                200,
                {
                    "access_token": "sandbox-" + uuid.uuid4().hex,
                    "token_type": "bearer",
                    "expires_in": 86400,
                    "scope": "*",
                },
            )
        elif path == "/api/v1/revoke_token":
            self.read_body()
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/api/comment":
            self._comment(self._form())
        elif path == "/_sandbox/reset":
            self.read_body()
            self.state.reset()
            self.send_json(200, {"ok": True})
        else:
            self.read_body()
            self.send_json(404, {"message": "Not Found", "error": 404})

    def _comment(self, form: dict[str, str]) -> None:
        parent, text = form.get("thing_id", ""), form.get("text", "")
        post_id = parent.split("_", 1)[1] if parent.startswith("t3_") else ""
        with self.state.lock:
            post = next((p for p in self.state.posts if p["id"] == post_id), None)
        if post is None or not text:
            errors = [["BAD_REQUEST", "unknown thing_id or empty text", "thing_id"]]
            self.send_json(200, {"json": {"errors": errors}})
            return
        comment = Comment(
            uuid.uuid4().hex[:7], parent, text, "tokenmeter_bot", post["subreddit"], time.time()
        )
        with self.state.lock:
            self.state.comments.append(comment)
        self.send_json(200, {"json": {"errors": [], "data": {"things": [_t1(comment)]}}})

    def do_GET(self) -> None:
        parts = [p for p in self.path_only.split("/") if p]
        query = {k: v[0] for k, v in self.query.items()}
        if len(parts) == 3 and parts[0] == "r" and parts[2] in {"new", "hot"}:
            self._listing(self.state.listing(parts[1], parts[2]), query)
        elif parts == ["api", "info"]:
            wanted = set(query.get("id", "").split(","))
            with self.state.lock:
                found = [p for p in self.state.posts if f"t3_{p['id']}" in wanted]
            self._listing(found, {"limit": "100"})
        elif parts == ["api", "v1", "me"]:
            self.send_json(200, {"name": "tokenmeter_bot", "id": "sandbox", "created_utc": 0})
        elif parts == ["_sandbox", "reddit", "comments"]:
            with self.state.lock:
                rows = [c.__dict__ for c in self.state.comments]
            self.send_json(200, rows)
        else:
            self.send_json(404, {"message": "Not Found", "error": 404})

    def _listing(self, posts: list[dict[str, Any]], query: dict[str, str]) -> None:
        limit = max(1, min(int(query.get("limit") or 25), 100))
        start = 0
        if after := query.get("after"):
            ids = [f"t3_{p['id']}" for p in posts]
            start = ids.index(after) + 1 if after in ids else len(posts)
        page = posts[start : start + limit]
        next_after = f"t3_{page[-1]['id']}" if page and start + limit < len(posts) else None
        self.send_json(
            200,
            {
                "kind": "Listing",
                "data": {
                    "after": next_after,
                    "before": None,
                    "dist": len(page),
                    "children": [_t3(p) for p in page],
                },
            },
            {"x-ratelimit-remaining": "599", "x-ratelimit-used": "1", "x-ratelimit-reset": "600"},
        )


def make_server(host: str = "127.0.0.1", port: int = 0) -> tuple[SandboxHTTPServer, RedditState]:
    state = RedditState.seeded()
    handler = type("BoundRedditHandler", (RedditHandler,), {"state": state})
    return SandboxHTTPServer(host, port, handler), state
