"""A real uvicorn server on a free loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.config import Settings


def _granian_missing() -> str:
    try:
        import granian  # noqa: F401
    except ImportError as exc:
        return f"granian is not importable ({exc}); install the extra: pip install -e '.[granian]'"
    return ""


# For tests of ``committee-serve --server granian``: skipped, with the reason, where granian is not installed.
needs_granian = pytest.mark.skipif(bool(_granian_missing()), reason=_granian_missing() or "granian is installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(settings: Settings, app=None) -> Iterator[str]:
    """Serve ``app`` (default: ``create_app(settings)``) until the block ends."""
    port = free_port()
    config = uvicorn.Config(app or create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def get(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.get(url + path, timeout=30, **kwargs)


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=30, **kwargs)


def wait_until_ready(probe: str, proc: "subprocess.Popen", what: str, timeout_s: float = 60) -> None:
    """Poll ``probe`` until it answers 200; fail with the process's last stderr if it exits first or
    time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(probe, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


@contextmanager
def serving_process(store, *flags: str, env: dict[str, str] | None = None, port: int | None = None,
                    stdout: int | None = None) -> Iterator[tuple[str, "subprocess.Popen"]]:
    """``committee-serve`` in its own process (its own GIL, as users run it), ready when this
    yields; on ``port`` (default: a free one). Its stderr is a pipe; its stdout (granian logs there)
    goes to ``stdout`` (default: this process's)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = port or free_port()
    command = [str(Path(sys.executable).parent / "committee-serve"), "--store", str(store), "--port", str(port),
               "--log-level", "warning", *flags]
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=stdout, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url + "/v2/health/ready", proc, "committee-serve")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


class ClientLoop:
    """A client that sends requests on a thread while the ``with`` block runs (``step(client, i)``
    once per iteration), then stops by itself: the traffic of fault tests."""

    def __init__(self, base: str, pause_s: float = 0.0) -> None:
        self.base = base
        self.pause_s = pause_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def step(self, client: httpx.Client, i: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                self.step(client, i)
                i += 1
                time.sleep(self.pause_s)
