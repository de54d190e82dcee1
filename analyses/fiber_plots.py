"""Figures of :mod:`analyses.fiber` (plotly, imported lazily): per-segment dimension histograms, one
token's log-log volume curve with its fitted segments, rejections by token kind, and a neighbourhood scatter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .core.report import format_p

if TYPE_CHECKING:
    from .fiber import FiberResult

__all__ = ["plot_hist", "plot_curve", "plot_kinds", "plot_neighbors"]


def _title(result: "FiberResult", what: str) -> str:
    return f"{what}<br><sup>{result.model.get('name')} ({result.source}) · {result.mode_label}</sup>"  # two lines: fits 1280 px


def plot_hist(result: "FiberResult", bins: int = 60):
    """Histogram of fitted local dimension, one trace per segment (the paper's multimodal histogram)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for j in range(result.seg_dim.shape[1]):
        d = result.seg_dim[:, j].numpy()
        d = d[np.isfinite(d)]
        if d.size:
            fig.add_trace(go.Histogram(x=d, nbinsx=bins, name=f"segment {j + 1} (n={d.size})", opacity=0.6))
    fig.update_layout(barmode="overlay", title=_title(result, "Local dimension per segment"),
                      xaxis_title="fitted dimension D (slope of log volume vs log radius)", yaxis_title="tokens",
                      height=420, margin={"t": 60})
    return fig


def plot_curve(result: "FiberResult", token_id: int):
    """Log volume vs log radius with the fitted segments and change points."""
    import plotly.graph_objects as go

    df = result.curve(token_id)
    row = result._row(token_id)
    fig = go.Figure(go.Scatter(x=df["log_r"], y=df["log_v"], mode="markers", marker={"size": 4, "color": "#888"},
                               name="neighbours", customdata=df[["volume", "slope"]],
                               hovertemplate="k=%{customdata[0]}<br>log r=%{x:.4f}<br>slope=%{customdata[1]:.1f}<extra></extra>"))
    for j in range(result.seg_dim.shape[1]):
        v0 = int(result.seg_start_volume[row, j])
        if v0 < 0:
            continue
        seg = df[df["segment"] == j + 1]
        seg = seg[np.isfinite(seg["log_r"])]
        if len(seg) < 2:
            continue
        D = float(result.seg_dim[row, j])
        c = float(np.mean(seg["log_v"] - D * seg["log_r"]))
        fig.add_trace(go.Scatter(x=seg["log_r"], y=c + D * seg["log_r"], mode="lines", name=f"segment {j + 1}: D={D:.1f}"))
        if j > 0:
            fig.add_vline(x=float(np.log(result.seg_start_radius[row, j])), line_dash="dash",  # labels point away from each
                          annotation_position="top left" if j % 2 else "top right",  # other: close changes never overlap
                          annotation_text=f"change {j} (p = {format_p(result.seg_p[row, j - 1].item(), 1)})")
    v = {k: bool(x[row]) for k, x in result.verdicts().items()}
    tag = "singular: rejects manifold" if v["reject_manifold"] else ("gap in the neighbour spacings" if v["gap"] else "no rejection")
    if v["reject_fb_small"] or v["reject_fb_large"]:
        tag += " and fiber bundle (" + ("small" if v["reject_fb_small"] else "large") + " radius)"
    fig.update_layout(title=_title(result, f"Token {token_id} {result.token_strs[row]!r}: {tag}"),
                      xaxis_title="log radius", yaxis_title="log volume (neighbour count)", height=440, margin={"t": 60})
    y = np.concatenate([np.asarray(tr.y, dtype=float) for tr in fig.data if tr.y is not None])
    y = y[np.isfinite(y)]
    if y.size:  # headroom above the data for the change labels, which sit at the top of the plot
        lo, hi = float(y.min()), float(y.max())
        span = max(hi - lo, 1e-6)
        fig.update_yaxes(range=[lo - 0.05 * span, hi + 0.15 * span])
    return fig


def plot_kinds(result: "FiberResult"):
    """Tokens by kind and verdict, singular and gap stacked (under ``config.correction``)."""
    import plotly.express as px

    kt = result.kind_table().melt(id_vars=["kind", "tokens", "tested", "rate"], value_vars=["singular", "gap"],
                                  var_name="verdict", value_name="count")
    fig = px.bar(kt, x="kind", y="count", color="verdict", hover_data=["tokens", "tested", "rate"],
                 title=_title(result, f"Verdicts by token kind ({result.config.correction})"))
    fig.update_layout(height=380, margin={"t": 60})
    return fig


def plot_neighbors(frame: pd.DataFrame, title: str = "Neighbourhood"):
    """2-D/3-D scatter of a :func:`neighborhood` frame."""
    import plotly.express as px

    kw = dict(color="rank", hover_name="token", hover_data=["token_id", "distance"], title=title)
    if "pc3" in frame:
        fig = px.scatter_3d(frame, x="pc1", y="pc2", z="pc3", **kw)
    else:
        fig = px.scatter(frame, x="pc1", y="pc2", **kw)
    fig.update_layout(height=480, margin={"t": 60})
    return fig
