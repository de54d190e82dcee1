"""Why a head attends: QK attribution of one attention edge (layer, head, query position, key position).

The pre-softmax score of the edge is ``s = q · k · scale`` (scale = 1/√d_h as the module sets it), with
``q = R_i(W_Q · n(x_i) + b_Q)`` and ``k = R_j(W_K · n(x_j) + b_K)``: ``x`` the residual entering the
layer, ``n`` its input norm (LayerNorm or RMSNorm), ``R_t`` the rotary rotation at position t (identity
for learned positions) and, under GQA, ``W_K`` the KV head the query head reads (h // (H / K)).

Each residual is the sum of what wrote it: the embedding, every earlier head (optionally split by the
source position it read from: ``A_h[t, s] · v_h[s] · W_O,h``), each attention output bias, each FFN.
**The norm scales are frozen** at their values on this prompt (the standard attribution-graph trick:
1/σ of the residual at that position is treated as a constant), so the normed residual is linear in the
parts: ``n(x) = Σ_p γ ⊙ (p − mean p) / σ + β`` (LayerNorm) or ``Σ_p γ ⊙ p / σ`` (RMSNorm). The
projection and the rotation are linear, so every part gets its own ``q_p`` and ``k_p``; β, b_Q and b_K
form a ``bias`` part. The score is bilinear::

    s = Σ_p Σ_r q_p · k_r · scale

:class:`AttentionExplanation` holds the full matrix ``pairs [P_q, P_k]``, the query-side marginals
(Σ over key parts), the key-side marginals and the top pairs. The parts add up to the score the model
computes (``model_score``, from ``hook_q``/``hook_k``) within float error.

Example::

    ex = routes.explain_attention(probe, "The cat sat on the mat", layer=5, head=3, query_pos=5, key_pos=2)
    ex.top(5); ex.top_pairs(5)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from probes.errors import InputError, UnsupportedModelError
from probes.labels import head_label
from probes.sites import Site

__all__ = ["AttentionExplanation", "explain_attention", "parse_edge", "MAX_SPLIT_PARTS"]

# input norm of each block, per family (block-relative path); families with q/k norms or (1 + w) norms are out
_INPUT_NORM = {"llama": "input_layernorm", "mistral": "input_layernorm", "qwen2": "input_layernorm",
               "gpt2": "ln_1", "gpt_neox": "input_layernorm"}
MAX_SPLIT_PARTS = 2048  # by_source="auto": split heads by source position while one side has at most this many parts


def parse_edge(text: str) -> tuple[int, int, int, int]:
    """``"L5H3@12->4"`` -> (layer 5, head 3, query position 12, key position 4)."""
    import re

    m = re.fullmatch(r"\s*L(\d+)H(\d+)@(-?\d+)\s*->\s*(-?\d+)\s*", text or "")
    if not m:
        raise InputError(f"cannot read the attention edge {text!r}.",
                         hint="Write LAYER, HEAD, query and key positions as L5H3@12->4.")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


@dataclass(frozen=True)
class AttentionExplanation:
    """QK attribution of one attention edge (see the module docstring).

    Attributes:
        query_parts / key_parts: component names (``embed``, ``L2H5`` or ``L2H5@3`` (head at source position),
            ``L2.attn_bias``, ``L2.mlp``, ``bias``), in the order of the rows / columns of ``pairs``.
        pairs: [P_q, P_k] contributions q_p · k_r · scale; their sum is ``score``.
        score: the sum of the parts; model_score: q · k · scale from the model's own hook_q / hook_k (None where
            the backend gives no post-rotary q/k); probability: the attention weight of the edge.
        residual_error: max |x − Σ parts| over the two residuals (how well the parts rebuild them).
    """

    layer: int
    head: int
    kv_head: int
    query_pos: int
    key_pos: int
    query_token: str
    key_token: str
    query_parts: tuple[str, ...]
    key_parts: tuple[str, ...]
    pairs: np.ndarray
    score: float
    model_score: float | None
    probability: float
    scale: float
    residual_error: float
    norm: str
    frozen_norm: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def query_marginals(self) -> pd.Series:
        """Contribution of each query-side part (summed over key parts)."""
        return pd.Series(self.pairs.sum(1), index=list(self.query_parts), name="contribution")

    @property
    def key_marginals(self) -> pd.Series:
        """Contribution of each key-side part (summed over query parts)."""
        return pd.Series(self.pairs.sum(0), index=list(self.key_parts), name="contribution")

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k largest query-side and key-side contributors by |contribution|: side, component, contribution."""
        rows = []
        for side, s in (("query", self.query_marginals), ("key", self.key_marginals)):
            s = s.reindex(s.abs().sort_values(ascending=False).index)[:k]
            rows += [{"side": side, "component": n, "contribution": float(v)} for n, v in s.items()]
        return pd.DataFrame(rows, columns=["side", "component", "contribution"])

    def top_pairs(self, k: int = 10) -> pd.DataFrame:
        """The k (query part, key part) pairs with the largest |q_p · k_r · scale|."""
        flat = np.abs(self.pairs).ravel()
        k = min(k, flat.size)
        idx = np.argpartition(-flat, k - 1)[:k] if k else np.array([], dtype=int)
        idx = idx[np.argsort(-flat[idx])]
        qi, ki = np.unravel_index(idx, self.pairs.shape)
        return pd.DataFrame({"query_component": [self.query_parts[i] for i in qi],
                             "key_component": [self.key_parts[j] for j in ki],
                             "contribution": self.pairs[qi, ki].astype(float)})

    @property
    def label(self) -> str:
        return f"{head_label(self.layer, self.head)}@{self.query_pos}->{self.key_pos}"

    def qk_edges(self, k: int = 5, parallel: bool = False) -> list[dict[str, Any]]:
        """The top-k query-side and key-side contributors as edges of the route graph (a second kind of edge): each
        from the contributor's node at its side's position (``embed`` → ``X0_t``, a head ``L2H5`` or ``L2H5@s`` and
        ``L2.attn_bias`` → the after-attention node ``A2_t`` (``I2_t`` for parallel blocks), ``L2.mlp`` → ``M2_t``) to
        the node the edge's side reads: the query side into ``A{layer}_{query}`` (``I`` for parallel blocks), the key
        side into the key position's residual ``I{layer-1}_{key}`` (``X0_{key}`` at layer 0). The ``bias`` part has no
        node and is left out. Keys: source, target, side, component, contribution."""
        from probes.labels import node_label

        a = "I" if parallel else "A"
        out = []
        top = self.top(k + 1)  # one more: the bias part may be among them
        for side, pos, target in (("query", self.query_pos, node_label(a, self.layer, self.query_pos)),
                                  ("key", self.key_pos, node_label("X", 0, self.key_pos) if self.layer == 0
                                   else node_label("I", self.layer - 1, self.key_pos))):
            rows = [r for r in top[top.side == side].itertuples() if r.component != "bias"][:k]
            for r in rows:
                c = r.component
                if c == "embed":
                    src = node_label("X", 0, pos)
                else:
                    l = int(c[1:].split("H" if "H" in c.split(".")[0] else ".")[0])
                    src = node_label("M", l, pos) if c.endswith(".mlp") else node_label(a, l, pos)
                out.append({"source": src, "target": target, "side": side, "component": c, "contribution": float(r.contribution)})
        return out

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        """JSON-ready summary: the edge, the score, and the top contributors and pairs."""
        top = self.top(k)
        return {"edge": self.label, "query_token": self.query_token, "key_token": self.key_token,
                "score": self.score, "model_score": self.model_score, "probability": self.probability,
                "scale": self.scale, "norm": self.norm, "frozen_norm": self.frozen_norm,
                "residual_error": self.residual_error, "notes": list(self.notes),
                "query": top[top.side == "query"][["component", "contribution"]].to_dict("records"),
                "key": top[top.side == "key"][["component", "contribution"]].to_dict("records"),
                "pairs": self.top_pairs(k).to_dict("records")}


# ============================================================================ model pieces
def _module(probe, path: str, layer: int | None = None) -> torch.nn.Module:
    """The HF module at ``path`` (the TransformerLens bridge wraps modules; this is the one it wraps)."""
    m = probe.module(path, layer)
    return getattr(m, "_original_component", m)


def _qk_weights(probe, layer: int, head: int, kv: int):
    """(W_Q [h, d], b_Q [h] | None, W_K [h, d], b_K [h] | None) of one query head and its KV head."""
    i, fam = probe.info, probe.info.family
    dh, d = i.d_head, i.d_model
    if fam == "gpt2":
        W = probe.linear_weight("attn.c_attn", layer)  # [3d, d]
        b = _module(probe, "attn.c_attn", layer).bias
        qs, ks = slice(head * dh, (head + 1) * dh), slice(d + kv * dh, d + (kv + 1) * dh)
    elif fam == "gpt_neox":  # fused, per head [q_h, k_h, v_h]
        W = probe.linear_weight("attention.query_key_value", layer)
        b = _module(probe, "attention.query_key_value", layer).bias
        qs, ks = slice(3 * head * dh, 3 * head * dh + dh), slice(3 * kv * dh + dh, 3 * kv * dh + 2 * dh)
    else:
        qm, km = _module(probe, "self_attn.q_proj", layer), _module(probe, "self_attn.k_proj", layer)
        bq = None if qm.bias is None else qm.bias[head * dh:(head + 1) * dh]
        bk = None if km.bias is None else km.bias[kv * dh:(kv + 1) * dh]
        return qm.weight[head * dh:(head + 1) * dh], bq, km.weight[kv * dh:(kv + 1) * dh], bk
    return W[qs], None if b is None else b[qs], W[ks], None if b is None else b[ks]


def _rotation(probe, layer: int, positions: list[int]):
    """A function ``rot(x [P, h], t) -> [P, h]`` applying the model's rotary embedding at position t (identity
    for learned positions), with the model's own rotary module and ``apply_rotary_pos_emb``."""
    if probe.info.positional != "rotary":
        return lambda x, t: x
    root = probe.arch.layers.rpartition(".")[0]  # the rotary module sits beside the blocks (model.rotary_emb)
    try:
        rot = _module(probe, f"{root}.rotary_emb" if root else "rotary_emb")
    except AttributeError:
        rot = None
    apply = None if rot is None else getattr(sys.modules[type(rot).__module__], "apply_rotary_pos_emb", None)
    if rot is None or apply is None:
        raise UnsupportedModelError(f"cannot find the rotary embedding of {probe.info.family}.",
                                    hint="QK attribution supports llama, mistral, qwen2, gpt2 and gpt_neox.")
    dt = probe.W_E.dtype
    pos = torch.tensor([positions], device=probe.device)
    cos, sin = rot(torch.zeros(1, 1, dtype=dt, device=probe.device), pos)  # [1, n, rot_dim]
    table = {t: (cos[:, n:n + 1].double().cpu(), sin[:, n:n + 1].double().cpu()) for n, t in enumerate(positions)}

    def apply_at(x: torch.Tensor, t: int) -> torch.Tensor:
        c, s = table[t]
        y = x[:, None, None, :]  # [P, heads=1, T=1, h]
        out, _ = apply(y, y, c, s)
        return out[:, 0, 0]

    return apply_at


def _norm_parts(probe, layer: int, x: torch.Tensor, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Frozen-scale norm: (normed parts [P, d], normed bias [d], kind), the norm's 1/σ taken from x."""
    fam = probe.info.family
    path = _INPUT_NORM.get(fam)
    if path is None:
        raise UnsupportedModelError(
            f"QK attribution does not support {fam} (its q/k or norm layout is not decomposed here).",
            hint="QK attribution supports llama, mistral, qwen2, gpt2 and gpt_neox.")
    m = _module(probe, path, layer)
    w = getattr(m, "weight", None)
    gamma = torch.ones_like(x) if w is None else w.detach().double().cpu()
    if isinstance(m, torch.nn.LayerNorm):
        sigma = torch.sqrt(x.var(unbiased=False) + m.eps)
        normed = (parts - parts.mean(-1, keepdim=True)) / sigma * gamma
        beta = torch.zeros_like(x) if m.bias is None else m.bias.detach().double().cpu()
        return normed, beta, "LayerNorm"
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
    sigma = torch.sqrt(x.pow(2).mean() + eps)
    return parts / sigma * gamma, torch.zeros_like(x), "RMSNorm"


# ============================================================================ entry point
@torch.no_grad()
def explain_attention(probe, prompt, layer: int, head: int, query_pos: int, key_pos: int, *, config=None,
                      by_source: bool | str = "auto") -> AttentionExplanation:
    """QK attribution of the attention edge (layer, head, query_pos -> key_pos) on ``prompt``.

    Args:
        probe: a loaded probe (llama, mistral, qwen2, gpt2 or gpt_neox family; either backend).
        prompt: text (tokenized with ``config.prepend_bos``) or token ids.
        layer, head: the query head; under GQA its KV head is h // (H / K).
        query_pos, key_pos: positions (negative counts from the end); key_pos <= query_pos.
        config: :class:`analyses.routes.Config` (only ``prepend_bos`` is read).
        by_source: split each earlier head's part by the source position it read from (``"auto"``: while
            one side has at most :data:`MAX_SPLIT_PARTS` parts; otherwise one part per head).

    Returns:
        :class:`AttentionExplanation`; ``pairs.sum() == score`` and score matches the model's own q·k·scale.
    """
    from .routes import Config, _check_supported, _tokens

    cfg = config or Config()
    _check_supported(probe)
    i = probe.info
    tokens = _tokens(probe, prompt, cfg)
    T = tokens.shape[-1]
    if not 0 <= layer < i.n_layers or not 0 <= head < i.n_heads:
        raise InputError(f"no head L{layer}H{head}: the model has {i.n_layers} layers of {i.n_heads} heads.",
                         hint=f"Use layers 0..{i.n_layers - 1} and heads 0..{i.n_heads - 1}.")
    for name, p in (("query", query_pos), ("key", key_pos)):
        if not -T <= p < T:
            raise InputError(f"{name} position {p} is outside the prompt of {T} tokens.", hint=f"Use 0..{T - 1}.")
    qp, kp = query_pos % T, key_pos % T
    if kp > qp:
        raise InputError(f"key position {kp} comes after query position {qp}; a causal head cannot attend there.",
                         hint="Give a key position at or before the query position.")
    kv = head // (i.n_heads // i.n_kv_heads)
    positions = sorted({qp, kp})
    split = (layer * i.n_heads * (qp + 1) <= MAX_SPLIT_PARTS) if by_source == "auto" else bool(by_source)

    got: dict[str, torch.Tensor] = {}

    def keep(name, fn):
        return lambda x: got.__setitem__(name, fn(x[0]).detach().double().cpu())

    rows = torch.tensor(positions)
    reads = {Site("resid_pre", 0).name: keep("embed", lambda x: x[rows])}
    for l in range(layer):
        reads[Site("pattern", l).name] = keep(f"pattern{l}", lambda x: x[:, rows])  # [H, n, T]
        reads[Site("v", l).name] = keep(f"v{l}", lambda x: x)  # [T, K, h]
        reads[Site("mlp_out", l).name] = keep(f"mlp{l}", lambda x: x[rows])
    if layer == 0:  # the layer's input is the embedding itself: one read keeps both names
        reads[Site("resid_pre", 0).name] = lambda x: (got.__setitem__("embed", x[0][rows].detach().double().cpu()),
                                                      got.__setitem__("x", x[0][rows].detach().double().cpu()))
    else:
        reads[Site("resid_pre", layer).name] = keep("x", lambda x: x[rows])
    reads[Site("pattern", layer).name] = keep("p", lambda x: x[head, qp, kp].reshape(1))
    qk = {Site("q", layer).name: keep("q", lambda x: x[qp, head]), Site("k", layer).name: keep("k", lambda x: x[kp, kv])}
    try:
        probe.run(tokens, reads={**reads, **qk}, return_logits=False)
    except UnsupportedModelError:  # no post-rotary q/k on this backend: the score is checked against nothing
        got.clear()
        probe.run(tokens, reads=reads, return_logits=False)

    # parts of the residual at each of the two positions
    names_at: dict[int, list[str]] = {}
    parts_at: dict[int, torch.Tensor] = {}
    for n, t in enumerate(positions):
        names, vecs = ["embed"], [got["embed"][n]]
        for l in range(layer):
            W_O = probe.W_O(l).detach().double().cpu()  # [H, h, d]
            v = got[f"v{l}"]
            if v.shape[1] != i.n_heads:
                from probes.attention import expand_kv

                v = expand_kv(v, i.n_heads, dim=1)
            a = got[f"pattern{l}"][:, n, : t + 1]  # [H, t+1]
            vo = torch.einsum("shk,hkd->shd", v[: t + 1], W_O)  # [t+1, H, d]
            z = a.T[..., None] * vo  # [t+1, H, d]
            for h in range(i.n_heads):
                if split:
                    names += [f"{head_label(l, h)}@{s}" for s in range(t + 1)]
                    vecs += list(z[:, h])
                else:
                    names.append(head_label(l, h))
                    vecs.append(z[:, h].sum(0))
            b = probe.b_O(l)
            if b is not None:
                names.append(f"L{l}.attn_bias")
                vecs.append(b.detach().double().cpu())
            names.append(f"L{l}.mlp")
            vecs.append(got[f"mlp{l}"][n])
        names_at[t], parts_at[t] = names, torch.stack(vecs)

    WQ, bQ, WK, bK = (None if w is None else w.detach().double().cpu() for w in _qk_weights(probe, layer, head, kv))
    rot = _rotation(probe, layer, positions)
    err = 0.0
    side: dict[str, tuple[list[str], torch.Tensor]] = {}
    for which, t, W, b in (("q", qp, WQ, bQ), ("k", kp, WK, bK)):
        n = positions.index(t)
        x = got["x"][n]
        P = parts_at[t]
        err = max(err, float((x - P.sum(0)).abs().max()))
        normed, beta, norm_kind = _norm_parts(probe, layer, x, P)
        proj = normed @ W.T  # [P, h]
        bias = beta @ W.T + (0 if b is None else b)
        vecs = rot(torch.cat([proj, bias[None]]), t)
        side[which] = (names_at[t] + ["bias"], vecs)

    attn = _module(probe, probe.arch.attn, layer)
    scale = float(getattr(attn, "scaling", None) or 1 / math.sqrt(i.d_head))
    pairs = (side["q"][1] @ side["k"][1].T * scale).numpy()
    model_score = float((got["q"] * got["k"]).sum() * scale) if "q" in got else None
    toks = probe.to_str_tokens(tokens[0])
    notes = ("norm scales frozen at this prompt's values (1/σ of each residual held constant)",)
    if not split:
        notes += ("heads summed over source positions (too many parts to split)",)
    if model_score is None:
        notes += (f"the {probe.backend} backend gives no post-rotary q/k for {i.family}: model_score not read",)
    return AttentionExplanation(
        layer=layer, head=head, kv_head=kv, query_pos=qp, key_pos=kp, query_token=toks[qp], key_token=toks[kp],
        query_parts=tuple(side["q"][0]), key_parts=tuple(side["k"][0]), pairs=pairs, score=float(pairs.sum()),
        model_score=model_score, probability=float(got["p"][0]), scale=scale, residual_error=err, norm=norm_kind,
        notes=notes)
