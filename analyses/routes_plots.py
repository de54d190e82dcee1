"""Figures of :mod:`analyses.routes` (plotly, imported lazily): a route drawn over the prompt and the
layer × head importance map."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["plot_route", "plot_heads"]


def plot_route(route, str_tokens: Sequence[str], n_layers: int, parallel: bool = False, hover: dict[str, str] | None = None):
    """Route graph over the prompt: tokens left to right, layers bottom to top, edge width by weight."""
    import plotly.graph_objects as go

    r, L, T = route, n_layers, len(str_tokens)
    sub_y = {"X": -1.0, "A": 0.0, "M": 0.33, "I": 0.66}

    def xy(n):
        d = r.nodes[n]
        k = d["kind"]
        y = -1.0 if k == "X" else d["layer"] + (sub_y[k] if not parallel else {"M": 0.33, "I": 0.66}.get(k, 0))
        return d["pos"] + (0.25 if k == "M" else 0.0), y

    colours = {"attn": "#1f77b4", "resid": "#aaaaaa", "ffn": "#d62728"}
    fig = go.Figure()
    maxw = max((d["weight"] for *_, d in r.edges(data=True)), default=1.0) or 1.0
    for u, v, d in r.edges(data=True):
        (x0, y0), (x1, y1) = xy(u), xy(v)
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text",
                                 text=f"{u} → {v}: {d['weight']:.3f}", showlegend=False,
                                 line=dict(width=0.5 + 6 * d["weight"] / maxw, color=colours.get(d["kind"], "#888"))))
    nodes = list(r.nodes)
    xs, ys = zip(*(xy(n) for n in nodes)) if nodes else ((), ())
    text = [f"{n} ({r.nodes[n]['token']!r})" + (f"<br>{hover[n]}" if hover and n in hover else "") for n in nodes]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", hoverinfo="text", text=text, customdata=nodes, showlegend=False,
                             marker=dict(size=8, color=["#2ca02c" if r.nodes[n]["kind"] == "M" else "#333" for n in nodes])))
    fig.update_layout(
        xaxis=dict(tickmode="array", tickvals=list(range(T)), ticktext=[repr(s)[1:-1] for s in str_tokens], title="token"),
        yaxis=dict(title="layer", range=[-1.5, L]), height=max(400, 22 * L), margin=dict(l=40, r=20, t=30, b=40),
        title=f"Route to position {r.graph.get('pos', '')}",
    )
    return fig


def plot_heads(importance: torch.Tensor):
    """Layer × head heat map of head importance ``[L, H]`` in a route."""
    import plotly.express as px

    fig = px.imshow(importance.numpy(), origin="lower", aspect="auto", color_continuous_scale="Blues",
                    labels=dict(x="head", y="layer", color="importance"))
    fig.update_layout(height=max(300, 14 * importance.shape[0]), margin=dict(l=40, r=20, t=30, b=40))
    return fig
