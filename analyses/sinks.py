"""Attention sinks, value-state drains and residual-state peaks.

Gu et al. 2024, "When Attention Sink Emerges in Language Models: An Empirical View" (arXiv 2410.10781,
ICLR 2025; code sail-sg/Attention-Sink), §3 metric:

* per layer l, head h and (0-indexed) key position k, with causal probabilities ``A[t, k]``::

      α_k^{l,h} = 1/(T − k) · Σ_{t=k..T−1} A[t, k]                         (mean attention key k receives)

  (1/T ≤ α_0 ≤ 1; the paper writes keys 1-indexed, so Sink_1 is position 0 here);
* a head is a sink head on a sample when ``α_k > ε``; ``Sink_k^ε = 100 · mean_{sample,layer,head} 1[α_k > ε]``
  (the printed 1/T factor is a typo; the reference code averages the indicator), ε = 0.3, T = 64.

Guo et al. 2024, "Active-Dormant Attention Heads" (arXiv 2410.13835), §2 companions:

* value-state drain: ``‖v_h[j] W_O,h‖₂`` per head and position (small at the sink);
* key and raw value norms (Gu et al.'s companion script): ``‖k_{h'}[j]‖₂`` and ``‖v_{h'}[j]‖₂`` per KV head h' and
  position, read from the states the KV cache holds (post-rotary / post-k-norm keys, values before W_O); a query
  head h reads KV head ``h // (H / H_kv)``;
* residual-state peak: ``‖x_l[j]‖₂`` per layer and position (huge at the sink), and which layers' MLPs
  write it (zero ``blocks.L.hook_mlp_out`` and re-measure).

Everything is streamed: α is reduced inside the ``hook_pattern`` hook by :class:`SinkAlpha`
(per-head α sum over samples plus exceedance counts on a fixed ε grid), so [S, L, H, T, T] is never
stored and shards merge exactly. Under the nnsight backend the probabilities are recomputed from the
hooked post-rotary q/k (the model keeps SDPA); the TransformerLens backend reads eager probabilities —
the test suite checks the two agree.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import pandas as pd
import torch

from probes import Ablate, Collect, Mean, Reducer, l2_norm, reducer_from_state
from probes.attention import expand_kv
from probes.errors import ConfigError, InputError, SondeError
from probes.labels import layer_label
from probes.sites import parse_site
from probes.sites import site as _site  # `site` names a local hook name below

from .core import base, domains as _domains, planner, registry
from .core.base import option, stored
from .core.progress import ProgressFn, phase

__all__ = ["Config", "SinksResult", "SinkAlpha", "run", "result_key", "alpha_from_pattern", "sink_percentage", "collect_stats",
           "EPS_GRID", "bos_flag", "accumulate", "merge_states", "result_from_states", "eps_grid_for", "kv_to_heads"]

EPS_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class Config(base.Config):
    """Sink-metric settings (defaults from shared/methods/sinks.md)."""

    # defaults: shared/methods/sinks.md (T, ε, positions, corpus size, BOS policy) and dormant.md (drains, peaks)
    T: int = option(64, ge=2, help="Sequence length; fixed for comparisons (the paper uses 64).")
    eps: float = option(0.3, gt=0, lt=1, help="Sink threshold ε (strict yet insensitive to T).", hint="Use e.g. --eps 0.3 (the paper's default).")
    positions: tuple[int, ...] = option((0,), ge=0, help="Sink positions (0-indexed keys; Sink_1 of the paper = position 0).")
    n_samples: int = option(100, ge=1, help="Texts (sequences) measured.")
    bos: Literal["tokenizer", "always", "never"] = option("tokenizer", help="BOS policy: the tokenizer's default (GPT-2: no BOS), always or never.")
    batch_size: int = option(8, ge=1, help="Sequences per forward pass.")
    seed: int = option(0, help="Seed of the sample order.")
    values: bool = option(True, help="Value-state drain ‖v_h W_O,h‖ per position.")
    kv_norms: bool = option(True, help="Key and raw value norms per KV head and position.")
    mlp_ablation: bool = option(True, help="Find which MLPs write the residual peak (zero one at a time).")
    ablation_layers: int = option(8, ge=0, help="Test the MLPs of the first N layers (0 = off; the paper: the first two write it).")
    ablation_samples: int = option(4, ge=1, help="Sequences used by the MLP ablation.")
    peak_layer: int | None = option(None, help="Layer whose residual peak is explained (default: the strongest peak).")

    def __post_init__(self):
        if not self.positions:
            raise ConfigError("positions is empty: there is no sink position to measure.",
                              hint="Give --positions 0 (the first token, BOS when the tokenizer adds one).")
        if any(p >= self.T for p in self.positions):
            raise ConfigError(f"positions={self.positions}; each must be an integer in 0..T-1 = 0..{self.T - 1}.")


def bos_flag(bos: str) -> bool | None:
    return {"tokenizer": None, "always": True, "never": False}[bos]


# ----------------------------------------------------------------------------- math
@torch.no_grad()
def alpha_from_pattern(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives from the queries that can see it.

    Args:
        pattern: causal probabilities ``[..., Tq=T, Tk=T]`` (rows = queries).
    Returns:
        ``α [..., T]``: ``α_k = Σ_t A[t, k] / (T − k)`` (upper-triangle zeros make the column sum exact).
    """
    T = pattern.shape[-1]
    denom = torch.arange(T, 0, -1, device=pattern.device, dtype=torch.float32)
    return pattern.float().sum(dim=-2) / denom


@torch.no_grad()
def sink_percentage(alpha: torch.Tensor, eps: float, position: int = 0) -> float:
    """``Sink_k^ε`` in percent from per-sample α ``[S, L, H, T]`` (or any ``[..., T]``)."""
    return float((alpha[..., position] > eps).float().mean() * 100)


@torch.no_grad()
def value_norm_factor(W_O: torch.Tensor) -> torch.Tensor:
    """Per-head square factor of the output projection: ``R_hᵀ [H, h, r]`` (``r = min(h, d)``, float32) with
    ``‖x W_O,h‖₂ = ‖x R_hᵀ‖₂`` for every ``x``.

    From the reduced QR factorisation ``W_O,hᵀ = Q_h R_h`` (``Q_h`` has orthonormal columns, so it keeps norms):
    ``x W_O,h = x R_hᵀ Q_hᵀ``. It is computed once per layer, so a value's norm after W_O costs an ``h × r``
    product instead of ``h × d`` (9× less on a 64-wide head writing a 576-wide residual) and never builds the
    ``[B, T, H, d]`` per-head outputs. The factorisation runs in float64 (a few ms per layer on a CPU, once per
    probe and layer: :func:`_value_factor` keeps it): a float32 QR's last bits depend on the thread count, which would make
    runs at different thread counts (or a sweep's workers) differ.
    """
    return torch.linalg.qr(W_O.detach().double().transpose(1, 2), mode="r").R.transpose(1, 2).float()


@torch.no_grad()
def factored_value_norms(v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``‖v_h[t] W_O,h‖₂`` as ``[B, T, H]`` from values ``[B, T, K, h]`` (K KV heads) and
    :func:`value_norm_factor`'s ``[H, h, r]``; query head h reads KV head ``h // (H / K)`` without expanding v."""
    B, T, K, h = v.shape
    H, _, r = factor.shape
    if H % K:
        raise ValueError(f"{H} query heads are not a multiple of {K} KV heads")
    G = H // K
    # one [B·T, h] x [h, G·r] product per KV head (a plain bmm: faster than the equivalent einsum)
    f = factor.to(v.device).view(K, G, h, r).permute(0, 2, 1, 3).reshape(K, h, G * r)
    x = torch.bmm(v.float().reshape(B * T, K, h).transpose(0, 1), f)  # [K, B·T, G·r]
    return x.view(K, B * T, G, r).norm(dim=-1).permute(1, 0, 2).reshape(B, T, H)


@torch.no_grad()
def head_value_norms(v: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """Value-state norms after each head's output slice.

    Args:
        v: values ``[B, T, K, h]`` (K KV heads; query head h reads KV head ``h // (H / K)``).
        W_O: per-head output projection ``[H, h, d]``.
    Returns:
        ``‖v_h[t] W_O,h‖₂`` as ``[B, T, H]`` (float32; through :func:`value_norm_factor`).
    """
    return factored_value_norms(v, value_norm_factor(W_O))


@torch.no_grad()
def kv_to_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-KV-head statistics ``[L, K, T]`` mapped to query heads ``[L, H, T]`` (query head h reads KV head
    ``h // (H / K)``, the grouping of :func:`probes.attention.expand_kv`)."""
    return expand_kv(x, n_heads, dim=1)


def _has_site(probe, name: str) -> bool:
    """Whether the probe's backend exposes ``name`` (e.g. TransformerLens gives no post-rotary keys for GPT-NeoX)."""
    try:
        probe._check_site(parse_site(name, probe.info.n_layers))
    except SondeError:
        return False
    return True


#: per probe and layer: (weak reference to the o_proj weight, its version counter, the factor of :func:`value_norm_factor`)
_FACTORS: "weakref.WeakKeyDictionary[Any, dict[int, tuple[weakref.ref, int, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def _value_factor(probe, layer: int) -> torch.Tensor:
    """:func:`value_norm_factor` of the layer's W_O, kept with the probe while the weight is the same tensor and
    unchanged (an in-place edit bumps its version; a masked or replaced weight is another tensor)."""
    weight = probe.module(probe.arch.o_proj, layer).weight
    cache = _FACTORS.setdefault(probe, {})
    hit = cache.get(layer)
    if hit is None or hit[0]() is not weight or hit[1] != weight._version:
        hit = cache[layer] = (weakref.ref(weight), weight._version, value_norm_factor(probe.W_O(layer)))
    return hit[2]


class _ValueNorm:
    """Reducer transform: ``[B, T, K, h]`` values -> ``[B, T, H]`` norms after W_O (see :func:`head_value_norms`),
    through the layer's factor ``[H, h, r]``."""

    def __init__(self, factor: torch.Tensor):
        self.factor = factor

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return factored_value_norms(v, self.factor)


class SinkAlpha(Reducer):
    """Streams α per head from ``hook_pattern`` ``[B, H, T, T]``.

    State: ``alpha_sum [H, T]`` (float64 sum over samples), ``exceed [E, H, K]`` (samples with
    ``α_k > ε_e`` for each ε of ``eps_grid`` and each tracked key of ``positions``), ``n`` samples.
    Merging two shards adds the states, so shards give the one-pass answer exactly.
    """

    def __init__(self, positions: Sequence[int] = (0,), eps_grid: Sequence[float] = EPS_GRID):
        super().__init__(dims=(0,))
        self.positions = tuple(int(p) for p in positions)
        self.eps_grid = tuple(float(e) for e in eps_grid)
        self._reset()

    def _settings(self):
        return super()._settings() + ("positions", "eps_grid")

    def _reset(self):
        super()._reset()
        self.alpha_sum: torch.Tensor | None = None
        self.exceed: torch.Tensor | None = None
        self.n = 0

    def _update(self, x):
        a = alpha_from_pattern(x)  # [B, H, T]
        a_k = a[..., list(self.positions)]  # [B, H, K]
        eps = torch.tensor(self.eps_grid, device=a.device).view(-1, 1, 1, 1)
        ex = (a_k.unsqueeze(0) > eps).sum(dim=1)  # [E, H, K]
        s = a.to(torch.float64).sum(dim=0)
        self._check_shape("alpha_sum", self.alpha_sum, s)
        self.alpha_sum = s if self.alpha_sum is None else self.alpha_sum + s.to(self.alpha_sum.device)
        self.exceed = ex if self.exceed is None else self.exceed + ex.to(self.exceed.device)
        self.n += x.shape[0]

    def _merge(self, other):
        self._check_shape("alpha_sum", self.alpha_sum, other.alpha_sum)
        self.alpha_sum = self.alpha_sum + other.alpha_sum.to(self.alpha_sum.device)
        self.exceed = self.exceed + other.exceed.to(self.exceed.device)
        self.n += other.n

    def _state(self):
        return {"alpha_sum": self.alpha_sum, "exceed": self.exceed, "n": self.n}

    def finalize(self) -> dict[str, torch.Tensor]:
        """``alpha_mean [H, T]``, ``exceed [E, H, K]`` counts and ``n``."""
        if self.alpha_sum is None:
            raise ConfigError("SinkAlpha.finalize() called before any update.")
        return {"alpha_mean": (self.alpha_sum / max(self.n, 1)).float().cpu(), "exceed": self.exceed.cpu(), "n": self.n}


# ----------------------------------------------------------------------------- hook plumbing
def make_reducers(probe, positions: Sequence[int], eps_grid: Sequence[float], *, values: bool = True,
                  resid: bool = True, kv_norms: bool = False) -> dict[str, Reducer]:
    """Site -> reducer map for one statistics pass (α per layer, value drains, key / raw value norms, residual norms).

    With ``kv_norms`` the ``hook_k`` / ``hook_v`` sites ``[B, T, K, h]`` get a second reducer each: the mean
    ``‖·‖₂`` over samples per position and KV head (``[T, K]``); only norms are kept, never the states.
    Keys are skipped when the backend cannot read them (see :func:`_has_site`).
    """
    n = probe.info.n_layers
    reads: dict[str, Reducer | list[Reducer]] = {}
    keys = kv_norms and _has_site(probe, "blocks.0.attn.hook_k")
    for L in range(n):
        reads[_site("pattern", L).name] = SinkAlpha(positions, eps_grid)
        v: list[Reducer] = []
        if values:
            v.append(Mean(dims=(0,), transform=_ValueNorm(_value_factor(probe, L))))
        if kv_norms:
            v.append(Mean(dims=(0,), transform=l2_norm))
        if v:
            reads[_site("v", L).name] = v
        if keys:
            reads[_site("k", L).name] = Mean(dims=(0,), transform=l2_norm)
    if resid:
        reads["blocks.0.hook_resid_pre"] = Mean(dims=(0,), transform=l2_norm)
        for L in range(n):
            reads[_site("resid_post", L).name] = Mean(dims=(0,), transform=l2_norm)
    return reads


@torch.no_grad()
def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sample: logits ``[B, T, V]``, tokens ``[B, T]`` -> ``[B]``."""
    # log-softmax over the whole (contiguous) logits, then drop the last position: slicing first would make
    # log_softmax copy the [B, T-1, V] view, which costs as much as the softmax itself
    lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    nll = -lp.gather(-1, tokens[:, 1:, None].to(lp.device)).squeeze(-1)
    return nll.mean(dim=1)


def collect_stats(probe, tokens: torch.Tensor, *, positions: Sequence[int], eps_grid: Sequence[float] = EPS_GRID,
                  batch_size: int = 8, values: bool = True, resid: bool = True, loss: bool = False,
                  kv_norms: bool = False, per_sample: bool = False, progress: ProgressFn | None = None,
                  what: str = "measuring") -> dict[str, Any]:
    """One streamed pass over ``tokens [S, T]`` (``progress``: phase ``what``, in samples).

    Returns ``alpha_mean [L, H, T]``, ``exceed [E, L, H, K]``, ``n``, and when asked
    ``value_norm [L, H, T]`` (after W_O), ``key_norm`` / ``value_state_norm [L, H_kv, T]`` (per KV head; the key
    norm is ``[L, H_kv, 0]`` when the backend gives no keys), ``resid_norm [L+1, T]``, ``loss`` (mean next-token CE),
    and with ``per_sample`` the per-sample ``alpha [S, L, H, T]`` (reduced in the hook: T, not T², per head).
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise InputError("no sample is left to measure (every text was shorter than T tokens).",
                         hint="Give longer texts, more texts, or a smaller T.")
    reads = make_reducers(probe, positions, eps_grid, values=values, resid=resid, kv_norms=kv_norms)
    per = {L: Collect(transform=alpha_from_pattern) for L in range(probe.info.n_layers)} if per_sample else {}
    for L, r in per.items():
        reads[_site("pattern", L).name] = [reads[_site("pattern", L).name], r]
    losses = []
    bar = phase(progress, what, tokens.shape[0], "samples")
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i:i + batch_size]
        logits = probe.run(b, reads=reads, return_logits=loss)
        if loss:
            losses.append(next_token_loss(logits, b).cpu())
        bar.advance(b.shape[0])
    if per:
        for L, r in per.items():
            reads[_site("pattern", L).name] = reads[_site("pattern", L).name][0]
    out = _finalize_reads(reads, probe.info.n_layers, values=values, resid=resid, kv_norms=kv_norms)
    if per:
        out["alpha"] = torch.stack([per[L].finalize().float() for L in range(probe.info.n_layers)], dim=1)
    if loss:
        out["loss"] = float(torch.cat(losses).mean())
    return out


def _finalize_reads(reads: Mapping[str, Reducer | list[Reducer]], n: int, *, values: bool, resid: bool,
                    kv_norms: bool = False) -> dict[str, Any]:
    """Statistics from the (possibly merged) reducers of :func:`make_reducers` (n layers)."""
    alphas = [reads[_site("pattern", L).name].finalize() for L in range(n)]
    out: dict[str, Any] = {
        "alpha_mean": torch.stack([a["alpha_mean"] for a in alphas]),
        "exceed": torch.stack([a["exceed"] for a in alphas], dim=1),
        "n": alphas[0]["n"],
    }
    v_reads = [reads[_site("v", L).name] if (values or kv_norms) else [] for L in range(n)]
    if values:  # [T, H] per layer -> [L, H, T]
        out["value_norm"] = torch.stack([v[0].finalize().float().T for v in v_reads])
    if kv_norms:  # [T, K] per layer -> [L, K, T]
        out["value_state_norm"] = torch.stack([v[-1].finalize().float().T for v in v_reads])
        if _site("k", 0).name in reads:
            out["key_norm"] = torch.stack([reads[_site("k", L).name].finalize().float().T for L in range(n)])
        else:
            out["key_norm"] = torch.zeros(n, out["value_state_norm"].shape[1], 0)
    if resid:
        out["resid_norm"] = torch.stack([reads["blocks.0.hook_resid_pre"].finalize().float()]
                                        + [reads[_site("resid_post", L).name].finalize().float() for L in range(n)])
    return out


@torch.no_grad()
def peak_ratio(resid_norm: torch.Tensor, pos: int) -> torch.Tensor:
    """Residual peak per layer: ``‖x[pos]‖ / max_{j≠pos} ‖x[j]‖`` from ``resid_norm [L+1, T]`` -> ``[L+1]``."""
    others = torch.cat([resid_norm[:, :pos], resid_norm[:, pos + 1:]], dim=1)
    return resid_norm[:, pos] / others.max(dim=1).values.clamp_min(1e-12)


@torch.no_grad()
def _pos_ratio(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Mean over layers and heads of ``x[..., pos]`` divided by the mean of the other positions (``x [L, K, T]``)."""
    others = torch.cat([x[..., :pos], x[..., pos + 1:]], dim=-1)
    return x[..., pos].mean() / others.mean().clamp_min(1e-12)


def mlp_ablation(probe, tokens: torch.Tensor, *, layer: int, pos: int, layers: Sequence[int]) -> pd.DataFrame:
    """Residual norm at ``pos`` after block ``layer`` with each listed layer's MLP output zeroed.

    Returns a frame ``ablated, sink_norm, max_other_norm, ratio`` (first row ``ablated="none"``).
    """
    site = _site("resid_post", layer).name
    rows = []
    for abl in [None, *layers]:
        red = Mean(dims=(0,), transform=l2_norm)
        edits = [] if abl is None else [Ablate(_site("mlp_out", abl).name)]
        probe.run(tokens, reads={site: red}, edits=edits, return_logits=False)
        norms = red.finalize().float()
        other = torch.cat([norms[:pos], norms[pos + 1:]]).max()
        rows.append({"ablated": "none" if abl is None else f"{layer_label(abl)} MLP", "layer": abl if abl is not None else pd.NA,
                     "sink_norm": float(norms[pos]), "max_other_norm": float(other),
                     "ratio": float(norms[pos] / other.clamp_min(1e-12))})
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


# ----------------------------------------------------------------------------- result
@base.register_result
@dataclass(frozen=True, kw_only=True)
class SinksResult(base.Result):
    """Sink statistics of one corpus.

    Arrays (L layers, H query heads, T positions, E = len(eps_grid), K = len(config.positions)):
    ``alpha_mean [L, H, T]`` (α_k averaged over samples), ``exceed [E, L, H, K]`` (samples with α_k > ε),
    ``value_norm [L, H, T]`` (mean ‖v_h W_O,h‖ per position; empty if off), ``resid_norm [L+1, T]``
    (mean ‖x‖ per position: row 0 = embeddings/resid_pre 0, row l+1 = after block l).
    Per KV head (H_kv KV heads; :meth:`per_head` maps them to query heads): ``key_norm [L, H_kv, T]`` (mean ‖k‖ of the
    cached, post-rotary keys) and ``value_state_norm [L, H_kv, T]`` (mean ‖v‖ before W_O); ``[L, H_kv, 0]`` when off
    (``key_norm`` also when the backend gives no keys).
    ``ablation``: residual peak at ``peak_layer`` with single MLPs zeroed.
    """

    analysis: ClassVar[str] = "sinks"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()), ("table", "norms", lambda r: r.norms_frame()),
                             ("extra", "summary", lambda r: r.summary()))

    alpha_mean: torch.Tensor = stored("array")
    exceed: torch.Tensor = stored("array")
    eps_grid: tuple[float, ...] = stored("extra")
    n_samples: int = stored("extra")
    n_skipped: int = stored("extra")
    value_norm: torch.Tensor = stored("array")
    resid_norm: torch.Tensor = stored("array")
    ablation: pd.DataFrame = stored("table", default_factory=pd.DataFrame, save=lambda r: r.ablation if len(r.ablation) else None)
    peak_layer: int | None = stored("extra", default=None)
    source: str = stored("extra", default="")
    tokens: tuple[str, ...] = stored("extra", default=())  # string tokens of the first sample (axis labels)
    key_norm: torch.Tensor = stored("array", default_factory=lambda: torch.zeros(0, 0, 0))
    value_state_norm: torch.Tensor = stored("array", default_factory=lambda: torch.zeros(0, 0, 0))

    def per_head(self, name: Literal["key_norm", "value_state_norm"]) -> torch.Tensor:
        """A per-KV-head array ``[L, H_kv, T]`` mapped to query heads ``[L, H, T]``."""
        x = getattr(self, name)
        if x.numel() == 0:
            raise ConfigError(f"{name} was not measured for this result.", hint="Run with kv_norms=True (the default).")
        return kv_to_heads(x, self.alpha_mean.shape[1])

    # -- derived --------------------------------------------------------------------------------
    def _eps_index(self, eps: float | None) -> int:
        eps = self.config.eps if eps is None else eps
        for i, e in enumerate(self.eps_grid):
            if abs(e - eps) < 1e-9:
                return i
        raise ConfigError(f"eps={eps} was not measured.", hint=f"Measured ε values: {', '.join(map(str, self.eps_grid))}.")

    def _pos_index(self, position: int | None) -> int:
        position = self.config.positions[0] if position is None else position
        if position not in self.config.positions:
            raise ConfigError(f"position {position} was not tracked.", hint=f"Tracked: {self.config.positions}; rerun with --positions.")
        return self.config.positions.index(position)

    def sink_pct(self, eps: float | None = None, position: int | None = None, layers: Sequence[int] | None = None) -> float:
        """``Sink_k^ε`` (%) over (sample, layer, head); ``layers`` restricts the layers."""
        ex = self.exceed[self._eps_index(eps), :, :, self._pos_index(position)]  # [L, H]
        if layers is not None:
            ex = ex[list(layers)]
        return float(ex.double().sum() / (self.n_samples * ex.numel()) * 100)

    def sink_fraction(self, eps: float | None = None, position: int | None = None) -> torch.Tensor:
        """Fraction of samples on which each head is a sink head, ``[L, H]``."""
        return self.exceed[self._eps_index(eps), :, :, self._pos_index(position)].float() / self.n_samples

    def sink_heads(self, eps: float | None = None, position: int | None = None) -> torch.Tensor:
        """``bool [L, H]``: sink head on the majority of samples."""
        return self.sink_fraction(eps, position) > 0.5

    def summary(self) -> dict[str, Any]:
        L = self.alpha_mean.shape[0]
        out = {f"Sink_{p + 1}^{self.config.eps} (%)": round(self.sink_pct(position=p), 2) for p in self.config.positions}
        p0 = self.config.positions[0]
        out[f"Sink_{p0 + 1} past layer 1 (%)"] = round(self.sink_pct(position=p0, layers=range(2, L)), 2) if L > 2 else None
        out["sink heads (majority)"] = f"{int(self.sink_heads().sum())}/{self.sink_heads().numel()}"
        out["samples"] = self.n_samples
        out["skipped (shorter than T)"] = self.n_skipped
        if self.resid_norm.numel():
            r = peak_ratio(self.resid_norm, p0)
            out["max residual peak ratio"] = round(float(r.max()), 2)
            out["peak layer"] = self.peak_layer
        for name, lab in (("key_norm", "key"), ("value_state_norm", "raw value"), ("value_norm", "value drain (after W_O)")):
            x = getattr(self, name)
            if x.numel() and x.shape[-1] > 1:
                out[f"{lab} norm at pos {p0} / mean of others"] = round(float(_pos_ratio(x, p0)), 3)
        return out

    # -- Result API --------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Tidy α: ``model, layer, head, pos, token, value`` (value = mean α_pos over samples)."""
        L, H, T = self.alpha_mean.shape
        lab = list(self.tokens) + [""] * max(0, T - len(self.tokens))
        idx = pd.MultiIndex.from_product([range(L), range(H), range(T)], names=["layer", "head", "pos"]).to_frame(index=False)
        idx.insert(0, "model", self.model.get("name", ""))
        idx["token"] = [lab[p] for p in idx["pos"]]
        idx["value"] = self.alpha_mean.reshape(-1).numpy()
        return idx

    def norms_frame(self) -> pd.DataFrame:
        """Tidy per-head norms: ``model, layer, head, kv_head, pos, token, key_norm, value_state_norm, value_norm``
        (query heads; ``kv_head`` is the KV head they read; a column is NaN when it was not measured)."""
        L, H, T = self.alpha_mean.shape
        lab = list(self.tokens) + [""] * max(0, T - len(self.tokens))
        idx = pd.MultiIndex.from_product([range(L), range(H), range(T)], names=["layer", "head", "pos"]).to_frame(index=False)
        idx.insert(0, "model", self.model.get("name", ""))
        K = next((x.shape[1] for x in (self.key_norm, self.value_state_norm) if x.numel()), self.model.get("n_kv_heads") or H)
        idx.insert(3, "kv_head", idx["head"] // max(H // K, 1))
        idx["token"] = [lab[p] for p in idx["pos"]]
        for name in ("key_norm", "value_state_norm", "value_norm"):
            x = getattr(self, name)
            if x.numel() and x.shape[-1] == T:
                idx[name] = (self.per_head(name) if name != "value_norm" else x).reshape(-1).numpy()
            else:
                idx[name] = float("nan")
        return idx

    def plot(self, kind: Literal["heads", "layers", "values", "keys", "raw_values", "resid", "eps"] = "heads",
             position: int | None = None):
        """``heads``: α heat map [layer × head]; ``layers``: Sink % per layer; ``values``: value drain ‖v W_O,h‖ per
        position (mean over heads, per layer); ``keys`` / ``raw_values``: key / raw value norm per position (mean over
        KV heads, per layer); ``resid``: residual norm [layer × position]; ``eps``: Sink % vs ε."""
        import plotly.graph_objects as go

        p = self.config.positions[0] if position is None else position
        L, H, T = self.alpha_mean.shape
        if kind == "heads":
            fig = go.Figure(go.Heatmap(z=self.alpha_mean[:, :, p].numpy(), x=[f"H{h}" for h in range(H)],
                                       y=[layer_label(l) for l in range(L)], zmin=0, zmax=1, colorscale="Viridis",
                                       colorbar={"title": f"α_{p + 1}"}))
            fig.update_layout(title=f"Mean attention on position {p} (α_{p + 1}) per head", yaxis_autorange="reversed")
        elif kind == "layers":
            frac = self.sink_fraction(position=p).mean(dim=1) * 100
            fig = go.Figure(go.Bar(x=list(range(L)), y=frac.numpy()))
            fig.update_layout(title=f"Sink_{p + 1}^{self.config.eps} per layer (%)", xaxis_title="layer", yaxis_title="%")
        elif kind == "values":
            fig = go.Figure()
            for l in range(L):
                fig.add_trace(go.Scatter(y=self.value_norm[l].mean(dim=0).numpy(), name=layer_label(l), mode="lines"))
            fig.update_layout(title="Value-state norm ‖v W_O,h‖ per position (mean over heads)", xaxis_title="position",
                              yaxis_type="log")
        elif kind in ("keys", "raw_values"):
            name = "key_norm" if kind == "keys" else "value_state_norm"
            x = self.per_head(name)
            fig = go.Figure()
            for l in range(L):
                fig.add_trace(go.Scatter(y=x[l].mean(dim=0).numpy(), name=layer_label(l), mode="lines"))
            what = "Key norm ‖k‖ (cached, post-rotary)" if kind == "keys" else "Raw value norm ‖v‖ (before W_O)"
            fig.update_layout(title=f"{what} per position (mean over heads)", xaxis_title="position", yaxis_type="log")
        elif kind == "resid":
            fig = go.Figure(go.Heatmap(z=self.resid_norm.clamp_min(1e-6).log10().numpy(), y=["embed"] + [layer_label(l) for l in range(L)],
                                       colorbar={"title": "log10 ‖x‖"}))
            fig.update_layout(title="Residual norm per layer and position", xaxis_title="position", yaxis_autorange="reversed")
        elif kind == "eps":
            ys = [self.sink_pct(eps=e, position=p) for e in self.eps_grid]
            fig = go.Figure(go.Scatter(x=list(self.eps_grid), y=ys, mode="lines+markers"))
            fig.update_layout(title=f"Sink_{p + 1}^ε vs ε", xaxis_title="ε", yaxis_title="%")
        else:
            raise ConfigError(f"plot kind={kind!r}; use heads, layers, values, keys, raw_values, resid or eps.")
        return fig


# ----------------------------------------------------------------------------- entry point
def _tokens_for(probe, config: Config, texts, tokens, domain) -> tuple[torch.Tensor, int, str]:
    given = sum(x is not None for x in (texts, tokens, domain))
    if given != 1:
        raise InputError("give exactly one of texts=, tokens= or domain=.")
    if tokens is not None:
        t = torch.as_tensor(tokens)
        if t.ndim == 1:
            t = t[None]
        if t.shape[1] < config.T:
            raise InputError(f"tokens have {t.shape[1]} positions; T={config.T} needs at least that many.",
                             hint="Pass longer sequences or a smaller T.")
        return t[: config.n_samples, : config.T].to(probe.device), 0, "tokens"
    if texts is not None:
        if isinstance(texts, str):
            texts = [texts]
        batch = _domains.domain_tokens(probe, "texts", n=config.n_samples, T=config.T, seed=config.seed,
                                       prepend_bos=bos_flag(config.bos), texts=list(texts))
        return batch.tokens, batch.n_skipped, "texts"
    _domains.check_domains([domain])
    batch = _domains.domain_tokens(probe, domain, n=config.n_samples, T=config.T, seed=config.seed,
                                   prepend_bos=bos_flag(config.bos))
    return batch.tokens, batch.n_skipped, domain


def _input_hash(toks: torch.Tensor) -> str:
    """The input hash of a sinks run over the sampled tokens ``toks`` ``[S, T]``: the hash of its rows'
    digests, which a sharded sweep of the same rows derives too (:func:`merge_states`)."""
    return registry.digests_hash(_row_digests(toks))


def _row_digests(toks: torch.Tensor) -> torch.Tensor:
    return registry.digests(list(toks.cpu()))


def _prepare(probe, texts: Sequence[str] | str | None = None, *, tokens: torch.Tensor | None = None,
             domain: str | None = None, config: Config) -> registry.Inputs:
    """The token rows ``[S, T]`` a run measures (texts are tokenized and sampled, a domain is drawn), the number
    of texts skipped and the source's name, with the hash of the rows (shared by :func:`run` and :data:`result_key`)."""
    if texts is None and tokens is None and domain is None:
        domain = "prose"
    if texts is not None and not isinstance(texts, str) and not (
            isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts)):
        hint = "Pass domain='code' (by keyword)." if isinstance(texts, str) else "Pass a list of strings."
        raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}.", hint=hint)
    toks, skipped, source = _tokens_for(probe, config, texts, tokens, domain)
    label = f"{source}: {toks.shape[0]} rows of {toks.shape[-1]} tokens" + (f" ({skipped} texts skipped)" if skipped else "")
    return registry.Inputs(_input_hash(toks), {"tokens": toks, "skipped": skipped, "source": source}, label)


def run(probe, texts: Sequence[str] | str | None = None, *, tokens: torch.Tensor | None = None,
        domain: str | None = None, config: Config = Config(), progress: ProgressFn | None = None) -> SinksResult:
    """Sink metric, value drains and residual peaks over a corpus.

    Args:
        probe: a loaded :class:`probes.Probe`.
        texts: texts (each must tokenize to ≥ T tokens; shorter ones are skipped and counted).
        tokens: or ids ``[S, ≥T]`` (e.g. the random/repeat controls).
        domain: or a built-in domain name (``prose``, ``code``, ``arithmetic``, ``random``, ``repeat``).
        config: :class:`Config`.
        progress: :class:`~analyses.core.progress.Progress` events: phase ``measuring``, in samples.
    """
    timer = base.Timer()
    with timer("tokenize"):
        inp = SPEC.inputs(probe, texts, tokens=tokens, domain=domain, config=config)
    toks, skipped, source = inp.data["tokens"], inp.data["skipped"], inp.data["source"]
    if toks.shape[0] == 0:
        raise InputError(f"all {skipped} texts are shorter than T={config.T} tokens; nothing to measure.",
                         hint="Give longer texts or a smaller T (--T).")
    eps_grid = eps_grid_for(config)
    with timer("stats"):
        st = collect_stats(probe, toks, positions=config.positions, eps_grid=eps_grid, batch_size=config.batch_size,
                           values=config.values, resid=True, kv_norms=config.kv_norms, progress=progress)
    return _result(probe, st, toks[: config.ablation_samples], config=config, eps_grid=eps_grid, n_skipped=skipped,
                   source=source, input_hash=inp.hash, timer=timer, inputs=inp.label)


def eps_grid_for(config: Config) -> tuple[float, ...]:
    """The ε grid whose exceedance counts are kept: the fixed grid plus ``config.eps``."""
    return tuple(sorted(set(EPS_GRID) | {float(config.eps)}))


def _result(probe, st: Mapping[str, Any], head: torch.Tensor, *, config: Config, eps_grid: tuple[float, ...],
            n_skipped: int, source: str, input_hash: str, timer: base.Timer, inputs: str = "") -> SinksResult:
    """Peak layer, MLP ablation (on ``head``, the first samples ``[k, T]``) and the result object."""
    p0 = config.positions[0]
    ratios = peak_ratio(st["resid_norm"], p0)
    n = probe.info.n_layers
    if config.peak_layer is not None and not 0 <= config.peak_layer < n:
        raise ConfigError(f"peak_layer={config.peak_layer}; the model has layers 0..{n - 1}.")
    peak_layer = config.peak_layer if config.peak_layer is not None else int(ratios[1:].argmax())
    ablation = pd.DataFrame()
    if config.mlp_ablation and config.ablation_layers > 0:
        with timer("mlp_ablation"):
            layers = list(range(min(config.ablation_layers, peak_layer + 1)))
            ablation = mlp_ablation(probe, head.to(probe.device), layer=peak_layer, pos=p0, layers=layers)
    L, H = probe.info.n_layers, probe.info.n_heads
    return SinksResult(
        config=config, model=probe.info.to_dict(), input_hash=input_hash, inputs=inputs,
        timings=timer.seconds, alpha_mean=st["alpha_mean"], exceed=st["exceed"], eps_grid=eps_grid,
        n_samples=int(st["n"]), n_skipped=n_skipped,
        value_norm=st.get("value_norm", torch.zeros(L, H, 0)), resid_norm=st["resid_norm"], ablation=ablation,
        peak_layer=peak_layer, source=source, tokens=tuple(probe.to_str_tokens(head[0])),
        key_norm=st.get("key_norm", torch.zeros(L, probe.info.n_kv_heads, 0)),
        value_state_norm=st.get("value_state_norm", torch.zeros(L, probe.info.n_kv_heads, 0)),
    )


# ----------------------------------------------------------------------------- shards (sweeps)
def accumulate(probe, texts: Sequence, config: Config = Config(), *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """One shard of a sweep: tokenize ``texts`` (shorter than T tokens: skipped and counted) and stream them.

    Returns a plain partial state: ``reads`` (site -> reducer ``state()``), ``n_skipped``, ``n_texts``,
    ``digests`` (of the measured rows, ``[S, 8]``: the input's name in the key) and ``head`` (the first
    ``ablation_samples`` token rows ``[k, T]``, for the MLP ablation).
    Partial states of consecutive shards combine with :func:`merge_states`; batches never straddle a
    shard, so with ``shard_size`` a multiple of ``batch_size`` the batches are those of one pass.
    """
    registry.check_config(config, Config, "a sinks shard")
    texts = [t if isinstance(t, str) else t.text for t in texts]
    toks, skipped = _domains.texts_to_tokens(probe, texts, config.T, prepend_bos=bos_flag(config.bos))
    reads = make_reducers(probe, config.positions, eps_grid_for(config), values=config.values, resid=True,
                          kv_norms=config.kv_norms)
    bar = phase(progress, "measuring", toks.shape[0], "samples")
    for i in range(0, toks.shape[0], config.batch_size):
        b = toks[i:i + config.batch_size]
        probe.run(b, reads=reads, return_logits=False)
        bar.advance(b.shape[0])
    return {"reads": {k: _state_of(r) for k, r in reads.items()}, "n_skipped": int(skipped), "n_texts": len(texts),
            "digests": _row_digests(toks), "head": toks[: config.ablation_samples].cpu()}


def _state_of(r: Reducer | list[Reducer]):
    """A reducer's state, or the list of states of a site read by several reducers."""
    return [x.state() for x in r] if isinstance(r, list) else r.state()


def _from_state(st, config: Config) -> Reducer | list[Reducer]:
    if isinstance(st, list):
        return [reducer_from_state(x, _template(x, config)) for x in st]
    return reducer_from_state(st, _template(st, config))


def _template(st: Mapping[str, Any], config: Config) -> Reducer:
    kind = st.get("__kind__")
    if kind == "SinkAlpha":
        return SinkAlpha(config.positions, eps_grid_for(config))
    if kind == "Mean":
        return Mean(dims=(0,))
    raise ConfigError(f"a sinks shard state holds a reducer of kind {kind!r}; expected SinkAlpha or Mean.")


def merge_states(a: Mapping[str, Any] | None, b: Mapping[str, Any], config: Config = Config(), info: Any = None) -> dict[str, Any]:
    """Combine the partial states of two consecutive shards (``a`` first; ``None`` = empty)."""
    if a is None:
        return dict(b)
    reads = {}
    for site, sa in a["reads"].items():
        ra, rb = _from_state(sa, config), _from_state(b["reads"][site], config)
        for x, y in zip(ra, rb) if isinstance(ra, list) else [(ra, rb)]:
            x.merge(y)
        reads[site] = _state_of(ra)
    head = torch.cat([a["head"], b["head"].to(a["head"].dtype)])[: config.ablation_samples]
    return {"reads": reads, "n_skipped": a["n_skipped"] + b["n_skipped"], "n_texts": a["n_texts"] + b["n_texts"],
            "digests": torch.cat([a["digests"], b["digests"]]), "head": head}


def result_from_states(probe, state: Mapping[str, Any], config: Config = Config(), *, source: str = "texts",
                       timings: Mapping[str, float] | None = None) -> SinksResult:
    """Finish a (merged) shard state into a :class:`SinksResult` (runs the MLP ablation on ``probe``); its key
    names the measured rows by their digests, as a one-pass :func:`run` over the same rows does."""
    if state is None or int(state["head"].shape[0]) == 0:
        n = 0 if state is None else state["n_skipped"]
        raise InputError(f"all {n} texts are shorter than T={config.T} tokens; nothing to measure.",
                         hint="Give longer texts or a smaller T (--T).")
    reads = {k: _from_state(v, config) for k, v in state["reads"].items()}
    st = _finalize_reads(reads, probe.info.n_layers, values=config.values, resid=True, kv_norms=config.kv_norms)
    timer = base.Timer()
    timer.seconds.update(dict(timings or {}))
    return _result(probe, st, state["head"], config=config, eps_grid=eps_grid_for(config), n_skipped=state["n_skipped"],
                   source=source, input_hash=registry.digests_hash(state["digests"]), timer=timer,
                   inputs=f"{source}: {int(state['digests'].shape[0])} rows of {config.T} tokens (sharded)")


# ----------------------------------------------------------------------------- declaration
def _memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """Attention probabilities recomputed in float32 from q/k per layer (scores, masked scores, softmax and the
    NaN-cleaned copy, beside the layer's q, k and v) and each head's ``v_h W_O,h`` before its norm; the forward pass computes the last position's
    logits only (nobody reads them: ``Probe.run(return_logits=False)``)."""
    return {"pattern": 4 * B * s.n_heads * T * T * 4, "value_norm": B * T * s.n_heads * s.d_model * 4,
            # the layer's q, k and v, alive while its hooks recompute the pattern or the value norms from them
            "layer_qkv": 2 * B * T * (s.n_heads + 2 * s.n_kv_heads) * s.d_head * s.itemsize,
            "logits": B * s.d_vocab * s.itemsize}


MEMORY = planner.MemoryModel("sinks", _memory, persistent=("layer_qkv",), sizes=lambda c: {"seq_len": c.T, "batch_size": c.batch_size}, batch_field="batch_size",
                             seq_option="--T")


def _sweep_run(probe, config: Config, *, texts=None, domain: str = "prose", progress: ProgressFn | None = None, **_: Any) -> SinksResult:
    from .core.planner import retry_on_oom

    # a checkpoint that runs out of memory is retried once with half the batch (same numbers: α is streamed)
    return retry_on_oom(lambda b: run(probe, texts, domain=None if texts is not None else domain,
                                      config=config.replace(batch_size=b), progress=progress),
                        config.batch_size, what=f"sinks on {probe.info.name}")


def _sweep_rows(result: SinksResult) -> list[dict]:
    """Sink % (overall and per layer), α per head and the residual peak ratio per layer, at the first position."""
    from .core.checkpoints import metric_rows

    p0 = result.config.positions[0]
    return (metric_rows("sink_pct", torch.tensor(result.sink_pct(position=p0)))
            + metric_rows("sink_pct_layer", result.sink_fraction(position=p0).mean(dim=1) * 100)
            + metric_rows("alpha", result.alpha_mean[:, :, p0])
            + metric_rows("resid_peak_ratio", peak_ratio(result.resid_norm, p0), layer_offset=-1))


def _finish(probe, state, config: Config, timings=None, source: str = "texts") -> SinksResult:
    return result_from_states(probe, state, config, source=source, timings=timings)


SPEC = registry.register(registry.Analysis(
    name="sinks", order=2, title="Attention sinks, value drains, residual peaks",
    summary="how much each head attends to the first tokens, and the norms that go with it",
    config=Config, result=SinksResult, run=run, prepare=_prepare, cli="sinks", page="sinks", memory=MEMORY,
    shard=registry.ShardProtocol(accumulate=accumulate, merge=merge_states, finish=_finish, needs_probe=True,
                                 count=lambda st: st["n_texts"]),
    sweep=registry.Sweep(run=_sweep_run, rows=_sweep_rows),
))
result_key = SPEC.key  # the key run() gives these inputs, from the same _prepare
