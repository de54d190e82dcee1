"""A 1280x800 window in headless Chromium: tables fit without scrolling sideways and the counterfactual grid shows
every token whole, in a readable size.

One fresh server (the ``server``/``browser`` fixtures of conftest.py), one browser context per check.
"""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from chromium import ARTIFACTS, COLD_START_S, _no_exception
from test_browser_pages import CONTEXT, HEADINGS, _settle

pytestmark = pytest.mark.browser

NARROW = {"width": 1280, "height": 800}
# every data grid on the page: how wide its content is against the width it has (glide's scroller)
_GRIDS = """() => [...document.querySelectorAll('[data-testid="stDataFrame"]')].map(d => {
    const s = d.querySelector('.dvn-scroller'); const r = d.getBoundingClientRect();
    return {content: s ? s.scrollWidth : 0, box: s ? s.clientWidth : 0, right: r.right}; })"""


def _open(server, browser, path: str, heading: str):
    ctx = browser.new_context(viewport=NARROW)
    page = ctx.new_page()
    page.goto(f"{server['url']}/{path}", wait_until="domcontentloaded")
    _settle(page, heading, COLD_START_S)
    page.wait_for_timeout(1000)
    _no_exception(page)
    return ctx, page


@pytest.mark.parametrize("path,name", [("fiber", "fiber"), ("fiber?mode=parity&correction=holm", "fiber"), ("results", "results"),
                                       ("bigram", "bigram"), ("component", "component")])
def test_tables_fit_a_1280_window(server, browser, path, name):
    """Embedding geometry's tables (the corrections, the kinds, the tokens with their verdict and p-values), the
    Results listing (with its inputs), the bigram predictions and the component's tables are no wider than the space
    they have: nothing to scroll sideways to read."""
    if name == "results":  # the saved "Hello world" lens (pages run before may have saved more)
        path += "?" + urlencode({"result": str(server["results"] / "hello")})
    ctx, page = _open(server, browser, path, HEADINGS[name])
    page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=60_000)
    grids = page.evaluate(_GRIDS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"narrow_{path.split('?')[0]}.png"), full_page=False)
    assert grids and all(g["content"] <= g["box"] + 1 and g["right"] <= NARROW["width"] for g in grids), grids
    if name == "results":  # the chosen result's inputs read whole under its heading
        assert "Inputs: 'Hello world' (2 tokens)" in page.inner_text("body")
    ctx.close()


# the counterfactual grid's cell texts: their text, drawn width and font size, and the width of one cell
_CELLS = """() => { const g = [...document.querySelectorAll('.js-plotly-plot')].find(p => p.data && p.data[0] &&
        p.data[0].type === 'heatmap' && p.data[0].customdata);
    if (!g) return null;
    const t = g.data[0], cols = t.x.length, cell = g._fullLayout.xaxis._length / cols;
    return {cell: cell, title: g.layout.title.text, texts: [...g.querySelectorAll('.heatmaplayer text, text.textpoint')].map(e =>
        ({text: e.textContent, width: e.getBBox().width, size: parseFloat(getComputedStyle(e).fontSize)}))}; }"""


def test_counterfactual_grid_shows_whole_tokens_at_1280(server, browser):
    """At 1280x800 the grid's cells hold whole tokens (no "recogniz…"), in a font of at least 11 px, each inside
    its cell; its title names the edit by its text, as the header does (not "id:253")."""
    q = "&".join(f"{k}={v}" for k, v in {**CONTEXT, "kind": "token", "pos": "3", "max_new_tokens": "16"}.items())
    ctx, page = _open(server, browser, f"counterfactual?{q.replace(' ', '+')}", HEADINGS["counterfactual"])
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(p => p.data && p.data[0] && "
                           "p.data[0].type === 'heatmap' && p.querySelector('.heatmaplayer text, text.textpoint'))", timeout=120_000)
    grid = page.evaluate(_CELLS)
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "narrow_counterfactual.png"), full_page=False)
    assert "token:3='" in grid["title"] and "id:" not in grid["title"], grid["title"]  # the edit as text, as in the header
    texts = [t for t in grid["texts"] if t["text"].strip()]
    assert len(texts) >= 10, grid
    cut = [t["text"] for t in texts if t["text"].endswith("…")]
    small = sorted({t["size"] for t in texts if t["size"] < 11})
    wide = [t["text"] for t in texts if t["width"] > grid["cell"]]
    assert not cut and not small and not wide, {"cut": cut, "font sizes under 11 px": small, "wider than a cell": wide,
                                                "cell": grid["cell"]}
    ctx.close()
