"""Statistics of the fiber-bundle test (:mod:`analyses.fiber`): the published window scan, the calibrated
likelihood-ratio scan of the Rényi scores, its null simulation and tail bounds, the gap test, segment fits and
the vocabulary-level corrections.

**Null.** Below the reach a smooth cloud is locally a homogeneous Poisson process in ``R^D`` (``D``
unknown). Then the Rényi scores ``Y_k = k · (log r_{k+1} − log r_k)`` are iid exponentials with mean
``1/D`` (exactly, for any ``D``; also for uniform points on a flat torus, or on a round 2-sphere in
chord distance). Every scale-free statistic of the scores therefore has a null law that depends on
nothing but their number.

**What the singularities look like in the scores.** If the expected neighbour count is ``N(r)``, then
``Y_k ≈ Exp(rate g(r_k))`` with ``g = d log N / d log r`` the local growth exponent at the radius of rank ``k``.

* *A second sheet enters* (a sphere crossing a plane; two touching spheres; a cone's other nappe): a sheet of
  the same dimension ``D`` at distance ``d``, with density ratio ``a`` to the token's own sheet, adds
  ``a·c·(r² − d²)`` to ``N = c·r²`` (``D = 2``). With ``k0 = c·d²`` the rank where it enters, the rate ratio is
  ``g/D = 1 + a·k0/k`` for ``k ≥ k0``: a *bump* that decays back, not a step. Its Kullback–Leibler total over
  ``k ≥ k0`` is ``Σ (w − 1 − log w) ≈ k0 · (2 log 2 − 1) ≈ 0.39·k0`` nats for ``a = 1`` (less for ``a < 1``, and
  cut off at ``vol_max``); detection at ``α = 1e−3`` needs roughly ``log(1/α) ≈ 7`` nats, so even a test that
  knows ``k0`` and ``a`` misses most sheets that enter before rank ~20 or after ~``vol_max − 40``.
* *Lollipop junction*: a stick (dimension 1) meets a sphere (dimension 2): the stick's end is a drop and the
  sphere's arrival a lasting *step* up, with a transient above 2 (``d log(r² − x²)/d log r`` is large near the
  distance ``x``).
* *Gap*: one huge score (below).

**Calibrated statistic** (:func:`lr_scan`). A mixture (average) likelihood-ratio scan whose alternatives fit
these shapes, over change ranks ``k0`` (every rank up to ~33, then a grid of ratio 1.03, at least
:data:`MIN_SEGMENT` scores on either side): rate ratio ``w_k = 1 + a·k0/k`` after ``k0`` ("a sheet enters",
``a`` in :data:`BUMP_A`), ``w_k = b`` after ``k0`` (one change point, a rise or a drop, ``b`` in
:data:`STEP_B`) and ``w_k = b`` on ``[k0, 2·k0)`` (two change points, :data:`SEGMENT_B`), each family a third
of the prior (:func:`scan_components`). The dimension ``D`` is a nuisance, so each component's likelihood
ratio is that of the scale-free ``U = Y / Σ Y``: ``LR = Π w_k · (Σ Y)^c / (Σ w_k Y_k)^c`` (the density of
``U`` under rates ``D·w`` is ``Γ(c) Π w_k / (Σ w_k U_k)^c`` for every ``D``), and ``A = Σ π_j LR_j``. The
most likely component gives the change point and its sign (``w > 1``: the dimension **rises** there, which
rejects "fiber bundle"; otherwise it drops). A rise is reported only when the exact one-sided two-segment test
between the scores before the change and those of its main part (up to rank ``2·k0``; the end for a step)
also rejects at ``α``: a profile that only drops (a strip, 2 → 1) is otherwise fitted well by a bump that
starts after a few noisy scores. :func:`split_p` keeps the exact two-segment test at a known
split (``B_m = S_m / S_c ~ Beta(m, c − m)``), and :func:`changepoint_scan` the scan of all such splits.

**Tail** (:func:`calibration`, :func:`calibrate_p`). ``E₀ A = 1`` exactly, so ``P = min(1, 1/A)`` is a valid p at
every level (Markov), proven. It is loose (about 20× at ``α = 1e−3``), so the token's p is
``min(P, U(P))`` with ``U`` an upper confidence bound of the null tail ``P₀(P ≤ t)`` on a grid of ``t`` down to
``1e−20``: the smaller of a Clopper–Pearson bound from ``n_sims`` direct null scans and an empirical-Bernstein
bound from ``n_sims`` scans drawn from the mixture alternative ``Q`` itself (importance sampling: ``dP₀/dQ`` of
``U`` is exactly ``1/A = P``, so ``P₀(P ≤ t) = E_Q[1{P ≤ t}·P]`` with terms in ``[0, t]``, and the bound needs no
approximation at any ``t``: at Holm's ≈2e−8 over a 50k vocabulary it is about 1 % of ``t`` for volumes
10–200). ``U`` applies only to tokens with the full number of scores the simulation had; others keep ``P``.

**Gaps** (:func:`gap_test`, :func:`trim_gaps`). A tight group of neighbours followed by empty space is
one huge score. Its test is Fisher's: ``G = max Y / Σ Y``, whose exact null tail is
``Σ_j (−1)^{j+1} C(c, j) (1 − jG)_+^{c−1}``; the first term ``c (1 − G)^{c−1}`` is an upper bound and
is the reported ``p_gap``. Up to :data:`MAX_GAPS` such scores are removed, one at a time while the test
rejects at α, before the change points are searched (so that the change found is not the gap itself);
a token's ``p_manifold`` is the larger of the scan's calibrated p on all its scores and on the trimmed
ones, so it stays a valid p. A token whose gap test rejects gets the verdict "gap", never "singular":
below and beyond a gap lie different clouds, and a change across it is no evidence of a singular radius.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import torch

from probes import ConfigError

__all__ = ["pointwise_slopes", "welch_scan", "spacing_scores", "changepoint_scan", "split_p", "gap_test", "trim_gaps",
           "calibrate_p", "scan_components", "lr_scan", "simulate_scan_p", "calibration", "simulate_calibration", "stratify",
           "adjust_p", "MIN_SEGMENT", "MAX_GAPS"]

Mode = Literal["calibrated", "parity"]
Correction = Literal["none", "holm", "bh"]
_EPS_SLOPE = 1e-5  # slopes at or below this are dropped from a window (released code)
_ZERO_RADIUS = 1e-10  # radii at or below this are duplicates and skipped (released code)
MIN_SEGMENT = 5  # shortest segment of scores on either side of a calibrated change point
MAX_GAPS = 3  # gap scores removed at most per token


# ------------------------------------------------------------------------------------------ math: test
@torch.no_grad()
def pointwise_slopes(log_r: torch.Tensor, log_v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Local dimension ``Δ log v / Δ log r`` per radius, numpy-gradient style on the segment ``[start, n)``.

    Args:
        log_r: ``[B, n]`` log radii (ascending; entries before ``start`` may be ``-inf``).
        log_v: ``[n]`` log volumes.
        start: ``[B]`` first index of each row's segment.

    Returns:
        ``[B, n]`` float64 slopes, NaN before ``start``; centred inside, one-sided at ``start`` and ``n−1``.
    """
    lr = log_r.double()
    lv = log_v.double().to(lr.device)
    B, n = lr.shape
    s = torch.full_like(lr, float("nan"))
    s[:, 1:-1] = (lv[2:] - lv[:-2]) / (lr[:, 2:] - lr[:, :-2])
    s[:, -1] = (lv[-1] - lv[-2]) / (lr[:, -1] - lr[:, -2])
    st = start.clamp(max=n - 2).long()
    rows = torch.arange(B, device=lr.device)
    s[rows, st] = (lv[st + 1] - lv[st]) / (lr[rows, st + 1] - lr[rows, st])
    idx = torch.arange(n, device=lr.device)
    s[idx[None, :] < start[:, None]] = float("nan")
    return s


@torch.no_grad()
def _welch_parts(slopes: torch.Tensor, start: torch.Tensor, ws: int) -> tuple[torch.Tensor, ...]:
    """Welch ``t``, degrees of freedom and a usable-window mask at ``w = 2ws … n−2ws−1`` (``[B, n−4ws]`` each)."""
    valid = torch.isfinite(slopes) & (slopes.abs() > _EPS_SLOPE)
    x = torch.where(valid, slopes, torch.zeros_like(slopes))
    n = slopes.shape[1]
    m = n - ws + 1  # windows [i, i+ws), i = 0 … n−ws
    vf = valid.to(x.dtype)
    tot, cnt = x[:, :m].clone(), vf[:, :m].clone()
    for j in range(1, ws):  # ws shifted adds: no [B, n, ws] temporary
        tot += x[:, j:j + m]
        cnt += vf[:, j:j + m]
    mean = tot / cnt.clamp_min(1)
    ss = torch.zeros_like(mean)
    for j in range(ws):  # two-pass variance around the window mean
        d = (x[:, j:j + m] - mean) * vf[:, j:j + m]
        ss += d * d
    var = ss / (cnt - 1).clamp_min(1)
    w = torch.arange(2 * ws, n - 2 * ws, device=slopes.device)
    a, b = w - 2 * ws, w + ws
    n1, n2, m1, m2 = cnt[:, a], cnt[:, b], mean[:, a], mean[:, b]
    e1, e2 = var[:, a] / n1.clamp_min(1), var[:, b] / n2.clamp_min(1)
    se2 = e1 + e2
    diff = m1 - m2
    t = torch.where(se2 > 0, diff / se2.sqrt(), torch.where(diff != 0, diff.sign() * math.inf, torch.zeros_like(diff)))
    df = se2 ** 2 / (e1 ** 2 / (n1 - 1).clamp_min(1) + e2 ** 2 / (n2 - 1).clamp_min(1))
    df = torch.where(se2 > 0, df, n1 + n2 - 2)
    ok = (n1 >= 2) & (n2 >= 2) & (w[None, :] >= start[:, None] + 2 * ws) & torch.isfinite(df) & ~t.isnan()
    return t, df, ok


def _two_sided(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    from scipy.special import stdtr

    return np.minimum(2.0 * stdtr(df, -np.abs(t)), 1.0)


@torch.no_grad()
def welch_scan(slopes: torch.Tensor, start: torch.Tensor, ws: int) -> np.ndarray:
    """Welch two-sample p-values of the sliding test, slopes ``[w−2ws, w−ws)`` vs ``[w+ws, w+2ws)``.

    Args:
        slopes: ``[B, n]`` pointwise slopes (NaN = not in segment).
        start: ``[B]`` segment starts; positions ``w < start + 2ws`` get ``p = 1``.
        ws: window size.

    Returns:
        ``[B, n]`` float64 two-sided p-values at each index ``w`` (1 where no test is made: outside
        ``[start+2ws, n−2ws)``, fewer than 2 usable slopes in a window, or zero variance and equal means).
    """
    B, n = slopes.shape
    p = np.ones((B, n))
    if n - 2 * ws <= 2 * ws:
        return p
    t, df, ok = _welch_parts(slopes, start, ws)
    pw = _two_sided(t.cpu().numpy(), df.cpu().numpy())
    p[:, 2 * ws:n - 2 * ws] = np.where(ok.cpu().numpy() & np.isfinite(pw), pw, 1.0)
    return p


# ------------------------------------------------------------------------------------------ math: calibrated scan
@torch.no_grad()
def spacing_scores(log_r: torch.Tensor, ranks: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Rényi scores ``Y_k = k · (log r_{k+1} − log r_k)`` per column (NaN before ``start`` and in the last column).

    For a homogeneous Poisson process in ``R^D`` (and for uniform points on a flat torus, or on a round
    2-sphere in chord distance) the ``Y_k`` are independent exponentials with mean ``1/D`` whatever ``k``
    (Rényi's representation of order statistics: ``(r_k / r_{k+1})^{kD}`` are iid uniform).

    Args:
        log_r: ``[B, n]`` log radii (ascending; ``-inf`` for zero radii before ``start``).
        ranks: ``[n]`` neighbour rank ``k`` of each column.
        start: ``[B]`` first column of each row's segment.
    """
    lr = log_r.double()
    B, n = lr.shape
    y = torch.full_like(lr, float("nan"))
    y[:, :-1] = ranks[:-1].double().to(lr.device) * (lr[:, 1:] - lr[:, :-1])
    idx = torch.arange(n, device=lr.device)
    y[idx[None, :] < start[:, None]] = float("nan")
    return y


@torch.no_grad()
def _fit_segments(log_r: torch.Tensor, log_v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n_points: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``log v = c + D log r`` on ``[a, b)`` per row → ``(D [B], scale [B])`` (NaN if < 2 points)."""
    n = log_r.shape[1]
    idx = torch.arange(n)
    m = (idx[None] >= a[:, None]) & (idx[None] < b[:, None])
    x = torch.where(m, log_r.double(), torch.zeros((), dtype=torch.float64))
    y = torch.where(m, log_v.double()[None].expand_as(x), torch.zeros((), dtype=torch.float64))
    c = m.double().sum(1)
    mx, my = x.sum(1) / c.clamp_min(1), y.sum(1) / c.clamp_min(1)
    dx = torch.where(m, x - mx[:, None], torch.zeros((), dtype=torch.float64))
    dy = torch.where(m, y - my[:, None], torch.zeros((), dtype=torch.float64))
    D = (dx * dy).sum(1) / (dx * dx).sum(1)
    icpt = my - D * mx
    rss = torch.where(m, y - icpt[:, None] - D[:, None] * x, torch.zeros((), dtype=torch.float64)).pow(2).sum(1)
    scale = torch.exp(icpt) / n_points * torch.exp(0.5 * rss)
    bad = c < 2
    return D.masked_fill(bad, float("nan")), scale.masked_fill(bad, float("nan"))



# ------------------------------------------------------------------------------------------ calibrated: change-point scan
def _beta_tails(m: np.ndarray, rest: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P(B ≤ b), P(B ≥ b))`` for ``B ~ Beta(m, rest)`` at ``b = s1 / (s1 + s2)``, each tail computed directly."""
    from scipy.special import betainc

    tot = s1 + s2
    with np.errstate(invalid="ignore", divide="ignore"):
        b, b2 = s1 / tot, s2 / tot
    lo = betainc(m, rest, b)
    hi = betainc(rest, m, b2)
    bad = ~(tot > 0) | ~np.isfinite(tot)
    return np.where(bad, 1.0, lo), np.where(bad, 1.0, hi)


def changepoint_scan(y: torch.Tensor | np.ndarray, min_seg: int = MIN_SEGMENT) -> dict[str, np.ndarray]:
    """Best single change in the exponential rate of each row's finite scores (see the module docstring).

    Args:
        y: ``[B, n]`` scores; NaN entries (before a segment's start, the last column, removed gaps) are skipped.
        min_seg: fewest scores on either side of a split.

    Returns:
        ``p`` ``[B]`` smallest two-sided split p (1 when no split is possible), ``split`` ``[B]`` column of the
        first score after the best split (``n`` when none), ``rise`` ``[B]`` (the dimension rises there),
        ``n_splits`` ``[B]`` number of splits scanned, ``n_scores`` ``[B]`` finite scores.
    """
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = y.astype(np.float64, copy=False)
    B, n = y.shape
    fin = np.isfinite(y)
    cs = np.cumsum(np.where(fin, y, 0.0), 1)
    cc = np.cumsum(fin, 1)
    c = cc[:, -1] if n else np.zeros(B, dtype=np.int64)
    tot = cs[:, -1] if n else np.zeros(B)
    # split before column w (w = 1 … n−1): first segment = finite scores in columns < w
    m = cc[:, :-1]
    ok = fin[:, 1:] & (m >= min_seg) & ((c[:, None] - m) >= min_seg)
    p_all = np.ones((B, max(n - 1, 0)))
    up_all = np.zeros((B, max(n - 1, 0)), dtype=bool)
    r, k = np.nonzero(ok)
    if r.size:
        s1 = cs[r, k]
        lo, hi = _beta_tails(m[r, k].astype(np.float64), (c[r] - m[r, k]).astype(np.float64), s1, tot[r] - s1)
        p_all[r, k] = np.minimum(1.0, 2.0 * np.minimum(lo, hi))
        up_all[r, k] = hi < lo  # first segment's mean score is the larger: its dimension is the smaller
    if n > 1:
        best = p_all.argmin(1)
        p = p_all[np.arange(B), best]
        rise = up_all[np.arange(B), best]
        split = np.where(ok.any(1), best + 1, n)
    else:
        p, rise, split = np.ones(B), np.zeros(B, dtype=bool), np.full(B, n)
    p = np.where(ok.any(1) if n > 1 else False, p, 1.0)
    return {"p": p, "split": split, "rise": rise & (split < n), "n_splits": np.maximum(c - 2 * min_seg + 1, 0),
            "n_scores": c}


def split_p(y: torch.Tensor | np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided exact p of a change at a *known* column (the oracle of the benchmark): ``(p [B], rise [B])``.

    ``split[i]`` is the column of the first score after the change; rows whose split leaves fewer than one
    finite score on a side get ``p = 1``."""
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = y.astype(np.float64, copy=False)
    B, n = y.shape
    fin = np.isfinite(y)
    idx = np.arange(n)[None, :]
    before = fin & (idx < np.asarray(split)[:, None])
    after = fin & ~before
    m, rest = before.sum(1).astype(np.float64), after.sum(1).astype(np.float64)
    s1, s2 = np.where(before, y, 0.0).sum(1), np.where(after, y, 0.0).sum(1)
    ok = (m >= 1) & (rest >= 1)
    lo, hi = _beta_tails(np.maximum(m, 1), np.maximum(rest, 1), s1, s2)
    p = np.where(ok, np.minimum(1.0, 2.0 * np.minimum(lo, hi)), 1.0)
    return p, ok & (hi < lo)


def gap_test(y: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fisher's test of the largest score: ``(p_gap [B], column [B])``.

    ``p_gap = min(1, c · (1 − G)^{c−1})`` with ``G = max Y / Σ Y`` over the ``c`` finite scores: the first
    term of the exact null tail, an upper bound of it (exact wherever ``G > 1/2``)."""
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = y.astype(np.float64, copy=False)
    fin = np.isfinite(y)
    yz = np.where(fin, y, -np.inf)
    col = yz.argmax(1) if y.shape[1] else np.zeros(len(y), dtype=np.int64)
    mx = np.where(fin.any(1), yz.max(1, initial=-np.inf), 0.0)
    tot = np.where(fin, y, 0.0).sum(1)
    c = fin.sum(1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.where(tot > 0, mx / tot, 0.0)
        logp = np.log(np.maximum(c, 1.0)) + (c - 1.0) * np.log1p(-np.minimum(g, 1.0))
    p = np.where((c >= 2) & (tot > 0), np.exp(np.minimum(logp, 0.0)), 1.0)
    return p, col


def trim_gaps(y: torch.Tensor | np.ndarray, alpha: float, max_gaps: int = MAX_GAPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove (set to NaN) up to ``max_gaps`` largest scores per row, one at a time while :func:`gap_test`
    rejects at ``alpha``. Returns ``(trimmed y, p_gap of the untrimmed scores [B], removed count [B])``."""
    y = (y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype(np.float64, copy=True)
    n_removed = np.zeros(len(y), dtype=np.int64)
    p0 = None
    active = np.arange(len(y))
    for _ in range(max_gaps):
        if active.size == 0:
            break
        p, col = gap_test(y[active])
        if p0 is None:
            p0 = p
        hit = p < alpha
        y[active[hit], col[hit]] = np.nan
        n_removed[active[hit]] += 1
        active = active[hit]
    return y, (p0 if p0 is not None else np.ones(len(y))), n_removed


def calibrate_p(p: np.ndarray, cal: dict[str, Any], n_splits: np.ndarray | int | None = None,
                n_scores: np.ndarray | int | None = None) -> np.ndarray:
    """Calibrated p of a token's scan p: ``min(1, n_splits · p, U(p))`` (see :func:`calibration`).

    For the likelihood-ratio scan (:func:`lr_scan`) ``p = 1/A`` is already a proven bound and
    ``n_splits = 1``; for a minimum of exact split p-values (:func:`changepoint_scan`) ``n_splits · p`` is
    the union bound. ``U`` is the calibration's upper confidence bound of the scan's null tail, a step
    function read at the grid point just above ``p``, used only for rows with ``n_scores`` equal to the
    calibration's (default: all rows)."""
    p = np.asarray(p, dtype=np.float64)
    nw = np.asarray(cal["n_splits"] if n_splits is None else n_splits, dtype=np.float64)
    ucb = np.asarray(cal["ucb"], dtype=np.float64)
    step = float(cal["grid_step"])
    i = np.floor(-np.log10(np.clip(p, 1e-300, 1.0)) / step + 1e-9).astype(np.int64)
    u = np.where(i < ucb.size, ucb[np.clip(i, 0, ucb.size - 1)], 1.0)  # below the grid: the bound alone
    if n_scores is not None:
        u = np.where(np.asarray(n_scores) == int(cal["n_scores"]), u, 1.0)
    return np.clip(np.minimum(np.maximum(nw, 1.0) * p, u), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ calibrated: LR scan
# magnitudes on a factor-2 grid: the benchmark's singularities need ratios of 1.5-3, token embeddings' dimension
# changes reach 10x and more (a fixed-ratio alternative far from the truth loses half its log likelihood ratio)
BUMP_A = (0.5, 1.0, 2.0, 4.0, 8.0)  # "a second sheet enters": rate ratio 1 + a·k0/k for k ≥ k0
STEP_B = (1 / 8, 1 / 4, 1 / 2, 2.0, 4.0, 8.0)  # one change point: rate ratio b for k ≥ k0 (b < 1: the dimension drops)
SEGMENT_B = (1 / 4, 1 / 2, 2.0, 4.0)  # two change points: rate ratio b for k0 ≤ k < 2·k0, 1 elsewhere
K0_RATIO = 1.03  # the change ranks k0 scanned: every rank up to ~33, then a geometric grid of ratio 1.03


@functools.lru_cache(maxsize=32)
def scan_components(vol_min: int, n_scores: int, min_seg: int = MIN_SEGMENT) -> dict[str, np.ndarray]:
    """The alternatives of :func:`lr_scan` for scores of ranks ``vol_min … vol_min + n_scores − 1``.

    Returns:
        ``w`` ``[J, n_scores]`` rate ratios (alternative / null) per component and score, ``log_prior`` ``[J]``
        (each family a third, uniform inside), ``column`` ``[J]`` first score column after the change
        (the change point), ``end`` ``[J]`` the column where the change's main part ends (rank ``2·k0`` for a bump
        or a segment, the last column + 1 for a step), ``rise`` ``[J]`` (the dimension rises there), ``family``
        ``[J]`` (0 bump, 1 step, 2 segment).
    """
    k = vol_min + np.arange(n_scores, dtype=np.float64)
    cols = np.arange(min_seg, n_scores - min_seg + 1)
    if cols.size == 0:
        return {"w": np.ones((0, n_scores)), "log_prior": np.zeros(0), "column": np.zeros(0, np.int64),
                "end": np.zeros(0, np.int64), "rise": np.zeros(0, bool), "family": np.zeros(0, np.int64)}
    grid = np.unique(np.round(np.geomspace(k[cols[0]], k[cols[-1]], 2 + int(np.log(k[cols[-1]] / k[cols[0]]) / np.log(K0_RATIO)))))
    cols = np.unique(np.clip(np.searchsorted(k, grid), cols[0], cols[-1]))
    k0 = k[cols]
    after = k[None, :] >= k0[:, None]  # [n0, n]
    fams, rows, rises, colv, famv = [], [], [], [], []
    for f, (params, make) in enumerate((
            (BUMP_A, lambda a: np.where(after, 1.0 + a * k0[:, None] / k[None, :], 1.0)),
            (STEP_B, lambda b: np.where(after, b, 1.0)),
            (SEGMENT_B, lambda b: np.where(after & (k[None, :] < 2 * k0[:, None]), b, 1.0)))):
        for v in params:
            rows.append(make(v))
            rises.append(np.full(len(k0), v > 0 if f == 0 else v > 1))
            colv.append(cols)
            famv.append(np.full(len(k0), f))
        fams.append(len(params) * len(k0))
    w = np.concatenate(rows)
    log_prior = np.concatenate([np.full(m, -np.log(3 * m)) for m in fams])
    famv = np.concatenate(famv)
    column = np.concatenate(colv)
    end = np.where(famv == 1, n_scores, np.minimum(np.searchsorted(k, 2 * k[column]), n_scores))
    return {"w": w, "log_prior": log_prior, "column": column, "end": end, "rise": np.concatenate(rises), "family": famv}


def lr_scan(y: torch.Tensor | np.ndarray, vol_min: int, min_seg: int = MIN_SEGMENT, chunk: int = 512, rise_level: float = 1e-3
            ) -> dict[str, np.ndarray]:
    """Mixture likelihood ratio of each row's finite scores against the alternatives of :func:`scan_components`.

    Each component's scale-invariant likelihood ratio (the density ratio of ``Y / Σ Y`` over the finite
    scores) is ``Π w_k · (Σ Y)^c / (Σ w_k Y_k)^c``; ``A`` is their prior-weighted mean, so ``E₀ A = 1``
    and ``p = min(1, 1/A)`` is a valid p at every level (Markov).

    Args:
        y: ``[B, n]`` scores (NaN = skipped), column ``j`` of rank ``vol_min + j``.
        vol_min: rank of column 0.

    Returns:
        ``p`` ``[B]`` (``1/A``), ``log_a`` ``[B]``, ``split`` ``[B]`` column of the first score after the most
        likely component's change (``n`` when no component), ``rise`` ``[B]`` (a rising component, confirmed by
        ``p_rise < rise_level``), ``p_rise`` ``[B]`` (exact one-sided two-segment p of a rise between the scores before
        the change and those of its main part, a descriptive check at a data-chosen split), ``n_scores`` ``[B]``.
    """
    from scipy.special import logsumexp

    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = y.astype(np.float64, copy=False)
    B, n = y.shape
    comp = scan_components(int(vol_min), n, min_seg)
    W, lp = comp["w"], comp["log_prior"]
    logW = np.log(W)
    fin = np.isfinite(y)
    c = fin.sum(1)
    out_la = np.zeros(B)
    best = np.zeros(B, dtype=np.int64)
    for s in range(0, B, chunk):
        f = fin[s:s + chunk]
        y0 = np.where(f, y[s:s + chunk], 0.0)
        tot = y0.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.where(tot > 0, y0 / tot, 0.0)
            llr = f.astype(np.float64) @ logW.T - c[s:s + chunk, None] * np.log(u @ W.T)
        ok = (tot[:, 0] > 0) & np.isfinite(tot[:, 0]) & (c[s:s + chunk] >= 2 * min_seg)
        llr = np.where(ok[:, None] & np.isfinite(llr), llr, 0.0)
        out_la[s:s + chunk] = logsumexp(llr + lp[None, :], axis=1) if W.shape[0] else 0.0
        best[s:s + chunk] = (llr + lp[None, :]).argmax(1) if W.shape[0] else 0
    has = (out_la > 0) & (W.shape[0] > 0)
    split = np.where(has, comp["column"][best] if W.shape[0] else n, n)
    rise = has & (comp["rise"][best] if W.shape[0] else False)
    p_rise = np.ones(B)
    if W.shape[0]:  # a rise also needs significantly smaller scores on the change's main part than before it: a
        # profile that only decreases (a strip's 2 → 1) is fitted well by a bump that starts a few noisy scores in
        cs = np.concatenate([np.zeros((B, 1)), np.cumsum(np.where(fin, y, 0.0), 1)], 1)
        cc = np.concatenate([np.zeros((B, 1)), np.cumsum(fin, 1)], 1)
        r, a, e = np.arange(B), split.clip(0, n), comp["end"][best]
        m1, m2 = cc[r, a], cc[r, e] - cc[r, a]
        s1, s2 = cs[r, a], cs[r, e] - cs[r, a]
        ok = has & (m1 >= 1) & (m2 >= 1)
        _, hi = _beta_tails(np.maximum(m1, 1), np.maximum(m2, 1), s1, s2)
        p_rise = np.where(ok, hi, 1.0)  # exact one-sided p of "larger scores before": Beta(m1, m2) upper tail
        rise &= p_rise < rise_level
    return {"p": np.minimum(1.0, np.exp(-out_la)), "log_a": out_la, "split": split, "rise": rise, "p_rise": p_rise,
            "n_scores": c}


def simulate_scan_p(n_scans: int, n: int, vol_min: int = 10, min_seg: int = MIN_SEGMENT, *, seed: int = 0,
                    chunk: int = 2000, proposal: Literal["null", "mixture"] = "null") -> np.ndarray:
    """:func:`lr_scan` p (``1/A``) of ``n_scans`` simulated scans over ``n`` radii (``n − 1`` Rényi scores).

    ``proposal="null"``: iid exponentials (the null). ``"mixture"``: each scan draws one component of
    :func:`scan_components` by its prior and its scores as exponentials with those rates, i.e. a draw from the
    mixture alternative ``Q``, whose likelihood ratio to the null is exactly ``A``: then ``E_Q[1{P ≤ t}·P] =
    P₀(P ≤ t)`` (importance sampling for the deep tail, :func:`simulate_calibration`)."""
    g = torch.Generator().manual_seed(seed)
    comp = scan_components(int(vol_min), n - 1, min_seg)
    prior = torch.as_tensor(np.exp(comp["log_prior"]))
    out = []
    for s in range(0, n_scans, chunk):
        b = min(chunk, n_scans - s)
        y = torch.empty(b, n - 1, dtype=torch.float64).exponential_(1.0, generator=g)
        if proposal == "mixture" and len(prior):
            j = torch.multinomial(prior, b, replacement=True, generator=g)
            y = y / torch.as_tensor(comp["w"])[j]
        out.append(lr_scan(y, vol_min, min_seg)["p"])
    return np.concatenate(out) if out else np.ones(0)


@functools.lru_cache(maxsize=16)
def calibration(vol_min: int, vol_max: int, min_seg: int = MIN_SEGMENT, n_sims: int = 40000, seed: int = 0,
                delta: float = 0.05, grid_step: float = 0.02, grid_min_log10: float = -20.0) -> dict[str, Any]:
    """:func:`simulate_calibration`, kept once per setting in Sonde's per-user cache (``fiber-calibration/``, JSON):
    the simulation is deterministic (a seeded generator), takes minutes at the default size, and depends on nothing
    but its arguments and the alternatives (:data:`BUMP_A`, :data:`STEP_B`, :data:`SEGMENT_B`, :data:`K0_RATIO`, hashed
    into the file name), so every later run, process and page reads it back. A damaged cache file is recomputed."""
    import json
    import os
    import tempfile

    from probes.loading import private_cache_dir

    args = dict(vol_min=int(vol_min), vol_max=int(vol_max), min_seg=int(min_seg), n_sims=int(n_sims), seed=int(seed),
                delta=float(delta), grid_step=float(grid_step), grid_min_log10=float(grid_min_log10))
    import hashlib

    fams = hashlib.sha256(repr((BUMP_A, STEP_B, SEGMENT_B, K0_RATIO)).encode()).hexdigest()[:8]  # the alternatives
    name = f"cal-v2-{fams}-" + "-".join(f"{k}={v}" for k, v in args.items()).replace(".", "p") + ".json"
    try:
        folder = private_cache_dir("fiber-calibration")
    except Exception:  # noqa: BLE001 - no usable cache folder: compute every time
        folder = None
    if folder is not None:
        try:
            got = json.loads((folder / name).read_text(encoding="utf-8"))
            ucb = got["ucb"]
            if (isinstance(ucb, list) and got.get("n_sims") == args["n_sims"]
                    and all(isinstance(u, float) and 0.0 <= u <= 1.0 for u in ucb)):
                return got
        except (OSError, ValueError, KeyError, TypeError):
            pass
    out = simulate_calibration(**args)
    if folder is not None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(out, f)
            os.replace(tmp, folder / name)
        except OSError:
            pass
    return out


def simulate_calibration(vol_min: int, vol_max: int, min_seg: int = MIN_SEGMENT, n_sims: int = 40000, seed: int = 0,
                         delta: float = 0.05, grid_step: float = 0.02, grid_min_log10: float = -20.0) -> dict[str, Any]:
    """Null law of the LR scan's ``P = 1/A``, as an upper confidence bound on a ``log10 p`` grid.

    ``ucb[i]`` bounds ``P₀(P ≤ t_i)``, ``t_i = 10^(−i·grid_step)``, by the smallest of three upper bounds:
    ``t_i`` itself (Markov: ``E₀ A = 1``; proven), the one-sided ``1 − delta/2`` Clopper–Pearson bound from
    ``n_sims`` direct null scans, and the ``1 − delta/2`` empirical-Bernstein bound (Maurer & Pontil 2009) of the
    importance-sampling estimate from ``n_sims`` scans drawn from the mixture alternative (:func:`simulate_scan_p`):
    its terms ``1{P ≤ t}·P`` lie in ``[0, t]``, so the bound holds at every ``t`` without any approximation, down to
    the grid's end (``10^grid_min_log10``), far below Holm's ≈2e−8 over a 50k vocabulary.

    Returns:
        ``{"n_splits": 1, "n_scores", "min_segment", "n_sims", "seed", "delta", "grid_step", "ucb"}``.
    """
    from scipy.stats import beta

    n = vol_max - vol_min
    grid = 10.0 ** (-np.arange(0.0, -grid_min_log10 + grid_step / 2, grid_step))
    p0 = np.sort(simulate_scan_p(n_sims, n, vol_min, min_seg, seed=seed))
    h = np.searchsorted(p0, grid, side="right")
    cp = np.where(h >= n_sims, 1.0, beta.ppf(1.0 - delta / 2, h + 1, np.maximum(n_sims - h, 1)))
    pq = np.sort(simulate_scan_p(n_sims, n, vol_min, min_seg, seed=seed + 1, proposal="mixture"))
    cs, cs2 = np.r_[0.0, np.cumsum(pq)], np.r_[0.0, np.cumsum(pq ** 2)]
    m = np.searchsorted(pq, grid, side="right")  # terms 1{P <= t}·P: the m smallest are P, the rest 0
    mean = cs[m] / n_sims
    var = np.maximum(cs2[m] / n_sims - mean ** 2, 0.0) * n_sims / max(n_sims - 1, 1)
    lg = np.log(4.0 / delta)  # Maurer & Pontil (2009), Thm 4, at confidence 1 − delta/2, terms scaled to [0, t]
    eb = mean + np.sqrt(2.0 * var * lg / n_sims) + 7.0 * grid * lg / (3.0 * max(n_sims - 1, 1))
    ucb = np.minimum(np.minimum(grid, cp), eb)
    return {"n_splits": 1, "n_scores": n - 1, "min_segment": min_seg, "n_sims": n_sims, "seed": seed, "delta": delta,
            "grid_step": grid_step, "ucb": [float(min(1.0, u)) for u in ucb]}


@torch.no_grad()
def stratify(radii: torch.Tensor, vol_min: int, *, window: int = 10, alpha: float = 1e-3, n_strata: int = 3,
             mode: Mode = "calibrated", cal: dict[str, Any] | None = None, n_points: int | None = None) -> dict[str, Any]:
    """Sequential change-point search and segment fits for a batch of tokens.

    Args:
        radii: ``[B, n]`` sorted distances to neighbours of rank ``vol_min … vol_min+n−1``.
        vol_min: rank of column 0 (volumes are ``vol_min + column``).
        mode: ``parity``: the released Welch window scan, raw p thresholded at ``alpha / n_strata``, the first
            position below it is the change; ``calibrated``: the likelihood-ratio scan of the Rényi scores
            (:func:`lr_scan`) after :func:`trim_gaps`, its most likely component's change is the change when the
            calibrated p (``cal`` from :func:`calibration`) is below ``alpha``.

    Returns:
        dict of ``[B, n_strata]`` arrays ``start_index`` (column; −1 = no segment), ``start_radius``,
        ``dim``, ``scale``, ``p`` (effective p of the change that ends the segment, 1 if none), ``rise``
        (the dimension rises at that change) and ``[B]`` arrays ``n_segments``, ``p_scan`` (the token's p:
        effective p of the first scan; calibrated: the larger of the scans with and without the gap
        scores), ``p_raw_min`` (parity: raw min p of the first scan; calibrated: ``1/A``, the uncalibrated bound), ``p_gap`` (gap test; 1 in parity mode),
        ``n_gaps`` (gap scores removed), ``first_start`` (first non-zero radius column), ``testable``.
        Later strata search the segment after the previous change; their p are conditional on it.
    """
    B, n = radii.shape
    if mode == "calibrated" and cal is None:
        raise ConfigError("stratify(mode='calibrated') needs cal=calibration(...).")
    n_points = n_points or B
    log_r = radii.double().clamp_min(1e-300).log()
    log_r = torch.where(radii > _ZERO_RADIUS, log_r, torch.full_like(log_r, -math.inf))
    ranks = torch.arange(vol_min, vol_min + n, dtype=torch.float64)
    log_v = ranks.log()
    thr = alpha / n_strata if mode == "parity" else alpha
    S = n_strata
    start_idx = torch.full((B, S), -1, dtype=torch.long)
    start_rad = torch.full((B, S), float("nan"), dtype=torch.float64)
    dims = torch.full((B, S), float("nan"), dtype=torch.float64)
    scales = torch.full((B, S), float("nan"), dtype=torch.float64)
    pj = torch.ones((B, S), dtype=torch.float64)
    rise = torch.zeros((B, S), dtype=torch.bool)
    first = (radii > _ZERO_RADIUS).double().argmax(1)
    first = torch.where((radii > _ZERO_RADIUS).any(1), first, torch.full_like(first, n))
    testable = (n - first) > 4 * window
    p_scan = np.ones(B)
    p_raw_min = np.ones(B)
    p_gap = np.ones(B)
    n_gaps = np.zeros(B, dtype=np.int64)
    if mode == "calibrated":
        y_all = spacing_scores(log_r, ranks, first).numpy()[:, :-1]  # the last column has no score
        full = lr_scan(y_all, vol_min, rise_level=alpha)
        p_full = calibrate_p(full["p"], cal, 1, full["n_scores"])
        y_trim, p_gap, n_gaps = trim_gaps(y_all, alpha)
    active = torch.arange(B)
    cur = first.clone()
    active = active[first < n - 1]
    for j in range(S):
        if active.numel() == 0:
            break
        st = cur[active]
        lr = log_r[active]
        rows = np.arange(len(st))
        if mode == "parity":
            praw = welch_scan(pointwise_slopes(lr, log_v, st), st, window)
            hit = praw < thr
            found = hit.any(1)
            w = np.where(found, hit.argmax(1), n)
            pchange = np.where(found, praw[rows, np.minimum(w, n - 1)], 1.0)
            pmin_raw = praw.min(1)
            pmin_eff = np.minimum(1.0, pmin_raw * n_strata)
            up = np.zeros(len(st), dtype=bool)
        else:
            ys = y_trim[active.numpy()].copy()
            ys[np.arange(n - 1)[None, :] < st.numpy()[:, None]] = np.nan
            cp = lr_scan(ys, vol_min, rise_level=alpha)
            pc = calibrate_p(cp["p"], cal, 1, cp["n_scores"])
            found = pc < thr
            w = np.where(found, cp["split"], n)
            pchange = np.where(found, pc, 1.0)
            up = cp["rise"] & found
            pmin_raw = full["p"][active.numpy()] if j == 0 else cp["p"]
            pmin_eff = np.maximum(p_full[active.numpy()], pc) if j == 0 else pc
        if j == 0:
            p_raw_min[active.numpy()] = pmin_raw
            p_scan[active.numpy()] = pmin_eff
        wt = torch.as_tensor(w, dtype=torch.long)
        D, sc = _fit_segments(lr, log_v, st, wt, n_points)
        start_idx[active, j] = st
        start_rad[active, j] = radii[active, st].double()
        dims[active, j], scales[active, j] = D, sc
        pj[active, j] = torch.as_tensor(pchange, dtype=torch.float64)
        rise[active, j] = torch.as_tensor(up)
        keep = torch.as_tensor(found)
        cur[active[keep]] = wt[keep]
        active = active[keep]
    if mode == "parity":  # the released decision: a fitted dimension that grows across the change
        rise[:, :-1] = (dims[:, 1:] > dims[:, :-1]) & (start_idx[:, 1:] >= 0)
    n_seg = (start_idx >= 0).sum(1)
    return {"start_index": start_idx, "start_radius": start_rad, "dim": dims, "scale": scales, "p": pj, "rise": rise,
            "n_segments": n_seg, "p_scan": torch.as_tensor(p_scan), "p_raw_min": torch.as_tensor(p_raw_min),
            "p_gap": torch.as_tensor(p_gap, dtype=torch.float64), "n_gaps": torch.as_tensor(n_gaps),
            "first_start": first, "testable": testable}


def adjust_p(p: np.ndarray, method: Correction) -> np.ndarray:
    """Vocabulary-level adjustment: ``none``, ``holm`` (FWER) or ``bh`` (Benjamini–Hochberg FDR)."""
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    if method == "none" or n == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ps = p[order]
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (n - np.arange(n)) * ps))
    elif method == "bh":
        adj = np.minimum.accumulate((ps * n / np.arange(1, n + 1))[::-1])[::-1]
        adj = np.minimum(adj, 1.0)
    else:
        raise ConfigError(f"correction={method!r} is not allowed.", hint="Use none, holm or bh.")
    out = np.empty(n)
    out[order] = adj
    return out

