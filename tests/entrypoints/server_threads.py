"""Running a uvicorn server in a thread of the test process (a module of its own, so
every test file can import it; importing from ``conftest`` picks whichever came first)."""

from __future__ import annotations

import threading
import time

STARTUP_TIMEOUT_S = 60


def start_in_thread(server) -> threading.Thread:
    """Start ``server.run`` in a daemon thread and wait until it accepts connections."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return thread
