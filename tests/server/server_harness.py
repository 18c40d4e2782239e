"""A real uvicorn server on 127.0.0.1 (any free port) in a background thread, around build_app.

Threads rather than processes for most tests: the test can look inside the FakeEngine (aborts,
parameters it received) directly. The SIGTERM test uses a subprocess (tests/server/serve_fake.py).
"""

from __future__ import annotations

import threading
import time

import uvicorn

from jaxserve.server.app import build_app
from jaxserve.server.config import ServerConfig


class ServerThread:
    def __init__(self, engine, config: ServerConfig | None = None):
        self.engine = engine
        self.config = config or ServerConfig(port=0, uvicorn_log_level="warning")
        self.app = build_app(engine, self.config)
        uv = uvicorn.Config(self.app, host="127.0.0.1", port=0, lifespan="on",
                            log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Polls `predicate` until true or `timeout` seconds pass (bounded, never forever)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
