"""The dashboard in a real headless browser: `spectune dashboard` on a seeded store, driven by
Playwright through Debian's chromium (installed by .ci/chromium.sh; no browser downloads)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dashboard_seed import GPU_HW, metrics, seed_store
from spectune.store import Store

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SERVER_START_TIMEOUT_S = 60
RENDER_TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: run .ci/chromium.sh"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spectune_cli() -> str:
    beside_python = Path(sys.executable).parent / "spectune"
    return str(beside_python) if beside_python.exists() else shutil.which("spectune") or "spectune"


def wait_healthy(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"`spectune dashboard` exited with {server.returncode}: "
                                 f"{server.stdout.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{base}/_stcore/health", timeout=1.0).text == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"dashboard not healthy at {base} after {SERVER_START_TIMEOUT_S} s")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    seeded = seed_store(f"sqlite:///{tmp_path / 'store.db'}")
    yield seeded
    seeded.close()


@pytest.fixture
def dashboard_url(store: Store) -> Iterator[str]:
    db_url = store.engine.url.render_as_string(hide_password=False)
    port = free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    server = subprocess.Popen([spectune_cli(), "dashboard", "--db", db_url, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: streamlit is a child of the CLI
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)


def wait_rendered(page) -> None:  # noqa: ANN001 - playwright's Page
    """Streamlit has finished a run: the running indicator is gone and the charts are drawn."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=RENDER_TIMEOUT_MS)
    page.locator(".js-plotly-plot .scatterlayer").filter(visible=True).first.wait_for(
        timeout=RENDER_TIMEOUT_MS)
    page.locator('[data-testid="stDataFrame"]').filter(visible=True).first.wait_for(
        timeout=RENDER_TIMEOUT_MS)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
        timeout=RENDER_TIMEOUT_MS)
    page.wait_for_timeout(800)  # plotly's transitions and the data grid's canvas settle


def full_page_screenshot(page, path: Path) -> None:  # noqa: ANN001
    # Streamlit scrolls its main block, not the document: grow the viewport to its height.
    height = page.evaluate(
        "() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1600, "height": int(height) + 40})
    page.wait_for_timeout(800)
    page.screenshot(path=str(path), full_page=True)


def point_count(page) -> int:  # noqa: ANN001
    return page.locator(".js-plotly-plot").first.locator(".scatterlayer .points path").count()


def test_dashboard_in_chromium(dashboard_url: str, store: Store) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(dashboard_url, wait_until="domcontentloaded")
            wait_rendered(page)
            # The newest sweep opens first: a running one, refreshing live.
            assert page.get_by_role("heading", name="quick-gpu").is_visible()
            assert page.locator(".js-plotly-plot").count() >= 3  # front, knobs, methods...
            assert page.locator('[data-testid="stDataFrame"]').filter(visible=True).count() >= 1

            # Live refresh: a trial finishing while the page is open appears without a reload.
            before = point_count(page)
            store.record_result("quick-gpu", "sps-k8", metrics({"method": "sps", "draft_len": 8},
                                                               GPU_HW), GPU_HW.spec)
            page.wait_for_function(
                "n => document.querySelector('.js-plotly-plot')"
                ".querySelectorAll('.scatterlayer .points path').length > n",
                arg=before, timeout=30_000)
            assert point_count(page) == before + 1

            # Pick the other sweep in the sidebar.
            page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name="quick-cpu").click()
            page.get_by_role("heading", name="quick-cpu").wait_for(timeout=RENDER_TIMEOUT_MS)
            wait_rendered(page)
            front = page.locator(".js-plotly-plot").first
            assert front.locator(".scatterlayer .trace").count() >= 5  # methods + the front line
            assert "Pareto front (lossless)" in front.inner_text()
            assert page.get_by_text("failed: ValueError: tree_shape").first.is_visible()
            assert page.get_by_text("Lossless: greedy outputs equal plain decoding").is_visible()
            assert page.locator('[data-testid="stException"]').count() == 0

            shot = ARTIFACTS / "dashboard.png"
            full_page_screenshot(page, shot)
            assert shot.stat().st_size > 50_000

            # Both sweeps' fronts on one plot.
            page.get_by_role("tab", name="Compare sweeps").click()
            compare = page.locator(".js-plotly-plot").filter(has_text="quick-gpu front")
            compare.wait_for(timeout=RENDER_TIMEOUT_MS)
            wait_rendered(page)
            compare.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"))
            page.get_by_role("tab", name="Pareto front & trials").click()

            # Clicking a point opens its trial (plotly selection event -> rerun).
            page.set_viewport_size({"width": 1600, "height": 1000})
            sps_points = front.locator(".scatterlayer .trace").nth(2).locator(".points path")
            box = sps_points.first.bounding_box()  # sps(draft_len=1): the seed's trial 1
            assert box is not None
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.get_by_text("Trial 1", exact=True).wait_for(timeout=RENDER_TIMEOUT_MS)
            assert page.get_by_text("sps(draft_len=1)").first.is_visible()
        finally:
            browser.close()
