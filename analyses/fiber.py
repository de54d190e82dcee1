"""Fiber-bundle / manifold null test on token embeddings.

Robinson, Dey & Chiang (2025), "Token embeddings violate the manifold hypothesis" (NeurIPS 2025; arXiv v2),
with the authors' released procedure ``kb1dds/stratified_estimator`` (``split_geo_estimator.py``).

Every row ``ψ`` of an embedding matrix ``E ∈ R^{V×ℓ}`` is a point. If the cloud near ``ψ`` is a smooth
manifold (or a fibered manifold ``p: T → S``), the number of points within radius ``r`` grows like
``r^{dim T}`` below a radius ``ρ(ψ)`` and like ``const + (r − ρ)^{dim S}`` beyond (Thm 1). In
log-volume vs log-radius this is piecewise linear and **slopes can only drop** as ``r`` grows, so

* a significant slope change (below the reach) rejects "manifold" at ``ψ``;
* a significant slope *increase* also rejects "fiber bundle": at the smaller radius (1st change) or
  the larger radius (2nd change).

Algorithm (the released script; method page ``shared/methods/fiber.md``):

1. ``r_k`` = Euclidean distance from ``ψ`` to its ``k``-th nearest row, ``v_k = k`` for
   ``k = vol_min … vol_max−1`` (index 0 is the point itself). Zero radii (duplicate rows) are skipped.
2. pointwise slope ``s_k = Δ log v_k / Δ log r_k`` (centred differences, one-sided at the ends);
3. sliding Welch t-test at each index ``w`` between the slopes in ``[w−2ws, w−ws)`` and
   ``[w+ws, w+2ws)``; slopes that are non-finite or ``|s| ≤ 1e−5`` are dropped; the first ``w`` with
   ``p < α'`` is a change point; the search restarts there, ``n_strata`` times;
4. per segment, least squares ``log v = a + D log r``: local dimension ``D`` and scale ``e^a / V``
   (Miller log-normal debias ``× exp(½ RSS)``).

Two modes (method page, "Calibration"):

* ``parity``: the published procedure: float16 cast of the matrix, ``α' = α / n_strata`` on the raw
  Welch p-values (Bonferroni over strata only). The window scan is a multiple test, so smooth data
  is over-rejected (≈1.7 % of a uniform 2-sphere at α = 1e−3).
* ``calibrated`` (default): a test built for power whose tail is bounded at every level
  (:mod:`analyses.fiber_stats`). Below the reach a smooth cloud is locally a homogeneous Poisson
  process, so the Rényi scores ``Y_k = k · (log r_{k+1} − log r_k)`` are iid exponentials with mean
  ``1/D`` whatever ``D``. The test is a mixture likelihood-ratio scan over the change rank ``k0`` with
  alternatives that fit the singularities: "a second sheet enters" (rate ratio ``1 + a·k0/k`` after
  ``k0``, a bump that decays), one change point (a lasting step up or down) and two change points (a
  step on ``[k0, 2·k0)``). Each component's likelihood ratio is that of the scale-free ``Y / Σ Y``, so
  the mixture ``A`` has null mean 1 and ``1/A`` is a proven p; a simulated null and an
  importance-sampling bound (the mixture alternative as proposal) tighten it, down to Holm's ≈2e−8
  and beyond. The most likely component is the change point; its sign says whether the dimension
  drops or rises there (a rise rejects "fiber bundle": at the smaller radius for the 1st change, the
  larger for the 2nd). Later strata search the segment after the previous change; their p-values are
  conditional on it and descriptive.
  **Gaps.** A tight group of neighbours followed by empty space is one huge score, which any rate test
  would call a change. Fisher's exact test of the largest score (``p_gap``) finds it; up to
  ``MAX_GAPS`` such scores are removed before the change search (so that the change found is not the gap
  itself), and the token's ``p_manifold`` is the larger of the scan's p with and without them. A token is
  ``gap`` when its gap test rejects (the scales below and beyond a gap are different clouds, so a change
  across it says nothing about a singular radius), ``singular`` when ``p_manifold`` rejects and there is
  no gap, else ``no rejection`` (:data:`VERDICTS`).

Across the vocabulary the per-token p-values are reported raw and Holm / Benjamini–Hochberg adjusted.

Nearest neighbours are found by a blocked exact kNN in fp32 (``‖a‖² + ‖b‖² − 2 a·b`` on the centred
matrix, never a dense V×V matrix); selected distances whose fp32 rounding bound is not small are
recomputed exactly in fp64 (all of them on CUDA, where it is cheap).

Axis order: rows of every per-token array follow ``token_ids``; segment arrays are ``[token, segment]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from probes import ConfigError, InputError, Probe

from .core import planner, registry, store
from .core.base import Config as _BaseConfig
from .core.base import Result, Timer, option, register_result, stored
from .core.progress import ProgressFn, phase
from .fiber_stats import (  # the statistics (re-exported)
    _ZERO_RADIUS, MAX_GAPS, MIN_SEGMENT, Correction, Mode, adjust_p, calibrate_p, calibration, changepoint_scan, gap_test,
    lr_scan, pointwise_slopes, scan_components, simulate_scan_p, spacing_scores, split_p, stratify, trim_gaps, welch_scan,
)

__all__ = [
    "Config", "FiberResult", "run", "result_key", "load_matrix", "knn_distances", "pointwise_slopes", "welch_scan",
    "stratify", "calibration", "calibrate_p", "adjust_p", "token_kind", "neighborhood", "spacing_scores",
    "changepoint_scan", "split_p", "gap_test", "trim_gaps", "lr_scan", "scan_components", "simulate_scan_p", "VERDICTS", "MIN_SEGMENT", "MAX_GAPS",
]



# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Fiber-bundle test settings (defaults: method page ``shared/methods/fiber.md``).

    Attributes:
        matrix: ``"input"`` (``W_E``), ``"output"`` (``W_U.T``, only if untied) or a ``.npy`` /
            ``.safetensors`` file holding a ``[V, ℓ]`` matrix.
        matrix_key: tensor name inside a ``.safetensors`` file with several tensors.
        tokens: rows to test (their neighbours always come from the whole matrix); ``None`` = all.
        vol_min, vol_max: neighbour ranks used, ``k = vol_min … vol_max−1`` (page: 10 and 1000; the
            released CLI's 50 is too short to test anything).
        window: Welch window ``ws`` of parity mode (paper: 10); both modes need more than ``4·ws`` radii.
        alpha: per-token level (paper: 1e−3).
        n_strata: sequential change searches (paper: 3).
        mode: ``calibrated`` (default; likelihood-ratio scan of the Rényi scores with a bounded tail, and a
            separate "gap" verdict) or ``parity`` (published procedure).
        correction: which vocabulary-level p drives the ``reject_*`` columns (all three are reported).
        exact: ``auto`` recomputes in fp64 only the selected distances whose fp32 rounding bound is not
            small (all of them on CUDA); ``all`` recomputes every selected distance (slower on CPU;
            bit-for-bit parity with the released script's float64 distances).
        duplicates: ``skip`` zero radii of duplicate rows (released code; reported as a warning) or
            ``error``.
        block_size: query rows per kNN block (memory ``block_size·V·4`` bytes; results do not depend on it).
        device: ``cpu``, ``cuda`` or ``auto``.
        keep_curves: keep the sorted radii and neighbour ids of ``all`` tokens, only ``rejected`` ones,
            or ``none`` (full-vocabulary radii are ``V·vol_max·4`` bytes).
        n_neighbors: neighbour ids kept per kept token (for the neighbourhood view).
        n_sims, seed: size and seed of the calibration simulation.
    """

    matrix: str = option("input", help="input (W_E), output (W_U.T, if untied), or FILE.npy / FILE.safetensors.")
    matrix_key: str | None = option(None, help="Tensor name in a .safetensors file with several.")
    tokens: tuple[int, ...] | None = option(None, ge=0, help="Rows to test: 0:5000, 0:49152:10, 17,42 (default all).")
    vol_min: int = option(10, ge=2, help="Smallest neighbour rank used.")
    vol_max: int = option(1000, ge=3, help="Largest neighbour rank + 1.")
    window: int = option(10, ge=2, le=1000, help="Welch window size (paper: 10).")
    alpha: float = option(1e-3, gt=0, lt=1, help="Per-token level.", hint="The paper uses 1e-3.")
    n_strata: int = option(3, ge=1, le=10, help="Sequential change searches.")
    mode: Mode = option("calibrated", help="calibrated (likelihood-ratio scan, valid p) or parity (published procedure).")
    correction: Correction = option("none", help="Verdict columns use none, holm or bh (all three are reported).")
    duplicates: Literal["skip", "error"] = option("skip", help="Duplicate rows: skip their zero radii (released code) or error.")
    exact: Literal["auto", "all"] = option("auto", help="Recompute in fp64 the distances whose fp32 rounding bound is not small (auto) or all.")
    block_size: int = option(2048, ge=1, help="Query rows per kNN block.")
    device: str = option("auto", help="cpu, cuda[:N] or auto.")
    keep_curves: Literal["all", "rejected", "none"] = option("rejected", help="Keep radii of all, rejected or none of the tokens.")
    n_neighbors: int = option(50, ge=1, help="Neighbour ids kept per kept token.")
    n_sims: int = option(40000, ge=200, help="Size of the calibration simulation (calibrated mode).")
    seed: int = option(0, ge=0, help="Seed of the calibration simulation.")

    def __post_init__(self) -> None:
        if self.vol_max - self.vol_min <= 4 * self.window:
            raise ConfigError(
                f"vol_max - vol_min = {self.vol_max} - {self.vol_min} = {self.vol_max - self.vol_min} radii is too short for "
                f"window={self.window}: the sliding test needs more than 4*window = {4 * self.window} radii.",
                hint=f"Raise vol_max to at least {self.vol_min + 4 * self.window + 1} (page default 1000) or lower window.")
        if not self.matrix:
            raise ConfigError(f"matrix={self.matrix!r} is not allowed.",
                              hint="Use 'input', 'output', or a path to a .npy / .safetensors file.")
        if self.matrix not in ("input", "output") and not self.matrix.endswith((".npy", ".safetensors")):
            raise ConfigError(f"matrix={self.matrix!r} is neither 'input', 'output' nor a .npy/.safetensors file.",
                              hint="Use 'input' (W_E), 'output' (W_U.T) or a path ending in .npy or .safetensors.")
        if self.tokens is not None and not self.tokens:
            raise ConfigError(f"tokens={self.tokens!r} is not allowed.", hint="Give a non-empty tuple of row ids, or None for all.")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r} is not allowed.", hint="Use auto, cpu, cuda or cuda:N.")


# ------------------------------------------------------------------------------------------ matrix
def load_matrix(path: str | Path, key: str | None = None) -> torch.Tensor:
    """Read a ``[V, ℓ]`` matrix from ``.npy`` (``allow_pickle=False``) or ``.safetensors``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"matrix file {str(p)!r} does not exist.", hint="Give an existing .npy or .safetensors file.")
    if p.suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{str(p)!r} cannot be read without pickle ({e}).",
                             hint="Save a plain numeric array with numpy.save(path, array).") from None
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        from safetensors.torch import load_file

        d = load_file(str(p))
        if key is not None:
            if key not in d:
                raise InputError(f"{str(p)!r} has no tensor {key!r}.", hint=f"Tensors: {sorted(d)[:20]}.")
            t = d[key]
        elif len(d) == 1:
            t = next(iter(d.values()))
        else:
            raise InputError(f"{str(p)!r} holds {len(d)} tensors; which one is the embedding?",
                             hint=f"Pass matrix_key (--matrix-key), one of {sorted(d)[:20]}.")
    if t.ndim != 2 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise InputError(f"{str(p)!r} holds a {tuple(t.shape)} {t.dtype} tensor, not a 2-D numeric [V, dim] matrix.",
                         hint="Save the embedding matrix with one row per token.")
    return t


def _check_matrix(E: torch.Tensor, vol_max: int) -> None:
    if E.ndim != 2:
        raise InputError(f"the embedding matrix has shape {tuple(E.shape)}; need 2-D [V, dim].", hint="Pass one row per token.")
    bad = ~torch.isfinite(E)
    if bad.any():
        rows = bad.any(1).nonzero()[:, 0]
        raise InputError(f"the embedding matrix has {int(bad.sum())} NaN/Inf entries in {rows.numel()} rows "
                         f"(first: row {int(rows[0])}).", hint="Drop or repair those rows before the test.")
    if vol_max > E.shape[0]:
        raise ConfigError(f"vol_max={vol_max} is larger than the number of rows ({E.shape[0]}).",
                          hint=f"Use vol_max <= {E.shape[0]} (each radius needs that many neighbours).")


# ------------------------------------------------------------------------------------------ math: kNN
@torch.no_grad()
def knn_distances(X: torch.Tensor, k: int, *, queries: torch.Tensor | None = None, block_size: int = 2048,
                  exact: Literal["auto", "all"] = "auto", progress: ProgressFn | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` smallest Euclidean distances from query rows to all rows of ``X`` (self included).

    Blocked: one ``[block_size, V]`` fp32 block of ``‖a‖² + ‖b‖² − 2a·b`` at a time (TF32 off), on the
    row-centred matrix (translation-invariant, smaller norms ⇒ less cancellation). ``k + 8``
    candidates are kept; those whose typical rounding error ``ε32·√ℓ·(‖a‖²+‖b‖²)`` exceeds ``2e−5·d²``
    (or all, with ``exact="all"``) are recomputed in fp64 from the difference, then re-sorted.

    Args:
        X: ``[V, ℓ]`` points (any float dtype; the device of ``X`` is used).
        k: neighbours per query (``<= V``).
        queries: ``[n]`` row ids of the query points (default all rows).
        progress: :class:`~analyses.core.progress.Progress` events: phase ``kNN``, in query blocks.

    Returns:
        ``(dist [n, k] float64 ascending, idx [n, k] int64)`` (float64 so that the fp64-recomputed
        distances keep their precision: consecutive radii differ by ~1/(D·k) relative).
    """
    V, dim = X.shape
    if not 1 <= k <= V:
        raise ConfigError(f"k={k} neighbours is not possible with {V} points.", hint=f"Use k <= {V}.")
    Xc = X.double()
    Xc = (Xc - Xc.mean(0, keepdim=True)).float()
    sq = (Xc * Xc).sum(1)
    q_ids = torch.arange(V, device=X.device) if queries is None else queries.to(X.device)
    kc = min(V, k + 8)
    # typical fp32 rounding of ‖a‖²+‖b‖²−2a·b is ~ε·√ℓ·(‖a‖²+‖b‖²); recompute when that exceeds 2e-5·d²
    # (1e-5 relative in d), i.e. near-duplicates and points far from the centre
    tol = torch.finfo(torch.float32).eps * math.sqrt(dim) / 2e-5
    all_exact = exact == "all"
    out_d, out_i = [], []
    n_blocks = (q_ids.numel() + block_size - 1) // block_size
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    bar = phase(progress, "kNN", n_blocks, "blocks")
    try:
        for b in range(n_blocks):
            ids = q_ids[b * block_size:(b + 1) * block_size]
            Q = Xc[ids]
            d2 = torch.addmm(sq[None, :], Q, Xc.T, beta=1.0, alpha=-2.0)
            d2 += sq[ids, None]
            v, i = d2.topk(kc, dim=1, largest=False, sorted=False)
            del d2
            v = v.double().clamp_min_(0.0)
            risky = torch.ones_like(v, dtype=torch.bool) if all_exact else (sq[ids, None] + sq[i]).double() * tol > v
            if risky.any():
                r, c = risky.nonzero(as_tuple=True)
                for s in range(0, r.numel(), 1 << 16):  # bounded gather
                    rr, cc = r[s:s + 1 << 16], c[s:s + 1 << 16]
                    diff = X[ids[rr]].double() - X[i[rr, cc]].double()
                    v[rr, cc] = (diff * diff).sum(1)
            v, order = v.sort(dim=1)
            out_d.append(v[:, :k].sqrt().cpu())
            out_i.append(i.gather(1, order[:, :k]).cpu())
            bar.advance()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return torch.cat(out_d), torch.cat(out_i)


# ------------------------------------------------------------------------------------------ token kinds
VERDICTS = ("singular", "gap", "no rejection")  # a token's verdict (calibrated mode; parity has no "gap")
KINDS = ("number", "whole word", "word piece", "whitespace/bytes", "punctuation/other")


def token_kind(s: str) -> str:
    """Coarse kind of a decoded token: number, whole word (leading space), word piece, whitespace/bytes, other."""
    core = s.strip()
    if core == "" or "\ufffd" in s or (core.startswith("<0x") and core.endswith(">")) or not s.isprintable() and not core:
        return "whitespace/bytes"
    if "\ufffd" in core or any(not ch.isprintable() for ch in core):
        return "whitespace/bytes"
    if core.replace(",", "").replace(".", "").isdigit():
        return "number"
    if core.isalpha():
        return "whole word" if s[:1].isspace() else "word piece"
    return "punctuation/other"


# ------------------------------------------------------------------------------------------ result
@register_result
@dataclass(frozen=True, kw_only=True)
class FiberResult(Result):
    """Fiber-bundle / manifold test of one embedding matrix.

    Per-token arrays (axis 0 follows ``token_ids``): ``p_manifold`` (effective token p: parity
    ``min(1, n_strata·p_raw)``, calibrated: the likelihood-ratio scan's p, the larger with and without gap scores), ``p_raw_min`` (parity: raw min Welch p; calibrated: ``1/A`` before calibration), ``p_large`` (effective p of
    the 2nd change, 1 if none), ``n_segments``, ``testable``, ``n_zero`` (duplicate radii skipped).
    Segment arrays ``[token, n_strata]``: ``seg_start_volume`` (−1 = none), ``seg_start_radius``,
    ``seg_dim``, ``seg_scale``, ``seg_p``, ``seg_rise`` (the dimension rises at the change that ends the
    segment). Gaps (calibrated mode): ``p_gap`` (Fisher's test of the largest Rényi score), ``n_gaps``
    (gap scores removed before the change search). Curves: ``curve_rows`` (rows into ``token_ids``),
    ``radii`` ``[m, vol_max]`` (rank 0 … vol_max−1; rank 0 = self), ``neighbors`` ``[m, n_neighbors]``.
    """

    analysis: ClassVar[str] = "fiber"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()), ("table", "segments", lambda r: r.segments_frame()))
    p_value_columns: ClassVar = ("p_manifold", "p_raw_min", "p_holm", "p_bh", "p_gap", "p")

    source: str = stored("extra")
    n_points: int = stored("extra")
    dim: int = stored("extra")
    token_ids: torch.Tensor = stored("array")
    token_strs: list[str] = stored("extra")
    kinds: list[str] = stored("extra")
    p_manifold: torch.Tensor = stored("array")
    p_raw_min: torch.Tensor = stored("array")
    p_large: torch.Tensor = stored("array")
    n_segments: torch.Tensor = stored("array")
    testable: torch.Tensor = stored("array")
    n_zero: torch.Tensor = stored("array")
    seg_start_volume: torch.Tensor = stored("array")
    seg_start_radius: torch.Tensor = stored("array")
    seg_dim: torch.Tensor = stored("array")
    seg_scale: torch.Tensor = stored("array")
    seg_p: torch.Tensor = stored("array")
    seg_rise: torch.Tensor | None = stored("array", default=None)
    p_gap: torch.Tensor | None = stored("array", default=None)
    n_gaps: torch.Tensor | None = stored("array", default=None)
    curve_rows: torch.Tensor = stored("array")
    radii: torch.Tensor = stored("array")
    neighbors: torch.Tensor = stored("array")
    calibration: dict[str, float] = stored("extra", default_factory=dict, load=dict)
    warnings: list[str] = stored("extra", default_factory=list)

    # --- verdicts -------------------------------------------------------------------------------
    @property
    def mode_label(self) -> str:
        c = self.config
        return f"{c.mode} mode" + (" (published procedure)" if c.mode == "parity" else " (likelihood-ratio scan)")

    def adjusted(self, method: Correction | None = None) -> np.ndarray:
        """Token p-values adjusted over the tested tokens (``method`` default: ``config.correction``)."""
        method = method or self.config.correction
        p = self.p_manifold.numpy().copy()
        t = self.testable.numpy()
        out = np.ones_like(p)
        out[t] = adjust_p(p[t], method)
        return out

    def _adjust(self, p: np.ndarray, method: Correction) -> np.ndarray:
        t = self.testable.numpy()
        out = np.ones_like(p, dtype=np.float64)
        out[t] = adjust_p(p[t], method)
        return out

    def verdicts(self, method: Correction | None = None) -> dict[str, np.ndarray]:
        """Boolean ``reject_manifold`` (the verdict "singular"), ``gap``, ``reject_fb_small``, ``reject_fb_large``
        per token. ``gap``: the gap test rejects (always false in parity mode); a gap token is never "singular"."""
        a = self.config.alpha
        method = method or self.config.correction
        rm = self.adjusted(method) < a
        n = len(rm)
        gap = np.zeros(n, bool)
        if self.p_gap is not None and self.config.mode == "calibrated":
            gap = self._adjust(self.p_gap.numpy().copy(), method) < a
            rm = rm & ~gap
        if self.seg_rise is not None:
            r = self.seg_rise.numpy().astype(bool)
            inc1 = r[:, 0] if r.shape[1] > 1 else np.zeros(n, bool)
            inc2 = r[:, 1] if r.shape[1] > 2 else np.zeros(n, bool)
        else:
            d = self.seg_dim.numpy()
            inc1 = (d[:, 1] > d[:, 0]) if d.shape[1] > 1 else np.zeros(n, bool)
            inc2 = (d[:, 2] > d[:, 1]) if d.shape[1] > 2 else np.zeros(n, bool)
        pl_adj = self._adjust(self.p_large.numpy().copy(), method)
        return {"reject_manifold": rm, "gap": gap, "reject_fb_small": rm & inc1, "reject_fb_large": rm & (pl_adj < a) & inc2}

    def verdict(self, method: Correction | None = None) -> np.ndarray:
        """Per token ``"singular"``, ``"gap"`` or ``"no rejection"`` (:data:`VERDICTS`)."""
        v = self.verdicts(method)
        return np.where(v["reject_manifold"], VERDICTS[0], np.where(v["gap"], VERDICTS[1], VERDICTS[2]))

    def counts(self) -> pd.DataFrame:
        """Tokens by verdict under each vocabulary-level correction (rows: none, holm, bh): ``tested``,
        ``singular`` (rejects "manifold"), ``gap``, ``no_rejection``, ``reject_fb_small``, ``reject_fb_large``."""
        rows = []
        for m in ("none", "holm", "bh"):
            v = self.verdicts(m)
            t = self.testable.numpy()
            rows.append({"correction": m, "tested": int(t.sum()), "singular": int(v["reject_manifold"].sum()),
                         "gap": int(v["gap"].sum()), "no_rejection": int((t & ~v["reject_manifold"] & ~v["gap"]).sum()),
                         "reject_fb_small": int(v["reject_fb_small"].sum()), "reject_fb_large": int(v["reject_fb_large"].sum())})
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: counts, median dimension per segment, warnings."""
        c = self.counts().set_index("correction")
        d = self.seg_dim.numpy()
        out: dict[str, Any] = {"mode": self.config.mode, "tokens": len(self.token_strs), "tested": int(self.testable.sum())}
        for m in ("none", "holm", "bh"):
            for k in ("singular", "gap", "no_rejection"):
                out[f"{k}[{m}]"] = int(c.loc[m, k])
        out["reject_fb_small/large[" + self.config.correction + "]"] = (
            f"{int(c.loc[self.config.correction, 'reject_fb_small'])}/{int(c.loc[self.config.correction, 'reject_fb_large'])}")
        for j in range(d.shape[1]):
            col = d[:, j][np.isfinite(d[:, j])]
            if col.size:
                out[f"median_dim_segment{j + 1}"] = round(float(np.median(col)), 2)
        out["min_p"] = float(self.p_manifold.min()) if len(self.p_manifold) else 1.0
        for w in self.warnings:
            out.setdefault("warnings", []).append(w)
        return out

    def kind_table(self, method: Correction | None = None) -> pd.DataFrame:
        """Tokens by kind (numbers, whole words, word pieces, whitespace/bytes, other) and verdict: ``tokens``,
        ``tested``, ``singular``, ``gap``, ``rate`` (singular / tested)."""
        v = self.verdicts(method)
        df = pd.DataFrame({"kind": self.kinds, "reject": v["reject_manifold"], "gap": v["gap"], "testable": self.testable.numpy()})
        g = df.groupby("kind").agg(tokens=("testable", "size"), tested=("testable", "sum"), singular=("reject", "sum"),
                                   gap=("gap", "sum"))
        g["rate"] = g["singular"] / g["tested"].clip(lower=1)
        return g.reset_index()

    # --- frames ------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per token: verdicts (under ``config.correction``), p-values and segment dims."""
        v = self.verdicts()
        S = self.seg_dim.shape[1]
        data: dict[str, Any] = {
            "model": self.model.get("name"), "mode": self.config.mode, "token_id": self.token_ids.numpy(),
            "token": self.token_strs, "kind": self.kinds, "testable": self.testable.numpy(),
            "n_segments": self.n_segments.numpy(), "p_manifold": self.p_manifold.numpy(), "p_raw_min": self.p_raw_min.numpy(),
            "p_holm": self.adjusted("holm"), "p_bh": self.adjusted("bh"), "verdict": self.verdict(), **v,
        }
        if self.p_gap is not None:
            data["p_gap"] = self.p_gap.numpy()
        else:  # a result saved before the gap verdict existed keeps its table
            del data["verdict"], data["gap"]
        for j in range(S):
            data[f"dim_{j + 1}"] = self.seg_dim[:, j].numpy()
            if j:
                data[f"change_volume_{j}"] = self.seg_start_volume[:, j].numpy()
                data[f"change_radius_{j}"] = self.seg_start_radius[:, j].numpy()
        data["n_zero"] = self.n_zero.numpy()
        return pd.DataFrame(data)

    def segments_frame(self) -> pd.DataFrame:
        """Tidy segments: one row per (token, segment)."""
        n, S = self.seg_dim.shape
        m = self.seg_start_volume.numpy() >= 0
        r, j = np.nonzero(m)
        return pd.DataFrame({"token_id": self.token_ids.numpy()[r], "token": [self.token_strs[i] for i in r], "segment": j + 1,
                             "start_volume": self.seg_start_volume.numpy()[r, j],
                             "start_radius": self.seg_start_radius.numpy()[r, j], "dim": self.seg_dim.numpy()[r, j],
                             "scale": self.seg_scale.numpy()[r, j], "p": self.seg_p.numpy()[r, j]})

    def _row(self, token_id: int) -> int:
        hits = (self.token_ids == int(token_id)).nonzero()
        if hits.numel() == 0:
            raise InputError(f"token {token_id} was not tested in this result.", hint="Pick one of result.token_ids.")
        return int(hits[0, 0])

    def curve(self, token_id: int) -> pd.DataFrame:
        """The log-log volume curve of one token: ``volume, radius, log_r, log_v, slope, segment``."""
        row = self._row(token_id)
        hit = (self.curve_rows == row).nonzero()
        if hit.numel() == 0:
            raise InputError(f"the curve of token {token_id} was not kept (keep_curves={self.config.keep_curves!r}).",
                             hint="Re-run with keep_curves='all' (or pass this token in tokens=...).")
        c = self.config
        r = self.radii[int(hit[0, 0]), c.vol_min:c.vol_max].double()
        vol = torch.arange(c.vol_min, c.vol_max, dtype=torch.float64)
        lr = torch.where(r > _ZERO_RADIUS, r.clamp_min(1e-300).log(), torch.full_like(r, -math.inf))
        st = torch.tensor([int((r > _ZERO_RADIUS).double().argmax())])
        slope = pointwise_slopes(lr[None], vol.log(), st)[0]
        seg = np.zeros(len(vol), dtype=int)
        for j, v0 in enumerate(self.seg_start_volume[row].tolist()):
            if v0 >= 0:
                seg[vol.numpy() >= v0] = j + 1
        return pd.DataFrame({"volume": vol.numpy(), "radius": r.numpy(), "log_r": lr.numpy(), "log_v": vol.log().numpy(),
                             "slope": slope.numpy(), "segment": seg})

    # --- store -------------------------------------------------------------------------------
    # --- plots -------------------------------------------------------------------------------
    def plot(self, kind: Literal["hist", "curve", "counts"] = "hist", *, token_id: int | None = None):
        """``hist``: dimension histograms per segment; ``curve``: one token's log-log curve; ``counts``: by kind."""
        if kind == "hist":
            return self.plot_hist()
        if kind == "curve":
            if token_id is None:
                raise ConfigError("plot(kind='curve') needs token_id.", hint="Pass token_id=<a tested token id>.")
            return self.plot_curve(token_id)
        if kind == "counts":
            return self.plot_kinds()
        raise ConfigError(f"kind={kind!r} is not allowed.", hint="Use hist, curve or counts.")

    def plot_hist(self, bins: int = 60):
        """Histogram of fitted local dimension, one trace per segment (the paper's multimodal histogram)."""
        from .fiber_plots import plot_hist

        return plot_hist(self, bins)

    def plot_curve(self, token_id: int):
        """Log volume vs log radius with the fitted segments and change points."""
        from .fiber_plots import plot_curve

        return plot_curve(self, token_id)

    def plot_kinds(self):
        """Manifold rejections by token kind (under ``config.correction``)."""
        from .fiber_plots import plot_kinds

        return plot_kinds(self)

    @staticmethod
    def plot_neighbors(frame: pd.DataFrame, title: str = "Neighbourhood"):
        """2-D/3-D scatter of a :func:`neighborhood` frame."""
        from .fiber_plots import plot_neighbors

        return plot_neighbors(frame, title)


def neighborhood(E: torch.Tensor, result: FiberResult, token_id: int, *, n: int | None = None, n_components: int = 3) -> pd.DataFrame:
    """PCA coordinates of a token and its kept nearest neighbours (rank 0 = the token).

    Args:
        E: ``[V, ℓ]`` the matrix the result was computed on.
        n: neighbours to show (default all kept).
        n_components: 2 or 3.

    Returns:
        frame ``rank, token_id, token, distance, pc1, pc2[, pc3]``.
    """
    if n_components not in (2, 3):
        raise ConfigError(f"n_components={n_components!r} is not allowed.", hint="Use 2 or 3.")
    row = result._row(token_id)
    hit = (result.curve_rows == row).nonzero()
    if hit.numel() == 0:
        raise InputError(f"neighbours of token {token_id} were not kept.", hint="Re-run with keep_curves='all'.")
    nb = result.neighbors[int(hit[0, 0])].long()
    nb = nb[: (n or nb.numel())]
    ids = torch.cat([torch.tensor([int(token_id)]), nb[nb != int(token_id)]])
    P = E[ids].double()
    P = P - P.mean(0)
    U, S, _ = torch.linalg.svd(P, full_matrices=False)
    coords = (U[:, :n_components] * S[:n_components]).numpy()
    dist = (E[ids].double() - E[int(token_id)].double()).norm(dim=1).numpy()
    strs = result.token_strs
    lookup = dict(zip(result.token_ids.tolist(), strs))
    df = pd.DataFrame({"rank": np.arange(len(ids)), "token_id": ids.numpy(), "token": [lookup.get(i, str(i)) for i in ids.tolist()],
                       "distance": dist})
    for c in range(coords.shape[1]):
        df[f"pc{c + 1}"] = coords[:, c]
    return df


# ------------------------------------------------------------------------------------------ run
def _resolve(probe: Probe | None, embeddings: Any, config: Config) -> tuple[torch.Tensor, str]:
    if embeddings is not None:
        E = torch.as_tensor(np.asarray(embeddings)) if not isinstance(embeddings, torch.Tensor) else embeddings
        return E.detach(), "array"
    if config.matrix in ("input", "output"):
        if probe is None:
            raise ConfigError(f"matrix={config.matrix!r} needs a model.", hint="Pass a probe, or matrix=<file.npy|.safetensors>.")
        if config.matrix == "input":
            return probe.W_E.detach(), "input (W_E)"
        WU = probe.W_U.detach()
        WE = probe.W_E.detach()
        if WU.data_ptr() == WE.data_ptr() or (WU.shape[::-1] == WE.shape and torch.equal(WU.T, WE)):
            raise ConfigError(f"{probe.info.name} ties its output embedding to its input embedding, so matrix='output' "
                              "is the same matrix.", hint="Use matrix='input'.")
        return WU.T, "output (W_U.T)"
    return load_matrix(config.matrix, config.matrix_key), Path(config.matrix).name


_MODEL_SOURCES = ("input (W_E)", "output (W_U.T)")  # the sources :func:`_resolve` names for a probe's own matrices


def _as_tested(E: torch.Tensor, config: Config) -> torch.Tensor:
    """The float32 matrix ``[V, ℓ]`` the test reads (parity mode rounds it through float16 first)."""
    E = E.float()
    if config.mode == "parity":  # the released script casts to float16 before the distances
        E16 = E.half()
        if not torch.isfinite(E16).all():
            raise InputError("the matrix overflows float16, which parity mode reproduces.", hint="Use mode='calibrated'.")
        E = E16.float()
    return E


def _queries(V: int, config: Config) -> torch.Tensor:
    """The row ids ``[n]`` that are tested: ``config.tokens``, else every row of the ``V``-row matrix."""
    return torch.arange(V) if config.tokens is None else torch.tensor(config.tokens, dtype=torch.long)


def _identity(probe: Probe | None, embeddings: Any, source: str, E: torch.Tensor | None, q: torch.Tensor
              ) -> tuple[dict[str, Any], str]:
    """The result's model (its fingerprint names the matrix when it is not the probe's own) and its input hash.

    ``E`` is the tested matrix (:func:`_as_tested`); it is read only when the matrix is not the probe's own
    (``None`` is allowed then)."""
    model = probe.info.to_dict() if probe is not None else {"name": source, "fingerprint": store.hash_inputs(E)[:16]}
    if probe is not None and source not in _MODEL_SOURCES and embeddings is None:
        model = {**model, "fingerprint": store.hash_inputs(model.get("fingerprint", ""), E)[:16]}
    return model, store.hash_inputs(source, q) if embeddings is None else store.hash_inputs(E, q)


def _key_inputs(probe: Probe | None = None, *, embeddings: Any = None, config: Config, **_: Any) -> registry.Inputs:
    """The tested matrix's identity without the neighbour search (:func:`_identity`, which :func:`run` uses too):
    a file or array matrix is read and hashed; a probe's own ``W_E`` / ``W_U`` is not copied."""
    if probe is not None:
        registry.check_probe(probe, "fiber")
    M, source = _resolve(probe, embeddings, config)
    own = probe is not None and embeddings is None and source in _MODEL_SOURCES
    E = None if own else _as_tested(M, config)
    model, input_hash = _identity(probe, embeddings, source, E, _queries(M.shape[0], config))
    return registry.Inputs(input_hash, {"model": model})


def run(probe: Probe | None = None, *, embeddings: Any = None, token_strs: Sequence[str] | None = None, config: Config = Config(),
        progress: ProgressFn | None = None) -> FiberResult:
    """Run the fiber-bundle / manifold test.

    Args:
        probe: model whose ``W_E`` / ``W_U`` is tested (optional with a file or ``embeddings``).
        embeddings: a ``[V, ℓ]`` array to test instead (overrides ``config.matrix``).
        token_strs: labels of the rows (default: the tokenizer's, else the row ids).
        progress: :class:`~analyses.core.progress.Progress` events: phase ``kNN``, in query blocks.
    """
    registry.check_config(config, Config, "fiber")
    if probe is not None:
        registry.check_probe(probe, "fiber")
    prep = _prepare(probe, embeddings, config, progress)
    return _finish(config, **prep, probe=probe, embeddings=embeddings, token_strs=token_strs)


def _prepare(probe: Probe | None, embeddings: Any, config: Config, progress: ProgressFn | None
             ) -> dict[str, Any]:
    """Matrix, duplicate check and nearest-neighbour distances up to ``config.vol_max``."""
    timer = Timer()
    with timer("load"):
        E, source = _resolve(probe, embeddings, config)
        E = E.float()
        _check_matrix(E, config.vol_max)
        E = _as_tested(E, config)
    V, dim = E.shape
    dev = config.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        from probes import DeviceError

        raise DeviceError(f"device={config.device!r} but CUDA is not available.", hint="Use device='cpu' or 'auto'.")
    q = _queries(V, config)
    if q.numel() and int(q.max()) >= V:
        raise ConfigError(f"tokens includes {int(q.max())}, but the matrix has {V} rows (0..{V - 1}).",
                          hint=f"Pick row ids below {V}.")
    # duplicate rows: zero radii, which the released code skips
    warnings: list[str] = []
    with timer("duplicates"):
        _, inv, cnt = torch.unique(E, dim=0, return_inverse=True, return_counts=True)
        dup_rows = int((cnt[inv] > 1).sum())
    if dup_rows:
        if config.duplicates == "error":
            first = int((cnt[inv] > 1).nonzero()[0, 0])
            raise InputError(f"the matrix has {dup_rows} rows that duplicate another row (first: row {first}); their "
                             "nearest radii are 0 and log r is undefined.",
                             hint="Use duplicates='skip' (the released code's behaviour) or de-duplicate the matrix.")
        warnings.append(f"{dup_rows} rows duplicate another row; their zero radii were skipped (released code's behaviour).")
    with timer("knn"):
        Ed = E.to(dev)
        dist, idx = knn_distances(Ed, config.vol_max, queries=q, block_size=config.block_size,
                                  exact="all" if dev.startswith("cuda") or config.exact == "all" else "auto", progress=progress)
    return {"dist": dist, "idx": idx, "q": q, "E": E, "source": source, "warnings": warnings, "timer": timer}


def _finish(config: Config, *, dist: torch.Tensor, idx: torch.Tensor, q: torch.Tensor, E: torch.Tensor, source: str,
            probe: Probe | None, embeddings: Any, token_strs: Sequence[str] | None, warnings: list[str], timer: Timer
            ) -> FiberResult:
    """The tests and the result, from the sorted neighbour distances ``dist [n, ≥ vol_max]`` of the rows ``q``."""
    V, dim = E.shape
    warnings = list(warnings)
    dist, idx = dist[:, :config.vol_max], idx[:, :config.vol_max]
    with timer("calibration"):
        cal = calibration(config.vol_min, config.vol_max, MIN_SEGMENT, config.n_sims, config.seed) if config.mode == "calibrated" else {}
    with timer("test"):
        radii = dist[:, config.vol_min:config.vol_max]
        parts = []
        for s in range(0, radii.shape[0], 1024):
            parts.append(stratify(radii[s:s + 1024], config.vol_min, window=config.window, alpha=config.alpha,
                                  n_strata=config.n_strata, mode=config.mode, cal=cal or None, n_points=V))
        st = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    n_zero = (dist[:, 1:] <= _ZERO_RADIUS).sum(1)
    untestable = int((~st["testable"]).sum())
    if untestable:
        warnings.append(f"{untestable} tokens have too few non-zero radii (<= 4*window) to be tested.")
    if token_strs is not None:
        if len(token_strs) != V:
            raise InputError(f"token_strs has {len(token_strs)} labels for {V} rows.", hint="Give one label per row.")
        strs = [token_strs[i] for i in q.tolist()]
    elif probe is not None and V <= probe.info.d_vocab:
        strs = probe.to_str_tokens(q.tolist())
    else:
        strs = [str(i) for i in q.tolist()]
    kinds = [token_kind(s) for s in strs] if (probe is not None or token_strs is not None) else ["row"] * len(strs)
    S = config.n_strata
    seg_vol = torch.where(st["start_index"] >= 0, st["start_index"] + config.vol_min, torch.full_like(st["start_index"], -1))
    p_large = st["p"][:, 1] * (S if config.mode == "parity" else 1) if S > 1 else torch.ones(len(q), dtype=torch.float64)
    p_large = p_large.clamp(max=1.0)
    # which curves to keep
    if config.keep_curves == "all":
        rows = torch.arange(len(q))
    elif config.keep_curves == "none":
        rows = torch.zeros(0, dtype=torch.long)
    else:
        rows = ((torch.as_tensor(st["p_scan"]) < config.alpha) | (st["p_gap"] < config.alpha)).nonzero()[:, 0]
    model, input_hash = _identity(probe, embeddings, source, E, q)
    return FiberResult(
        config=config, model=model, input_hash=input_hash, inputs=f"{source} matrix {V}x{dim}, {len(q)} rows tested",
        timings=timer.seconds, source=source, n_points=V, dim=dim, token_ids=q, token_strs=strs, kinds=kinds,
        p_manifold=st["p_scan"].double(), p_raw_min=st["p_raw_min"].double(), p_large=p_large.double(),
        n_segments=st["n_segments"], testable=st["testable"], n_zero=n_zero, seg_start_volume=seg_vol,
        seg_start_radius=st["start_radius"], seg_dim=st["dim"], seg_scale=st["scale"], seg_p=st["p"], seg_rise=st["rise"],
        p_gap=st["p_gap"] if config.mode == "calibrated" else None, n_gaps=st["n_gaps"] if config.mode == "calibrated" else None,
        curve_rows=rows, radii=dist[rows].float().contiguous(), neighbors=idx[rows, : config.n_neighbors].int().contiguous(),
        calibration=dict(cal), warnings=warnings,
    )


# ------------------------------------------------------------------------------------------ stability
STABILITY_RANGES: tuple[tuple[int, int], ...] = ((10, 200), (10, 300), (10, 500), (10, 1000))


def _jaccard(a: set[int], b: set[int]) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def volume_stability(probe: Probe | None = None, *, embeddings: Any = None, token_strs: Sequence[str] | None = None,
                     config: Config = Config(), ranges: Sequence[tuple[int, int]] = STABILITY_RANGES,
                     correction: Correction | None = None, progress: ProgressFn | None = None,
                     return_results: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, list[FiberResult]]:
    """How the rejections depend on the volume range: one nearest-neighbour pass, one test per range.

    Args:
        config: every setting except ``vol_min`` / ``vol_max`` (taken from ``ranges``).
        ranges: ``(vol_min, vol_max)`` pairs (each checked like a :class:`Config`).
        correction: vocabulary correction of the counted rejections (default ``config.correction``).

    Returns:
        one row per range: ``volumes``, ``vol_min``, ``vol_max``, ``tested``, ``reject_manifold``,
        ``gap``, ``reject_fb_small``, ``reject_fb_large`` and ``jaccard <volumes>`` per range (Jaccard index of the
        two sets of manifold rejections, i.e. of singular tokens; 1 when both are empty); with ``return_results`` also the
        :class:`FiberResult` of each range.
    """
    if not ranges:
        raise ConfigError("ranges is empty.", hint="Give (vol_min, vol_max) pairs, e.g. ((10, 200), (10, 1000)).")
    cfgs = [config.replace(vol_min=int(a), vol_max=int(b), keep_curves="none") for a, b in ranges]
    top = max(cfgs, key=lambda c: c.vol_max)
    prep = _prepare(probe, embeddings, top, progress)
    method = correction or config.correction
    rows, sets, results = [], [], []
    for c in cfgs:
        res = _finish(c, **{**prep, "timer": Timer()}, probe=probe, embeddings=embeddings, token_strs=token_strs)
        v = res.verdicts(method)
        ids = res.token_ids.numpy()
        sets.append(set(ids[v["reject_manifold"]].tolist()))
        results.append(res)
        rows.append({"volumes": f"{c.vol_min}–{c.vol_max}", "vol_min": c.vol_min, "vol_max": c.vol_max,
                     "tested": int(res.testable.sum()), **{k: int(x.sum()) for k, x in v.items()}})
    df = pd.DataFrame(rows)
    for j, r in enumerate(rows):
        df[f"jaccard {r['volumes']}"] = [round(_jaccard(s, sets[j]), 3) for s in sets]
    df.attrs.update(mode=config.mode, correction=method, alpha=config.alpha)
    return (df, results) if return_results else df


def kinds_markdown(records: Sequence[dict[str, Any]]) -> str:
    """A :meth:`FiberResult.kind_table` (``to_dict(orient="records")``) as a Markdown table."""
    lines = ["| kind | tokens | singular | gap | no rejection |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['kind']} | {r['tested']} | {r['singular']} | {r['gap']} | {r['tested'] - r['singular'] - r['gap']} |")
    return "\n".join(lines)


def stability_markdown(records: Sequence[dict[str, Any]]) -> str:
    """A :func:`volume_stability` table (``to_dict(orient="records")``) as a Markdown table."""
    labels = [r["volumes"] for r in records]
    head = ["volumes", "tested", "singular", "gap", "fb small", "fb large", *[f"Jaccard vs {v}" for v in labels]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [r["volumes"], r["tested"], r["reject_manifold"], r.get("gap", 0), r["reject_fb_small"], r["reject_fb_large"],
                 *[f"{float(r[f'jaccard {v}']):.2f}" for v in labels]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """The blocked kNN of :func:`knn_distances` over the ``[V, d]`` matrix (``B`` = ``block_size`` query rows): the
    float32 matrix and its centred copy, the centring itself (two float64 copies), then one ``[B, V]`` float32 block
    of distances with its top-k candidates beside the neighbour radii (float64) and ids (int64) of every tested
    token, kept per block and then concatenated. Measured on the embedded model (1,024 and 4,096 tokens): the
    centring is the peak, 649 MiB."""
    c = o.get("config")
    V, d = s.d_vocab, s.d_model
    k = c.vol_max if c is not None else 1000
    n = len(c.tokens) if c is not None and c.tokens is not None else V
    return {"matrix": 2 * V * d * 4, "centring": 2 * V * d * 8,
            "knn": B * V * 4 + B * (k + 8) * 28 + 2 * n * k * 16}


MEMORY = planner.MemoryModel("fiber", _memory, persistent=("matrix",), forward=False,
                             sizes=lambda c: {"seq_len": 1, "batch_size": c.block_size}, batch_field="block_size",
                             option="--block-size", hint="Test fewer tokens (--tokens), or free memory.")


SPEC = registry.register(registry.Analysis(
    name="fiber", order=4, title="Fiber-bundle test of token embeddings",
    summary="a local volume-growth test per token of the embedding or unembedding matrix",
    config=Config, result=FiberResult, run=run, prepare=_key_inputs, cli="fiber", page="fiber", needs_probe=False,
    memory=MEMORY,
))
result_key = SPEC.key  # the key run() gives this matrix and these tokens (the same _identity)
