"""Loopback servers that speak the OpenAI and Reddit HTTP APIs and keep ground truth."""
