"""Margin-aware comparison of discrete decisions (sampled tokens, argmaxes) made by two runs.

Two backends, thread counts or machines compute the same scores up to a small numeric difference;
a decision (an argmax) can only flip where the gap between the two best scores is below twice that
difference. These helpers compare decisions step by step up to the first step whose margin is not
safely above the measured difference, and say how many steps were compared, so a test can assert
that it compared something.
"""

from __future__ import annotations

from typing import Sequence

import torch

SAFETY = 10.0  # the margin must exceed SAFETY x (2 x measured difference): the compared runs may differ a little more
FLOOR = 1e-5  # ... and at least this (float32 noise of a cached vs full forward)


def score_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the entries finite in both (the numeric difference of two runs' scores)."""
    fin = torch.isfinite(a) & torch.isfinite(b)
    return float((a.double() - b.double()).abs()[fin].max()) if bool(fin.any()) else 0.0


def margins(scores: torch.Tensor) -> torch.Tensor:
    """Per-row gap between the best and second-best score ``[..., V] -> [...]`` (inf where one entry is finite)."""
    top = scores.double().topk(2, dim=-1).values
    return torch.where(torch.isfinite(top[..., 1]), top[..., 0] - top[..., 1], torch.full_like(top[..., 0], float("inf")))


def compare_steps(scores_a: torch.Tensor, scores_b: torch.Tensor, toks_a: Sequence[int], toks_b: Sequence[int], *,
                  start: int = 0) -> tuple[int, float]:
    """Assert ``toks_a[t] == toks_b[t]`` for ``t = start, ...`` up to the first step whose margin is unsafe.

    ``scores_a`` / ``scores_b`` ``[T, V]`` are both runs' scores at each step given ``toks_a[:t]`` (the prefixes
    agree at every compared step, since comparison stops at the first unsafe one). Also checks that
    ``scores_a`` reproduces run a's choices there. Returns ``(steps compared, tolerance used)``.
    """
    tol = max(SAFETY * 2 * score_difference(scores_a, scores_b), FLOOR)
    m = margins(scores_a)
    n = 0
    for t in range(start, len(toks_a)):
        if not m[t] > tol:
            break
        assert int(scores_a[t].argmax()) == toks_a[t], f"step {t}: the scores do not reproduce run a's token"
        assert t < len(toks_b) and toks_b[t] == toks_a[t], \
            f"step {t}: tokens differ ({toks_a[t]} vs {toks_b[t] if t < len(toks_b) else 'none'}) with margin {float(m[t]):.3g} > {tol:.3g}"
        n += 1
    return n, tol
