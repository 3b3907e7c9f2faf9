"""Four policies under open- and closed-loop load on the default pipeline's store: always the
ensemble, always the cascade (its fixed default thresholds), always the student, and the SLO route
(``POST /v1/predict?max_latency_ms=B``).

    python -m benchmarks.slo [--store model-store] [--budget-ms B] [--rates 0.25,0.5,1,2,3] [--seconds 8]
                             [--connections 1,8,64,256,1000] [--markdown docs/benchmarks.md] [--plot docs/slo.png]
                             [--screenshot docs/overview.png]

Capacity is the ensemble's answers/s under wrk at 32 connections, measured first in the same run.

- **Open loop** (``open_loop``: Poisson arrivals at fixed rates of 0.25x-3x capacity, whatever the
  server answers; the generator runs on the same cores). Every policy gets the same deadline: the
  fixed ones send ``X-Request-Timeout: B``, the route's budget is its deadline.
- **Closed loop** (wrk, 1 thread: each connection re-sends at once, a refused request too). The
  fixed policies keep the server's default deadline (10 s), as clients that name a model do: a
  backlog of 1,000 requests is about a second of work, which fits it (the overload collapse of
  issue 17); the route keeps its budget as its deadline, so it must refuse what would not fit, to
  clients that retry at once.
- **Routed-path overhead**: the route without a budget (it serves the most accurate variant, the
  ensemble) against the ensemble by name, wrk at 32 connections, side by side.

Per cell: offered and answered requests/s, answers within the budget per second (server-measured
decode + queue + compute, what ``budget_met`` reports), refused (503), late (answers over the budget,
and 504s), p50/p99 of answers (client side), and the achieved accuracy: the held-out test accuracy
of what answered (a cascade at the operating point that served), weighted by answers.
``--screenshot`` keeps the overview page (``GET /``) as headless Chromium renders it after the run.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import orjson

from .load import Body, committee_serve, free_port, percentiles_ms, server, write_between_markers
from .open_loop import open_loop

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
CAPACITY_CONNECTIONS = 32

# wrk (one thread) counts answers, answers within the budget, late answers and refusals, and which
# variant (and cascade operating point) answered, from each response.
LUA = """
wrk.method = "POST"
local f = io.open("{body}", "rb"); wrk.body = f:read("*all"); f:close()
wrk.headers["Content-Type"] = "application/json"
{headers}
threads = {{}}
setup = function(thread) table.insert(threads, thread) end
within, answered, late, refused, timeouts, variants = 0, 0, 0, 0, 0, {{}}
response = function(status, headers, body)
  if status == 503 then refused = refused + 1 end
  if status == 504 then late = late + 1; timeouts = timeouts + 1 end
  if status ~= 200 then return end
  answered = answered + 1
  local v = headers["x-committee-variant"] or headers["X-Committee-Variant"] or "{fixed}"
  local point = string.match(body, '"cascade_point":(%d+)')
  if point then v = v .. "@" .. point end
  variants[v] = (variants[v] or 0) + 1
  local total = tonumber(string.match(body, '"total_ms":([%d%.eE+-]+)'))
  if total and total <= {budget} then within = within + 1 else late = late + 1 end
end
done = function(summary, latency, requests)
  for _, t in ipairs(threads) do
    local counts = t:get("variants")
    local parts = {{}}
    for k, n in pairs(counts) do table.insert(parts, string.format('"%s": %d', k, n)) end
    io.write(string.format('RESULT {{"within": %d, "answered": %d, "late": %d, "refused": %d, "timeouts": %d, "variants": {{%s}}}}\\n',
      t:get("within"), t:get("answered"), t:get("late"), t:get("refused"), t:get("timeouts"), table.concat(parts, ", ")))
  end
end
"""


@dataclass(frozen=True)
class Policy:
    name: str
    path: str
    headers: dict[str, str]
    fixed: str  # the variant a fixed policy names ("" for the route)


@dataclass(frozen=True)
class Cell:
    policy: str
    load: str  # "0.5x" (open loop) or "c=64" (closed loop)
    offered_per_s: float
    answered_per_s: float
    within_per_s: float
    refused_per_s: float
    late_per_s: float  # answers over the budget, and 504s
    timeouts_per_s: float  # 504s: admitted, not answered by the deadline
    p50_ms: float
    p99_ms: float
    accuracy: float
    shares: dict[str, float]

    @property
    def within_share(self) -> float:
        """Of the requests admitted (answered, or timed out after admission)."""
        admitted = self.answered_per_s + self.timeouts_per_s
        return self.within_per_s / admitted if admitted else float("nan")


def test_images_png(count: int) -> list[bytes]:
    """The first ``count`` Fashion-MNIST test images (Debian's dataset-fashion-mnist), as PNG."""
    from PIL import Image

    with gzip.open(FASHION_MNIST) as f:
        pixels = f.read(16 + 28 * 28 * count)[16:]
    out = []
    for i in range(count):
        png = io.BytesIO()
        Image.frombytes("L", (28, 28), pixels[28 * 28 * i : 28 * 28 * (i + 1)]).save(png, "PNG")
        out.append(png.getvalue())
    return out


def achieved(counts: dict[str, float], accuracy: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Nominal accuracy (each answering setting's held-out test accuracy) weighted by answers, and
    each setting's share; NaN when nothing answered."""
    total = sum(counts.values())
    if not total:
        return float("nan"), {}
    shares = {k: n / total for k, n in counts.items()}
    return sum(accuracy.get(k, accuracy.get(k.split("@")[0], float("nan"))) * p for k, p in shares.items()), shares


def closed_loop_cell(url: str, policy: Policy, body: Body, connections: int, seconds: float, budget_ms: float,
                     accuracy: dict[str, float], workdir: Path) -> Cell:
    body_path = workdir / "body.json"
    body_path.write_bytes(body.data)
    script = workdir / "slo.lua"
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in policy.headers.items())
    script.write_text(LUA.format(body=body_path, fixed=policy.fixed, budget=budget_ms, headers=headers))
    duration = max(1, round(seconds))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "--latency", "-s",
                          str(script), url + policy.path], capture_output=True, text=True, check=True).stdout
    raw = json.loads(re.search(r"RESULT (.*)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50, p99 = percentiles_ms(out)
    accuracy_now, shares = achieved(raw["variants"], accuracy)
    return Cell(policy.name, f"c={connections}", total / duration, raw["answered"] / duration, raw["within"] / duration,
                raw["refused"] / duration, raw["late"] / duration, raw["timeouts"] / duration, p50, p99, accuracy_now, shares)


def open_loop_cell(url: str, policy: Policy, bodies: list[bytes], headers: dict[str, str], rate: float, label: str,
                   seconds: float, budget_ms: float, accuracy: dict[str, float]) -> Cell:
    """Within budget here is what the client saw: from the scheduled send to the last byte."""
    run = open_loop(url, policy.path, bodies, {**headers, **policy.headers}, rate, seconds)
    ok = [a for a in run.answers if a.status == 200]
    within = sum(1000 * a.latency_s <= budget_ms for a in ok)
    timeouts = sum(a.status == 504 for a in run.answers)
    others = sum(a.status not in (200, 503, 504) for a in run.answers) + run.unsent + run.failed
    counts: dict[str, float] = {}
    for a in ok:
        key = (a.variant or policy.fixed) + ("" if a.cascade_point is None else f"@{a.cascade_point}")
        counts[key] = counts.get(key, 0) + 1
    latencies = [1000 * a.latency_s for a in ok]
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99)) if latencies else (float("nan"),) * 2
    accuracy_now, shares = achieved(counts, accuracy)
    if others:
        print(f"  {policy.name} at {label}: {others} neither answered nor refused ({run.unsent} not sent: every connection "
              f"busy; {run.failed} connection errors)", file=sys.stderr)
    return Cell(policy.name, label, run.offered / seconds, len(ok) / seconds, within / seconds,
                sum(a.status == 503 for a in run.answers) / seconds, (len(ok) - within + timeouts + others) / seconds,
                timeouts / seconds, p50, p99, accuracy_now, shares)


def wait_for_calibration(url: str, timeout_s: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = httpx.get(url + "/v1/tradeoffs", timeout=30).json()
        if all(r["batch1_ms"] is not None for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError("calibration did not finish")
        time.sleep(1)


def accuracies(rows: list[dict]) -> dict[str, float]:
    """Held-out accuracy by variant name, and by ``name@point`` for a cascade's operating points."""
    out = {r["name"]: r["accuracy"] for r in rows if r["accuracy"] is not None}
    for r in rows:
        for p in r.get("operating_points") or []:
            out[f"{r['name']}@{p['point']}"] = p["accuracy"]
    return out


def ms(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"  # wrk prints no percentile when it has none


def short(setting: str) -> str:
    return setting.split("-", 1)[-1]


def table(cells: list[Cell], budget_ms: float) -> list[str]:
    lines = [f"| policy | load | offered/s | answered/s | within {budget_ms:.0f} ms /s | within share | refused/s | late/s | "
             "p50 ms | p99 ms | achieved accuracy | answered by |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        shares = ", ".join(f"{short(v)} {p:.0%}" for v, p in sorted(c.shares.items(), key=lambda kv: -kv[1]))
        share = "—" if c.within_share != c.within_share else f"{c.within_share:.1%}"
        lines.append(f"| {c.policy} | {c.load} | {c.offered_per_s:,.0f} | {c.answered_per_s:,.0f} | {c.within_per_s:,.0f} | "
                     f"{share} | {c.refused_per_s:,.0f} | {c.late_per_s:,.1f} | {ms(c.p50_ms)} | {ms(c.p99_ms)} | "
                     f"{100 * c.accuracy:.2f} % | {shares} |")
    return lines


def verdicts(cells: list[Cell], route: str, student: str, ensemble: str, capacity: float, rates: list[float]) -> list[str]:
    """The issue's targets, each with its measured value."""
    out = []
    for label in dict.fromkeys(c.load for c in cells):
        row = {c.policy: c for c in cells if c.load == label}
        mine = row[route]
        best = max((c for p, c in row.items() if p != route), key=lambda c: c.within_per_s)
        checks = [f"within budget/s {mine.within_per_s:,.0f} vs best fixed {best.within_per_s:,.0f} ({best.policy}): "
                  f"{'met' if mine.within_per_s >= best.within_per_s else 'missed'}",
                  f"accuracy {100 * mine.accuracy:.2f} % vs student {100 * row[student].accuracy:.2f} %: "
                  f"{'met' if mine.accuracy >= row[student].accuracy - 1e-9 else 'missed'}"]
        if label.endswith("x"):
            x = float(label[:-1])
            floor = 0.99 if x <= 1 else 0.95
            checks.append(f"within share {mine.within_share:.1%} (target {floor:.0%}): {'met' if mine.within_share >= floor else 'missed'}")
            if x <= 0.5:
                equal = abs(mine.accuracy - row[ensemble].accuracy) < 5e-4
                checks.append(f"accuracy = ensemble's {100 * row[ensemble].accuracy:.2f} %: {'met' if equal else 'missed'}")
        elif label == "c=1000":
            for c in row.values():
                # answers inside their own deadline: the fixed policies' is the default 10 s, the route's its budget
                goodput = c.within_per_s if c.policy == route else c.answered_per_s
                checks.append(f"{c.policy}: goodput {goodput:,.0f}/s = {goodput / capacity:.0%} of capacity (target 80 %), "
                              f"{c.timeouts_per_s:.1f}/s past the deadline: "
                              f"{'met' if goodput >= 0.8 * capacity and not c.timeouts_per_s else 'missed'}")
        out.append(f"- {label}: " + "; ".join(checks))
    return out


def plot(cells: list[Cell], budget_ms: float, capacity: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    opened = [c for c in cells if c.load.endswith("x")]
    for policy in dict.fromkeys(c.policy for c in opened):
        mine = [c for c in opened if c.policy == policy]
        x = [float(c.load[:-1]) for c in mine]
        axes[0].plot(x, [c.within_per_s for c in mine], marker="o", label=policy)
        axes[1].plot(x, [100 * c.within_share for c in mine], marker="o", label=policy)
        axes[2].plot(x, [100 * c.accuracy for c in mine], marker="o", label=policy)
    for ax, title in zip(axes, (f"answers within {budget_ms:.0f} ms per second", "share of answers within budget, %",
                                "achieved accuracy, %")):
        ax.set_xlabel(f"offered load, x capacity ({capacity:,.0f}/s), open loop")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
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
    parser.add_argument("--rates", default="0.25,0.5,1,2,3", help="open-loop offered rates, in multiples of capacity")
    parser.add_argument("--connections", default="1,8,64,256,1000", help="closed-loop wrk connections per step")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--budget-ms", type=float, default=25.0, help="every policy's deadline; the SLO route's budget")
    parser.add_argument("--ensemble", default="ensemble-mean-prob", help="name or name suffix")
    parser.add_argument("--cascade", default="cascade", help="name or name suffix")
    parser.add_argument("--student", default="student", help="name or name suffix")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--screenshot", type=Path, help="also save the overview page after the run (needs chromium)")
    args = parser.parse_args()
    if not FASHION_MNIST.exists():
        sys.exit(f"{FASHION_MNIST} is missing: make data (Debian's dataset-fashion-mnist)")
    # the open loop sends the first 64 test images in turn (a cascade's exits vary as in real traffic);
    # wrk sends the first one
    bodies = [orjson.dumps({"images": [base64.b64encode(png).decode()]}) for png in test_images_png(64)]
    json_headers = {"Content-Type": "application/json"}
    body = Body(bodies[0], json_headers)
    from model_store import ModelStore

    names = ModelStore(args.store).names()

    def find(suffix: str) -> str:
        found = [n for n in names if n == suffix or n.endswith("-" + suffix)]
        if len(found) != 1:
            sys.exit(f"expected one model named like {suffix!r} in {args.store}, found {found}")
        return found[0]

    ensemble, cascade, student = find(args.ensemble), find(args.cascade), find(args.student)
    budget_ms = args.budget_ms
    timeout = {"X-Request-Timeout": str(budget_ms / 1000)}
    policies = [Policy(f"always {short(ensemble)}", f"/v1/models/{ensemble}/predict", timeout, ensemble),
                Policy(f"always {short(cascade)}", f"/v1/models/{cascade}/predict", timeout, cascade),
                Policy(f"always {short(student)}", f"/v1/models/{student}/predict", timeout, student),
                Policy(f"SLO route, {budget_ms:.0f} ms", f"/v1/predict?max_latency_ms={budget_ms}", {}, "")]
    cells: list[Cell] = []
    pool = ",".join((ensemble, cascade, student))

    @contextmanager
    def fresh_server() -> Iterator[tuple[str, dict[str, float]]]:
        """A server of its own, calibrated: no policy inherits another's queues, corrections or exit counts."""
        port = free_port()
        with server(committee_serve(args.store, port, "--slo-pool", pool), port) as url:
            yield url, accuracies(wait_for_calibration(url))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with fresh_server() as (url, accuracy):
            named = Policy("ensemble by name", f"/v1/models/{ensemble}/predict", {}, ensemble)
            routed = Policy("the route, no budget (serves the ensemble)", "/v1/predict", {}, "")
            overhead = []
            for policy in (named, routed, named, routed):  # twice, interleaved: drift shows as a spread
                closed_loop_cell(url, policy, body, CAPACITY_CONNECTIONS, 2, 1e9, accuracy, workdir)  # warm-up
                overhead.append(closed_loop_cell(url, policy, body, CAPACITY_CONNECTIONS, args.seconds, 1e9, accuracy, workdir))
        capacity = (overhead[0].answered_per_s + overhead[2].answered_per_s) / 2
        print(f"capacity (the ensemble by name, wrk c={CAPACITY_CONNECTIONS}): {capacity:,.0f} answers/s", flush=True)
        rates = [float(r) for r in args.rates.split(",")]
        for policy in policies:
            with fresh_server() as (url, accuracy):
                open_loop_cell(url, policy, bodies, json_headers, 0.25 * capacity, "warm-up", 2, budget_ms, accuracy)
                for x in rates:
                    cells.append(open_loop_cell(url, policy, bodies, json_headers, x * capacity, f"{x:g}x", args.seconds,
                                                budget_ms, accuracy))
                    print(table(cells[-1:], budget_ms)[-1], flush=True)
                for connections in (int(c) for c in args.connections.split(",")):  # the default deadline (see the docstring)
                    unhurried = Policy(policy.name, policy.path, {}, policy.fixed)
                    cells.append(closed_loop_cell(url, unhurried, body, connections, args.seconds, budget_ms, accuracy, workdir))
                    print(table(cells[-1:], budget_ms)[-1], flush=True)
                if args.screenshot and policy is policies[-1]:
                    screenshot(url + "/", args.screenshot)
    order = {c.load: i for i, c in enumerate(cells)}
    cells.sort(key=lambda c: (order[c.load], [p.name for p in policies].index(c.policy)))
    route = policies[-1].name
    named_rate = (overhead[0].answered_per_s + overhead[2].answered_per_s) / 2
    routed_rate = (overhead[1].answered_per_s + overhead[3].answered_per_s) / 2
    overhead_lines = [f"| path | run 1 answers/s | run 2 answers/s | p99 ms (run 1, 2) |", "|---|---:|---:|---|",
                      *(f"| {a.policy} | {a.answered_per_s:,.0f} | {b.answered_per_s:,.0f} | {ms(a.p99_ms)}, {ms(b.p99_ms)} |"
                        for a, b in ((overhead[0], overhead[2]), (overhead[1], overhead[3]))),
                      "", f"Routed / named: **{routed_rate / named_rate:.3f}** (target ≥ 0.95)."]
    lines = table(cells, budget_ms)
    checks = verdicts(cells, route, policies[2].name, policies[0].name, capacity, rates)
    print("\n".join(lines + [""] + overhead_lines + [""] + checks))
    if args.plot:
        plot(cells, budget_ms, capacity, args.plot)
    if args.markdown:
        command = "python -m benchmarks.slo " + " ".join(sys.argv[1:])
        text = [f"Store `{args.store}` (the default pipeline), one Fashion-MNIST test image per request (JSON, base64; the "
                f"open loop cycles through the first 64 test images, wrk sends the first), each policy on a fresh calibrated "
                f"server, "
                f"on {os.cpu_count()} cores shared by server and load generator, no GPU. In the open loop every policy's "
                f"deadline is {budget_ms:.0f} ms; in the closed loop the fixed policies keep the default 10 s and the route "
                f"its {budget_ms:.0f} ms budget. Capacity = the ensemble's answers/s by name under wrk at {CAPACITY_CONNECTIONS} "
                f"connections = **{capacity:,.0f}/s**. Open loop: Poisson arrivals at the offered rate ({args.seconds:g} s "
                f"a cell); closed loop: wrk, one thread. Command: `{command}`.", "", *lines, "",
                "Routed-path overhead (wrk, 32 connections, the same variant by name and through the route, interleaved):",
                "", *overhead_lines, "", "Targets:", "", *checks]
        if args.plot:
            text += ["", f"![policies under open-loop load]({os.path.relpath(args.plot, args.markdown.parent)})"]
        write_between_markers(args.markdown, "benchmarks.slo", "\n".join(text))


if __name__ == "__main__":
    main()
