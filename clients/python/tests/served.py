"""An ASGI app (an official SDK's server) served by uvicorn on a free local port in a thread, for
the tests that pay it through the daemon."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class Served:
    """`app` listening on 127.0.0.1 (`port`) until `stop()`; `name` is for the start error."""

    def __init__(self, app: Any, name: str) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.02)
        self.port: int = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
