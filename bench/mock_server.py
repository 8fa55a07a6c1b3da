"""A mock OpenAI-compatible server for the HTTP benchmark and tests: every chat completion is answered after
a fixed latency plus a little jitter, any number in parallel (asyncio, so the server itself is not the
bottleneck; plain asyncio streams rather than uvicorn, whose h11 protocol added 40 ms to every request on a
kept-alive connection here), optionally with a capacity: a request that arrives while `capacity` others
are being answered gets HTTP 429 with Retry-After at once. With `hold`, replies wait for `POST /release` (at
most the latency; once released, every reply goes at once): a test sees, through /stats, every request it sent
waiting at the server at once, and measures its own side at that moment, however slowly a busy machine sends
them.

The reply is short and of a fixed form, "The answer is D.", D a digit drawn from a hash of the conversation
and the seed, so the same request always gets the same reply. Usage counts are given as a server would:
the prompt's characters / 4 and the reply's 6 tokens.

`GET /stats` tells what the server saw: for every chat completion request, when it arrived (seconds on the
server's monotonic clock), the status it got, and a hash of its body; the most answered at once, and how many
are being answered now.

    python bench/mock_server.py [--latency S] [--jitter S] [--capacity N] [--retry-after S] [--hold]

prints `port: N` once it listens on 127.0.0.1 and serves until killed. From Python, `MockServer(...)` runs
it in a child process (so that its work does not share a GIL with the client measured) for a `with` block.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import subprocess
import sys
import time
import urllib.request

REPLY_TOKENS = 6


class Mock:
    """The server's state and its answers."""

    def __init__(self, latency: float, jitter: float, capacity: int | None, retry_after: float, hold: bool = False):
        self.latency, self.jitter, self.capacity, self.retry_after = latency, jitter, capacity, retry_after
        self.hold, self.released = hold, asyncio.Event()
        self.seen: list[dict] = []
        self.busy = self.most_busy = 0

    async def completion(self, body: bytes) -> tuple[int, dict, dict]:
        """(status, extra headers, JSON body) for a chat completion request."""
        entry = {"at": time.monotonic(), "status": 200, "body": hashlib.sha256(body).hexdigest()[:16]}
        self.seen.append(entry)
        if self.capacity is not None and self.busy >= self.capacity:
            entry["status"] = 429
            # Retry-After is whole seconds by the standard; retry-after-ms (OpenAI's) says it exactly.
            headers = {"Retry-After": str(math.ceil(self.retry_after)),
                       "retry-after-ms": str(round(self.retry_after * 1000))}
            return 429, headers, {"error": {"message": "over capacity", "type": "rate_limit"}}
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            await self.wait()
        finally:
            self.busy -= 1
        asked = json.loads(body)
        digit = hashlib.sha256(json.dumps([asked["messages"], asked.get("seed")]).encode()).digest()[0] % 10
        prompt_tokens = sum(len(message["content"]) for message in asked["messages"]) // 4
        return 200, {}, {
            "id": "mock", "object": "chat.completion", "created": int(time.time()), "model": asked["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"The answer is {digit}."},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": REPLY_TOKENS,
                      "total_tokens": prompt_tokens + REPLY_TOKENS},
        }

    async def wait(self) -> None:
        """The latency (and jitter) of one reply; with `hold`, until released, at most the latency."""
        if not self.hold:
            await asyncio.sleep(self.latency + random.uniform(0, self.jitter))
            return
        try:
            await asyncio.wait_for(self.released.wait(), self.latency)
        except asyncio.TimeoutError:
            pass

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict]:
        if method == "POST" and path == "/v1/chat/completions":
            return await self.completion(body)
        if path == "/v1/models":
            return 200, {}, {"object": "list", "data": [{"id": "mock", "object": "model"}]}
        if path == "/stats":
            return 200, {}, {"requests": self.seen, "most_at_once": self.most_busy, "at_once": self.busy}
        if method == "POST" and path == "/release":
            self.released.set()
            return 200, {}, {}
        return 404, {}, {"error": {"message": f"no {method} {path} here"}}

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 with keep-alive, as much of it as the `openai` client uses: a request line, headers, a
        body of Content-Length bytes; requests on one connection answered one after another."""
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
                length = int(next((value for name, value in fields.items() if name.lower() == "content-length"), 0))
                status, headers, payload = await self.answer(method, path, await reader.readexactly(length))
                data = json.dumps(payload).encode()
                lines = [f"HTTP/1.1 {status} {STATUS_TEXT[status]}", "Content-Type: application/json",
                         f"Content-Length: {len(data)}", *(f"{name}: {value}" for name, value in headers.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            writer.close()


STATUS_TEXT = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}


def serve(latency: float, jitter: float, capacity: int | None, retry_after: float, hold: bool) -> None:
    async def run() -> None:
        mock = Mock(latency, jitter, capacity, retry_after, hold)
        server = await asyncio.start_server(mock.connection, "127.0.0.1", 0, backlog=4096)
        print(f"port: {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(run())


class MockServer:
    """`with MockServer(latency=1.0, capacity=32) as server:` serves at `server.url` (without /v1) in a
    child process until the block ends; `server.stats()` is its `GET /stats`, `server.release()` answers the
    replies held (`hold=True`)."""

    def __init__(self, latency: float = 1.0, jitter: float = 0.05, capacity: int | None = None,
                 retry_after: float = 1.0, hold: bool = False):
        self.argv = [sys.executable, __file__, "--latency", str(latency), "--jitter", str(jitter),
                     "--retry-after", str(retry_after)] + (["--capacity", str(capacity)] if capacity else []) + (
                     ["--hold"] if hold else [])

    def __enter__(self) -> "MockServer":
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        first = self.process.stdout.readline()
        if not first.startswith("port: "):
            self.process.kill()
            raise RuntimeError(f"the mock server did not start (it printed {first!r})")
        self.url = f"http://127.0.0.1:{first.split()[1]}"  # printed once the server listens
        return self

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=30) as answer:
            return json.load(answer)

    def release(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/release", method="POST"), timeout=30).close()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds before each reply")
    parser.add_argument("--jitter", type=float, default=0.05, help="up to this many seconds more, at random")
    parser.add_argument("--capacity", type=int, default=None, help="requests answered at once; more get 429")
    parser.add_argument("--retry-after", type=float, default=1.0, help="the pause a 429 asks for, in seconds")
    parser.add_argument("--hold", action="store_true", help="hold replies until POST /release (at most --latency)")
    args = parser.parse_args()
    serve(args.latency, args.jitter, args.capacity, args.retry_after, args.hold)


if __name__ == "__main__":
    main()
