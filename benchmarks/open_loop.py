"""An open-loop HTTP/1.1 load generator: requests leave on a fixed schedule (Poisson arrivals at a
given rate), whatever the server does, so a slow server meets more load, not less (wrk's closed
loop waits for each answer before it sends the next, and so hides overload; "coordinated omission").

Each request is a prepared byte string written to a keep-alive connection that is idle at its send
time; a new connection is opened when none is (up to ``max_connections``: beyond it the request is
counted as ``unsent``, which says the generator, not the server, was the limit). Responses are parsed
just enough: status, ``Content-Length``, one header and two JSON numbers of the body. Latency is
from the scheduled send time to the last byte of the answer. Runs on uvloop where installed.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import numpy as np

HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Answer:
    status: int
    latency_s: float  # scheduled send -> last byte
    variant: str  # the X-Committee-Variant header ("" when absent)
    server_ms: float | None  # the body's timings.total_ms (decode + queue + compute), when present
    cascade_point: int | None


@dataclass
class Run:
    offered: int = 0
    unsent: int = 0
    failed: int = 0  # connection errors
    answers: list[Answer] = field(default_factory=list)


def request_bytes(path: str, host: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_TOTAL = re.compile(rb'"total_ms":([0-9.eE+-]+)')
_POINT = re.compile(rb'"cascade_point":(\d+)')


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self, data: bytes, scheduled: float) -> asyncio.Future:
        self.sent_at = scheduled
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(HEADER_END)
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        length = int(_header(head, b"content-length") or 0)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        total, point = _TOTAL.search(body), _POINT.search(body)
        server_ms = None if total is None else float(total.group(1))
        answer = Answer(int(head[9:12]), time.monotonic() - self.sent_at, (_header(head, b"x-committee-variant") or b"").decode(),
                        server_ms, None if point is None else int(point.group(1)))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)
        self.pool.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(str(exc or "closed")))
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        self.pool.open -= 1


class _Pool:
    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[_Connection] = []
        self.open = 0

    async def take(self) -> _Connection | None:
        if self.idle:
            return self.idle.pop()
        if self.open >= self.limit:
            return None
        self.open += 1
        try:
            _, conn = await asyncio.get_running_loop().create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError:
            self.open -= 1
            raise
        return conn  # type: ignore[return-value]


async def _drive(host: str, port: int, requests: list[bytes], rate: float, seconds: float, max_connections: int,
                 seed: int) -> Run:
    pool = _Pool(host, port, max_connections)
    run = Run()
    pending: list[asyncio.Task] = []
    gaps = np.random.default_rng(seed).exponential(1 / rate, size=int(rate * seconds * 1.5) + 10)
    start = time.monotonic()
    at = start
    gaps = gaps.tolist()

    async def one(scheduled: float, request: bytes) -> None:
        try:
            conn = await pool.take()
            if conn is None:
                run.unsent += 1
                return
            run.answers.append(await conn.send(request, scheduled))
        except (ConnectionError, OSError):
            run.failed += 1

    for gap in gaps:
        at += gap
        if at - start > seconds:
            break
        await asyncio.sleep(max(0.0, at - time.monotonic()))  # yields even when behind: answers keep flowing
        pending.append(asyncio.ensure_future(one(at, requests[run.offered % len(requests)])))
        run.offered += 1
    await asyncio.gather(*pending)
    for conn in pool.idle:
        if conn.transport is not None:
            conn.transport.close()
    return run


def open_loop(url: str, path: str, bodies: list[bytes], headers: dict[str, str], rate: float, seconds: float,
              max_connections: int = 2000, seed: int = 0) -> Run:
    """Offer ``rate`` requests/s (Poisson) for ``seconds`` to ``url`` + ``path``, the ``bodies`` in
    turn; every answer back."""
    host, port = url.removeprefix("http://").split(":")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    requests = [request_bytes(path, host, body, headers) for body in bodies]
    return runner(_drive(host, int(port), requests, rate, seconds, max_connections, seed))
