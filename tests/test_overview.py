"""The overview page at ``/`` rendered by a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.config import Settings
from tests.server import get, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (make test installs Debian's chromium where apt is usable; here it is not)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    return playwright


def render(url: str, screenshot: Path | None = None) -> dict:
    """Load ``url`` in headless Chromium and read back what it rendered."""
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="load")
            result = {
                "title": page.title(),
                "variants": page.eval_on_selector_all("#variants td[data-variant]", "cells => cells.map(c => c.dataset.variant)"),
                "readiness": page.inner_text("#readiness"),
                "plot_width": page.eval_on_selector("img", "img => img.naturalWidth"),
                "refresh": page.get_attribute("meta[http-equiv=refresh]", "content"),
            }
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return result
        finally:
            browser.close()


def test_the_overview_page_shows_every_served_variant_with_its_plot(store_dir, tmp_path):
    with running_server(Settings(store=store_dir, calibration_seconds=0.2)) as base:
        served = sorted(m["name"] for m in get(base, "/v1/models").json() if m["ready"])
        shown = render(base + "/", tmp_path / "overview.png")
    assert sorted(shown["variants"]) == served and len(served) >= 4
    assert shown["title"].startswith("Committee") and "Ready" in shown["readiness"]
    assert shown["plot_width"] == 1300  # the trade-off PNG loaded and decoded in the browser
    assert shown["refresh"] == "10"
    assert (tmp_path / "overview.png").stat().st_size > 10_000


def test_the_overview_page_reads_without_javascript(store_dir):
    """Server-rendered: the variant table is in the HTML itself, not built by scripts."""
    with running_server(Settings(store=store_dir, calibrate=False)) as base:
        html = get(base, "/").text
    assert "<script" not in html and 'data-variant="member-a"' in html and 'data-variant="cascade"' in html
