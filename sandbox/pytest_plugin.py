"""pytest fixtures that start the sandbox servers (filled in by the sandbox issue)."""
