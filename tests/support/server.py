"""Run the edgetrust Flask app on a real HTTP server on 127.0.0.1 inside the test process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server


class ServerThread:
    def __init__(self, app: Flask, port: int = 0):
        self.app = app
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextmanager
def serving(app: Flask, port: int = 0) -> Iterator[ServerThread]:
    """Serve ``app`` on 127.0.0.1 for the duration of the block, on ``port`` or a free one."""
    server = ServerThread(app, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
