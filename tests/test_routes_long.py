"""Long prompts: all-position mode refuses a prompt longer than its memory budget allows, before any forward pass,
naming the length that fits; top-down mode keeps each layer's residuals, q, k and v (not its [H, T, T] pattern) and
only the rows its walk visits, so it runs prompts all-position mode refuses, and the planner's estimate of it follows
the measured peak."""

from __future__ import annotations

import re

import pytest
import torch

from analyses import routes
from analyses.core import planner
from probes import OutOfMemoryError, ZeroAttention
from peaks import measure, needs_proc


def test_long_prompt_refused_with_length_that_fits(embedded):
    i = embedded.info
    ids = torch.randint(4, 1000, (1, 4096), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OutOfMemoryError) as e:
        routes.run(embedded, ids, config=routes.Config(mode="all"))
    fits = routes.max_prompt_tokens(i.n_layers, i.n_heads, 8.0, 4)
    assert fits < 4096 and re.search(rf"at most {fits} tokens", str(e.value))
    # the length named fits: L·T²·H·itemsize of that length is within the budget, one more token is not
    assert i.n_layers * i.n_heads * fits**2 * 4 <= 8 * 2**30 < i.n_layers * i.n_heads * (fits + 1) ** 2 * 4
    # top-down at a budget below its store: refused too, with the longest prompt whose store fits
    with pytest.raises(OutOfMemoryError) as e:
        routes.run(embedded, ids, config=routes.Config(mode="route", max_memory_gb=0.5))
    fits = routes.max_route_tokens(i, 0.5)
    assert 1000 < fits < 4096 and re.search(rf"at most {fits} tokens", str(e.value))
    assert routes._top_down_bytes(i, fits, 4) <= 0.5 * 2**30 < routes._top_down_bytes(i, fits + 1, 4)


def test_route_mode_runs_what_all_mode_refuses(tiny):
    """Top-down stores no [T, T] arrays: a prompt all-position mode refuses runs, and gives the route all-position
    mode gives under a larger budget; an edit of the pattern keeps the patterns (and their limit)."""
    probe = tiny("llama")
    i = probe.info
    T = 120
    budget = 0.95 * i.n_layers * i.n_heads * 4 * T**2 / 2**30  # just below all-position importances of T tokens
    assert routes._top_down_bytes(i, T, 4) < 0.8 * budget * 2**30
    ids = torch.arange(4, 4 + T)[None]
    with pytest.raises(OutOfMemoryError, match="top-down"):
        routes.run(probe, ids, config=routes.Config(max_memory_gb=budget))
    top = routes.run(probe, ids, config=routes.Config(mode="route", max_memory_gb=budget))
    full = routes.run(probe, ids)
    assert set(top.route().edges()) == set(full.route().edges()) and top.route().number_of_edges() > 0
    assert top.attn.shape[1] == len(top.rows) < T  # only the visited rows are kept
    with pytest.raises(OutOfMemoryError, match="attention patterns fit prompts of at most"):
        routes.run(probe, ids, config=routes.Config(mode="route", max_memory_gb=budget),
                   edits=[ZeroAttention(layer=0, heads=[0])])


def test_route_mode_refuses_a_walk_beyond_the_budget(tiny):
    """The visited rows count against the budget with the layer store: a walk that outgrows it stops with one line."""
    probe = tiny("llama")
    ids = torch.arange(4, 44)[None]
    store = routes._top_down_bytes(probe.info, 40, 4)
    cfg = routes.Config(mode="route", tau=0.01, max_memory_gb=(store + 40 * probe.info.n_heads * 4) / 2**30)  # room for the first row only
    with pytest.raises(OutOfMemoryError, match="the route reaches .* positions at layer"):
        routes.run(probe, ids, config=cfg)


def test_top_down_on_transformer_lens_neox_keeps_patterns(tiny):
    """TransformerLens gives no post-rotary q/k for GPT-NeoX: top-down falls back to the stored patterns, same route."""
    probe = tiny("gpt_neox", backend="transformer_lens")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
    top = routes.run(probe, ids, config=routes.Config(mode="route"))
    full = routes.run(probe, ids)
    assert set(top.route().edges()) == set(full.route().edges()) and top.route().number_of_edges() > 0


_PEAKS = r"""
from analyses import routes
for T in (512, 1536):
    ids = torch.randint(10, 30000, (1, T), generator=torch.Generator().manual_seed(T))
    out[f"route {T}"] = peak(lambda: routes.run(probe, ids, config=routes.Config(mode="route", kernel="eager")))
"""


@needs_proc
def test_top_down_estimate_is_within_25_percent_of_the_measured_peak():
    measured = measure(_PEAKS, threads=2, timeout=1500)
    from probes.loading import embedded_model_dir
    from transformers import AutoConfig

    shape = planner.ModelShape.from_config(AutoConfig.from_pretrained(embedded_model_dir()))
    ratios = {k: planner.estimate(routes.memory_model("route"), shape, seq_len=int(k.split()[1])).activations / v
              for k, v in measured.items()}
    assert all(0.75 <= v <= 1.25 for v in ratios.values()), (ratios, measured)


def test_readme_quotes_the_latest_long_rows():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    head, body = [s for s in text.split("\n## ") if "routes `--long`" in s.split("\n", 1)[0]][-1].split("\n", 1)
    ratio, peak, times = re.search(r"top-down route \(long prompt\), T=4096 \| ([\d.]+×) forward[^|]*peak RSS (\d+) MB "
                                   r"\(([\d.]+×) the forward's\)", body).groups()
    fwd = re.search(r"plain forward, T=4096 \| [\d.]+ s; peak RSS (\d+) MB", body).group(1)
    doc = " ".join((root / "docs" / "readme" / "routes.md").read_text(encoding="utf-8").split())
    assert head.split()[0] in doc
    assert f"took {ratio} a plain forward with a peak RSS of {peak} MB, {times} the forward's {fwd} MB" in doc


# ----------------------------------------------------------------------------- the model's full context (8,192)
def _full_context_prompt() -> str:
    """A text of exactly the embedded model's context, 8,192 tokens (' the' is one token of SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer

    from probes.loading import embedded_model_dir

    text = " the" * 8192
    assert len(AutoTokenizer.from_pretrained(embedded_model_dir())(text)["input_ids"]) == 8192
    return text


def test_full_context_plans_at_the_context_not_past_it():
    """A prompt of exactly n_ctx tokens is planned at n_ctx: the bound that tokens_bound adds for special tokens
    does not push it past the context (it was refused as '8256 tokens per row'). Top-down fits 20 GiB free."""
    text = _full_context_prompt()
    bound = planner.tokens_bound(text, model="embedded")
    assert bound > 8192
    cfg, p = planner.plan_config(routes.MEMORY, "embedded", routes.Config(mode="route"), device="cpu", dtype="float32",
                                 free_bytes=20 * 2**30, seq_len=bound, prompt_bound=True)
    assert p.fits and p.seq_len == 8192


def test_all_positions_refuse_the_full_context_with_the_length_that_fits():
    """All-position mode at 8,192 tokens (74.8 GiB of importances) is refused before loading, naming the longest prompt
    whose estimate fits the budget: that length fits, one token more does not."""
    shape = planner.shape_of("embedded", dtype="float32")
    free = 22 * 2**30
    with pytest.raises(OutOfMemoryError) as e:
        planner.plan_config(routes.MEMORY, shape, routes.Config(mode="all"), device="cpu", free_bytes=free, seq_len=8192)
    n = int(re.search(r"Prompts of at most (\d+) tokens fit", e.value.hint).group(1))
    budget = int(free * 0.8)
    est = lambda T: planner.estimate(routes.MEMORY, shape, seq_len=T, chunk_mb=1, config=routes.Config(mode="all")).total  # noqa: E731
    assert 1000 < n < 8192 and est(n) <= budget < est(n + 1)


def test_full_context_top_down_refused_under_a_memory_limit(capsys, monkeypatch, results_dir):
    """`sonde run routes --mode route` on an 8,192-token prompt with $SONDE_MEMORY_LIMIT below its plan exits 2 before
    the weights load, with the longest prompt that fits; without the limit the plan fits (the run itself: 6 min,
    peak RSS 5.8 GiB, benchmarks/RESULTS.md)."""
    from conftest import run_cli

    monkeypatch.setenv(planner.MEMORY_LIMIT_ENV, "3GiB")
    code, out, err = run_cli(["run", "routes", "--prompt", _full_context_prompt(), "--mode", "route", "--position", "-1",
                              "--device", "cpu"], capsys)
    assert code == 2 and "at T=8192" in err and "Traceback" not in err, err
    n = int(re.search(r"Prompts of at most (\d+) tokens fit", err).group(1))
    shape = planner.shape_of("embedded", dtype="float32")
    est = lambda T: planner.estimate(routes.MEMORY, shape, seq_len=T, chunk_mb=1, config=routes.Config(mode="route")).total  # noqa: E731
    assert 1000 < n < 8192 and est(n) <= int(3 * 2**30 * 0.8) < est(n + 1)
    assert not any(results_dir.glob("*")) if results_dir.exists() else True  # nothing saved
