"""Headless Chromium: long prompts stay readable and cancellable, and the default views show the best saved result.

* Information flow on a ~3,000-token prompt: the header's position lies in the traced window the note names, the
  main thread never stalls long (a long-task observer), the code shown is short, and the page says the result's size;
* Model & prompt on a long prompt: the lens runs in the background with a progress bar and Cancel, and the previous
  prompt's chart is gone meanwhile;
* Bigram subnetwork: a short test mask saved to the store does not replace the shipped mask as the default view.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlencode

import pytest

from chromium import ARTIFACTS, COLD_START_S, _no_exception  # the server/browser fixtures are in conftest.py

pytestmark = pytest.mark.browser

LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 300)  # ~3,000 tokens
LONG_BOUND_S = 600  # a 256-token route window of a 3,000-token prompt on a shared 2-core CPU
STALL_MS = 1000  # the longest main-thread task allowed (the bound) ...
STALL_LOAD_FACTOR = 2.5  # ... or this times the default prompt's longest task in the same browser (a loaded machine)
_IDLE = ("() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
         "        return a && a.getAttribute('data-test-script-state') === 'notRunning'; }")
_LONG_TASKS = ("window.__sondeLong = []; new PerformanceObserver(l => { for (const e of l.getEntries()) "
               "window.__sondeLong.push(e.duration); }).observe({type: 'longtask', buffered: true});")


def _settle(page, timeout_s: float) -> None:
    for _ in range(3):  # a rerun the run queued (query-parameter writes) is waited for too
        page.wait_for_function(_IDLE, timeout=timeout_s * 1000)
        page.wait_for_timeout(1000)


def _longest_task_ms(browser, url: str, timeout_s: float) -> tuple[float, object]:
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = ctx.new_page()
    page.add_init_script(_LONG_TASKS)
    page.goto(url, wait_until="domcontentloaded")
    page.locator(".st-key-routes_graph .js-plotly-plot").wait_for(state="visible", timeout=timeout_s * 1000)
    _settle(page, timeout_s)
    return max(page.evaluate("window.__sondeLong") or [0.0]), page


@pytest.mark.slow  # 2-4 min: routes over a 256-token window on 2 CPU cores
def test_routes_long_prompt_is_readable_and_never_stalls(server, browser):
    """Information flow on a ~3,000-token prompt (a 256-token window traced): the longest main-thread task after the
    page settles (a ``longtask`` PerformanceObserver, buffered) is at most STALL_MS, or STALL_LOAD_FACTOR times the
    default prompt's in the same browser when the machine is loaded. Measured 2026-12-07 on AMD EPYC, 2 cores, load
    average 5-10: 864 ms on the long prompt (the default prompt's first page: 1,214 ms); issue 30 reported 6.4 s with all
    256 positions labelled; the figure labels at most 40 since (benchmarks/RESULTS.md)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base_ms, short = _longest_task_ms(browser, server["url"] + "/routes", COLD_START_S)
    short.context.close()
    long_ms, page = _longest_task_ms(browser, server["url"] + "/routes?" + urlencode({"prompt": LONG_PROMPT}), LONG_BOUND_S)
    _no_exception(page)
    body = page.inner_text("body")
    note = re.search(r"traced over its last ([\d,]+) \(positions (\d+)–(\d+)", body)
    head = re.search(r"Route to position (\d+)", body)
    assert note and head, body[:2000]
    first, last = int(note.group(2)), int(note.group(3))
    assert first <= int(head.group(1)) <= last, (head.group(0), note.group(0))  # header and note name the same positions
    box = page.locator(".st-key-routes_position").inner_text() + page.locator(".st-key-routes_position input").input_value()
    assert f"{last}:" in box, box  # the position box counts prompt positions too
    # the graph's position labels are thinned (at most 40) and every one is a position of the window
    ticks = page.evaluate("() => [...document.querySelectorAll('.st-key-routes_graph .xtick text')].map(t => t.textContent)")
    assert 0 < len(ticks) <= 40, ticks
    # the reproducible code is shown with the prompt cut (highlighting 13,000 characters stalled the tab); full code is a download
    page.get_by_text("Reproduce in a notebook").last.click()
    code = page.locator("[data-testid='stExpander']:has-text('Reproduce in a notebook') [data-testid='stCode']").last
    code.wait_for(state="visible", timeout=30_000)
    assert len(code.inner_text()) < 2000 and "characters in the download" in code.inner_text()
    assert f"[-{int(note.group(1).replace(',', ''))}:]" in code.inner_text()  # the code traces the same window
    # the page says how much the result takes in the results store
    assert re.search(r"results store: .*\([\d.]+ (kB|MB|GB) on disk\)", body), body[:3000]
    page.screenshot(path=str(ARTIFACTS / "routes_long_prompt.png"), full_page=False)
    (ARTIFACTS / "routes_long_prompt_longtasks.txt").write_text(f"default prompt {base_ms:.0f} ms, long prompt {long_ms:.0f} ms\n")
    assert long_ms <= max(STALL_MS, STALL_LOAD_FACTOR * base_ms), (long_ms, base_ms)
    page.context.close()


@pytest.mark.slow  # 1-3 min: one short lens, then a 600-token one cancelled after its first steps
def test_model_long_prompt_shows_progress_and_cancel(server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(server["url"] + "/model", wait_until="domcontentloaded")
    page.locator(".st-key-logit_lens_heatmap .js-plotly-plot").wait_for(state="visible", timeout=COLD_START_S * 1000)
    _settle(page, 120)
    # ~600 tokens, over the page's background threshold (256), a prompt no other test ran: its forward pass is one step
    # of seconds, so Cancel lands within one unembedding chunk (a 3,000-token forward takes minutes on a loaded CPU)
    page.locator(".st-key-ctx_prompt textarea").fill(" ".join(["The quick brown fox jumps over the lazy dog."] * 60) + " Cancel me")
    page.get_by_role("button", name="Run").click()
    # progress with a step count and a Cancel button, while the previous prompt's heat map is gone
    page.wait_for_function("() => document.body.innerText.includes('Logit lens over')", timeout=120_000)
    bar = page.locator("[data-testid='stProgress']")
    bar.first.wait_for(state="visible", timeout=60_000)
    assert re.search(r"Logit lens over [\d,]+ tokens .*: \d+/\d+ steps", page.inner_text("body"))
    assert page.locator(".st-key-logit_lens_heatmap").count() == 0
    page.screenshot(path=str(ARTIFACTS / "model_long_prompt_progress.png"), full_page=False)
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_function("() => document.body.innerText.includes('was cancelled')", timeout=300_000)
    page.get_by_role("button", name="Run again").wait_for(state="visible", timeout=60_000)
    assert page.locator(".st-key-logit_lens_heatmap").count() == 0
    _no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "model_long_prompt_cancelled.png"), full_page=False)
    ctx.close()


def test_bigram_default_view_is_the_shipped_mask_not_a_short_test_mask(server, browser, embedded):
    """A 6-step mask saved to the results store (as a test or a quick try does) is listed, but the page opens on the
    mask shipped with Sonde, which was trained far longer."""
    import pandas as pd
    import torch

    from analyses import bigram as B

    L, H = embedded.info.n_layers, embedded.info.n_heads
    short = B.BigramResult(config=B.Config(steps=6), model=embedded.info.to_dict(), masks={},
                           matrices=pd.DataFrame({"layer": [0], "matrix": ["q"], "kept": [1], "total": [2], "fraction": [0.5]}),
                           head_kept=torch.zeros(L, H), neuron_kept=torch.zeros(L, embedded.info.d_mlp), curve=pd.DataFrame(),
                           ablation=pd.DataFrame(), sparsity=0.5, steps_done=6).save(server["results"] / "bigram-test-6-steps")
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(server["url"] + "/bigram", wait_until="domcontentloaded")
    page.get_by_role("heading", name="Bigram subnetwork").wait_for(timeout=COLD_START_S * 1000)
    page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=COLD_START_S * 1000)
    _settle(page, 120)
    _no_exception(page)
    body = page.inner_text("body")
    assert "shipped with Sonde" in body and "50.000" not in body, body[:2000]  # not the test mask (50 % kept)
    page.locator(".st-key-bigram_mask").click()
    page.wait_for_timeout(500)
    options = page.locator("[role='option']").all_inner_texts()
    assert any("shipped" in o for o in options) and any(short.name in o and "6 steps" in o for o in options), options
    ctx.close()
