"""Figures of :mod:`analyses.routes` (plotly, imported lazily): a route drawn over the prompt and the
layer × head importance map.

:func:`plot_route` is the one route figure: ``RoutesResult.plot()`` and the dashboard's Information flow page
draw it (the page adds the selected node and head, and the comparison with an ablated route). Node markers
carry their node name (``X0_3``, ``A5_3`` …) as ``customdata``, so a click on one names the node.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["plot_route", "plot_heads", "plot_qk", "plot_faithfulness", "EDGE_COLOURS", "NODE_COLOURS", "NODE_NAMES", "COMPARE_COLOURS",
           "QK_COLOURS"]

# one palette for every route figure
EDGE_COLOURS = {"attn": "#1f77b4", "ffn": "#d62728", "resid": "#bbbbbb"}
NODE_COLOURS = {"X": "#7f7f7f", "A": "#1f77b4", "M": "#d62728", "I": "#333333"}
NODE_NAMES = {"X": "token embedding", "A": "after attention", "M": "FFN output", "I": "block output"}
COMPARE_COLOURS = {"kept": "#8c8c8c", "lost": "#d62728", "gained": "#2ca02c"}
HEAD_COLOUR = "#ff7f0e"  # the edges of the selected head
SELECTED_COLOUR = "#ff7f0e"  # the ring around the selected node
MAX_TICKS = 40  # token labels on the x axis at most


def _segment(g, u: str, v: str, parallel: bool, xs: list, ys: list, mx: list, my: list) -> None:
    """Append edge ``u → v`` as a line segment (``None`` breaks the line) and its midpoint (its hover point)."""
    (x0, y0), (x1, y1) = _xy(g, u, parallel), _xy(g, v, parallel)
    xs += [x0, x1, None]
    ys += [y0, y1, None]
    mx.append((x0 + x1) / 2)
    my.append((y0 + y1) / 2)


def _xy(g, n: str, parallel: bool) -> tuple[float, float]:
    """A node's place: its token position on x (FFN outputs a quarter to the right), its layer on y (embeddings at -1;
    after attention, FFN output and block output at +0, +0.33, +0.66 of their layer)."""
    d = g.nodes[n]
    k = d["kind"]
    y = -1.0 if k == "X" else d["layer"] + ({"A": 0.0, "M": 0.33, "I": 0.66}[k] if not parallel else {"M": 0.33, "I": 0.66}.get(k, 0))
    return d["pos"] + (0.25 if k == "M" else 0.0), y


def _edge_traces(fig, g, edges, parallel: bool, *, name: str = "", colour: str | None = None, dash: str | None = None,
                 maxw: float = 1.0, width_scale: float = 6.0) -> None:
    """One trace per edge kind and width (lines joined with None gaps), so the legend names each kind once. Lines take
    no hover; each edge's hover text sits on one invisible point at its midpoint, so no edge covers a node."""
    import plotly.graph_objects as go

    by_kind: dict[str, list] = {}
    for u, v, d in edges:
        by_kind.setdefault(d["kind"], []).append((u, v, d))
    for kind, es in sorted(by_kind.items()):
        # widths differ per edge: bucket them so one trace carries one width
        buckets: dict[float, list] = {}
        for u, v, d in es:
            buckets.setdefault(round(0.6 + width_scale * d["weight"] / maxw, 0), []).append((u, v, d))
        first = True
        mx, my, mt = [], [], []
        for w, bes in sorted(buckets.items()):
            xs, ys = [], []
            for u, v, d in bes:
                _segment(g, u, v, parallel, xs, ys, mx, my)
                mt.append(f"{u} → {v} · {d['kind']} · weight {d['weight']:.3f}")
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", legendgroup=f"{name}-{kind}",
                                     name=f"{name}{kind} edge", showlegend=first,
                                     line=dict(width=w, color=colour or EDGE_COLOURS.get(kind, "#888"), dash=dash)))
            first = False
        _midpoints(fig, mx, my, mt, group=f"{name}-{kind}")


MIN_HOVER_GAP_PX = 12  # an edge's hover point keeps at least this far from every node (at a 1000-px-wide figure)


def _midpoints(fig, xs, ys, text, *, group: str) -> None:
    """Invisible hover points at edge midpoints (``_clear_nodes`` then drops those near a node)."""
    import plotly.graph_objects as go

    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", hoverinfo="text", text=text, legendgroup=group, showlegend=False,
                                 name="edges", marker=dict(size=6, opacity=0)))


def _clear_nodes(fig, node_xy, T: int, L: int, height: int) -> None:
    """Drop edge hover points that lie within ``MIN_HOVER_GAP_PX`` of a node (short vertical edges have their midpoint
    a few pixels from their ends): a click there must reach the node. The node's own hover lists its in-edges."""
    import numpy as np

    if not node_xy:
        return
    px_x, px_y = 1000.0 / max(T, 1), max(height - 225, 100) / (L + 1.5)  # pixels per position and per layer
    nodes = np.asarray(node_xy, dtype=float) * [px_x, px_y]
    for t in fig.data:
        if t.name != "edges" or t.x is None:
            continue
        pts = np.asarray(list(zip(t.x, t.y)), dtype=float).reshape(-1, 2) * [px_x, px_y]
        far = np.sqrt(((pts[:, None, :] - nodes[None, :, :]) ** 2).sum(-1)).min(1) >= MIN_HOVER_GAP_PX
        t.x = [x for x, k in zip(t.x, far) if k]
        t.y = [y for y, k in zip(t.y, far) if k]
        t.text = [x for x, k in zip(t.text, far) if k]


def _head_trace(fig, g, head: str, parallel: bool) -> None:
    """The attention edges that ``head`` ("L5H3") carries, drawn over the route."""
    import plotly.graph_objects as go

    from probes import parse_head

    hl, hh = parse_head(head)
    hx, hy, mx, my, mt = [], [], [], [], []
    for u, v, d in g.edges(data=True):
        hs = d.get("heads") or []
        if d["kind"] == "attn" and d["layer"] == hl and hh < len(hs) and hs[hh] > 0:
            _segment(g, u, v, parallel, hx, hy, mx, my)
            mt.append(f"{head}: {hs[hh]:.3f} of {u} → {v}")
    fig.add_trace(go.Scatter(x=hx or [None], y=hy or [None], mode="lines", hoverinfo="skip", legendgroup="selected-head",
                             name=f"{head} (selected head)", line=dict(width=5, color=HEAD_COLOUR)))
    _midpoints(fig, mx, my, mt, group="selected-head")


def _in_edges(g, n: str, k: int = 3) -> str:
    """The node's strongest in-edges, for its hover text."""
    es = sorted(g.in_edges(n, data=True), key=lambda e: -e[2]["weight"])[:k]
    return "".join(f"<br>← {u} · {d['kind']} · {d['weight']:.3f}" for u, _, d in es)


QK_COLOURS = {"query": "#9467bd", "key": "#8c564b"}  # QK contributor edges (why a head attends), per side


def _node_xy(n: str, parallel: bool) -> tuple[float, float]:
    """The place of a node by its name alone (a node the route does not hold), as :func:`_xy` places it."""
    from probes.labels import parse_node

    k, l, p = parse_node(n)
    y = -1.0 if k == "X" else l + ({"A": 0.0, "M": 0.33, "I": 0.66}[k] if not parallel else {"M": 0.33, "I": 0.66}.get(k, 0))
    return p + (0.25 if k == "M" else 0.0), y


def _qk_traces(fig, qk, parallel: bool) -> None:
    """QK contributor edges (:meth:`analyses.routes_explain.AttentionExplanation.qk_edges`): dashed, one trace per side,
    width by |contribution|, hover on the midpoint; a hollow marker on each contributor node."""
    import plotly.graph_objects as go

    top = max((abs(e["contribution"]) for e in qk), default=1.0) or 1.0
    for side in ("query", "key"):
        es = [e for e in qk if e["side"] == side]
        if not es:
            continue
        mx, my, mt, nx_, ny_ = [], [], [], [], []
        for i, e in enumerate(es):
            (x0, y0), (x1, y1) = _node_xy(e["source"], parallel), _node_xy(e["target"], parallel)
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", legendgroup=f"qk-{side}",
                                     name=f"QK contributor ({side} side)", showlegend=i == 0,
                                     line=dict(width=0.8 + 4 * abs(e["contribution"]) / top, color=QK_COLOURS[side], dash="dash")))
            mx.append((x0 + x1) / 2)
            my.append((y0 + y1) / 2)
            mt.append(f"{e['component']} → {side} side of the score ({e['target']}): {e['contribution']:+.4f}")
            nx_.append(x0)
            ny_.append(y0)
        fig.add_trace(go.Scatter(x=mx, y=my, mode="markers", hoverinfo="text", text=mt, legendgroup=f"qk-{side}",
                                 showlegend=False, marker=dict(size=8, color=QK_COLOURS[side], opacity=0.01)))
        fig.add_trace(go.Scatter(x=nx_, y=ny_, mode="markers", hoverinfo="skip", legendgroup=f"qk-{side}", showlegend=False,
                                 marker=dict(symbol="circle-open", size=11, color=QK_COLOURS[side], line=dict(width=2))))


def plot_route(route, str_tokens: Sequence[str], n_layers: int, parallel: bool = False, hover: dict[str, str] | None = None, *,
               selected: str | None = None, head: str | None = None, compare=None, title: str | None = None, offset: int = 0,
               qk: Sequence[dict] | None = None):
    """Route graph over the prompt: tokens left to right (every token on the x axis), layers bottom to top, edge width
    by weight, one colour per edge and node kind, with a legend.

    Args:
        hover: extra hover text per node (e.g. its logit lens).
        selected: a node name drawn with a ring (the node a page inspects).
        head: a head label ("L5H3") whose attention edges are drawn over the route.
        compare: another route (e.g. with a head ablated): the figure then shows the edges kept (grey), lost (red,
            dotted) and gained (green).
        title: the figure's title (default "Route to position <pos>").
        offset: the prompt position of the first token drawn (a window of a long prompt): thinned labels name
            positions in the prompt.
        qk: QK contributor edges of one attention edge (:meth:`AttentionExplanation.qk_edges`), drawn dashed as a
            second kind of edge.

    Traces: the edges, the selected head's edges, the selected node's ring (no hover, so clicks reach the node under
    it), then one marker trace per node kind whose ``customdata`` are node names (a click selects a node).
    """
    import plotly.graph_objects as go

    r, L, T = route, n_layers, len(str_tokens)
    fig = go.Figure()
    e0 = {(u, v): d for u, v, d in r.edges(data=True)}
    maxw = max((d["weight"] for d in e0.values()), default=1.0) or 1.0
    if compare is None:
        _edge_traces(fig, r, [(u, v, d) for (u, v), d in e0.items()], parallel, maxw=maxw)
        graphs = [r]
    else:
        from .routes_graph import route_diff

        diff = route_diff(r, compare)
        maxw = max([maxw] + [d["weight"] for _, _, d in diff["gained"]])
        c = COMPARE_COLOURS
        _edge_traces(fig, r, diff["kept"], parallel, name="kept ", colour=c["kept"], maxw=maxw)
        _edge_traces(fig, r, diff["lost"], parallel, name="lost ", colour=c["lost"], dash="dot", maxw=maxw)
        _edge_traces(fig, compare, diff["gained"], parallel, name="gained ", colour=c["gained"], maxw=maxw)
        graphs = [r, compare]
    if head:
        _head_trace(fig, r, head, parallel)
    if qk:
        _qk_traces(fig, qk, parallel)
    seen: dict = {}
    for g in graphs:
        for n in g.nodes:
            seen.setdefault(n, g)
    height = max(460, 22 * L)
    _clear_nodes(fig, [_xy(g, n, parallel) for n, g in seen.items()], T, L, height)
    if selected is not None and selected in seen:
        sx, sy = _xy(seen[selected], selected, parallel)
        fig.add_trace(go.Scatter(x=[sx], y=[sy], mode="markers", hoverinfo="skip", name=f"{selected} (selected node)", cliponaxis=False,  # whole at the top row
                                 marker=dict(symbol="circle-open", size=19, color=SELECTED_COLOUR, line=dict(width=3))))
    for kind in ("X", "A", "M", "I"):
        ns = [n for n, g in seen.items() if g.nodes[n]["kind"] == kind]
        if not ns:
            continue
        xs, ys = zip(*(_xy(seen[n], n, parallel) for n in ns))
        text = [f"{n} ({seen[n].nodes[n]['token']!r})" + (f"<br>{hover[n]}" if hover and n in hover else "") + _in_edges(seen[n], n)
                for n in ns]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", hoverinfo="text", text=text, customdata=ns, name=NODE_NAMES[kind],
                                 marker=dict(size=9, color=NODE_COLOURS[kind], line=dict(width=1, color="white"))))
    ticks = [repr(s)[1:-1] or "·" for s in str_tokens]
    # at most MAX_TICKS labels (every k-th position and the last): a 256-token window would overlap them all
    k = -(-T // MAX_TICKS)
    tickvals = sorted(set(range(T - 1, -1, -k)))
    fig.update_layout(
        title=dict(text=title if title is not None else f"Route to position {r.graph.get('pos', '')}", y=0.995, yanchor="top",
                   x=0.01, xanchor="left", font=dict(size=15)),
        xaxis=dict(tickmode="array", tickvals=tickvals, ticktext=[ticks[t] if k == 1 else f"{t + offset}: {ticks[t]}" for t in tickvals],
                   title="prompt token (position →)" if k == 1 else f"prompt token (every {k}th position labelled)",
                   range=[-0.6, T - 0.4], tickangle=-45 if len(tickvals) > 12 else 0),
        yaxis=dict(title="layer (−1 = embeddings)", range=[-1.5, L]), height=height,
        margin=dict(l=60, r=20, t=135, b=90), legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0, font=dict(size=11)),
        clickmode="event+select", dragmode=False,
    )
    return fig


def plot_heads(importance: torch.Tensor):
    """Layer × head heat map of head importance ``[L, H]`` in a route."""
    import plotly.express as px

    fig = px.imshow(importance.numpy(), origin="lower", aspect="auto", color_continuous_scale="Blues",
                    labels=dict(x="head", y="layer", color="importance"))
    fig.update_layout(height=max(300, 14 * importance.shape[0]), margin=dict(l=40, r=20, t=30, b=40))
    return fig


def _bars(fig, s, row: int, col: int, colour: str) -> None:
    import plotly.graph_objects as go

    s = s[::-1]  # largest at the top
    fig.add_trace(go.Bar(x=s.values, y=list(s.index), orientation="h", showlegend=False,
                         marker_color=[colour if v >= 0 else "#d62728" for v in s.values],
                         hovertemplate="%{y}: %{x:.4f}<extra></extra>"), row=row, col=col)


def plot_qk(explanation, k: int = 10):
    """Why a head attends: the ``k`` largest query-side and key-side contributors (by |contribution|) of one
    attention edge's pre-softmax score (an :class:`analyses.routes_explain.AttentionExplanation`), as two horizontal
    bar charts side by side; each side's marginals sum to the score named in the title."""
    from plotly.subplots import make_subplots

    ex = explanation
    q, kk = ex.query_marginals, ex.key_marginals
    q = q.reindex(q.abs().sort_values(ascending=False).index)[:k]
    kk = kk.reindex(kk.abs().sort_values(ascending=False).index)[:k]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.18,
                        subplot_titles=(f"query side: position {ex.query_pos} {ex.query_token!r}",
                                        f"key side: position {ex.key_pos} {ex.key_token!r}"))
    _bars(fig, q, 1, 1, "#1f77b4")
    _bars(fig, kk, 1, 2, "#2ca02c")
    fig.update_xaxes(title_text="contribution to the score", zeroline=True, zerolinecolor="#888")
    fig.update_layout(title=f"{ex.label}: score {ex.score:.3f} = Σ query parts = Σ key parts · attention weight {ex.probability:.3f}",
                      height=120 + 24 * max(len(q), len(kk)), margin=dict(l=10, r=10, t=80, b=40))
    return fig


FAITHFUL_KINDS = {"clean": "clean", "off_route": "off-route ablated", "route": "route ablated",
                  "random_keep": "random kept (median)", "random": "random ablated (median)"}


def plot_faithfulness(faith):
    """p(target) per condition of an :class:`analyses.routes_faithful.Faithfulness` (clean, off-route ablated, route
    ablated, and the medians of the random sets of the route's size), one bar group per ablation mode."""
    import plotly.graph_objects as go

    f = faith.frame
    fig = go.Figure()
    for ab, colour in (("zero", "#1f77b4"), ("mean", "#ff7f0e")):
        sub = f[f.ablation == ab]
        if sub.empty:
            continue
        xs = list(FAITHFUL_KINDS.values())
        ys = [faith.p_clean] + [float(sub[sub.kind == kd].p_target.median()) for kd in list(FAITHFUL_KINDS)[1:]]
        fig.add_trace(go.Bar(x=xs, y=ys, name=f"{ab} ablation", marker_color=colour, text=[f"{y:.2g}" for y in ys],
                             textposition="outside", hovertemplate="%{x}: %{y:.3g}<extra></extra>"))
    # probabilities span many decades (0.7 clean, 1e-9 with the route ablated): a log axis shows every bar
    fig.update_layout(barmode="group", height=340, margin=dict(l=10, r=10, t=40, b=40),
                      yaxis=dict(type="log", title=f"p({faith.target_token!r}), log scale", exponentformat="power"),
                      title=f"p({faith.target_token!r}) at position {faith.position} per condition",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0))
    return fig
