"""A fault-injecting HTTP proxy for the tests of the OpenAI-compatible backend.

It forwards to a real server on 127.0.0.1, except that the POSTs it receives follow a fixed schedule of
faults: the n-th POST (counting from 0) gets SCHEDULE[n % len(SCHEDULE)]. A fault is one of

- "429": Too Many Requests with `Retry-After: RETRY_AFTER_S`, without asking the server;
- "500": Internal Server Error, without asking the server;
- "stall": no answer for `stall_s` seconds (longer than the client's timeout), then the connection closes;
- "drop": the connection closes as soon as the request is read, with no answer at all;
- "cut": the server's real answer is forwarded with its full Content-Length but only half its body,
  then the connection closes.

Every POST is logged (its fault, a hash of its body, when it came and when it was answered), so a test
can count the faults it really injected and check that a retry waited what Retry-After asked.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

RETRY_AFTER_S = 2
SCHEDULE = ("429", None, "500", None, "stall", None, "drop", None, "cut", None)


class FaultProxy:
    """`with FaultProxy(upstream, stall_s) as proxy:` serves on `proxy.url` until the block ends."""

    def __init__(self, upstream: str, stall_s: float):
        self.upstream = urlsplit(upstream)
        self.stall_s = stall_s
        self.log: list[dict] = []  # one entry per POST: {"fault", "body", "received_at", "answered_at"}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True  # a stalled handler must not keep the test process alive
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def injected(self, fault: str) -> int:
        return sum(entry["fault"] == fault for entry in self.log)

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()  # releases stalled handlers
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, body: bytes) -> dict:
        with self.lock:
            entry = {"fault": SCHEDULE[len(self.log) % len(SCHEDULE)], "body": hashlib.sha256(body).hexdigest(),
                     "received_at": time.monotonic(), "answered_at": None}
            self.log.append(entry)
            return entry

    def _forward(self, method: str, path: str, body: bytes, headers) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=600)
        try:
            forwarded = {name: headers[name] for name in ("Content-Type", "Authorization") if headers[name]}
            connection.request(method, path, body=body or None, headers=forwarded)
            response = connection.getresponse()
            return response.status, [(k, v) for k, v in response.getheaders() if k.lower() == "content-type"], response.read()
        finally:
            connection.close()

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, send: bytes | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body if send is None else send)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up waiting (its timeout) and went away

            def do_GET(self) -> None:
                self._reply(*proxy._forward("GET", self.path, b"", self.headers))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                entry = proxy._next_fault(body)
                fault = entry["fault"]
                error = [("Content-Type", "application/json")]
                if fault == "429":
                    self._reply(429, [*error, ("Retry-After", str(RETRY_AFTER_S))], b'{"error": {"message": "slow down"}}')
                elif fault == "500":
                    self._reply(500, error, b'{"error": {"message": "injected failure"}}')
                elif fault == "stall":
                    proxy.stopping.wait(proxy.stall_s)
                    self.close_connection = True
                elif fault == "drop":
                    self.close_connection = True
                else:
                    status, headers, answer = proxy._forward("POST", self.path, body, self.headers)
                    if fault == "cut":
                        self._reply(status, headers, answer, send=answer[: len(answer) // 2])
                        self.close_connection = True
                    else:
                        self._reply(status, headers, answer)
                entry["answered_at"] = time.monotonic()

        return Handler
