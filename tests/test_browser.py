"""End-to-end: the real dashboard server in headless Debian Chromium (Playwright, no downloaded browser).

Starts ``streamlit run dashboard/app.py`` on 127.0.0.1 and a free port, opens the "Model & prompt" page
(the first page), waits for the plotly heat map, checks there is no Streamlit exception box, and saves
screenshots to ``tests/_artifacts/``. Also opens the Results page on a folder with one saved result.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "_artifacts"
COLD_START_S = 180  # a cold server loads torch + the model and runs the first lens before the first paint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run browser tests")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    results = tmp_path_factory.mktemp("browser-results")
    # one saved result for the Results page (the session's embedded probe is already loaded by other tests)
    from analyses import logit_lens

    logit_lens.run(embedded, "Hello world", config=logit_lens.Config(layers=(0, 10, 20, 29), k=3)).save(results / "hello")
    env = {**os.environ, "SONDE_RESULTS": str(results), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    port = _free_port()
    log = open(tmp_path_factory.mktemp("browser-log") / "streamlit.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env={**env, "SONDE_MODEL": "embedded"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"streamlit did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "results": results}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _no_exception(page) -> None:
    exc = page.locator("[data-testid='stException']")
    assert exc.count() == 0, "Streamlit shows an exception: " + exc.first.inner_text()[:2000]


def test_model_page_renders_heat_map(server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"] + "/", wait_until="domcontentloaded")
    heat = page.locator(".js-plotly-plot").first
    heat.wait_for(state="visible", timeout=COLD_START_S * 1000)
    # plotly has drawn the heat map's cells and axis labels (not only an empty frame)
    page.wait_for_selector(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm image", timeout=30_000)
    page.wait_for_selector(".js-plotly-plot .xtick text", timeout=30_000)
    page.wait_for_timeout(1500)  # let fonts and the token chips settle before the screenshot
    _no_exception(page)
    assert page.get_by_role("heading", name="Model & prompt").count() == 1
    assert "iffel" in page.inner_text("body")  # the token chips (" E" | "iffel" | " Tower" ...)
    assert page.locator("[data-testid='stAlertContentError']").count() == 0
    box = heat.bounding_box()
    assert box and box["width"] > 400 and box["height"] > 300, box
    page.screenshot(path=str(ARTIFACTS / "model_page.png"), full_page=True)
    heat.screenshot(path=str(ARTIFACTS / "logit_lens_heatmap.png"))
    # hovering a cell shows its top tokens
    heat.hover(position={"x": box["width"] * 0.85, "y": box["height"] * 0.25})
    page.wait_for_timeout(500)
    hover = page.locator(".js-plotly-plot .hoverlayer")
    assert "final top-1" in (hover.text_content() or ""), "hover label missing"
    page.screenshot(path=str(ARTIFACTS / "model_page_hover.png"))
    assert not errors, errors
    page.close()


def test_results_page_lists_and_plots(server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(server["url"] + "/results", wait_until="domcontentloaded")
    page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=COLD_START_S * 1000)
    page.wait_for_timeout(1500)
    _no_exception(page)
    assert page.get_by_role("heading", name="Results").count() == 1
    assert "logit_lens" in page.inner_text("body")
    page.screenshot(path=str(ARTIFACTS / "results_page.png"), full_page=True)
    page.close()
