"""Three policies under stepped load on the default pipeline's store: always the ensemble, always the
student, and the SLO route (``POST /v1/predict?max_latency_ms=B``).

    python -m benchmarks.slo [--store model-store] [--steps 1,4,16,64,128] [--seconds 8] [--budget-ms B]
                             [--markdown docs/benchmarks.md] [--plot docs/slo.png] [--screenshot docs/overview.png]

Load comes from wrk (closed loop: each step is a number of connections; a refused request is
re-sent at once, so the offered rate at the high steps is several times what the ensemble can
serve). Per step: requests/s offered (answered + refused), successes/s, the 503 share, wrk's
p50/p99 (client side, every response), the share of successes whose server-side time
(``timings.total_ms``) is within the budget, and the achieved accuracy: the test accuracy of the
variants that answered, weighted by their share of the answers. ``--screenshot`` then keeps the
overview page (``GET /``, with the live numbers of the run) as rendered by headless Chromium.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from .load import Body, committee_serve, free_port, percentiles_ms, server, write_between_markers

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

# wrk counts per-variant answers and answers within the budget from each response (one thread).
LUA = """
wrk.method = "POST"
local f = io.open("{body}", "rb"); wrk.body = f:read("*all"); f:close()
wrk.headers["Content-Type"] = "application/json"
threads = {{}}
setup = function(thread) table.insert(threads, thread) end
within, answered, variants = 0, 0, {{}}
response = function(status, headers, body)
  if status ~= 200 then return end
  answered = answered + 1
  local v = headers["x-committee-variant"] or headers["X-Committee-Variant"] or "{fixed}"
  variants[v] = (variants[v] or 0) + 1
  local total = tonumber(string.match(body, '"total_ms":([%d%.eE+-]+)'))
  if total and total <= {budget} then within = within + 1 end
end
done = function(summary, latency, requests)
  for _, t in ipairs(threads) do
    local counts = t:get("variants")
    local parts = {{}}
    for k, n in pairs(counts) do table.insert(parts, string.format('"%s": %d', k, n)) end
    io.write(string.format('RESULT {{"within": %d, "answered": %d, "variants": {{%s}}}}\\n',
      t:get("within"), t:get("answered"), table.concat(parts, ", ")))
  end
end
"""


@dataclass(frozen=True)
class Step:
    policy: str
    connections: int
    offered_per_s: float
    ok_per_s: float
    refused_share: float
    p50_ms: float
    p99_ms: float
    within_budget: float
    accuracy: float
    shares: dict[str, float]


def test_image_png() -> bytes:
    """The first Fashion-MNIST test image (Debian's dataset-fashion-mnist), as PNG."""
    from PIL import Image

    with gzip.open(FASHION_MNIST) as f:
        pixels = f.read(16 + 28 * 28)[16:]
    out = io.BytesIO()
    Image.frombytes("L", (28, 28), pixels).save(out, "PNG")
    return out.getvalue()


def run_step(url: str, body: Body, connections: int, seconds: float, budget_ms: float, fixed: str, workdir: Path) -> dict:
    body_path = workdir / "body.json"
    body_path.write_bytes(body.data)
    script = workdir / "slo.lua"
    script.write_text(LUA.format(body=body_path, fixed=fixed, budget=budget_ms))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                          "--latency", "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    result = json.loads(re.search(r"RESULT (.*)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p50, p99 = percentiles_ms(out)
    result.update(requests=total, refused=int(errors.group(1)) if errors else 0, p50_ms=p50, p99_ms=p99,
                  seconds=max(1, round(seconds)))
    return result


def step_of(policy: str, connections: int, raw: dict, accuracy: dict[str, float]) -> Step:
    answered = max(raw["answered"], 1)
    shares = {v: n / answered for v, n in raw["variants"].items()}
    return Step(policy, connections, raw["requests"] / raw["seconds"], raw["answered"] / raw["seconds"],
                raw["refused"] / max(raw["requests"], 1), raw["p50_ms"], raw["p99_ms"], raw["within"] / answered,
                sum(accuracy[v] * s for v, s in shares.items()), shares)


def wait_for_calibration(url: str, timeout_s: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = httpx.get(url + "/v1/tradeoffs", timeout=30).json()
        if all(r["batch1_ms"] is not None for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError("calibration did not finish")
        time.sleep(1)


def ms(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"  # wrk prints no percentile when it has none


def table(steps: list[Step], budget_ms: float) -> list[str]:
    lines = ["| policy | connections | offered req/s | successes/s | 503 share | p50 ms | p99 ms | "
             f"successes within {budget_ms:.0f} ms | achieved accuracy | answered by |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in steps:
        shares = ", ".join(f"{v.split('-', 1)[-1]} {p:.0%}" for v, p in sorted(s.shares.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {s.policy} | {s.connections} | {s.offered_per_s:,.0f} | {s.ok_per_s:,.0f} | {s.refused_share:.0%} | "
                     f"{ms(s.p50_ms)} | {ms(s.p99_ms)} | {s.within_budget:.0%} | {100 * s.accuracy:.2f} % | {shares} |")
    return lines


def plot(steps: list[Step], budget_ms: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for policy in dict.fromkeys(s.policy for s in steps):
        mine = [s for s in steps if s.policy == policy]
        x = [s.connections for s in mine]
        axes[0].plot(x, [s.ok_per_s for s in mine], marker="o", label=policy)
        axes[1].plot(x, [s.p99_ms for s in mine], marker="o", label=policy)
        axes[2].plot(x, [100 * s.accuracy for s in mine], marker="o", label=policy)
    axes[1].axhline(budget_ms, color="grey", linestyle="--", label=f"budget {budget_ms:.0f} ms")
    for ax, title in zip(axes, ("successes per second", "p99 latency, ms (all responses)", "achieved accuracy, %")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("wrk connections (closed loop)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path)


def screenshot(url: str, path: Path) -> None:
    """``url`` as Debian's chromium renders it (driven by Playwright; no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="load")
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model-store"))
    parser.add_argument("--steps", default="1,4,16,64,128", help="wrk connections per step")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--budget-ms", type=float, default=25.0, help="the SLO route's latency budget")
    parser.add_argument("--ensemble", default="ensemble-mean-prob", help="name or name suffix")
    parser.add_argument("--student", default="student", help="name or name suffix")
    parser.add_argument("--pool", default="ensemble-mean-prob,cascade,student",
                        help="the SLO route's candidates (names or name suffixes): the ensemble, its cascade and its student")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--screenshot", type=Path, help="also save the overview page after the run (needs chromium)")
    args = parser.parse_args()
    if not FASHION_MNIST.exists():
        sys.exit(f"{FASHION_MNIST} is missing: make data (Debian's dataset-fashion-mnist)")
    body = Body(orjson.dumps({"images": [base64.b64encode(test_image_png()).decode()]}), {"Content-Type": "application/json"})
    from model_store import ModelStore

    names = ModelStore(args.store).names()
    pool = [n for suffix in args.pool.split(",") for n in names if n == suffix or n.endswith("-" + suffix)]
    port = free_port()
    steps_of: list[Step] = []
    with tempfile.TemporaryDirectory() as tmp, server(committee_serve(args.store, port, "--slo-pool", ",".join(pool)), port) as url:
        rows = wait_for_calibration(url)
        by_name = {r["name"]: r for r in rows}

        def find(suffix: str) -> str:
            names = [n for n in by_name if n == suffix or n.endswith("-" + suffix)]
            if len(names) != 1:
                sys.exit(f"expected one served model named like {suffix!r}, found {names}")
            return names[0]

        ensemble, student = find(args.ensemble), find(args.student)
        accuracy = {n: r["accuracy"] for n, r in by_name.items() if r["accuracy"] is not None}
        budget_ms = args.budget_ms
        policies = [(f"always {ensemble}", f"/v1/models/{ensemble}/predict", ensemble),
                    (f"always {student}", f"/v1/models/{student}/predict", student),
                    (f"SLO route, {budget_ms:.0f} ms", f"/v1/predict?max_latency_ms={budget_ms}", "")]
        for policy, path, fixed in policies:
            for connections in (int(c) for c in args.steps.split(",")):
                run_step(url + path, body, connections, 2, budget_ms, fixed, Path(tmp))  # warm-up
                raw = run_step(url + path, body, connections, args.seconds, budget_ms, fixed, Path(tmp))
                steps_of.append(step_of(policy, connections, raw, accuracy))
                print(table(steps_of[-1:], budget_ms)[-1], flush=True)
        if args.screenshot:
            screenshot(url + "/", args.screenshot)
    lines = table(steps_of, budget_ms)
    print("\n".join(lines))
    if args.plot:
        plot(steps_of, budget_ms, args.plot)
    if args.markdown:
        command = "python -m benchmarks.slo " + " ".join(sys.argv[1:])
        text = [f"Store `{args.store}` (the default pipeline), one Fashion-MNIST test image per request (JSON, base64), "
                f"wrk on the same machine ({os.cpu_count()} cores, no GPU). The SLO route's pool: {', '.join(pool)}. "
                f"Command: `{command}`.", "", *lines]
        if args.plot:
            text += ["", f"![policies under load]({os.path.relpath(args.plot, args.markdown.parent)})"]
        write_between_markers(args.markdown, "benchmarks.slo", "\n".join(text))


if __name__ == "__main__":
    main()
