"""The application's storage: its tables, schemas, settings and sessions.

tokenmeter's ledger (``tokenmeter.OpenAICall``) is the library's, not part of this package.
"""

from models.db import dispose_after_fork, get_engine, session_scope
from models.schemas import AgentScannedPostSchema, PipelineRunSchema, PipelineRunUsageSchema
from models.settings import Settings, get_settings
from models.tables import AgentScannedPost, Base, PipelineRun, PipelineRunUsage

__all__ = [
    "AgentScannedPost",
    "AgentScannedPostSchema",
    "Base",
    "PipelineRun",
    "PipelineRunSchema",
    "PipelineRunUsage",
    "PipelineRunUsageSchema",
    "Settings",
    "dispose_after_fork",
    "get_engine",
    "get_settings",
    "session_scope",
]
