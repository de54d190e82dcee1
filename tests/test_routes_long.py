"""Long prompts: both modes refuse a prompt longer than the memory budget allows, before any forward pass, naming
the length that fits; top-down mode counts the attention patterns it keeps as well as the importances."""

from __future__ import annotations

import re

import pytest
import torch

from analyses import routes
from probes import OutOfMemoryError


@pytest.mark.parametrize("mode,itemsize", [("all", 4), ("route", 8)])
def test_long_prompt_refused_with_length_that_fits(embedded, mode, itemsize):
    i = embedded.info
    ids = torch.randint(4, 1000, (1, 4096), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OutOfMemoryError) as e:
        routes.run(embedded, ids, config=routes.Config(mode=mode))
    fits = routes.max_prompt_tokens(i.n_layers, i.n_heads, 8.0, itemsize)
    assert fits < 4096 and re.search(rf"at most {fits} tokens", str(e.value))
    # the length named fits: L·T²·H·itemsize of that length is within the budget, one more token is not
    assert i.n_layers * i.n_heads * fits**2 * itemsize <= 8 * 2**30 < i.n_layers * i.n_heads * (fits + 1) ** 2 * itemsize


def test_route_mode_refuses_what_all_mode_would_take(tiny):
    probe = tiny("llama")
    i = probe.info
    budget = 2 * i.n_layers * i.n_heads * 4 * 20**2 / 2**30  # all-position importances of 20 tokens
    ids = torch.arange(4, 24)[None]
    routes.run(probe, ids, config=routes.Config(max_memory_gb=budget))
    with pytest.raises(OutOfMemoryError, match="stored attention patterns fit prompts of at most"):
        routes.run(probe, torch.arange(4, 34)[None], config=routes.Config(mode="route", max_memory_gb=budget))


def test_readme_quotes_the_latest_long_rows():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    head, body = [s for s in text.split("\n## ") if "routes `--long`" in s.split("\n", 1)[0]][-1].split("\n", 1)
    ratio, peak, times = re.search(r"top-down route \(long prompt\), T=1024 \| ([\d.]+×) forward[^|]*peak RSS (\d+) MB "
                                   r"\(([\d.]+×) the forward's\)", body).groups()
    fwd = re.search(r"plain forward, T=1024 \| [\d.]+ s; peak RSS (\d+) MB", body).group(1)
    fwd4k = re.search(r"plain forward, T=4096 \| [\d.]+ s; peak RSS (\d+) MB", body).group(1)
    doc = " ".join((root / "docs" / "readme" / "routes.md").read_text(encoding="utf-8").split())
    assert head.split()[0] in doc
    assert f"took {ratio} a plain forward with a peak RSS of {peak} MB, {times} the forward's {fwd} MB" in doc
    assert f"plain forward peaked at {fwd4k} MB and both modes refused" in doc
