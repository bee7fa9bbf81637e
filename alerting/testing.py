"""Test doubles for receivers: a threaded local HTTP server that records what it is sent and answers
as scripted (202 + JSON like PagerDuty, 429 with Retry-After, 5xx, or a closed port for an outage).
Used by the tests and handy for trying a configuration locally."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec


class Received(msgspec.Struct):
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


# A responder gets the request and returns (status, headers, body) or None for the default answer.
Responder = Callable[[Received], "tuple[int, dict[str, str], bytes] | None"]


class RecordingServer:
    """``RecordingServer(port).start()``; ``.requests`` holds every request that got a 2xx (and
    ``.attempts`` every request). ``script`` is a list of statuses answered first, in order (e.g.
    ``[429, 503]``), then ``default_status``; ``responder`` overrides both."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", default_status: int = 202) -> None:
        self.host = host
        self.port = port
        self.default_status = default_status
        self.script: list[int] = []
        self.retry_after = "1"
        self.responder: Responder | None = None
        self.requests: list[Received] = []
        self.attempts: list[Received] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RecordingServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                request = Received(
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    at=time.time(),
                )
                status, headers, payload = owner._answer(request)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"recording-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _answer(self, request: Received) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.attempts.append(request)
            answer = self.responder(request) if self.responder else None
            if answer is None:
                status = self.script.pop(0) if self.script else self.default_status
                headers = {"Retry-After": self.retry_after} if status == 429 else {}
                if 200 <= status < 300:
                    payload = json.dumps({"status": "success", "message": "Event processed"}).encode()
                else:
                    payload = json.dumps({"status": "error", "message": f"scripted {status}"}).encode()
                answer = (status, headers, payload)
            if 200 <= answer[0] < 300:
                self.requests.append(request)
            self.arrived.notify_all()
            return answer

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait until ``predicate(self.requests)`` holds."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.arrived.wait(left)
            return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
