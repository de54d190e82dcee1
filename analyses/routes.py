"""Information-flow routes (Ferrando & Voita 2024, "Information Flow Routes: Automatically Interpreting
Language Models at Scale", arXiv 2403.00824).

Each block's output is split into parts that add up to it (the residual input, one part per
(source token, head) for attention, the FFN output or its neurons). A part's importance is its
*proximity* to the whole (paper eq. 2, LLM-TT ``routes/contributions.py``)::

    prox_k = max(‖y‖_p − ‖y − z_k‖_p, ε)          importance_k = prox_k / Σ_m prox_m

with p = 1 and ε = 1e-5 by default, so every row of importances sums to exactly 1 and parts that are
zero (future keys) get ε / Σ. Attention (layer l, query i)::

    resid_mid[i] = resid_pre[i] + Σ_h Σ_j A_h[i, j] · v_h[j] · W_O,h  (+ b_O)

(v from the value projection including b_V, counted once; GQA value heads are expanded so query head
h reads KV head h // (H / K)). FFN: parts {mlp_out[i], resid_mid[i]}, whole resid_post[i].
Parallel-residual blocks (GPT-NeoX, Pythia): one block whose parts are the head-token parts, mlp_out
and resid_pre, whole resid_post. Neuron level: parts post[i, n] · W_out[n] and the rest of the residual.

The graph uses LLM-TT's node names (``routes/graph.py``): ``X0_t`` embedding at position t, ``A{l}_t``
residual after layer l's attention, ``M{l}_t`` FFN node, ``I{l}_t`` residual after the FFN (input of
l + 1); the prediction node at t is ``I{L-1}_t``. A route (paper Algorithm 1) starts at the prediction
node and walks down, keeping every incoming edge whose weight is above τ (default 0.04, LLM-TT's
slider). With ``renormalize=True`` (LLM-TT default) τ is applied per (token, head) part and per
residual part, survivors are divided by their new sum, and extraction keeps edges > 0.

The proximities are computed *inside the forward pass*, layer by layer, by a reducer that receives
each layer's resid_pre, v, pattern, resid_mid, mlp_out and resid_post in execution order; the
``[T_q, T_k, H, d]`` parts tensor only ever exists for one chunk of queries of one layer.

Example::

    from probes import load_model
    from analyses import routes
    probe = load_model("embedded")
    res = routes.run(probe, "The Eiffel Tower is located in the city of")
    res.route().edges(data=True); res.plot()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from probes.errors import ConfigError, InputError, OutOfMemoryError, UnsupportedModelError
from probes.labels import node_label
from probes.edits import as_edits
from probes.sites import Site

from .core.base import Config as _BaseConfig
from .core.base import Result, Timer, option, register_result, stored
from .core import planner, registry
from .core.store import hash_inputs

__all__ = [
    "Config", "RoutesResult", "run", "result_key",
    "proximity", "attention_importance", "ffn_importance", "neuron_importance", "block_importance",
    "decomposed_attention", "threshold_renormalize", "node_name", "max_prompt_tokens", "max_route_tokens", "describe_edit", "resolve_kernel",
    "explain_attention", "AttentionExplanation", "faithfulness", "Faithfulness", "context_label", "context_model", "compare", "memory_model",
    "pack_causal", "unpack_causal", "half_if_fits",
]

Level = Literal["token", "head", "neuron"]


# ============================================================================ configs
@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Settings of one route computation (defaults: shared/methods/routes.md)."""

    # defaults: LLM-TT (slider, clip, renormalisation) and the method page
    tau: float = option(0.04, gt=0, lt=1, help="Edge threshold (LLM-TT's slider default; range 0.01-0.10).",
                        hint="Use a threshold such as 0.04 (LLM-TT's range is 0.01-0.10).")
    renormalize: bool = option(True, help="Renormalise after thresholding (LLM-TT default on).")
    p: float = option(1.0, ge=1, help="Proximity norm (1 = L1: residual streams are anisotropic, paper §3).")
    eps: float = option(1e-5, gt=0, lt=1e-2, help="Importance clip, so every row sums to exactly 1 (LLM-TT).")
    include_bias: bool = option(False, help="Count the attention output bias b_O as its own part (LLM-TT leaves it out).")
    level: Level = option("token", help="token; head adds per-head edge rows; neuron adds per-neuron FFN importances.")
    position: int = option(-1, help="Prediction position of the route (negative counts from the end; -1 = last token).")
    mode: Literal["all", "route"] = option("all", help="all (graph of every position) or route (top-down: only the route to --position).")
    prepend_bos: bool = option(False, help="Start each prompt with BOS (default off: no BOS, and a BOS the tokenizer adds is removed).")
    query_chunk: int | None = option(None, ge=1, help="Queries per chunk; None sizes chunks to chunk_mb.")
    chunk_mb: int = option(256, ge=1, help="Memory budget of one [Q, T, H, d] chunk (megabytes).")
    max_memory_gb: float = option(8.0, gt=0, help="Refuse prompts whose stored importances would exceed this (gigabytes).")
    keep_residuals: bool = option(False, help="Keep residual vectors so nodes can be read through the logit lens.")
    dtype: Literal["float32", "float64"] = option("float32", help="Compute dtype (LLM-TT computes in fp32).")
    kernel: Literal["auto", "compiled", "eager"] = option("auto", help="Proximity kernel: auto, compiled (torch.compile) or eager.")


# ============================================================================ math (no model)
def _norm(x: torch.Tensor, p: float) -> torch.Tensor:
    if p == 1:
        return x.abs().sum(-1)
    if p == 2:
        return torch.linalg.vector_norm(x, ord=2, dim=-1)
    return torch.linalg.vector_norm(x, ord=p, dim=-1)


@torch.no_grad()
def _prox(whole: torch.Tensor, parts: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """Unnormalised proximity: whole [..., d], parts [..., P, d] -> [..., P] (clipped at eps)."""
    return (_norm(whole, p).unsqueeze(-1) - _norm(whole.unsqueeze(-2) - parts, p)).clamp_min(eps)


@torch.no_grad()
def proximity(whole: torch.Tensor, parts: torch.Tensor, *, p: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """Importances of parts for a whole: whole [..., d], parts [..., P, d] -> [..., P], rows sum to 1."""
    pr = _prox(whole, parts, p, eps)
    return pr / pr.sum(-1, keepdim=True)


# A fused proximity kernel: torch.compile turns the expression below into one loop (C++/OpenMP on
# CPU, Triton on GPU) that never materialises the [C, K, H, d] parts tensor; eager PyTorch needs four
# passes over it. Same arithmetic, reductions in another order (differences ~1e-6 relative).
_COMPILED: dict[float, Callable] = {}
_COMPILE_FAILED: list[str] = []
AUTO_COMPILE_WORK = 5e8  # L·T²·H·d element operations above which kernel="auto" compiles


def _scaled_prox(w: torch.Tensor, a: torch.Tensor, u: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """w [C, d], a [C, K, H], u [K, H, d] -> clipped proximity of parts a[c, k, h] · u[k, h] to w[c]: [C, K, H]."""
    diff = w[:, None, None, :] - a.unsqueeze(-1) * u.unsqueeze(0)
    return (_norm(w, p)[:, None, None] - _norm(diff, p)).clamp_min(eps)


def _scaled_prox_eager(w: torch.Tensor, a: torch.Tensor, u: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """:func:`_scaled_prox` in eager PyTorch with one ``[C, K, H, d]`` temporary: the parts, turned in place into
    ``w − parts`` and their absolute values (bit for bit the same numbers as ``w − parts``)."""
    x = a.unsqueeze(-1) * u.unsqueeze(0)
    x.neg_().add_(w[:, None, None, :])
    nx = x.abs_().sum(-1) if p == 1 else _norm(x, p)
    del x
    return (_norm(w, p)[:, None, None] - nx).clamp_min(eps)


def _prox_kernel(kernel: str) -> Callable:
    """The proximity function for ``kernel`` ("compiled" falls back to eager, with a warning, when
    torch.compile is unavailable, e.g. no C++ compiler)."""
    if kernel != "compiled" or _COMPILE_FAILED:
        return _scaled_prox_eager

    def run(w, a, u, p, eps):
        fn = _COMPILED.get(p)
        if fn is None:
            fn = _COMPILED[p] = torch.compile(lambda w, a, u, eps: _scaled_prox(w, a, u, p, eps), dynamic=True)
        try:
            return fn(w, a, u, eps)
        except Exception as e:  # compiler missing or unsupported platform: keep going, eagerly
            import warnings

            _COMPILE_FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            warnings.warn(f"routes: torch.compile failed ({_COMPILE_FAILED[-1]}); using the eager proximity kernel.", stacklevel=2)
            return _scaled_prox_eager(w, a, u, p, eps)

    return run


def resolve_kernel(kernel: str, n_layers: int, T: int, n_heads: int, d_model: int) -> str:
    """``"auto"`` -> ``"compiled"`` when the all-position work ``L·T²·H·d`` exceeds :data:`AUTO_COMPILE_WORK`."""
    if kernel != "auto":
        return kernel
    return "compiled" if n_layers * T * T * n_heads * d_model >= AUTO_COMPILE_WORK else "eager"


@torch.no_grad()
def decomposed_attention(pattern: torch.Tensor, vo: torch.Tensor, queries: slice | None = None) -> torch.Tensor:
    """Per (query, key, head) attention parts.

    Args:
        pattern: [H, T_q, T_k] attention probabilities.
        vo: [T_k, H, d] value vectors already multiplied by each head's W_O slice (v_h[j] · W_O,h).
        queries: which query rows (default all).

    Returns:
        [Q, T_k, H, d]: z[i, j, h] = A_h[i, j] · vo[j, h].
    """
    a = pattern if queries is None else pattern[:, queries]
    return a.permute(1, 2, 0).unsqueeze(-1) * vo.unsqueeze(0)


def _chunk_size(T: int, H: int, d: int, chunk_mb: int, itemsize: int = 4) -> int:
    per_query = max(1, T * H * d * itemsize)  # the parts, turned in place into |whole - parts| (_scaled_prox_eager)
    return max(1, min(T, int(chunk_mb * 2**20 // per_query)))


@torch.no_grad()
def attention_importance(resid_pre: torch.Tensor, whole: torch.Tensor, pattern: torch.Tensor, vo: torch.Tensor, *,
                         p: float = 1.0, eps: float = 1e-5, extra_parts: torch.Tensor | None = None,
                         query_chunk: int | None = None, chunk_mb: int = 256, queries: torch.Tensor | None = None,
                         kernel: Literal["eager", "compiled"] = "eager",
                         pattern_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Importances of an attention block's parts, computed in chunks of queries.

    Args:
        resid_pre: [T, d] residual input (one part).
        whole: [T, d] block output residual (resid_mid; resid_post for parallel blocks).
        pattern: [H, T, T] attention probabilities (causal: zero for keys after the query).
        vo: [T', H, d] v_h[j] · W_O,h per key and head (T' ≤ T: keys after the last query may be left out).
        extra_parts: [T, E, d] further parts per query (b_O, a parallel block's mlp_out), or None.
        queries: optional sorted query positions [Q] (top-down mode computes only these rows).
        pattern_rows: ``pattern`` holds only the rows of ``queries`` ([H, Q, T]), as the top-down walk recomputes them.
        kernel: "eager" (chunks of the [Q, T, H, d] parts tensor) or "compiled" (one fused loop, no parts tensor).

    Returns:
        attn [Q, T, H] (query, key, head), resid [Q], extra [Q, E] or None (Q = T when ``queries`` is None);
        each query's entries sum to 1, keys after the query get exactly eps / Σ.
    """
    T, (_, H, d) = pattern.shape[-1], vo.shape
    qhost = None if queries is None else torch.as_tensor(queries).cpu().long()  # chunk bounds without a device sync
    qidx = torch.arange(T, device=vo.device) if qhost is None else qhost.to(vo.device)
    Q = qidx.numel()
    fused = kernel == "compiled"
    # eager chunks hold [C, T, H, d] parts; the fused kernel only its [C, T, H] weights and output
    qc = query_chunk or (_fused_chunk(Q, T, H, chunk_mb, vo.element_size()) if fused else _chunk_size(T, H, d, chunk_mb, vo.element_size()))
    prox_fn = _prox_kernel(kernel)
    attn = torch.full((Q, T, H), eps, dtype=vo.dtype, device=vo.device)
    w = whole[qidx]
    resid = _prox(w, resid_pre[qidx].unsqueeze(-2), p, eps)[..., 0]  # [Q]
    extra = None if extra_parts is None else _prox(w, extra_parts[qidx], p, eps)  # [Q, E]
    for c0 in range(0, Q, qc):
        c1 = min(Q, c0 + qc)
        qs = qidx[c0:c1]
        k1 = c1 if qhost is None else int(qhost[c0:c1].max()) + 1  # causal: no key after the last query of the chunk matters
        a = (pattern[:, c0:c1, :k1] if pattern_rows else pattern[:, qs, :k1]).permute(1, 2, 0)  # [C, k1, H]
        if fused:
            pr = prox_fn(w[c0:c1].contiguous(), a.contiguous(), vo[:k1].contiguous(), float(p), float(eps))
        else:  # one [C, k1, H, d] temporary
            pr = _scaled_prox_eager(w[c0:c1], a, vo[:k1], p, eps)  # [C, k1, H]
        # keys after the query hold exact zero parts; pin them to eps (float reduction order aside)
        future = torch.arange(k1, device=vo.device)[None, :] > qs[:, None]
        pr.masked_fill_(future[..., None], eps)
        attn[c0:c1, :k1] = pr
        del pr
    total = attn.sum((1, 2)) + resid + (0 if extra is None else extra.sum(-1))
    attn /= total[:, None, None]
    resid = resid / total
    if extra is not None:
        extra = extra / total[:, None]
    return attn, resid, extra


@torch.no_grad()
def ffn_importance(resid_mid: torch.Tensor, mlp_out: torch.Tensor, resid_post: torch.Tensor, *, p: float = 1.0,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN block: parts {mlp_out, resid_mid} of whole resid_post, all [T, d] -> (ffn [T], resid [T])."""
    imp = proximity(resid_post, torch.stack([mlp_out, resid_mid], dim=-2), p=p, eps=eps)
    return imp[..., 0], imp[..., 1]


@torch.no_grad()
def block_importance(whole: torch.Tensor, parts: Sequence[torch.Tensor], *, p: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """Generic block: whole [T, d], parts list of [T, d] -> [T, P] importances (rows sum to 1)."""
    return proximity(whole, torch.stack(list(parts), dim=-2), p=p, eps=eps)


@torch.no_grad()
def neuron_importance(rest: torch.Tensor, post: torch.Tensor, W_out: torch.Tensor, whole: torch.Tensor, *,
                      p: float = 1.0, eps: float = 1e-5, query_chunk: int | None = None,
                      chunk_mb: int = 256, kernel: Literal["eager", "compiled"] = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron-level FFN parts.

    Args:
        rest: [T, d] the residual part (whole minus the MLP output; resid_mid for sequential blocks).
        post: [T, F] MLP hidden activations; W_out: [F, d] write directions; whole: [T, d] resid_post.

    Returns:
        neurons [T, F] and resid [T]; rows sum to 1.
    """
    T, F = post.shape
    d = W_out.shape[1]
    fused = kernel == "compiled"
    per_query = F * (2 if fused else d) * post.element_size()
    qc = query_chunk or max(1, min(T, int(chunk_mb * 2**20 // max(1, per_query))))
    neurons = torch.empty(T, F, dtype=post.dtype, device=post.device)
    resid = _prox(whole, rest.unsqueeze(-2), p, eps)[..., 0]
    prox_fn = _prox_kernel(kernel)
    for q0 in range(0, T, qc):
        q1 = min(T, q0 + qc)
        if fused:  # parts post[i, n] · W_out[n] as the scaled-part kernel with one "head"
            neurons[q0:q1] = prox_fn(whole[q0:q1].contiguous(), post[q0:q1, :, None].contiguous(),
                                     W_out[:, None, :].contiguous(), float(p), float(eps))[..., 0]
        else:  # one [Q, F, d] temporary
            neurons[q0:q1] = _scaled_prox_eager(whole[q0:q1], post[q0:q1, :, None], W_out[:, None, :], p, eps)[..., 0]
    total = neurons.sum(-1) + resid
    return neurons / total[:, None], resid / total


@torch.no_grad()
def threshold_renormalize(parts: torch.Tensor, resid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-TT ``apply_threshold_and_renormalize``: zero every part (and residual) with importance <= tau,
    divide survivors by their new sum (residual included).

    Args:
        parts: [..., P] block parts per target; resid: [...] residual part.

    Returns:
        (parts, resid) with the same shapes; a target whose parts are all <= tau gets all zeros (not NaN).
    """
    pk = torch.where(parts > tau, parts, torch.zeros_like(parts))
    rk = torch.where(resid > tau, resid, torch.zeros_like(resid))
    s = pk.sum(-1) + rk
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return pk / safe.unsqueeze(-1), rk / safe


def node_name(kind: Literal["X", "A", "M", "I"], layer: int, pos: int) -> str:
    """LLM-TT node name: ``X0_t``, ``A{l}_t``, ``M{l}_t``, ``I{l}_t``."""
    return node_label(kind, layer, pos)


def max_prompt_tokens(n_layers: int, n_heads: int, max_memory_gb: float, itemsize: int = 4) -> int:
    """Longest prompt whose stored [L, T, T, H] importances fit in ``max_memory_gb``."""
    return int(math.sqrt(max_memory_gb * 2**30 / (n_layers * n_heads * itemsize)))


# ============================================================================ hook plumbing
class _Decomposer:
    """Computes one prompt's importances layer by layer.

    ``mode="all"``: inside the forward pass, as each layer's sites arrive; it keeps at most one layer's
    resid_pre, v, pattern (and MLP hidden) at a time, and the ``[Q, T, H, d]`` parts tensor exists for one
    chunk of queries only. ``mode="route"`` (top-down): the forward pass keeps each layer's residuals and its
    post-rotary q, k and v (``[T, ·]`` each, no ``[T, T]`` pattern), then :meth:`walk` goes from the prediction
    node down and computes only the rows of the queries the route can reach at each layer, recomputing those
    rows of the pattern (``softmax(q kᵀ · scale)``, causal, as the model computes it) on the way. Only the
    visited rows' importances are kept (``rows``: their positions), so memory grows as ``T``, not ``T²``.
    Where q/k cannot stand in for the pattern (an edit of the pattern, or a backend without post-rotary q/k)
    the pass keeps each layer's ``[H, T, T]`` pattern instead, as many bytes as all-position importances.
    """

    def __init__(self, probe, T: int, cfg: Config, *, store_patterns: bool = False):
        i = probe.info
        self.probe, self.cfg, self.T = probe, cfg, T
        self.L, self.H, self.d = i.n_layers, i.n_heads, i.d_model
        self.parallel = i.parallel_blocks
        self.dt = getattr(torch, cfg.dtype)
        self.route_mode = cfg.mode == "route"
        self.store_patterns = store_patterns
        self.kernel = resolve_kernel(cfg.kernel, self.L, T, self.H, self.d)
        dev = probe.device
        z = lambda *s: torch.zeros(*s, dtype=self.dt, device=dev)  # noqa: E731
        self.attn = None if self.route_mode else z(self.L, T, T, self.H)
        self.rows: torch.Tensor | None = None  # top-down: positions of attn's query axis
        self._attn_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._row_bytes = 0
        self.attn_resid = z(self.L, T)
        self.ffn = z(self.L, T)
        self.ffn_resid = z(self.L, T)
        self.attn_bias = z(self.L, T) if cfg.include_bias else None
        self.neurons = z(self.L, T, i.d_mlp) if cfg.level == "neuron" else None
        self.neuron_resid = z(self.L, T) if cfg.level == "neuron" else None
        self.res = {k: z(self.L, T, self.d) for k in ("resid_mid", "mlp_out", "resid_post")} if cfg.keep_residuals else None
        self.computed = torch.zeros(self.L, T, dtype=torch.bool)
        self.embed = None
        self._cur: dict[str, torch.Tensor] = {}
        self._layers: list[dict[str, torch.Tensor]] = [{} for _ in range(self.L)]

    def reads(self) -> dict[str, Callable[[torch.Tensor], None]]:
        """Read functions for ``probe.run``: each site's tensor goes to :meth:`visit` inside the hook."""
        r: dict[str, Callable[[torch.Tensor], None]] = {}
        recompute = self.route_mode and not self.store_patterns
        for L in range(self.L):
            # top-down keeps resid_pre of layer 0 only: layer L's input is layer L - 1's resid_post
            kinds = ["resid_pre"] if (L == 0 or not self.route_mode) else []
            kinds += ["q", "k", "v"] if recompute else ["v", "pattern"]
            kinds += ["mlp_out", "resid_post"]
            if not self.parallel:
                kinds.append("resid_mid")
            if self.cfg.level == "neuron":
                kinds.append("mlp_post")
            for k in kinds:
                name = Site(k, L).name
                r[name] = lambda x, L=L, k=k: self.visit(L, k, x)
        return r

    def visit(self, L: int, kind: str, x: torch.Tensor) -> None:
        if self.route_mode:  # kept in the model's dtype until the walk reaches the layer
            x = x[0]
            if kind == "resid_pre":
                self.embed = x.to(self.dt).clone()
            self._layers[L][kind] = x
            return
        x = x[0].to(self.dt)  # batch of one
        if kind == "resid_pre" and L == 0:
            self.embed = x.clone()
        c = self._cur
        c[kind] = x
        if kind == "resid_mid" or (kind == "resid_post" and self.parallel):
            self._attention(L, c, None, c["pattern"])
        if kind == "resid_post":
            if not self.parallel:
                self._ffn(L, c, None)
            self._neurons_and_residuals(L, c, None)
            self.computed[L] = True
            self._cur = {}

    # -------------------------------------------------------------- one block, some (or all) queries
    def _attention(self, L: int, c: dict[str, torch.Tensor], rows: torch.Tensor | None, pattern: torch.Tensor) -> torch.Tensor:
        """The block's importances for ``rows`` (None: every query); ``pattern`` is [H, T, T], or [H, R, T] for ``rows``
        (top-down). Returns the attention part importances [R, T, H]."""
        cfg = self.cfg
        whole = c["resid_post"] if self.parallel else c["resid_mid"]
        W_O = self.probe.W_O(L).to(self.dt)  # [H, h, d]
        # keys after the last query read no value: top-down projects only the keys up to its last row
        v = c["v"] if rows is None else c["v"][: int(rows.max()) + 1]  # [T', K, h]
        T, K, h = v.shape
        # GQA: query head h reads KV head h // (H / K); grouping the H heads as [K, H / K] needs no copy of v
        vo = torch.einsum("tkh,kghd->tkgd", v, W_O.reshape(K, self.H // K, h, self.d)).reshape(T, self.H, self.d)
        extras = []
        b_O = self.probe.b_O(L)
        if cfg.include_bias and b_O is not None:
            extras.append(b_O.to(self.dt).expand(self.T, self.d))
        if self.parallel:
            extras.append(c["mlp_out"])
        a, r, e = attention_importance(c["resid_pre"], whole, pattern, vo, p=cfg.p, eps=cfg.eps,
                                       extra_parts=torch.stack(extras, 1) if extras else None,
                                       query_chunk=cfg.query_chunk, chunk_mb=cfg.chunk_mb, queries=rows, kernel=self.kernel,
                                       pattern_rows=rows is not None)
        idx = slice(None) if rows is None else rows
        if rows is None:
            self.attn[L] = a
        else:
            self._attn_rows[L] = (rows, a)
        self.attn_resid[L, idx] = r
        if cfg.include_bias:
            self.attn_bias[L, idx] = e[:, 0] if (b_O is not None) else 0.0
        if self.parallel:
            self.ffn[L, idx] = e[:, -1]
        return a

    def _ffn(self, L: int, c: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        idx = slice(None) if rows is None else rows
        f, r = ffn_importance(c["resid_mid"][idx], c["mlp_out"][idx], c["resid_post"][idx], p=self.cfg.p, eps=self.cfg.eps)
        self.ffn[L, idx], self.ffn_resid[L, idx] = f, r

    def _neurons_and_residuals(self, L: int, c: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        cfg = self.cfg
        idx = slice(None) if rows is None else rows
        post_resid = c["resid_post"]
        if cfg.level == "neuron":
            W_out = self.probe.W_out(L).to(self.dt)
            n, r = neuron_importance((post_resid - c["mlp_out"])[idx], c["mlp_post"][idx], W_out, post_resid[idx],
                                     p=cfg.p, eps=cfg.eps, query_chunk=cfg.query_chunk, chunk_mb=cfg.chunk_mb, kernel=self.kernel)
            self.neurons[L, idx], self.neuron_resid[L, idx] = n, r
        if self.res is not None:
            self.res["resid_post"][L] = post_resid
            self.res["mlp_out"][L] = c["mlp_out"]
            self.res["resid_mid"][L] = c.get("resid_mid", post_resid - c["mlp_out"])

    # -------------------------------------------------------------- top-down walk
    def _pattern_rows(self, L: int, c: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Layer L's attention probabilities of the queries ``rows``: [H, R, T] (recomputed from q and k, or sliced
        from the stored pattern)."""
        if "pattern" in c:
            return c["pattern"][:, rows.to(c["pattern"].device)]
        attn = self.probe.module(self.probe.arch.attn, layer=L)
        scale = float(getattr(attn, "scaling", None) or 1 / math.sqrt(self.probe.info.d_head))
        rd = rows.to(c["q"].device)
        k = c["k"].float()  # [T, K, h]
        K = k.shape[1]
        q = c["q"][rd].float()  # [R, H, h], post-rotary (as the model's attention receives it)
        q = q.reshape(q.shape[0], K, self.H // K, q.shape[-1])  # query head h reads KV head h // (H / K)
        scores = torch.einsum("rkge,tke->kgrt", q, k).reshape(self.H, q.shape[0], self.T) * scale
        kpos = torch.arange(self.T, device=q.device)[None, :]
        allowed = kpos <= rd[:, None]
        window = self.probe.attention_window(L)
        if window is not None:
            allowed = allowed & (rd[:, None] - kpos < window)
        return torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1).to(self.dt)

    def walk(self, position: int) -> None:
        """Top-down: compute the rows of layer l only for positions whose residual node the route reaches.

        The reachable set of layer l - 1 follows from layer l's thresholded weights exactly as the graph
        builds its edges, so the route equals the one from ``mode="all"``.
        """
        cfg = self.cfg
        budget = cfg.max_memory_gb * 2**30  # for the layer store and the visited rows together
        self._row_bytes = _top_down_bytes(self.probe.info, self.T, getattr(torch, self.probe.info.dtype).itemsize, self.store_patterns)
        need = torch.tensor([position])
        for L in range(self.L - 1, -1, -1):
            c = {k: v.to(self.dt) for k, v in self._layers[L].items()}
            c["resid_pre"] = self.embed if L == 0 else self._layers[L - 1]["resid_post"].to(self.dt)
            rows = need.sort().values
            self._row_bytes += rows.numel() * self.T * self.H * self.dt.itemsize
            if self._row_bytes > budget:
                raise OutOfMemoryError(
                    f"the route reaches {rows.numel()} positions at layer {L}; their importances over {self.T} keys and "
                    f"the stored layers exceed max_memory_gb={cfg.max_memory_gb}.",
                    hint="Raise tau (fewer edges), shorten the prompt or raise max_memory_gb.")
            if not self.parallel:
                self._ffn(L, c, rows)
            att = self._attention(L, c, rows, self._pattern_rows(L, c, rows))
            self._neurons_and_residuals(L, c, rows)
            self.computed[L, rows] = True
            self._layers[L] = {k: v for k, v in self._layers[L].items() if k == "resid_post"}  # layer L + 1 is done
            if L + 1 < self.L:
                self._layers[L + 1] = {}
            if L == 0:
                break
            # positions j whose node I{L-1}_j has an edge into a reached node of layer L
            ar, ffn, fr = self.attn_resid[L, rows], self.ffn[L, rows], self.ffn_resid[L, rows]
            if cfg.renormalize:
                att, ar, ffn, fr = _renorm_arrays(att[None], ar[None], ffn[None], fr[None], cfg.tau, self.parallel)
                att, ar, ffn, fr, thr = att[0], ar[0], ffn[0], fr[0], 0.0
            else:
                thr = cfg.tau
            reach = (att.sum(-1) > thr).any(0)  # [T] keys feeding any reached query
            rows_d = rows.to(reach.device)
            reach[rows_d] |= ar > thr  # the residual edge keeps the position
            if self.parallel:
                reach[rows_d] |= ffn > thr  # M{L}_i reads I{L-1}_i
            need = torch.nonzero(reach).flatten().cpu()  # the one host sync per layer: which rows to compute next
            if need.numel() == 0:
                break
        self._layers = [{} for _ in range(self.L)]
        self._gather()

    def _gather(self) -> None:
        """The visited rows of every layer in one array: attn [L, R, T, H] over the union of their positions."""
        rows = sorted({int(p) for r, _ in self._attn_rows.values() for p in r.tolist()})
        self.rows = torch.tensor(rows, dtype=torch.long)
        at = {p: n for n, p in enumerate(rows)}
        dev = self.attn_resid.device
        self.attn = torch.zeros(self.L, len(rows), self.T, self.H, dtype=self.dt, device=dev)
        for L, (r, a) in self._attn_rows.items():
            self.attn[L, torch.tensor([at[int(p)] for p in r.tolist()], device=dev)] = a
        self._attn_rows = {}

    def fields(self) -> dict[str, Any]:
        """The result's arrays (on the CPU): the fields :class:`RoutesResult` takes from a decomposition."""
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        every = bool(self.computed.all())
        return dict(attn=self.attn.cpu(), attn_resid=self.attn_resid.cpu(), ffn=self.ffn.cpu(), ffn_resid=self.ffn_resid.cpu(),
                    parallel=self.parallel, attn_bias=cpu(self.attn_bias), neurons=cpu(self.neurons),
                    neuron_resid=cpu(self.neuron_resid), computed=None if every else self.computed,
                    rows=None if self.rows is None or (every and len(self.rows) == self.T) else self.rows)


_ROUTE_EDIT_KINDS = ("pattern", "q", "k", "v", "mlp_pre", "mlp_post", "mlp_out")


def _route_edits(edits: Sequence) -> list:
    """Edits a decomposition stays exact under; zero-ablating heads at hook_z becomes zero attention."""
    from probes.edits import Ablate, ZeroAttention

    out = []
    for e in edits or ():
        kind = e.target.kind
        if isinstance(e, Ablate) and kind in ("z", "result") and e.mode == "zero" and e.positions is None and e.neurons is None:
            out.append(ZeroAttention(layer=e.target.layer, heads=e.heads))  # A_h = 0  <=>  z_h = 0
        elif kind in _ROUTE_EDIT_KINDS:
            out.append(e)
        else:
            raise ConfigError(
                f"routes cannot decompose a run edited at {e.target.name} ({type(e).__name__}): the parts would no "
                f"longer add up to the block output.",
                hint="Edit attention patterns, q/k/v or MLP sites, or zero-ablate whole heads at hook_z "
                     "(Ablate('blocks.L.attn.hook_z', heads=[h])).")
    return out


def _check_supported(probe) -> None:
    a = probe.arch
    if a.attn_out[0] != a.attn:
        raise UnsupportedModelError(
            f"{probe.info.family} normalises the attention output before adding it to the residual "
            f"(attn_out is {a.attn_out[0]}.{a.attn_out[1]}), so per-head parts do not add up to the block output.",
            hint="Routes support pre-LN blocks: llama, mistral, qwen2, qwen3, olmo, gpt2 and gpt_neox.",
        )


def _resolve_position(position: int, T: int) -> int:
    if not -T <= position < T:
        raise InputError(f"position={position} is outside the prompt of {T} tokens.",
                         hint=f"Use a position in {-T}..{T - 1} (-1 = the last token).")
    return position % T


def max_route_tokens(info, max_memory_gb: float, itemsize: int = 4, *, patterns: bool = False) -> int:
    """Longest prompt whose top-down (``mode="route"``) store fits in ``max_memory_gb``: every layer's residuals,
    q, k and v (``itemsize`` bytes each; :func:`_top_down_bytes`), and with ``patterns`` each layer's [H, T, T] pattern too."""
    budget = max_memory_gb * 2**30
    lo, hi = 0, 1 << 22
    while hi - lo > 1:  # the store grows monotonically with T
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _top_down_bytes(info, mid, itemsize, patterns) <= budget else (lo, mid)
    return lo


def _top_down_bytes(s, T: int, itemsize: int, patterns: bool = False) -> int:
    """Bytes the top-down pass keeps until its walk: per layer resid_mid, mlp_out, resid_post, q, k and v (or v and the
    [H, T, T] pattern), and the [L, T] importances of every position. ``s``: a :class:`probes.ModelInfo` or planner shape."""
    L, H, K, h, d = s.n_layers, s.n_heads, s.n_kv_heads, s.d_head, s.d_model
    per_token = 3 * d + K * h + (0 if patterns else H * h + K * h)
    return L * T * per_token * itemsize + (L * H * T * T * 4 if patterns else 0) + 4 * L * T * 4


@torch.no_grad()
def _compute(probe, tokens: torch.Tensor, cfg: Config, edits: Sequence = ()) -> _Decomposer:
    _check_supported(probe)
    T = tokens.shape[-1]
    item = 8 if cfg.dtype == "float64" else 4
    edits = _route_edits(edits)
    # top-down recomputes the visited rows of each pattern from q and k, unless an edit changes the pattern itself
    patterns = cfg.mode == "route" and any(e.target.kind == "pattern" for e in edits)
    _check_length(probe, T, cfg, item, patterns)
    dec = _Decomposer(probe, T, cfg, store_patterns=patterns)
    try:
        probe.run(tokens, reads=dec.reads(), edits=edits, return_logits=False)
    except UnsupportedModelError:
        if cfg.mode != "route" or patterns:
            raise
        # no post-rotary q/k on this backend (TransformerLens' GPT-NeoX): keep the patterns instead
        _check_length(probe, T, cfg, item, True)
        dec = _Decomposer(probe, T, cfg, store_patterns=True)
        probe.run(tokens, reads=dec.reads(), edits=edits, return_logits=False)
    if dec.route_mode:
        dec.walk(_resolve_position(cfg.position, T))
    return dec


def _check_length(probe, T: int, cfg: Config, item: int, patterns: bool) -> None:
    """Refuse (before any forward pass) a prompt whose stored arrays exceed ``cfg.max_memory_gb``, naming the length that fits."""
    i = probe.info
    if cfg.mode == "route":
        limit = max_route_tokens(i, cfg.max_memory_gb, getattr(torch, i.dtype).itemsize, patterns=patterns)
        what = ("stored residuals and attention patterns" if patterns else "stored residuals, queries, keys and values")
    else:
        limit = max_prompt_tokens(i.n_layers, i.n_heads, cfg.max_memory_gb, item)
        what = "route importances"
    if T > limit:
        raise OutOfMemoryError(
            f"the prompt is {T} tokens long; with max_memory_gb={cfg.max_memory_gb} this model's {what} "
            f"fit prompts of at most {limit} tokens" + ("" if cfg.mode == "route" else " (top-down mode='route' fits longer ones)") + ".",
            hint="Shorten the prompt or raise max_memory_gb.")


# ============================================================================ result
def _renorm_arrays(attn, attn_resid, ffn, ffn_resid, tau: float, parallel: bool):
    """Threshold + renormalise every block (attention over T_k*H parts + resid; FFN over 2 parts).

    attn [L, Q, T_k, H]; the others [L, Q] (Q = T_k for a whole result, fewer for a top-down subset).
    """
    L, Q, K, H = attn.shape
    if parallel:
        parts = torch.cat([attn.reshape(L, Q, K * H), ffn.unsqueeze(-1)], -1)
        pk, rk = threshold_renormalize(parts, attn_resid, tau)
        return pk[..., : K * H].reshape(L, Q, K, H), rk, pk[..., -1], torch.zeros_like(ffn_resid)
    pk, rk = threshold_renormalize(attn.reshape(L, Q, K * H), attn_resid, tau)
    fk, frk = threshold_renormalize(ffn.unsqueeze(-1), ffn_resid, tau)
    return pk.reshape(L, Q, K, H), rk, fk[..., 0], frk


@register_result
@dataclass(frozen=True, kw_only=True)
class RoutesResult(Result):
    """Edge importances of every block at every position of one prompt.

    Arrays (L layers, T positions, H query heads, F MLP hidden units; raw, ε-clipped importances):
        attn [L, T_q, T_k, H]; attn_resid [L, T]; ffn [L, T]; ffn_resid [L, T] (zeros for parallel blocks,
        whose residual part is attn_resid); attn_bias [L, T] if include_bias; neurons [L, T, F] and
        neuron_resid [L, T] at level "neuron"; residuals {resid_mid, mlp_out, resid_post: [L, T, d], embed: [T, d]}
        if keep_residuals.
    """

    analysis: ClassVar[str] = "routes"

    saved_views: ClassVar = (("table", "edges", lambda r: r.to_frame()), ("table", "route", lambda r: r.route_frame()),
                             ("array", "head_importance", lambda r: r.head_importance().float()),
                             ("extra", "position", lambda r: r.position), ("extra", "route", lambda r: _node_link(r.route())),
                             ("table", "attn_lower", lambda r: _lower_table(pack_causal(r.attn, r.rows))),
                             ("array", "attn_upper", lambda r: pack_causal(r.attn, r.rows).get("upper")),
                             ("array", "attn", lambda r: pack_causal(r.attn, r.rows).get("dense")))

    tokens: torch.Tensor = stored("array")
    str_tokens: list[str] = stored("extra")
    # stored packed (see saved_views): the keys up to each query, zstd-compressed in the table ``attn_lower``, and each
    # row's one value beyond them in the array ``attn_upper``; results saved before packing hold the array ``attn``
    attn: torch.Tensor = stored(None, read=lambda s: _read_attn(s))
    attn_resid: torch.Tensor = stored("array")
    ffn: torch.Tensor = stored("array")
    ffn_resid: torch.Tensor = stored("array")
    parallel: bool = stored("extra", default=False)
    attn_bias: torch.Tensor | None = stored("array", default=None)
    neurons: torch.Tensor | None = stored("array", default=None)
    neuron_resid: torch.Tensor | None = stored("array", default=None)
    # float16 on disk when every value fits (they are only read through the logit lens), float32 again on load
    residuals: dict[str, torch.Tensor] = stored("arrays", key="residual", default_factory=dict,
                                                save=lambda r: {k: half_if_fits(v) for k, v in r.residuals.items()},
                                                read=lambda s: _read_residuals(s))
    # [L, T] rows computed (top-down mode); None = every row
    computed: torch.Tensor | None = stored("array", default=None, load=lambda a: a.bool())
    # interventions applied during the forward pass (e.g. "ZeroAttention L5 heads=[3]")
    edits: tuple[str, ...] = stored("extra", default=())
    # top-down: the positions of attn's query axis (the rows the walk visited); None = every position
    rows: torch.Tensor | None = stored("array", default=None)

    # ------------------------------------------------------------------ shape helpers
    @property
    def n_layers(self) -> int:
        return self.attn.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.attn.shape[2]

    @property
    def query_positions(self) -> torch.Tensor:
        """The positions of ``attn``'s query axis: every position, or the rows a top-down walk visited."""
        return torch.arange(self.n_tokens) if self.rows is None else self.rows

    @property
    def n_heads(self) -> int:
        return self.attn.shape[3]

    @property
    def position(self) -> int:
        return _resolve_position(self.config.position, self.n_tokens)

    def weights(self, tau: float | None = None, renormalize: bool | None = None):
        """Edge weights used by the graph: (attn, attn_resid, ffn, ffn_resid, extraction threshold)."""
        tau = self.config.tau if tau is None else tau
        renorm = self.config.renormalize if renormalize is None else renormalize
        if not 0 < tau < 1:
            raise ConfigError(f"tau={tau!r} is outside (0, 1).", hint="Use a threshold such as 0.04.")
        # attn's rows are query_positions; the per-position arrays are gathered to match them for the threshold
        q = self.rows
        ar, ffn, fr = (x if q is None else x[:, q] for x in (self.attn_resid, self.ffn, self.ffn_resid))
        if renorm:
            a, ar, ffn, fr = _renorm_arrays(self.attn, ar, ffn, fr, tau, self.parallel)
            thr = 0.0
        else:
            a, thr = self.attn, tau
        if q is not None:  # back to [L, T] for the per-position arrays (rows not visited stay 0)
            ar, ffn, fr = (self.attn_resid.new_zeros(self.attn_resid.shape).index_copy_(1, q, x) for x in (ar, ffn, fr))
        return a, ar, ffn, fr, thr

    # ------------------------------------------------------------------ graph (analyses.routes_graph)
    def graph(self, tau: float | None = None, renormalize: bool | None = None):
        """The full thresholded graph over all positions (see :func:`analyses.routes_graph.build_graph`)."""
        from .routes_graph import build_graph

        attn, ar, ffn, fr, thr = self.weights(tau, renormalize)
        return build_graph(attn, ar, ffn, fr, thr, self.str_tokens, self.parallel, rows=self.rows)

    def route(self, position: int | None = None, tau: float | None = None, renormalize: bool | None = None, graph=None):
        """The route to the prediction at ``position`` (see :func:`analyses.routes_graph.extract_route`)."""
        from .routes_graph import extract_route

        pos = _resolve_position(self.config.position if position is None else position, self.n_tokens)
        self._check_partial(pos, tau, renormalize)
        g = graph if graph is not None else self.graph(tau, renormalize)
        return extract_route(g, self.n_layers, pos, self.str_tokens[pos])

    def _check_partial(self, pos: int, tau: float | None, renormalize: bool | None) -> None:
        """A top-down result holds only the rows its own route reaches: other routes need mode='all'."""
        if self.computed is None or bool(self.computed.all()):
            return
        same = (pos == self.position and (tau is None or tau == self.config.tau)
                and (renormalize is None or renormalize == self.config.renormalize))
        if not same:
            raise ConfigError(
                f"this result was computed top-down (mode='route') for position {self.position} at tau={self.config.tau}; "
                f"it has no rows for position {pos} or another threshold.",
                hint="Re-run with routes.Config(mode='all') to explore every position and threshold.")

    def head_importance(self, position: int | None = None, tau: float | None = None, renormalize: bool | None = None,
                        route=None) -> torch.Tensor:
        """[L, H]: Σ of each head's part importances over the attention edges of the route."""
        from .routes_graph import head_importance

        return head_importance(route if route is not None else self.route(position, tau, renormalize), self.n_layers, self.n_heads)

    def head_importance_all(self) -> torch.Tensor:
        """[L, H]: mean over query positions (the computed ones, top-down) of each head's total importance (no threshold)."""
        a = self.attn.sum(2).double().cpu()  # [L, R, H]
        if self.computed is None:
            return a.mean(1)
        m = self.computed[:, self.query_positions].double()  # [L, R]
        return (a * m[..., None]).sum(1) / m.sum(1).clamp_min(1)[:, None]

    def to_graphml(self, path: str | Path, position: int | None = None, *, full: bool = False) -> Path:
        """Write the route (or the full thresholded graph) as GraphML (per-head vectors as JSON strings)."""
        from .routes_graph import write_graphml

        return write_graphml(self.graph() if full else self.route(position), path)

    def logit_lens(self, probe, nodes: Iterable[str], k: int = 5) -> dict[str, list[tuple[str, float]]]:
        """Top-k tokens of each node's residual read through the final norm and unembedding (needs keep_residuals;
        see :func:`analyses.routes_lens.node_lens`)."""
        from .routes_lens import node_lens

        return node_lens(probe, self.residuals, nodes, k)

    # ------------------------------------------------------------------ tables & plots
    def to_frame(self) -> pd.DataFrame:
        """Tidy edge table of raw importances: one row per (layer, target pos, source pos, kind[, head]).

        Columns: model, layer, head (per-head attention rows at level 'head'; otherwise attention rows are
        head-summed and head is <NA>), pos, token, source_pos, source_token, kind (attn|attn_resid|ffn|ffn_resid), value.
        """
        L, R, T, H = self.attn.shape
        toks = np.array(self.str_tokens, dtype=object)
        model = self.model.get("name", "")
        frames = []
        qpos = self.query_positions.numpy()
        done = np.ones((L, T), bool) if self.computed is None else self.computed.numpy()
        a = self.attn.detach().cpu().double().numpy()
        for l in range(L):
            # (row, key) pairs of computed rows, keys up to the query (top-down: the visited rows only)
            ri, kj = np.nonzero((np.arange(T)[None, :] <= qpos[:, None]) & done[l, qpos][:, None])
            qi = qpos[ri]
            if self.config.level == "head":
                vals = a[l][ri, kj]  # [n, H]
                frames.append(pd.DataFrame({"layer": l, "head": np.tile(np.arange(H), len(ri)), "pos": np.repeat(qi, H),
                                            "source_pos": np.repeat(kj, H), "kind": "attn", "value": vals.reshape(-1)}))
            else:
                frames.append(pd.DataFrame({"layer": l, "head": None, "pos": qi, "source_pos": kj,
                                            "kind": "attn", "value": a[l].sum(-1)[ri, kj]}))
        ar, f, fr = (t.detach().cpu().double().numpy() for t in (self.attn_resid, self.ffn, self.ffn_resid))
        for l in range(L):
            pos = np.nonzero(done[l])[0]
            ar_l, f_l, fr_l = ar[l][pos], f[l][pos], fr[l][pos]
            frames.append(pd.DataFrame({"layer": l, "head": None, "pos": pos, "source_pos": pos, "kind": "attn_resid", "value": ar_l}))
            frames.append(pd.DataFrame({"layer": l, "head": None, "pos": pos, "source_pos": pos, "kind": "ffn", "value": f_l}))
            if not self.parallel:
                frames.append(pd.DataFrame({"layer": l, "head": None, "pos": pos, "source_pos": pos, "kind": "ffn_resid", "value": fr_l}))
        df = pd.concat(frames, ignore_index=True)
        df["head"] = df["head"].astype("Int64")
        df.insert(0, "model", model)
        df["token"] = toks[df["pos"].to_numpy()]
        df["source_token"] = toks[df["source_pos"].to_numpy()]
        return df[["model", "layer", "head", "pos", "token", "source_pos", "source_token", "kind", "value"]]

    def route_frame(self, position: int | None = None, tau: float | None = None, renormalize: bool | None = None) -> pd.DataFrame:
        """The route's edges: source, target, kind, layer, weight."""
        from .routes_graph import route_frame

        return route_frame(self.route(position, tau, renormalize))

    def plot(self, position: int | None = None, tau: float | None = None, renormalize: bool | None = None,
             hover: dict[str, str] | None = None, route=None):
        """Route graph over the prompt (see :func:`analyses.routes_plots.plot_route`)."""
        from .routes_plots import plot_route

        r = route if route is not None else self.route(position, tau, renormalize)
        return plot_route(r, self.str_tokens, self.n_layers, self.parallel, hover)

    def plot_heads(self, position: int | None = None, tau: float | None = None, renormalize: bool | None = None):
        """Layer × head heat map of head importance in the route."""
        from .routes_plots import plot_heads

        return plot_heads(self.head_importance(position, tau, renormalize))




def pack_causal(attn: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored form of importances ``attn`` [L, R, T, H] (R query rows at positions ``rows``, every position when
    None): ``lower`` [L, N, H] holds each row's keys up to its query (N = Σ (q + 1): T(T + 1)/2 for a whole result),
    ``upper`` [L, R] the one value every later key of that row holds (ε divided by the row's sum; 0 for the last
    position, which has no later key). :func:`unpack_causal` gives ``attn`` back bit for bit; importances whose later
    keys do not hold one value per row are returned whole (``{"dense": attn}``), never approximated."""
    L, R, T, H = attn.shape
    mask = _causal_mask(rows, R, T)
    upper = attn[:, :, T - 1, 0].clone()
    q = torch.arange(T) if rows is None else rows.cpu().long()
    upper[:, q == T - 1] = 0
    if not torch.equal(torch.where(mask[None, :, :, None], attn, upper[:, :, None, None]), attn):
        return {"dense": attn}
    return {"lower": attn[:, mask], "upper": upper}


def unpack_causal(lower: torch.Tensor, upper: torch.Tensor, T: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The importances [L, R, T, H] that :func:`pack_causal` stored as ``lower`` [L, N, H] and ``upper`` [L, R]."""
    (L, R), H = upper.shape, lower.shape[-1]
    mask = _causal_mask(rows, R, T)
    if lower.shape[:2] != (L, int(mask.sum())):
        raise InputError(f"the stored importances ({tuple(lower.shape)}) do not fit {R} rows over {T} tokens; the result is damaged.",
                         hint="Re-run the analysis.")
    attn = upper[:, :, None, None].expand(L, R, T, H).clone()
    attn[:, mask] = lower
    return attn


def _causal_mask(rows: torch.Tensor | None, R: int, T: int) -> torch.Tensor:
    """[R, T]: key k is at or before row r's query position."""
    q = torch.arange(T) if rows is None else rows.cpu().long()
    if q.numel() != R:
        raise InputError(f"{R} stored importance rows but {q.numel()} query positions; the result is damaged.", hint="Re-run the analysis.")
    return torch.arange(T)[None, :] <= q[:, None]


def _lower_table(packed: Mapping[str, torch.Tensor]) -> pd.DataFrame | None:
    """The packed importances ``lower`` [L, N, H] as a one-column table (``value``, in [L, N, H] order), or None when
    :func:`pack_causal` kept them whole."""
    if "lower" not in packed:
        return None
    return pd.DataFrame({"value": packed["lower"].reshape(-1).numpy()})


def _read_attn(s) -> torch.Tensor:
    """The importances of a stored result: packed (the table ``attn_lower`` and the array ``attn_upper``) or whole
    (the array ``attn``: results saved before packing, and importances :func:`pack_causal` keeps whole)."""
    a = s.arrays
    if "attn" in a:
        return a["attn"]
    if "attn_lower" not in s.tables or "attn_upper" not in a or "tokens" not in a:
        raise InputError(f"{str(s.path)!r} lacks the importances of its routes result (attn).",
                         hint="The result is incomplete or damaged; re-run the analysis.")
    upper, T, rows = a["attn_upper"], int(a["tokens"].numel()), a.get("rows")
    values = torch.from_numpy(s.tables["attn_lower"]["value"].to_numpy(dtype=upper.numpy().dtype, copy=True))
    L, N = upper.shape[0], int(_causal_mask(rows, upper.shape[1], T).sum())
    if L * N == 0:  # no stored row: the head count comes from the model
        return unpack_causal(values.reshape(L, N, int(s.manifest["model"]["n_heads"])), upper, T, rows)
    if values.numel() % (L * N):
        raise InputError(f"the stored importances ({values.numel()} values) do not fit {upper.shape[1]} rows over {T} tokens "
                         f"in {L} layers; the result is damaged.", hint="Re-run the analysis.")
    return unpack_causal(values.reshape(L, N, -1), upper, T, rows)


FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def half_if_fits(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float16 when every value is finite and within float16's range (a relative error of at most 2^-11 for
    normal values), else unchanged."""
    if not x.is_floating_point() or x.dtype == torch.float16 or x.numel() == 0:
        return x
    return x.half() if bool(torch.isfinite(x).all()) and float(x.abs().max()) <= FLOAT16_MAX else x


def _read_residuals(s) -> dict[str, torch.Tensor]:
    """The kept residuals (``residual.<name>``), float16 ones widened to float32."""
    return {k[len("residual."):]: (v.float() if v.dtype == torch.float16 else v) for k, v in s.arrays.items() if k.startswith("residual.")}


def _node_link(g) -> dict[str, Any]:
    from .routes_graph import node_link

    return node_link(g)


def describe_edit(e) -> str:
    """A short label of an edit for manifests and titles: ``"ZeroAttention blocks.5.attn.hook_pattern heads=[3]"``."""
    bits = [type(e).__name__, e.target.name]
    for k in ("heads", "neurons", "positions", "key", "mode", "scale"):
        v = getattr(e, k, None)
        if v is not None and not (k == "mode" and v == "zero") and not (k == "scale" and v == 1.0):
            bits.append(f"{k}={list(v) if isinstance(v, (tuple, list)) else v}")
    return " ".join(bits)


def _tokens(probe, prompt: str | torch.Tensor | Sequence[int], config: Config) -> torch.Tensor:
    """The prompt's token ids ``[1, T]`` (text is tokenized with ``config.prepend_bos``)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty.", hint="Type a prompt of at least one token.")
        return probe.to_tokens(prompt, prepend_bos=config.prepend_bos)
    tokens = torch.as_tensor(prompt)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise InputError(f"routes take one prompt; got token ids of shape {tuple(tokens.shape)}.", hint="Pass ids of shape [T] or [1, T].")
    return tokens


def _input_hash(tokens: torch.Tensor, described: Sequence[str]) -> str:
    """The input hash of routes over ``tokens`` ``[1, T]`` with the edits ``described`` (:func:`describe_edit`).

    The edits are part of the input: an ablated run must not share the content key of the unedited one."""
    return hash_inputs(tokens.cpu(), *described) if described else hash_inputs(tokens.cpu())


def _prepare(probe, prompt: str | torch.Tensor | Sequence[int], *, config: Config, edits: Sequence = ()) -> registry.Inputs:
    """The prompt's ids ``[1, T]`` and the edits (any spelling :func:`probes.edits.as_edits` reads), with the hash
    that names both (shared by :func:`run` and :data:`result_key`)."""
    if not isinstance(prompt, (str, torch.Tensor, list, tuple)):
        raise InputError(f"routes take one prompt (text or token ids), got {type(prompt).__name__}.",
                         hint="Pass a string, or ids of shape [T] / [1, T].")
    edits = as_edits(edits, probe.info)
    tokens = _tokens(probe, prompt, config)
    described = tuple(describe_edit(e) for e in edits)
    label = registry.tokens_label(probe, tokens) + (f" with {len(described)} edit(s)" if described else "")
    return registry.Inputs(_input_hash(tokens, described), {"tokens": tokens, "edits": edits, "described": described}, label)


def run(probe, prompt: str | torch.Tensor, *, config: Config = Config(), edits: Sequence = (),
        timer: Timer | None = None) -> RoutesResult:
    """Information-flow routes of one prompt.

    Args:
        probe: a loaded :class:`probes.Probe` (pre-LN decoder: llama/mistral/qwen/olmo/gpt2/gpt_neox families).
        prompt: text, or token ids [T] / [1, T].
        config: :class:`Config`; ``mode="all"`` (default) gives every position's graph from one forward pass,
            ``mode="route"`` computes top-down only the rows on the route to ``config.position`` (faster).
        edits: interventions applied during the forward pass, e.g. ``[Ablate("blocks.5.attn.hook_z", heads=[3])]``
            to compare routes with a head ablated. Edits must keep the parts adding up to each block output:
            attention patterns, q/k/v, MLP sites, or zero-ablation of whole heads.

    Returns:
        :class:`RoutesResult`; ``.route()`` is the route to ``config.position``.
    """
    inp = SPEC.inputs(probe, prompt, config=config, edits=edits)
    tokens, edits, described = inp.data["tokens"], inp.data["edits"], inp.data["described"]
    timer = timer or Timer()
    T = tokens.shape[-1]
    _resolve_position(config.position, T)
    with timer("routes"):
        dec = _compute(probe, tokens, config, edits)
    res = {}
    if dec.res is not None:
        res = {k: v.cpu() for k, v in dec.res.items()}
        res["embed"] = dec.embed.cpu()
    return RoutesResult(
        config=config, model=probe.info.to_dict(), input_hash=inp.hash, inputs=inp.label, timings=dict(timer.seconds),
        tokens=tokens[0].cpu(), str_tokens=probe.to_str_tokens(tokens[0]), residuals=res, edits=described, **dec.fields(),
    )


# ============================================================================ declarations
def _itemsize_of(o: Mapping[str, Any]) -> int:
    """Bytes per stored importance: the config's dtype when the plan has the config, else ``route_itemsize``."""
    cfg = o.get("config")
    return 8 if getattr(cfg, "dtype", None) == "float64" else (4 if cfg is not None else o["route_itemsize"])


def _fused_chunk(Q: int, T: int, H: int, chunk_mb: int, itemsize: int) -> int:
    """Queries per chunk of the fused kernel for ``Q`` queries over ``T`` keys: its ``[C, T, H]`` weights and output
    within ``chunk_mb``. (Smaller chunks, each stopping at its last query's key, would skip most of the masked half of
    the square; on a 2-core CPU they measured slower, not faster: benchmarks/RESULTS.md, 2026-12-06.)"""
    return max(1, min(Q, _chunk_size(T, H, 2, chunk_mb, itemsize)))


def _route_memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """All positions (``mode="all"``; a config with ``mode="route"`` gets :func:`_top_down_memory`): the stored
    ``[L, T, T, H]`` importances stay; inside each layer's hook its recomputed ``[H, T, T]`` pattern (scores and
    probabilities, float32), the layer's ``[T, T, H]`` importances and one proximity chunk live together (eager:
    ``[Q, T, H, d]`` parts for ``Q`` queries by :func:`_chunk_size`; fused: the chunk's ``[Q, T, H]`` weights and
    output). The kernel is the one the config resolves to (no config: the default ``kernel="auto"``)."""
    cfg = o.get("config")
    if getattr(cfg, "mode", "all") == "route":
        return _top_down_memory(s, B, T, o)
    H, d, L, a = s.n_heads, s.d_model, s.n_layers, _itemsize_of(o)
    kernel = resolve_kernel(getattr(cfg, "kernel", "auto"), L, T, H, d)
    if kernel == "compiled":
        chunk = _fused_chunk(T, T, H, o["chunk_mb"], a) * T * H * a * 2
    else:  # chunk c of q queries ends at key (c + 1)·q: the largest is the last full chunk, or the partial one after it
        q = _chunk_size(T, H, d, o["chunk_mb"], a)
        chunk = max(q * q * (T // q), (T % q) * T) * H * d * a
    return {"proximity_chunk": chunk, "layer": 2 * H * T * T * 4 + T * T * H * a,
            "importances": L * T * T * H * a + 3 * L * T * a,
            "logits": s.d_vocab * s.itemsize}  # the forward pass computes the last position's logits only


ROUTE_ROWS = 8  # positions per layer a top-down route is planned for (at tau=0.04 the embedded model's visit 2-7; the walk checks the budget itself)


def _top_down_memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """Top-down (``mode="route"``): the layer store of :func:`_top_down_bytes` (in the model's dtype) and the visited
    rows' importances (planned for :data:`ROUTE_ROWS` per layer) stay; the walk's proximity chunk and recomputed
    pattern rows come after the forward pass (which computes the last position's logits only)."""
    H, d, L, a = s.n_heads, s.d_model, s.n_layers, _itemsize_of(o)
    R = min(T, ROUTE_ROWS)
    # the proximity chunk holds one layer's visited rows at once: planned for half the row budget, the middle of the
    # 2-7 a route visits (measured: 186 and 544 MiB peaks at T = 512 and 1,536, estimates 1.19x and 1.16x); a walk
    # that visits more rows checks its budget itself
    q = min(max(1, R // 2), _chunk_size(T, H, d, o["chunk_mb"], a))
    # the forward pass's attention scores of one layer, [H, T, T] in the model's dtype, live beside the full store at
    # the last layer: measured at the full context (T = 8,192: 5.8 GiB peak RSS where the terms without it planned
    # 3.3 GiB; benchmarks/RESULTS.md, 2026-12-07); below T ≈ 2,000 the proximity chunk is larger
    return {"layer_store": _top_down_bytes(s, T, s.itemsize), "importances": L * R * T * H * a,
            "proximity_chunk": q * T * H * d * a, "pattern_rows": 2 * H * R * T * 4, "logits": s.d_vocab * s.itemsize,
            "scores": H * T * T * s.itemsize}


# one memory model for both modes: the terms follow the config's mode (without a config: all positions)
MEMORY = planner.MemoryModel("routes", _route_memory, persistent=("importances", "layer_store"), one_row=True, chunk=_chunk_size,
                             sizes=lambda c: {"chunk_mb": c.chunk_mb}, batch_field="chunk_mb", option="--chunk-mb")
TOP_DOWN_MEMORY = planner.MemoryModel("routes (top-down)", _top_down_memory, persistent=("layer_store", "importances"),
                                      one_row=True, chunk=_chunk_size, sizes=lambda c: {"chunk_mb": c.chunk_mb},
                                      batch_field="chunk_mb", option="--chunk-mb")


def memory_model(mode: str = "all") -> planner.MemoryModel:
    """The planner's memory model of a routes run: all positions (:data:`MEMORY`) or top-down (:data:`TOP_DOWN_MEMORY`)."""
    return TOP_DOWN_MEMORY if mode == "route" else MEMORY


SPEC = registry.register(registry.Analysis(
    name="routes", order=1, title="Information-flow routes", summary="which heads, FFNs and tokens carry a prediction",
    config=Config, result=RoutesResult, run=run, prepare=_prepare, cli="routes", page="routes", memory=MEMORY,
))
result_key = SPEC.key  # the key run() gives these inputs, from the same _prepare

from .routes_explain import AttentionExplanation, explain_attention  # noqa: E402  (QK attribution of one edge)
from .routes_faithful import Faithfulness, faithfulness  # noqa: E402  (ablation checks of a route)


def context_label(prompt: str, model: str) -> str:
    """How a comparison names one context (a prompt on a model): the CLI's ``--compare`` and the page's compare mode."""
    return f"{prompt!r} on {model}"


def context_model(model: str, *, adapter: "str | Path | None" = None, dtype: str | None = None) -> str:
    """How a comparison names a context's model: the model, the LoRA adapter merged into it and its dtype, where given
    (the CLI's ``--model-b`` / ``--adapter-b`` / ``--dtype-b`` and the page's compare modes)."""
    return str(model) + (f" + adapter {str(adapter)!r}" if adapter else "") + (f" in {dtype}" if dtype else "")


def compare(a: RoutesResult, b: RoutesResult, *, position_a: int | None = None, position_b: int | None = None,
            probe_a=None, probe_b=None, target: int | None = None, labels: tuple[str, str] | None = None):
    """Two contexts side by side: two prompts on one model (clean vs corrupted) or one prompt on two models.

    Positions are right-aligned (b's position = a's + ``b.n_tokens - a.n_tokens``), so prompts of equal length align
    one to one. Returns a :class:`analyses.routes_graph.RouteComparison`: kept / lost / gained route edges with
    both weights, Δ head importance [L, H] (b − a) and, with ``probe_a`` (and ``probe_b``, default the same probe),
    p(target) in each context (target: a's top token at its position unless given). ``labels`` name the two contexts
    in exports (default: each result's inputs and model). The comparison keeps both routes:
    ``.plot()``, ``.to_graphml(path)`` and ``.report_html()`` draw and export them.
    """
    from .routes_graph import RouteComparison, compare_routes

    if (a.n_layers, a.n_heads) != (b.n_layers, b.n_heads):
        raise ConfigError(f"the contexts' models differ in shape ({a.n_layers}x{a.n_heads} vs {b.n_layers}x{b.n_heads} "
                          f"layers x heads); routes compare on models of one shape.",
                          hint="Compare two prompts on one model, or two checkpoints of one architecture.")
    pa = _resolve_position(a.config.position if position_a is None else position_a, a.n_tokens)
    offset = b.n_tokens - a.n_tokens
    pb = _resolve_position(pa + offset if position_b is None else position_b, b.n_tokens)
    ra, rb = a.route(pa), b.route(pb)
    edges = compare_routes(ra, rb, offset)
    delta = b.head_importance(route=rb) - a.head_importance(route=ra)
    p = {}
    if probe_a is not None:
        with torch.no_grad():
            la = probe_a.run(a.tokens[None])[0, pa].double().softmax(-1).cpu()
            lb = (probe_b or probe_a).run(b.tokens[None])[0, pb].double().softmax(-1).cpu()
        tgt = int(la.argmax()) if target is None else int(target)
        p = dict(target=tgt, target_token=probe_a.to_str_tokens([tgt])[0], p_a=float(la[tgt]), p_b=float(lb[tgt]))
    if labels is None:
        labels = tuple(f"{r.inputs or 'prompt'} on {r.model.get('name', 'a model')}" for r in (a, b))
    return RouteComparison(edges=edges, head_delta=delta, position_a=pa, position_b=pb, offset=offset, route_a=ra, route_b=rb,
                           str_tokens_a=tuple(a.str_tokens), parallel=a.parallel, labels=tuple(labels), **p)


_MOVED = {"routes_dataset": ("DatasetConfig", "RouteStats", "RouteStatsResult", "run_dataset", "dataset_key", "accumulate",
                             "merge_states", "result_from_state")}


def __getattr__(name: str):
    """Dataset mode is an analysis of its own (:mod:`analyses.routes_dataset`); its names stay importable here."""
    for mod, names in _MOVED.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f"{__package__}.{mod}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
