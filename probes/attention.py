"""Attention internals without eager attention: taps on q/k/v and patterns recomputed per layer.

Sonde registers one attention implementation, ``"sonde"``, with transformers' attention interface.
It receives exactly what the model's own attention would (queries and keys after rotary and any
q/k norm, values, the mask, the scale and the soft-cap) and:

* when no tap is active, calls SDPA (or eager attention for soft-capped models, which SDPA does not
  support), so an untouched model runs at SDPA speed;
* passes q, k and v through identity :class:`HookPoint` modules (``attn.sonde_taps.hook_q`` ...) that
  any backend can read or edit;
* only when a run reads or edits ``hook_pattern``, recomputes ``softmax(q kᵀ · scale + mask)`` for
  that layer (GQA expanded, soft-capping and sliding windows respected) and passes it through
  ``hook_pattern``. When the pattern is only read, the layer's output still comes from SDPA; when
  it is edited, the output is ``pattern @ v`` with the edited pattern.

Patterns are never stored across layers: a reducer consumes each layer's pattern in its hook.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping

import torch
from torch import nn

__all__ = ["HookPoint", "AttnTaps", "install_taps", "tap_run", "recompute_pattern", "expand_kv", "ATTN_IMPL"]

ATTN_IMPL = "sonde"


class HookPoint(nn.Module):
    """Identity module: a place where backends read or replace a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AttnTaps(nn.Module):
    """Tap points of one attention module, in site layout ([B, T, heads, h] and [B, H, Tq, Tk])."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_pattern = HookPoint()


# What the current run asks of each tap: {id(taps): (qkv_active, pattern_mode)}, pattern_mode None | "read" | "edit".
# A context variable, not attributes of the shared modules, so the state belongs to the run (and its thread)
# and nothing is left behind when it ends.
_RUN: contextvars.ContextVar[Mapping[int, tuple[bool, str | None]]] = contextvars.ContextVar("sonde_taps", default={})


@contextlib.contextmanager
def tap_run(state: Mapping["AttnTaps", tuple[bool, str | None]]) -> Iterator[None]:
    """Activate taps for one forward pass: ``{taps: (qkv_active, pattern_mode)}``; taps not named stay idle."""
    token = _RUN.set({id(t): v for t, v in state.items()})
    try:
        yield
    finally:
        _RUN.reset(token)


def expand_kv(x: torch.Tensor, n_heads: int, dim: int = 2) -> torch.Tensor:
    """Repeat KV heads to query heads along ``dim`` (query head h reads KV head h // (H / K))."""
    k = x.shape[dim]
    if k == n_heads:
        return x
    if n_heads % k:
        raise ValueError(f"{n_heads} query heads are not a multiple of {k} KV heads")
    return x.repeat_interleave(n_heads // k, dim=dim)


def recompute_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention probabilities from post-rotary q [B, H, Tq, h] and k [B, K, Tk, h] -> [B, H, Tq, Tk] (fp32).

    ``attention_mask`` is what transformers passed to the attention function: ``None`` (plain
    causal), a boolean mask (True = may attend) or an additive float mask.
    """
    B, H, Tq, h = q.shape
    K, Tk = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"{H} query heads are not a multiple of {K} KV heads")
    # query heads j·G … j·G+G−1 read KV head j (expand_kv's grouping, G = H / K): one matmul per KV head over its
    # group's stacked queries gives the same scores without copying k once per query head
    scores = torch.matmul(q.float().reshape(B, K, (H // K) * Tq, h), k.float().transpose(-1, -2)).view(B, H, Tq, Tk)
    scores.mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        kpos = torch.arange(Tk, device=q.device)[None, :]
        blocked = kpos > qpos
        if sliding_window is not None:
            blocked = blocked | (qpos - kpos >= sliding_window)
        # an additive [Tq, Tk] bias: adding it is several times faster than a broadcast masked_fill_; every row
        # keeps at least its own key, so no row is fully masked
        bias = torch.zeros(Tq, Tk, device=q.device).masked_fill_(blocked, float("-inf"))
        return torch.softmax(scores.add_(bias), dim=-1)
    if attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[..., :Tk], float("-inf"))
    else:
        scores.add_(attention_mask[..., :Tk].float())
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # fully masked rows (left padding) -> zeros


def _sonde_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    taps: AttnTaps | None = getattr(module, "sonde_taps", None)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    qkv_active, mode = _RUN.get().get(id(taps), (False, None)) if taps is not None else (False, None)
    if qkv_active:
        query = taps.hook_q(query.transpose(1, 2)).transpose(1, 2)
        key = taps.hook_k(key.transpose(1, 2)).transpose(1, 2)
        value = taps.hook_v(value.transpose(1, 2)).transpose(1, 2)
    if mode is None and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    probs = recompute_pattern(query, key, attention_mask, scaling, softcap, sliding if attention_mask is None else None)
    if mode is not None:
        probs = taps.hook_pattern(probs)
    if mode == "read" and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    v = expand_kv(value, query.shape[1], dim=1)
    out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, None


_REGISTERED = False


def register_attention() -> None:
    """Register the ``"sonde"`` attention function (and SDPA's mask builder) with transformers."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, _sonde_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    _REGISTERED = True


def install_taps(model: nn.Module, attn_modules: list[nn.Module]) -> list[AttnTaps]:
    """Give each attention module a ``sonde_taps`` child and switch the model to the sonde implementation."""
    register_attention()
    taps = []
    for m in attn_modules:
        if not hasattr(m, "sonde_taps"):
            m.sonde_taps = AttnTaps().to(next(m.parameters()).device)
        taps.append(m.sonde_taps)
    model.set_attn_implementation(ATTN_IMPL)
    return taps
