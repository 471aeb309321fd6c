"""Read side: one query layer, the HTTP API, the CLI and metrics."""
