"""Statistics of the fiber-bundle test (:mod:`analyses.fiber`): the published window scan, the calibrated
change-point scan of the Rényi scores, its null simulation and tail bound, the gap test, segment fits and
the vocabulary-level corrections.

**Null.** Below the reach a smooth cloud is locally a homogeneous Poisson process in ``R^D`` (``D``
unknown). Then the Rényi scores ``Y_k = k · (log r_{k+1} − log r_k)`` are iid exponentials with mean
``1/D`` (exactly, for any ``D``; also for uniform points on a flat torus, or on a round 2-sphere in
chord distance). Every scale-free statistic of the scores therefore has a null law that depends on
nothing but their number.

**Calibrated statistic** (:func:`changepoint_scan`). For each split ``m`` of a token's ``c`` scores into a
first segment of ``m`` and a second of ``c − m`` (both at least :data:`MIN_SEGMENT` long), the
likelihood-ratio test of one exponential rate against two is a monotone function of
``B_m = S_m / S_c`` (``S`` the partial sums), and under the null ``B_m ~ Beta(m, c − m)`` exactly (the
ratio of the two segment means is ``F(2m, 2(c − m))``). The split's two-sided p
``p_m = 2 · min(I_B(m, c−m), I_{1−B}(c−m, m))`` is therefore exactly uniform; the scan reports the
smallest, its split (the change point) and its sign: a first segment with the larger mean score has the
*smaller* dimension, so the dimension **rises** at the change (which rejects "fiber bundle") and
otherwise drops.

**Tail: a proven bound** (:func:`calibrate_p`). The token's p is
``min(1, M · min_m p_m, U(min_m p_m))``: ``M · min p`` is the Bonferroni (union) bound over the ``M``
splits, which is never below the true tail of the scan's minimum, at every level, down to the
≈2e−8 that Holm needs over a 50k vocabulary and beyond (each Beta tail is computed directly, not as
one minus the other, by the regularized incomplete beta function, so it keeps its relative accuracy
deep in the tail). ``U`` is a
one-sided 95 % Clopper–Pearson upper bound of the simulated null tail (:func:`calibration`, ``n_sims``
scans simulated directly as iid exponentials); it is only tighter around α ≳ 1e−3 and is used only for
tokens that have the full number of scores the simulation had.

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
           "calibrate_p", "simulate_scan_min_p", "calibration", "stratify", "adjust_p", "MIN_SEGMENT", "MAX_GAPS"]

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
    """Scan-calibrated p of a raw minimum p: ``min(1, n_splits · p, U(p))`` (see :func:`calibration`).

    ``n_splits · p`` is the union bound over the scan's splits (valid because each split's p is exactly
    uniform under the null); ``U`` is the simulated upper confidence bound of the scan's minimum-p law, a
    step function read at the grid point just above ``p``, used only for rows with ``n_scores`` equal to
    the simulation's (default: all rows)."""
    p = np.asarray(p, dtype=np.float64)
    nw = np.asarray(cal["n_splits"] if n_splits is None else n_splits, dtype=np.float64)
    ucb = np.asarray(cal["ucb"], dtype=np.float64)
    step = float(cal["grid_step"])
    i = np.floor(-np.log10(np.clip(p, 1e-300, 1.0)) / step + 1e-9).astype(np.int64)
    u = ucb[np.clip(i, 0, ucb.size - 1)]
    if n_scores is not None:
        u = np.where(np.asarray(n_scores) == int(cal["n_scores"]), u, 1.0)
    return np.clip(np.minimum(np.maximum(nw, 1.0) * p, u), 0.0, 1.0)


def simulate_scan_min_p(n_scans: int, n: int, min_seg: int = MIN_SEGMENT, *, seed: int = 0, chunk: int = 4000) -> np.ndarray:
    """Minimum raw split p of ``n_scans`` null scans over ``n`` radii (``n − 1`` Rényi scores simulated directly
    as iid exponentials, as for real radii), through :func:`changepoint_scan`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n_scans, chunk):
        b = min(chunk, n_scans - s)
        y = torch.empty(b, n - 1, dtype=torch.float64).exponential_(1.0, generator=g)
        out.append(changepoint_scan(y, min_seg)["p"])
    return np.concatenate(out) if out else np.ones(0)


@functools.lru_cache(maxsize=16)
def calibration(vol_min: int, vol_max: int, min_seg: int = MIN_SEGMENT, n_sims: int = 40000, seed: int = 0,
                delta: float = 0.05, grid_step: float = 0.02, grid_min_log10: float = -20.0) -> dict[str, Any]:
    """:func:`simulate_calibration`, kept once per setting in Sonde's per-user cache (``fiber-calibration/``, JSON):
    the simulation is deterministic (a seeded generator), takes minutes at the default size, and depends on nothing
    but its arguments, so every later run, process and page reads it back. A damaged cache file is recomputed."""
    import json
    import os
    import tempfile

    from probes.loading import private_cache_dir

    args = dict(vol_min=int(vol_min), vol_max=int(vol_max), min_seg=int(min_seg), n_sims=int(n_sims), seed=int(seed),
                delta=float(delta), grid_step=float(grid_step), grid_min_log10=float(grid_min_log10))
    name = "cal-v1-" + "-".join(f"{k}={v}" for k, v in args.items()).replace(".", "p") + ".json"
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
    """Null law of the change-point scan's minimum raw p, as an upper confidence bound on a ``log10 p`` grid.

    ``ucb[i]`` is the one-sided ``1 − delta`` Clopper–Pearson upper bound of ``P(min p ≤ 10^(−i·grid_step))``
    from ``n_sims`` scans of ``vol_max − vol_min − 1`` iid exponential scores.

    Returns:
        ``{"n_splits", "n_scores", "min_segment", "n_sims", "seed", "delta", "grid_step", "ucb"}``.
    """
    from scipy.stats import beta

    n = vol_max - vol_min
    minp = np.sort(simulate_scan_min_p(n_sims, n, min_seg, seed=seed))
    grid = 10.0 ** (-np.arange(0.0, -grid_min_log10 + grid_step / 2, grid_step))
    h = np.searchsorted(minp, grid, side="right")
    ucb = np.where(h >= n_sims, 1.0, beta.ppf(1.0 - delta, h + 1, np.maximum(n_sims - h, 1)))
    return {"n_splits": max(0, n - 1 - 2 * min_seg + 1), "n_scores": n - 1, "min_segment": min_seg, "n_sims": n_sims,
            "seed": seed, "delta": delta, "grid_step": grid_step, "ucb": [float(u) for u in ucb]}


@torch.no_grad()
def stratify(radii: torch.Tensor, vol_min: int, *, window: int = 10, alpha: float = 1e-3, n_strata: int = 3,
             mode: Mode = "calibrated", cal: dict[str, Any] | None = None, n_points: int | None = None) -> dict[str, Any]:
    """Sequential change-point search and segment fits for a batch of tokens.

    Args:
        radii: ``[B, n]`` sorted distances to neighbours of rank ``vol_min … vol_min+n−1``.
        vol_min: rank of column 0 (volumes are ``vol_min + column``).
        mode: ``parity``: the released Welch window scan, raw p thresholded at ``alpha / n_strata``, the first
            position below it is the change; ``calibrated``: the change-point scan of the Rényi scores
            (:func:`changepoint_scan`) after :func:`trim_gaps`, its best split is the change when the
            calibrated p (``cal`` from :func:`calibration`) is below ``alpha``.

    Returns:
        dict of ``[B, n_strata]`` arrays ``start_index`` (column; −1 = no segment), ``start_radius``,
        ``dim``, ``scale``, ``p`` (effective p of the change that ends the segment, 1 if none), ``rise``
        (the dimension rises at that change) and ``[B]`` arrays ``n_segments``, ``p_scan`` (the token's p:
        effective min p of the first scan; calibrated: the larger of the scans with and without the gap
        scores), ``p_raw_min`` (raw min p of the first scan), ``p_gap`` (gap test; 1 in parity mode),
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
        y_all = spacing_scores(log_r, ranks, first).numpy()
        full = changepoint_scan(y_all)
        p_full = calibrate_p(full["p"], cal, full["n_splits"], full["n_scores"])
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
            ys[np.arange(n)[None, :] < st.numpy()[:, None]] = np.nan
            cp = changepoint_scan(ys)
            pc = calibrate_p(cp["p"], cal, cp["n_splits"], cp["n_scores"])
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

