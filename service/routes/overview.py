"""``GET /``: the overview page for people. Plain server-rendered HTML that refreshes itself:
served variants with offline and live numbers, the trade-off plot, readiness and load."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from .. import __version__
from ..tradeoffs import Tradeoff, tradeoffs
from .common import plane

router = APIRouter(tags=["Operations"])
REFRESH_S = 10

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
.front { font-weight: bold; color: #b00; } .bad { color: #b00; } .ok { color: #070; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def _row(r: Tradeoff) -> str:
    front = " ".join(k for k, on in (("latency", r.pareto_latency), ("cost", r.pareto_cost)) if on) or "—"
    cells = [
        f'<td class="name" data-variant="{escape(r.name)}">{escape(r.name)}</td>', f"<td>{r.version}</td>",
        f'<td class="name">{escape(r.kind)}</td>',
        f"<td>{_num(r.accuracy and 100 * r.accuracy)}</td>", f"<td>{_num(r.ece, '{:.3f}')}</td>",
        f"<td>{_num(r.flops_per_image and r.flops_per_image / 1e6, '{:.1f}')}</td>",
        f"<td>{r.live_requests}</td>", f"<td>{_num(r.live_requests_per_s, '{:.1f}')}</td>",
        f"<td>{_num(r.live_p50_ms)}</td>", f"<td>{_num(r.live_p99_ms)}</td>",
        f"<td>{_num(r.batch1_ms)}</td>", f"<td>{_num(r.images_per_s, '{:,.0f}')}</td>",
        f"<td>{_num(r.cost_per_1000_images, '{:.3f}')}</td>",
        f'<td class="{"front" if front != "—" else ""}">{front}</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>"


@router.get("/", response_class=HTMLResponse, summary="Overview page: variants, live trade-offs, readiness, load")
async def overview(request: Request) -> HTMLResponse:
    dp = plane(request)
    rows = tradeoffs(dp.registry.served(), dp.calibrator, dp.live, dp.settings)
    unit = rows[0].cost_unit if rows else "core-seconds"
    statuses = dp.registry.statuses()
    not_ready = [s for s in statuses if not s.ready]
    ready = dp.registry.ready
    queues = sorted((r.key, r.batcher.queued_images) for r in dp.runners())
    header = ("<tr><th class='name'>variant</th><th>version</th><th class='name'>kind</th><th>test accuracy %</th>"
              "<th>ECE</th><th>MFLOPs/img</th><th>live requests</th><th>req/s</th><th>live p50 ms</th><th>live p99 ms</th>"
              f"<th>batch-1 ms</th><th>img/s (best batch)</th><th>{escape(unit)} / 1,000 img</th><th>Pareto front</th></tr>")
    problems = "".join(f"<li><b>{escape(s.name)}</b>: {escape(s.reason or 'not loaded')}</li>" for s in not_ready)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>Committee — served variants</title><style>{STYLE}</style></head>
<body>
<h1>Committee {escape(__version__)}</h1>
<p id="readiness" class="{'ok' if ready else 'bad'}">{'Ready' if ready else 'Not ready'}:
{len(rows)} variant(s) serving, {len(not_ready)} not ready; {dp.inflight} request(s) in flight.
Refreshes every {REFRESH_S} s. <a href="/docs">API docs</a> · <a href="/v1/tradeoffs">trade-offs (JSON)</a> ·
<a href="/v1/tradeoffs?format=csv">CSV</a> · <a href="/metrics">metrics</a></p>
{f'<ul id="problems">{problems}</ul>' if problems else ''}
<h2>Variants</h2>
<p>Accuracy, ECE and FLOPs: held-out test set (manifest). Live: successful requests in the last
{dp.settings.latency_window:,} / {dp.settings.latency_window_s:.0f} s. Batch-1 latency, throughput and cost: calibrated on this server's runtime.</p>
<table id="variants">{header}{''.join(_row(r) for r in rows)}</table>
<h2>Trade-offs</h2>
<img src="/v1/tradeoffs?format=png" alt="accuracy against latency and cost, Pareto fronts marked" width="1300" height="550">
<h2>Load</h2>
<table id="queues"><tr><th class="name">runner</th><th>queued images</th></tr>
{''.join(f'<tr><td class="name">{escape(k)}</td><td>{n}</td></tr>' for k, n in queues)}</table>
</body></html>"""
    return HTMLResponse(page)
