"""Side-by-side serving benchmark: one run, one machine, every number next to its reference.

    python -m benchmarks.serving [--seconds 10] [--concurrency 32] [--markdown docs/benchmarks.md]

Measures, each in its own process (torch never shares a process with ONNX Runtime compute):
  - raw ONNX Runtime on the model (batch-1 latency, batch-32 throughput),
  - a naive FastAPI + ONNX Runtime server without batching (JSON tensors),
  - committee-serve with JSON tensors and with binary tensors (Open Inference Protocol v2),
with wrk as the load generator (one image per request), and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import orjson

MODEL = "resnet18"


@dataclass(frozen=True)
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(command: list[str], port: int, probe: str) -> Iterator[str]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(url + probe, timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, body: bytes, headers: dict[str, str], connections: int, seconds: float, workdir: Path) -> Load:
    body_path = workdir / f"body-{len(body)}-{len(headers)}.bin"
    body_path.write_bytes(body)
    script = workdir / "post.lua"
    lines = ['wrk.method = "POST"', f'local f = io.open("{body_path}", "rb")', "wrk.body = f:read('*all')", "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Load(rps, p50, p99, int(errors.group(1)) if errors else 0)


def bodies(x: np.ndarray) -> tuple[bytes, tuple[bytes, dict[str, str]]]:
    json_body = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    header = orjson.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    })
    return json_body, (header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"})


def run(seconds: float, concurrency: int, workdir: Path, serve_args: list[str]) -> dict:
    py = sys.executable
    store = workdir / "store"
    subprocess.run([py, "-m", "benchmarks.make_model", "--store", str(store), "--arch", MODEL], check=True)
    raw = json.loads(subprocess.run([py, "-m", "benchmarks.raw_ort", "--store", str(store), "--model", MODEL,
                                     "--seconds", str(seconds)], capture_output=True, text=True, check=True).stdout)
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    json_body, (binary_body, binary_headers) = bodies(x)
    json_headers = {"Content-Type": "application/json"}
    path = f"/v2/models/{MODEL}/infer"
    results: dict = {"raw": raw}

    port = free_port()
    with server([py, "-m", "benchmarks.naive_server", str(store), MODEL, str(port)], port, "/docs") as url:
        wrk(url + path, json_body, json_headers, concurrency, 2, workdir)  # warm-up
        results["naive_json"] = wrk(url + path, json_body, json_headers, concurrency, seconds, workdir)

    port = free_port()
    beside_python = Path(sys.executable).parent / "committee-serve"  # the venv's script, activated or not
    serve = [str(beside_python) if beside_python.exists() else "committee-serve", "--store", str(store), "--port", str(port), "--log-level", "warning", *serve_args]
    with server(serve, port, "/v2/health/ready") as url:
        wrk(url + path, json_body, json_headers, concurrency, 2, workdir)
        results["serve_json_c1"] = wrk(url + path, json_body, json_headers, 1, seconds, workdir)
        results["serve_json"] = wrk(url + path, json_body, json_headers, concurrency, seconds, workdir)
        results["serve_binary"] = wrk(url + path, binary_body, binary_headers, concurrency, seconds, workdir)
        metrics = httpx.get(url + "/metrics").text
        count = float(re.search(rf'committee_batch_size_count{{model="{MODEL}:1"}} (\S+)', metrics).group(1))  # type: ignore[union-attr]
        total = float(re.search(rf'committee_batch_size_sum{{model="{MODEL}:1"}} (\S+)', metrics).group(1))  # type: ignore[union-attr]
        results["mean_batch"] = total / count
    return results


def table(r: dict, concurrency: int) -> str:
    raw = r["raw"]
    batch_key = next(k for k in raw if k.startswith("batch") and k.endswith("img_per_s") and k != "batch1_per_s")
    batch_label = batch_key.split("_")[0]  # e.g. batch32
    naive = r["naive_json"].requests_per_s

    def row(label: str, load: Load, ref: float, ref_name: str) -> tuple[str, ...]:
        errors = f" ({load.errors} non-2xx)" if load.errors else ""
        return (label, f"{load.requests_per_s:,.0f} req/s", f"{load.p50_ms:.2f}", f"{load.p99_ms:.2f}",
                f"{load.requests_per_s / ref:.2f} × {ref_name}{errors}")

    rows = [
        ("raw ONNX Runtime, batch 1", f"{raw['batch1_per_s']:,.0f} img/s", f"{raw['batch1_ms_p50']:.2f}", "", "reference"),
        (f"raw ONNX Runtime, {batch_label}", f"{raw[batch_key]:,.0f} img/s", "", "", "reference"),
        row(f"naive FastAPI + ORT, JSON, c={concurrency}", r["naive_json"], naive, "naive"),
        row("committee-serve, JSON, c=1", r["serve_json_c1"], raw["batch1_per_s"], "raw batch 1"),
        row(f"committee-serve, JSON, c={concurrency}", r["serve_json"], naive, "naive"),
        row(f"committee-serve, binary, c={concurrency}", r["serve_binary"], naive, "naive"),
    ]
    lines = ["| setup | throughput | p50 ms | p99 ms | ratio |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(x) + " |" for x in rows]
    lines += [
        "",
        f"- committee-serve binary / raw ONNX Runtime at {batch_label}: {r['serve_binary'].requests_per_s / raw[batch_key]:.2f}",
        f"- committee-serve JSON / raw ONNX Runtime at {batch_label}: {r['serve_json'].requests_per_s / raw[batch_key]:.2f}",
        f"- mean executed batch size in committee-serve over the run: {r['mean_batch']:.1f}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each measured load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--markdown", type=Path, help="also write the table into this Markdown file")
    parser.add_argument("--queue-delay-ms", type=float, help="committee-serve --max-queue-delay-ms (default: the server's)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian), or run `make bench`, which installs it")
    with tempfile.TemporaryDirectory() as tmp:
        serve_args = [] if args.queue_delay_ms is None else ["--max-queue-delay-ms", str(args.queue_delay_ms)]
        results = run(args.seconds, args.concurrency, Path(tmp), serve_args)
    text = table(results, args.concurrency)
    print(text)
    if args.markdown:
        command = "python -m benchmarks.serving " + " ".join(sys.argv[1:])
        args.markdown.write_text(
            f"# Serving benchmark\n\nModel: timm {MODEL} (random weights) at 3×32×32, one image per request, "
            f"load from wrk on the same machine ({os.cpu_count()} cores, no GPU).\n\n"
            f"Command: `{command}` (or `make bench`)\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
