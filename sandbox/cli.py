"""``tokenmeter sandbox``: both sandbox servers in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading

from .runner import SandboxServers


def serve(host: str = "127.0.0.1", openai_port: int = 8100, reddit_port: int = 8200) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with SandboxServers(host, openai_port, reddit_port) as servers:
        print(
            f"OpenAI sandbox: {servers.openai_base_url}   (ground truth: "
            f"{servers.openai_base_url.removesuffix('/v1')}/_sandbox/ledger)"
        )
        print(f"Reddit sandbox: {servers.reddit_base_url}")
        print("Point clients at them with:")
        print(f"OPENAI_BASE_URL={servers.openai_base_url}")
        print("OPENAI_API_KEY=sk-sandbox")
        print(f"REDDIT_SANDBOX_URL={servers.reddit_base_url}")
        print("Ctrl-C to stop.", flush=True)
        stop.wait()
    print("sandbox stopped", flush=True)
