"""Route nodes read through the logit lens: a node's residual vector (kept with
``routes.Config(keep_residuals=True)``) through the model's final norm and unembedding."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from probes.errors import ConfigError

__all__ = ["node_vector", "node_lens"]

_SITE = {"A": "resid_mid", "M": "mlp_out", "I": "resid_post"}  # node kind -> kept residual


def node_vector(residuals: Mapping[str, torch.Tensor], node: str) -> torch.Tensor:
    """The residual vector ``[d]`` of a node ``X0_t`` / ``A{l}_t`` / ``M{l}_t`` / ``I{l}_t``."""
    kind, rest = node[0], node[1:]
    layer, pos = (int(x) for x in rest.split("_"))
    return residuals["embed"][pos] if kind == "X" else residuals[_SITE[kind]][layer, pos]


def node_lens(probe, residuals: Mapping[str, torch.Tensor], nodes: Iterable[str], k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Top-``k`` ``(token, probability)`` of each node's residual read through the final norm and unembedding."""
    if not residuals:
        raise ConfigError("this result kept no residual vectors.", hint="Run with Config(keep_residuals=True).")
    names = list(nodes)
    if not names:
        return {}
    logits = probe.unembed(torch.stack([node_vector(residuals, n) for n in names]).float()).float()
    top = logits.softmax(-1).topk(k, dim=-1)
    tok = probe.tokenizer
    return {n: [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values[r], top.indices[r])] for r, n in enumerate(names)}
