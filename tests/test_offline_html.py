"""Every HTML file Sonde writes opens offline: plotly.js is inlined, and a chart renders with the network blocked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tiny_models
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def test_plotly_html_is_made_in_one_place():
    """No module but analyses/report.py turns a figure into HTML (so none can fall back to a CDN link)."""
    offenders = []
    for d in ("analyses", "dashboard", "probes"):
        for f in (ROOT / d).rglob("*.py"):
            if f == ROOT / "analyses" / "core" / "report.py":
                continue
            text = f.read_text(encoding="utf-8")
            for m in re.finditer(r"\.write_html\(|\.to_html\(|include_plotlyjs", text):
                offenders.append(f"{f.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}")
    assert not offenders, "plotly HTML written outside analyses.core.report: " + ", ".join(offenders)
    report = (ROOT / "analyses" / "core" / "report.py").read_text(encoding="utf-8")
    assert not re.search(r"include_plotlyjs\s*=\s*['\"]", report), "report.py links plotly.js instead of inlining it"


def _tiny_dir(tmp: Path) -> Path:
    m, tok = tiny_models.build("llama", seed=0)
    d = tmp / "tiny-llama"
    m.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def offline_page():
    """A headless Chromium page that can load file:// URLs only (every other request is aborted)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            blocked: list[str] = []

            def gate(route):
                if route.request.url.startswith("file://"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", gate)
            page.blocked = blocked
            yield page
        finally:
            browser.close()


def _renders(page, path: Path) -> None:
    page.blocked.clear()
    page.goto(path.resolve().as_uri(), wait_until="load")
    # plotly has drawn the figure: its root div carries .js-plotly-plot and an SVG with the axes
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    assert page.evaluate("typeof Plotly") == "object"
    assert not page.blocked, f"the page asked the network for {page.blocked[:3]}"


@pytest.mark.browser
def test_cli_html_and_report_render_offline(tmp_path, capsys, offline_page):
    model = _tiny_dir(tmp_path)
    html = tmp_path / "lens.html"
    rc, out, err = run_cli(["run", "logit-lens", "--model", str(model), "--prompt", "one two three four",
                            "--device", "cpu", "--out", str(tmp_path / "ll"), "--html", str(html), "--json"], capsys)
    assert rc == 0, err
    assert not re.search(r"<script[^>]*\ssrc=[\"']https?:", html.read_text(encoding="utf-8")), "a script is loaded from the network"
    _renders(offline_page, html)

    from analyses.core.report import html_report

    report = tmp_path / "report.html"
    report.write_bytes(html_report(tmp_path / "ll"))
    _renders(offline_page, report)
