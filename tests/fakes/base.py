"""The shared part of the fake API servers: a threaded HTTP server that records requests."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        return self.body.get("model")


class FakeServer(ThreadingHTTPServer):
    """A threaded server on 127.0.0.1 with a free port; `start()` serves it in a daemon thread."""

    daemon_threads = True
    handler_class: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), self.handler_class)
        self.requests: list[Recorded] = []
        #: Reply text per model (for tests where models answer differently), else the default text.
        self.replies: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, request: Recorded) -> None:
        with self._lock:
            self.requests.append(request)

    @property
    def models(self) -> list[str | None]:
        """The `model` of every request received, in order."""
        with self._lock:
            return [r.model for r in self.requests]

    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeHandler(BaseHTTPRequestHandler):
    """Reads the JSON body, records the request, dispatches on the path; helpers to answer."""

    server: FakeServer
    protocol_version = "HTTP/1.1"
    routes: ClassVar[dict[str, str]] = {}  # path -> method name

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else {}
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.record(Recorded("POST", self.path, body, headers))
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        getattr(self, route)(body, headers)

    def option(self, headers: dict[str, str], name: str, default: int = 0) -> int:
        value = headers.get(f"x-fake-{name}")
        return int(value) if value is not None else default

    def send_json(self, status: int, payload: Any, extra_headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def send_event(self, data: Any, event: str | None = None) -> bool:
        """Write one SSE event; False when the client has gone away (an abandoned stream)."""
        text = data if isinstance(data, str) else json.dumps(data)
        chunk = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
        try:
            self.wfile.write(chunk.encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True
