"""tests/services.reverse_proxy: a real HAProxy round-robining over local servers, which keeps
answering, POSTs included, when one of them is gone (the groundwork of the multi-replica rehearsal)."""

from __future__ import annotations

import http.server
import threading
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from tests.services import reverse_proxy


class _Named(http.server.BaseHTTPRequestHandler):
    """Answers every GET and POST with the server's name (and the size of the body it read)."""

    protocol_version = "HTTP/1.0"  # one request per connection: once the listener closes, the server is gone

    def _answer(self, body: bytes) -> None:
        text = f"{self.server.name} {len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._answer(b"")

    def do_POST(self):  # noqa: N802
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def log_message(self, *args):
        pass


@contextmanager
def named_server(name: str) -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    server.name = name
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("health_path", [None, "/"], ids=["retries", "retries+health-checks"])
def test_the_proxy_round_robins_and_survives_a_stopped_upstream(health_path):
    with named_server("a") as (a, _), named_server("b") as (b, server_b), reverse_proxy([a, b], health_path) as proxy:
        with httpx.Client(base_url=proxy, timeout=10) as client:
            first = [client.get("/").text.split()[0] for _ in range(6)]
            assert sorted(first) == ["a"] * 3 + ["b"] * 3  # round robin
            server_b.shutdown()
            server_b.server_close()  # b's port now refuses connections
            body = b"x" * 200_000  # larger than HAProxy's 16 kB buffer: retried all the same
            answers = [client.get("/") for _ in range(10)]
            answers += [client.post("/v1/feedback", content=body) for _ in range(10)]
        assert [r.status_code for r in answers] == [200] * 20
        assert {r.text for r in answers} == {"a 0", f"a {len(body)}"}
