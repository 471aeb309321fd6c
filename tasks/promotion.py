"""Promotion scan: read new Reddit posts, rate each with a chat model, comment on the good ones.

Every scanned post gets one ``agent_scanned_posts`` row whose usage columns are the exact sum
of *that post's* calls (rating + comment): each post is analysed inside its own nested usage
scope bound to its row.  Posts are analysed concurrently (threads run under a copy of the
task's context, so each call lands in its post's scope); praw, which is not thread-safe, is used
from the task's own thread only.
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select

from models.db import session_scope
from models.settings import get_settings
from models.tables import AgentScannedPost
from tasks.app import app
from tasks.clients import openai_client, reddit_client
from tasks.dbretry import db_step
from tokenmeter import TableRollup, usage_scope

logger = logging.getLogger(__name__)


class PostRating(BaseModel):
    relevance: int = Field(ge=0, le=10)
    quality: int = Field(ge=0, le=10)
    fit: int = Field(ge=0, le=10)
    summary: str = ""


@dataclass
class Post:
    id: str
    subreddit: str
    title: str
    body: str
    score: int


@dataclass
class Verdict:
    post: Post
    ratings: dict[str, Any] | None
    message: str | None
    rejection: str | None


def post_rollup(post: Post, model: str) -> TableRollup:
    return TableRollup(
        AgentScannedPost,
        key={"post_id": post.id},
        sums={"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
        cost_column="total_cost_usd",
        values={"agent_model": model},
    )


def analyse(post: Post, model: str, threshold: int) -> Verdict:
    """Rate the post (JSON mode) and, if it fits, write a comment: in the post's own scope."""
    client = openai_client()
    with usage_scope("scanned_post", post.id) as scope:
        scope.bind_rollup(post_rollup(post, model))
        rated = client.chat.completions.create(
            model=model,
            response_format={"type": "json_object"},
            messages=[
                {
                    "role": "system",
                    "content": "Rate Reddit posts for a handmade-gift shop. "
                    "Answer JSON with integer relevance, quality, fit (0-10) and a summary.",
                },
                {"role": "user", "content": f"r/{post.subreddit}: {post.title}\n\n{post.body}"},
            ],
        )
        try:
            rating = PostRating.model_validate_json(rated.choices[0].message.content or "")
        except ValidationError as exc:
            return Verdict(post, None, None, f"unreadable rating: {exc.errors()[0]['msg']}")
        if rating.fit < threshold:
            return Verdict(post, rating.model_dump(), None, f"fit {rating.fit} < {threshold}")
        written = client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "system",
                    "content": "Write a short, warm, non-pushy Reddit comment "
                    "that mentions our handmade gift shop only if it genuinely helps.",
                },
                {"role": "user", "content": f"{post.title}\n\n{post.body}"},
            ],
        )
        return Verdict(post, rating.model_dump(), written.choices[0].message.content, None)


def _fetch_posts(reddit: Any, subreddits: list[str], limit: int) -> list[Post]:
    return [
        Post(s.id, str(s.subreddit), s.title, s.selftext or "", int(s.score))
        for sub in subreddits
        for s in reddit.subreddit(sub).new(limit=limit)
    ]


def _record_posts(posts: list[Post], dry: bool, model: str) -> None:
    """The rows exist before any call, for the rollups."""
    now = datetime.now(UTC)
    with session_scope() as session:
        for p in posts:
            session.add(
                AgentScannedPost(
                    post_id=p.id,
                    subreddit=p.subreddit,
                    post_title=p.title,
                    post_score=p.score,
                    dry_run=dry,
                    promoted=False,
                    scanned_at=now,
                    agent_model=model,
                )
            )


def _save_verdict(v: Verdict, comment_id: str | None) -> None:
    with session_scope() as session:
        row = session.scalars(
            select(AgentScannedPost).where(AgentScannedPost.post_id == v.post.id)
        ).one()
        row.agent_ratings = v.ratings
        row.promotion_message = v.message
        row.rejection_reason = v.rejection
        row.promoted = v.message is not None
        row.comment_id = comment_id


def _unseen(posts: list[Post]) -> list[Post]:
    with session_scope() as session:
        seen = set(
            session.scalars(
                select(AgentScannedPost.post_id).where(
                    AgentScannedPost.post_id.in_([p.id for p in posts])
                )
            )
        )
    return [p for p in posts if p.id not in seen]


@app.task(bind=True, name="tasks.promotion_scan")
def promotion_scan(
    self: Any,
    subreddits: list[str] | None = None,
    limit: int | None = None,
    dry_run: bool | None = None,
) -> dict[str, Any]:
    """Scan new posts once.  Beat runs it every PROMOTION_INTERVAL_S; callable on demand."""
    settings = get_settings()
    subs = subreddits or settings.subreddits
    dry = settings.promotion_dry_run if dry_run is None else dry_run
    model = settings.openai_community_agent_model
    reddit = reddit_client()
    found = _fetch_posts(reddit, subs, limit or settings.promotion_post_limit)
    posts = db_step("skipping posts already scanned", lambda: _unseen(found))
    db_step("recording the posts", lambda: _record_posts(posts, dry, model))
    with ThreadPoolExecutor(max_workers=settings.promotion_concurrency) as pool:
        futures = [
            pool.submit(
                contextvars.copy_context().run, analyse, p, model, settings.promotion_threshold
            )
            for p in posts
        ]
        verdicts = []
        for post, future in zip(posts, futures, strict=True):
            try:
                verdicts.append(future.result())
            except Exception as exc:  # one bad post does not stop the scan
                logger.warning("post %s could not be analysed: %s", post.id, exc)
                verdicts.append(Verdict(post, None, None, f"{type(exc).__name__}: {exc}"))
    promoted = 0
    for v in verdicts:
        comment_id = None
        if v.message and not dry:
            comment_id = reddit.submission(id=v.post.id).reply(v.message).id
        # the comment is posted: wait out a database outage rather than rescan and repost
        db_step("saving a verdict", partial(_save_verdict, v, comment_id))
        promoted += v.message is not None
    return {"scanned": len(posts), "promoted": promoted, "dry_run": dry, "subreddits": subs}
