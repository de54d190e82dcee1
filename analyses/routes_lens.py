"""Route nodes read through the logit lens: a node's residual vector (kept with
``routes.Config(keep_residuals=True)``) through the model's final norm and unembedding."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from probes.errors import ConfigError

__all__ = ["node_vector", "node_probs", "node_lens", "top_prediction"]

_SITE = {"A": "resid_mid", "M": "mlp_out", "I": "resid_post"}  # node kind -> kept residual


def node_vector(residuals: Mapping[str, torch.Tensor], node: str) -> torch.Tensor:
    """The residual vector ``[d]`` of a node ``X0_t`` / ``A{l}_t`` / ``M{l}_t`` / ``I{l}_t``."""
    kind, rest = node[0], node[1:]
    layer, pos = (int(x) for x in rest.split("_"))
    return residuals["embed"][pos] if kind == "X" else residuals[_SITE[kind]][layer, pos]


def node_probs(probe, residuals: Mapping[str, torch.Tensor], nodes: Iterable[str]) -> torch.Tensor:
    """``[n, V]``: the full distribution of each node's residual read through the final norm and unembedding."""
    if not residuals:
        raise ConfigError("this result kept no residual vectors.", hint="Run with Config(keep_residuals=True).")
    names = list(nodes)
    if not names:
        return torch.empty(0, probe.info.d_vocab)
    return probe.unembed(torch.stack([node_vector(residuals, n) for n in names]).float()).float().softmax(-1).cpu()


def node_lens(probe, residuals: Mapping[str, torch.Tensor], nodes: Iterable[str], k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Top-``k`` ``(token, probability)`` of each node's residual read through the final norm and unembedding."""
    names = list(nodes)
    top = node_probs(probe, residuals, names).topk(k, dim=-1)
    tok = probe.tokenizer
    return {n: [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values[r], top.indices[r])] for r, n in enumerate(names)}


def top_prediction(probe, residuals: Mapping[str, torch.Tensor], node: str,
                   other: Mapping[str, torch.Tensor] | None = None) -> tuple[int, str, float, float | None]:
    """``(token id, token, p, p_other)``: the most likely token of ``node`` read through the logit lens, its
    probability, and its probability at the same node of ``other`` residuals (e.g. a run with a head ablated), read
    from the full distribution (not only from a top-k list)."""
    p = node_probs(probe, residuals, [node])[0]
    tid = int(p.argmax())
    p_other = float(node_probs(probe, other, [node])[0, tid]) if other is not None else None
    return tid, probe.tokenizer.decode([tid]), float(p[tid]), p_other
