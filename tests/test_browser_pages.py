"""Every dashboard page in headless Chromium: shared links round-trip, long prompts never freeze the tab, and
screenshots at two window sizes.

One fresh server (the ``server``/``browser`` fixtures of ``test_browser``); every check opens its URL in a new
browser context, so nothing is carried over from an earlier visit but the server's caches.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlencode, urlparse

import pytest

from chromium import ARTIFACTS, COLD_START_S, _no_exception  # the server/browser fixtures are in conftest.py

pytestmark = pytest.mark.browser

# page -> non-default values of the page's view controls (cheap to compute): a link must bring all of them back
VIEWS: dict[str, dict[str, str]] = {
    "model": {"k": "3", "color": "top1"},
    "routes": {"tau": "0.05", "renorm": "0"},
    "sinks": {"eps": "0.5", "domain": "code"},
    "bigram": {"target": "self", "layers": "0"},
    "fiber": {"mode": "parity", "correction": "none"},
    "critical": {"granularity": "token", "rollouts": "2"},
    "counterfactual": {"kind": "token", "pos": "2", "new": "Maeve", "seed": "1", "max_new_tokens": "8"},
    "component": {"component": "L4H2"},
    "results": {},
}
HEADINGS = {"model": "Model & prompt", "routes": "Information flow", "sinks": "Sinks & dormant heads",
            "bigram": "Bigram subnetwork", "fiber": "Embedding geometry", "critical": "Critical tokens",
            "counterfactual": "Counterfactuals", "component": "Component", "results": "Results"}
CONTEXT = {"prompt": "The Eiffel Tower is located in the city of", "bos": "0", "backend": "nnsight"}
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 300)  # ~3,000 tokens
LONG_BOUND_S = 420  # one page's answer to a 3,000-token prompt on a shared 2-core CPU (refusal, window or result)
RESPONSIVE_S = 5  # after the page answered, the tab evaluates a script within this


_TRUNCATED = """() => [...document.querySelectorAll('[data-testid="stDownloadButton"] button')].filter(b => {
    const t = b.querySelector('p') || b; return t.scrollWidth > t.clientWidth + 1 || b.scrollWidth > b.clientWidth + 1; }).map(b => b.innerText)"""
_IDLE = ("() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
         "        return a && a.getAttribute('data-test-script-state') === 'notRunning'; }")


def _settle(page, heading: str, bound_s: float) -> float:
    """Wait for the page heading, then for Streamlit's script run to end (the app root's script state), twice with a
    pause between, so a rerun the run queued (query-parameter writes) is waited for too; seconds taken."""
    t0 = time.time()
    page.get_by_role("heading", name=heading).first.wait_for(timeout=bound_s * 1000)
    for _ in range(2):
        page.wait_for_function(_IDLE, timeout=max(1.0, bound_s - (time.time() - t0)) * 1000)
        page.wait_for_timeout(800)
    page.wait_for_function(_IDLE, timeout=max(1.0, bound_s - (time.time() - t0)) * 1000)
    return time.time() - t0


@pytest.mark.parametrize("name", list(VIEWS))
def test_shared_link_round_trips(server, browser, name):
    """A link with the context and non-default view settings opens the same view in a fresh session: after the page
    ran, the URL still holds every setting it was given (none reset to a default), and no error is shown."""
    given = {**CONTEXT, **VIEWS[name]}
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server['url']}/{name}?{urlencode(given)}", wait_until="domcontentloaded")
    _settle(page, HEADINGS[name], COLD_START_S)
    _no_exception(page)
    assert page.locator("[data-testid='stAlertContentError']:has-text('in the URL')").count() == 0, page.inner_text("body")[:1500]
    back = {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}
    lost = {k: (v, back.get(k)) for k, v in given.items() if back.get(k) != v}
    assert not lost, f"{name}: settings not kept in the URL (given, now): {lost}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page_{name}_1600x1000.png"), full_page=False)
    assert page.evaluate(_TRUNCATED) == [], "download buttons with cut labels at 1600x1000"
    page.set_viewport_size({"width": 1280, "height": 800})
    page.wait_for_timeout(700)
    page.screenshot(path=str(ARTIFACTS / f"page_{name}_1280x800.png"), full_page=False)
    assert page.evaluate(_TRUNCATED) == [], "download buttons with cut labels at 1280x800"
    # the in-app navigation keeps the context: the sidebar link to Model & prompt carries model and prompt
    if name == "routes":  # (one page is enough: the sidebar is the same on every page)
        link = page.locator("[data-testid='stSidebarNav'] a[href*='model']").first
        link.click()
        _settle(page, HEADINGS["model"], COLD_START_S)
        q = parse_qs(urlparse(page.url).query)
        assert q.get("prompt") == [CONTEXT["prompt"]], page.url
        assert "Eiffel" in page.inner_text("body") or "iffel" in page.inner_text("body")
    assert not errors, errors
    ctx.close()


@pytest.mark.slow  # about 4 min on 2 CPU cores (make test PYTEST_ARGS="-m slow")
@pytest.mark.parametrize("name", [n for n in VIEWS if n != "model"])  # Model & prompt: test_browser's window test
def test_long_prompt_keeps_every_page_responsive(server, browser, name):
    """A ~3,000-token prompt in the link: every page answers within LONG_BOUND_S (a result, a window, or one clear
    refusal), shows no exception, and the tab still answers a script at once."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(f"{server['url']}/{name}?{urlencode({**CONTEXT, 'prompt': LONG_PROMPT})}", wait_until="domcontentloaded")
    took = _settle(page, HEADINGS[name], LONG_BOUND_S)
    _no_exception(page)
    t0 = time.time()
    assert page.evaluate("() => document.body.innerText.length") > 0
    assert time.time() - t0 < RESPONSIVE_S
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"long_prompt_{name}.png"), full_page=False)
    with open(ARTIFACTS / "long_prompt_pages.txt", "a") as f:
        f.write(f"{name}\t{took:.1f}\n")
    ctx.close()


def _open_routes(server, browser, params: dict):
    """A fresh 1600x1000 browser context on /routes with ``params`` in the URL, settled, with no exception and no
    error shown: ``(context, page)``."""
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = ctx.new_page()
    page.goto(f"{server['url']}/routes?{urlencode(params)}", wait_until="domcontentloaded")
    _settle(page, HEADINGS["routes"], COLD_START_S)
    _no_exception(page)
    assert page.locator("[data-testid='stAlertContentError']").count() == 0, page.inner_text("body")[:1500]
    return ctx, page


def test_routes_compare_link_draws_both_contexts(server, browser):
    """A link to compare mode (a second prompt) draws the comparison in a fresh session, keeps its settings in the URL
    and shows no error; its screenshot at 1600x1000 is the documentation's picture of the mode."""
    given = {**CONTEXT, "cmp": "prompt", "prompt_b": "The Colosseum is located in the city of"}
    ctx, page = _open_routes(server, browser, given)
    back = {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}
    assert {k: back.get(k) for k in given} == given
    heading = page.get_by_role("heading", name="Two contexts side by side").first
    heading.wait_for(timeout=30_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    assert "Edges kept" in page.inner_text("body")
    assert page.evaluate(_TRUNCATED) == [], "download buttons with cut labels at 1600x1000"
    heading.evaluate("e => e.scrollIntoView({block: 'start'})")  # the picture: counts, Δp and the graph of both routes
    page.wait_for_timeout(1000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "routes_compare_1600x1000.png"), full_page=False)
    # the downloads are the CLI's --compare --graphml and --html files: one graph with both weights, one offline page
    got = {}
    for label in ("GraphML", "Comparison report"):
        with page.expect_download(timeout=60_000) as dl:
            page.locator("[data-testid='stDownloadButton'] button", has_text=label).first.click()
        got[label] = open(dl.value.path(), "rb").read()
    assert b"<graphml" in got["GraphML"] and b"weight_a" in got["GraphML"] and b'"status"' in got["GraphML"]
    assert b"Routes compared" in got["Comparison report"] and b"Colosseum" in got["Comparison report"]
    ctx.close()


def _heaviest_attention_node(probe, prompt: str) -> str:
    """The after-attention node of the page's route (default τ) whose entering head edge reads another position with the
    largest weight: the node a reader clicks to ask why that head attends there."""
    from analyses import routes
    from probes import parse_node

    route = routes.run(probe, prompt, config=routes.Config(keep_residuals=True)).route()
    best = max(((max(d.get("heads") or [0]), v) for u, v, d in route.edges(data=True)
                if d["kind"] == "attn" and parse_node(u)[2] != parse_node(v)[2]), default=(0, None))
    assert best[1] is not None, "the route has no attention edge across positions"
    return best[1]


def test_routes_explain_and_faithfulness_views(server, browser, embedded):
    """A link naming an after-attention node opens its heaviest attention edge explained (query-side and key-side
    contributor bars); the faithfulness panel beside the graph runs its ablation checks. Their 1600x1000 screenshots
    are the documentation's pictures of the two views (docs/img/routes_explain.png, routes_faithful.png)."""
    node = _heaviest_attention_node(embedded, CONTEXT["prompt"])
    ctx, page = _open_routes(server, browser, {**CONTEXT, "node": node})
    heading = page.get_by_role("heading", name="Why this head attends").first
    heading.wait_for(timeout=60_000)
    heading.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(1500)
    body = page.inner_text("body")
    assert "query side" in body and "key side" in body and "Each side's contributors sum to the score" in body
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "routes_explain_1600x1000.png"), full_page=False)
    page.get_by_text("Is this route faithful?").first.click()
    page.locator("button", has_text="Run the ablation checks").first.click()
    _settle(page, HEADINGS["routes"], COLD_START_S)
    _no_exception(page)
    assert "Route:" in page.inner_text("body") and "heads" in page.inner_text("body")
    page.get_by_text("Is this route faithful?").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "routes_faithful_1600x1000.png"), full_page=False)
    ctx.close()
