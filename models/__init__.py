"""Storage: typed tables, engine/session handling, pydantic schemas, settings."""

from models.db import dispose_after_fork, get_engine, session_scope
from models.schemas import (
    AgentScannedPostSchema,
    OpenAICallSchema,
    PipelineRunSchema,
    PipelineRunUsageSchema,
)
from models.settings import Settings, get_settings
from models.tables import (
    AgentScannedPost,
    Base,
    OpenAICall,
    PipelineRun,
    PipelineRunUsage,
)
from models.types import Money, to_money

__all__ = [
    "AgentScannedPost",
    "AgentScannedPostSchema",
    "Base",
    "Money",
    "OpenAICall",
    "OpenAICallSchema",
    "PipelineRun",
    "PipelineRunSchema",
    "PipelineRunUsage",
    "PipelineRunUsageSchema",
    "Settings",
    "dispose_after_fork",
    "get_engine",
    "get_settings",
    "session_scope",
    "to_money",
]
