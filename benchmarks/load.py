"""The benchmark's instruments: start a server process, drive it with wrk, build v2 request bodies."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import orjson


@dataclass(frozen=True)
class Load:
    """What wrk saw: every response counts in the rate and the latencies, non-2xx ones too."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    seconds: float

    @property
    def ok_per_s(self) -> float:
        return self.requests_per_s - self.errors / self.seconds


@dataclass(frozen=True)
class Body:
    data: bytes
    headers: dict[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committee_serve(store: Path, port: int, *args: str) -> list[str]:
    """The venv's ``committee-serve`` whether or not the venv is activated."""
    beside_python = Path(sys.executable).parent / "committee-serve"
    program = str(beside_python) if beside_python.exists() else "committee-serve"
    return [program, "--store", str(store), "--port", str(port), "--log-level", "warning", *args]


@contextmanager
def server(command: list[str], port: int, probe: str = "/v2/health/ready") -> Iterator[str]:
    """Run ``command`` in its own process group until the block ends; yields the base URL once ``probe`` answers."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(url + probe, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        with suppress(ProcessLookupError):  # the whole group already exited: the error above says why
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def duration_ms(text: str) -> float:
    """wrk's '850.00us' / '1.23ms' / '1.02s' / '1.10m' in milliseconds (NaN for what it prints when
    nothing completed)."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def percentiles_ms(out: str) -> tuple[float, float]:
    """p50 and p99 from wrk's latency distribution (lines of their own: '     50%   12.30ms'; wrk pads
    whole seconds with a trailing space: '     99%    1.11s ')."""
    found = dict(re.findall(r"^\s*(50|99)%\s+(\S+)[ \t]*$", out, re.M))
    return duration_ms(found.get("50", "")), duration_ms(found.get("99", ""))


def wrk(url: str, body: Body, connections: int, seconds: float, workdir: Path) -> Load:
    """POST ``body`` to ``url`` from ``connections`` keep-alive connections (one wrk thread) for ``seconds``."""
    body_path = workdir / f"body-{abs(hash(body.data))}.bin"
    body_path.write_bytes(body.data)
    script = workdir / "post.lua"
    lines = ['wrk.method = "POST"', f'local f = io.open("{body_path}", "rb")', "wrk.body = f:read('*all')", "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in body.headers.items()]
    script.write_text("\n".join(lines) + "\n")
    duration = max(1, round(seconds))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50, p99 = percentiles_ms(out)
    if p50 != p50:
        print(f"wrk measured no latency at {connections} connections:\n{out}", file=sys.stderr)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Load(rps, p50, p99, int(errors.group(1)) if errors else 0, duration)


def json_body(x: np.ndarray, input_name: str) -> Body:
    data = orjson.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    return Body(data, {"Content-Type": "application/json"})


def binary_body(x: np.ndarray, input_name: str, output_name: str) -> Body:
    """The binary tensor extension both ways: raw FP32 bytes in, raw bytes out."""
    header = orjson.dumps({
        "inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    })
    return Body(header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"})


def served_body(url: str, model: str, seed: int = 0) -> Body:
    """A one-image binary request shaped from the model's own v2 metadata (any variant, any input)."""
    meta = httpx.get(f"{url}/v2/models/{model}", timeout=10).raise_for_status().json()
    spec, output = meta["inputs"][0], meta["outputs"][0]
    shape = [1 if d < 0 else d for d in spec["shape"]]
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return binary_body(x, spec["name"], output["name"])


def mean_batch(url: str, model: str) -> float:
    """Mean executed batch size of ``model`` (every version) from the server's own histogram."""
    text = httpx.get(url + "/metrics", timeout=10).text
    label = re.escape(model) + r":\d+"
    count = sum(float(v) for v in re.findall(rf'committee_batch_size_count{{model="{label}"}} (\S+)', text))
    total = sum(float(v) for v in re.findall(rf'committee_batch_size_sum{{model="{label}"}} (\S+)', text))
    return total / count if count else float("nan")


def write_between_markers(page: Path, block: str, text: str) -> None:
    """Replace the generated ``block`` of ``page`` and keep the hand-written rest, so one page can
    hold several scripts' tables beside prose."""
    begin, end = f"<!-- {block}: begin -->", f"<!-- {block}: end -->"
    old = page.read_text() if page.exists() else ""
    if begin not in old or end not in old:
        old = old.rstrip("\n") + "\n\n" + begin + "\n" + end + "\n"
    head, rest = old.split(begin, 1)
    page.write_text(head + begin + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
