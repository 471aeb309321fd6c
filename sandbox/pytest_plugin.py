"""pytest fixtures for the sandbox servers (loaded by tests/conftest.py).

The servers are started once per test session; each test that uses them starts from a clean
provider state (no billed requests, no planned faults, an empty prompt cache), so what one test
sent never changes what another sees, whatever the order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from .runner import SandboxServers

SANDBOX_KEY = "sk-sandbox"


@pytest.fixture(scope="session")
def sandbox_servers() -> Iterator[SandboxServers]:
    with SandboxServers() as servers:
        yield servers


@pytest.fixture
def sandbox(sandbox_servers: SandboxServers) -> SandboxServers:
    """The session's servers, reset for this test (ledger, faults, prompt cache)."""
    sandbox_servers.openai.reset()
    return sandbox_servers


@pytest.fixture
def openai_client(sandbox: SandboxServers) -> Iterator[Any]:
    from openai import OpenAI

    client = OpenAI(base_url=sandbox.openai_base_url, api_key=SANDBOX_KEY, max_retries=0)
    yield client
    client.close()


@pytest.fixture
async def async_openai_client(sandbox: SandboxServers) -> AsyncIterator[Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key=SANDBOX_KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
def praw_reddit(sandbox: SandboxServers) -> Any:
    import praw

    return praw.Reddit(**sandbox.praw_settings())
