"""The real servers users run beside us, started by tests from Debian's packages: PostgreSQL,
Prometheus and HAProxy (the reverse proxy in front of several replicas). Each skips with the exact
reason when its program is not installed here."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from tests.server import free_port, wait_until_ready


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql where apt is usable; here it is not)")
    return Path(found[-1]).parent


class Postgres:
    """A running throwaway PostgreSQL cluster that a test can stop and start again (same port)."""

    def __init__(self, pg_ctl: list[str], data: Path, log: Path, options: str, url: str) -> None:
        self._pg_ctl, self._data, self._log, self._options = pg_ctl, data, log, options
        self.url = url

    def start(self) -> None:
        subprocess.run([*self._pg_ctl, "-D", str(self._data), "-l", str(self._log), "-w", "start", "-o", self._options],
                       check=True, capture_output=True)

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as in a crash or a failover."""
        subprocess.run([*self._pg_ctl, "-D", str(self._data), "-m", "fast", "-w", "stop"], check=True, capture_output=True)

    def _processes(self) -> list[int]:
        postmaster = int((self._data / "postmaster.pid").read_text().split()[0])
        children = [int(d) for d in os.listdir("/proc") if d.isdigit() and _parent(int(d)) == postmaster]
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP the server and its backends: connections stay open but nothing answers (a hung
        or overloaded database, the slow fault)."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def postgresql_server() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth). As root it runs as the
    ``postgres`` user, which PostgreSQL requires."""
    bindir = _postgres_bin()
    as_root = os.geteuid() == 0
    if as_root:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    workdir = Path(tempfile.mkdtemp(prefix="committee-pg-"))
    data, sockets = workdir / "data", workdir / "run"
    sockets.mkdir()
    if as_root:
        os.chown(workdir, user.pw_uid, user.pw_gid)
        os.chown(sockets, user.pw_uid, user.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    port = free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    server = Postgres([*prefix, str(bindir / "pg_ctl")], data, workdir / "log",
                      f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off",
                      f"postgresql://postgres@127.0.0.1:{port}/postgres")
    server.start()
    try:
        yield server
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def postgresql() -> Iterator[str]:
    """A throwaway PostgreSQL cluster's URL (see ``postgresql_server``)."""
    with postgresql_server() as server:
        yield server.url


@contextmanager
def prometheus(targets: list[str], workdir: Path, scrape_interval_ms: int = 1000, rules: Path | None = None) -> Iterator[str]:
    """Debian's Prometheus scraping ``targets`` (host:port) on loopback; yields its base URL."""
    program = shutil.which("prometheus")
    if program is None:
        pytest.skip("Prometheus is not installed (make test installs Debian's prometheus where apt is usable; here it is not)")
    port = free_port()
    config = workdir / "prometheus.yml"
    rule_files = f"rule_files: [{str(rules)!r}]\n" if rules else ""
    config.write_text(
        f"global:\n  scrape_interval: {scrape_interval_ms}ms\n  evaluation_interval: {scrape_interval_ms}ms\n{rule_files}"
        f"scrape_configs:\n  - job_name: committee\n    static_configs:\n      - targets: {targets!r}\n")
    proc = subprocess.Popen([program, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url + "/-/ready", proc, "prometheus")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def reverse_proxy(upstreams: Sequence[str], health_path: str | None = None, retries: int = 3) -> Iterator[str]:
    """Debian's HAProxy on a free loopback port, round-robin over ``upstreams`` ("host:port" or
    "http://host:port"); yields its base URL. This is what a Service or an ingress does in front of
    replicas, on this machine.

    Retries: a request whose connection to an upstream fails (refused or timed out: that server is
    down) goes to the next upstream, up to ``retries`` times, POSTs included. That is safe because
    such a request never reached a server (``retry-on conn-failure`` + ``option redispatch``). A
    request already sent is never sent again, so nothing is done twice: if its upstream dies before
    answering, the client gets 502 (or 504 after the server timeout, 60 s). With ``health_path``,
    HAProxy also checks every upstream each 0.5 s (GET, 2xx or 3xx passes) and stops routing to one
    after two failed checks, until one check passes again."""
    program = shutil.which("haproxy")
    if program is None:
        pytest.skip("HAProxy is not installed (make test installs Debian's haproxy where apt is usable; here it is not)")
    if not upstreams:
        raise ValueError("reverse_proxy needs at least one upstream (host:port)")
    workdir = Path(tempfile.mkdtemp(prefix="committee-proxy-"))
    port = free_port()
    check = " check inter 500ms fall 2 rise 1" if health_path else ""
    servers = "\n".join(f"    server u{i} {u.removeprefix('http://').rstrip('/')}{check}" for i, u in enumerate(upstreams))
    health = f"    option httpchk GET {health_path}\n" if health_path else ""
    config = workdir / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 1024\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n"
        f"    retries {retries}\n    retry-on conn-failure\n    option redispatch 1\n"
        f"frontend committee\n    bind 127.0.0.1:{port}\n    default_backend replicas\n"
        f"backend replicas\n    balance roundrobin\n{health}{servers}\n")
    log = workdir / "stderr"
    proc = None
    try:
        checked = subprocess.run([program, "-c", "-f", str(config)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration:\n{config.read_text()}\n{checked.stdout}{checked.stderr}")
        with log.open("wb") as err:  # a file, not a pipe: nothing blocks however much it writes
            proc = subprocess.Popen([program, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while True:  # ready once it accepts connections (the upstreams may still be starting)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
