"""Route graphs of :mod:`analyses.routes`: the thresholded edge graph of a prompt and the route to one
prediction, as networkx graphs over LLM-TT's node names (:func:`analyses.routes.node_name`).

Pure functions of the importance arrays (no model): ``attn [L, T_q, T_k, H]``, ``attn_resid [L, T]``,
``ffn [L, T]``, ``ffn_resid [L, T]`` (edge weights after the threshold/renormalisation of
:meth:`analyses.routes.RoutesResult.weights`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .routes import node_name

__all__ = ["build_graph", "extract_route", "head_importance", "route_frame", "write_graphml", "node_link", "route_diff",
           "compare_routes", "RouteComparison", "shift_route"]


def build_graph(attn: torch.Tensor, attn_resid: torch.Tensor, ffn: torch.Tensor, ffn_resid: torch.Tensor, thr: float,
                str_tokens: Sequence[str], parallel: bool = False, rows: torch.Tensor | None = None):
    """The full graph over all positions as a networkx DiGraph (edges bottom-up).

    ``attn`` is [L, R, T, H]: its query axis holds the positions ``rows`` (a top-down result's visited rows), or
    every position (``rows=None``, R = T).

    Edges at or below ``thr`` are left out (they can never be on a route), so the graph stays sparse.
    Edge attributes: ``weight``, ``kind`` (attn|resid|ffn), ``layer``, and ``heads`` (per-head weights,
    attention edges only). Node attributes: ``kind``, ``layer``, ``pos``, ``token``.
    """
    import networkx as nx

    attn, ar, ffn, fr = (t.detach().cpu().double().numpy() for t in (attn, attn_resid, ffn, ffn_resid))
    L, T = attn.shape[0], attn.shape[2]
    qpos = np.arange(T) if rows is None else np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows)
    g = nx.DiGraph()

    def add_node(name, kind, layer, pos):
        if name not in g:
            g.add_node(name, kind=kind, layer=layer, pos=pos, token=str_tokens[pos])

    def add_edge(u, v, w, kind, layer, heads=None):
        if g.has_edge(u, v):  # the self-attention edge and the residual edge share (u, v)
            g[u][v]["weight"] += w
            return
        g.add_edge(u, v, weight=float(w), kind=kind, layer=layer, **({"heads": heads} if heads is not None else {}))

    for t in range(T):
        add_node(node_name("X", 0, t), "X", -1, t)

    def src(l, j):  # the residual node feeding layer l at position j
        name = node_name("X", 0, j) if l == 0 else node_name("I", l - 1, j)
        add_node(name, "X" if l == 0 else "I", l - 1, j)
        return name

    for l in range(L):
        tgt_a = "I" if parallel else "A"
        summed = attn[l].sum(-1)  # [T, T]
        ri, kj = np.nonzero(summed > thr)
        for r, j in zip(ri.tolist(), kj.tolist()):
            i = int(qpos[r])
            add_node(node_name(tgt_a, l, i), tgt_a, l, i)
            add_edge(src(l, j), node_name(tgt_a, l, i), summed[r, j], "attn", l, [float(x) for x in attn[l, r, j]])
        for i in np.nonzero(ar[l] > thr)[0].tolist():
            add_node(node_name(tgt_a, l, i), tgt_a, l, i)
            add_edge(src(l, i), node_name(tgt_a, l, i), ar[l, i], "resid", l)
        for i in np.nonzero(ffn[l] > thr)[0].tolist():
            m, out = node_name("M", l, i), node_name("I", l, i)
            if parallel:
                inp = src(l, i)
            else:
                inp = node_name("A", l, i)
                add_node(inp, "A", l, i)
            for n, k in ((m, "M"), (out, "I")):
                add_node(n, k, l, i)
            add_edge(inp, m, ffn[l, i], "ffn", l)
            add_edge(m, out, ffn[l, i], "ffn", l)
        if not parallel:
            for i in np.nonzero(fr[l] > thr)[0].tolist():
                add_node(node_name("A", l, i), "A", l, i)
                add_node(node_name("I", l, i), "I", l, i)
                add_edge(node_name("A", l, i), node_name("I", l, i), fr[l, i], "resid", l)
    return g


def extract_route(g, n_layers: int, pos: int, token: str):
    """The route to the prediction at ``pos`` (LLM-TT ``build_paths_to_predictions``, paper Algorithm 1):
    reverse ``g``, DFS from ``I{L-1}_pos``, keep the visited edges (``g`` holds only edges above the threshold)."""
    import networkx as nx

    top = node_name("I", n_layers - 1, pos)
    sub = nx.DiGraph(pos=pos)
    sub.add_node(top, **(g.nodes[top] if top in g else dict(kind="I", layer=n_layers - 1, pos=pos, token=token)))
    if top not in g:
        return sub
    rev = g.reverse(copy=False)
    for u, v in nx.edge_dfs(rev, top):
        sub.add_node(u, **g.nodes[u])
        sub.add_node(v, **g.nodes[v])
        sub.add_edge(v, u, **g[v][u])
    return sub


def head_importance(route, n_layers: int, n_heads: int) -> torch.Tensor:
    """[L, H]: Σ of each head's part importances over the attention edges of ``route``."""
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for _, _, e in route.edges(data=True):
        if "heads" in e:
            out[e["layer"]] += torch.tensor(e["heads"], dtype=torch.float64)
    return out


def route_frame(route) -> pd.DataFrame:
    """The route's edges: ``source, target, kind, layer, weight``."""
    return pd.DataFrame([{"source": u, "target": v, "kind": d["kind"], "layer": d["layer"], "weight": d["weight"]}
                         for u, v, d in route.edges(data=True)], columns=["source", "target", "kind", "layer", "weight"])


_XML_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def write_graphml(g, path: str | Path) -> Path:
    """Write ``g`` as GraphML (per-head vectors as JSON strings)."""
    import networkx as nx

    def plain(k: str, val: Any) -> Any:
        # one GraphML type per attribute: a weight of 1 (an int) beside 0.5 would declare two "weight" keys
        if isinstance(val, list):
            return json.dumps(val)
        if k == "weight" or isinstance(val, float):
            return float(val)
        if isinstance(val, str):  # XML 1.0 cannot hold control characters (byte-level tokens): write them escaped
            return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", val)
        return int(val) if isinstance(val, (int,)) and not isinstance(val, bool) else val

    h = nx.DiGraph()
    h.add_nodes_from((n, {k: plain(k, val) for k, val in d.items()}) for n, d in g.nodes(data=True))
    for u, v, d in g.edges(data=True):
        h.add_edge(u, v, **{k: plain(k, val) for k, val in d.items()})
    path = Path(path)
    nx.write_graphml(h, path)
    return path


def node_link(g) -> dict[str, Any]:
    """``g`` as node-link JSON (the stored form of a route)."""
    import networkx as nx

    return nx.node_link_data(g, edges="links")


# ============================================================================ two contexts side by side
def _aligned(route_b, offset: int) -> tuple[dict[tuple[str, str], dict], list[tuple[str, str, dict]]]:
    """``b``'s edges with positions shifted by ``-offset`` (``{(u, v): data}``) and those that fall before 0."""
    from probes.labels import node_label, parse_node

    def shift(n):
        if not offset:
            return n
        k, l, p = parse_node(n)
        return None if p - offset < 0 else node_label(k, l, p - offset)

    eb, unaligned = {}, []
    for u, v, d in route_b.edges(data=True):
        su, sv = shift(u), shift(v)
        if su is None or sv is None:
            unaligned.append((u, v, d))
        else:
            eb[(su, sv)] = d
    return eb, unaligned


def route_diff(route_a, route_b, offset: int = 0) -> dict[str, list[tuple[str, str, dict]]]:
    """Edges of route ``a`` against route ``b`` (the same prompt with a head ablated, or another context), ``b``'s
    positions shifted by ``-offset`` onto ``a``'s: ``kept`` (in both, with ``a``'s data), ``lost`` (only in ``a``),
    ``gained`` (only in ``b``, with ``b``'s data, in ``a``'s positions) and ``unaligned`` (``b``'s edges whose nodes
    fall before ``a``'s position 0, as they are); each a list of ``(u, v, data)`` in the graphs' edge order."""
    ea = {(u, v): d for u, v, d in route_a.edges(data=True)}
    eb, unaligned = _aligned(route_b, offset)
    return {"kept": [(u, v, d) for (u, v), d in ea.items() if (u, v) in eb],
            "lost": [(u, v, d) for (u, v), d in ea.items() if (u, v) not in eb],
            "gained": [(u, v, d) for (u, v), d in eb.items() if (u, v) not in ea],
            "unaligned": unaligned}


def compare_routes(route_a, route_b, offset: int = 0) -> pd.DataFrame:
    """:func:`route_diff` as a table: one row per edge, ``source, target, kind, layer, weight_a, weight_b, delta,
    status`` (kept, lost, gained or unaligned; positions in ``a``'s coordinates), sorted by |delta|, largest first."""
    ea = {(u, v): d for u, v, d in route_a.edges(data=True)}
    eb, unaligned = _aligned(route_b, offset)
    rows = []
    for e in sorted(set(ea) | set(eb)):
        da, db = ea.get(e), eb.get(e)
        wa, wb = (da["weight"] if da else 0.0), (db["weight"] if db else 0.0)
        d = da or db
        rows.append({"source": e[0], "target": e[1], "kind": d["kind"], "layer": d["layer"], "weight_a": wa, "weight_b": wb,
                     "delta": wb - wa, "status": "kept" if da and db else ("lost" if da else "gained")})
    rows += [{"source": u, "target": v, "kind": d["kind"], "layer": d["layer"], "weight_a": np.nan, "weight_b": d["weight"],
              "delta": np.nan, "status": "unaligned"} for u, v, d in unaligned]
    df = pd.DataFrame(rows, columns=["source", "target", "kind", "layer", "weight_a", "weight_b", "delta", "status"])
    return df.iloc[np.argsort(-df["delta"].abs().fillna(-1).to_numpy(), kind="stable")].reset_index(drop=True)


def shift_route(route, offset: int):
    """``route`` with every node's position moved by ``-offset`` (b's route in a's coordinates); nodes that would fall
    before position 0 are left out with their edges."""
    import networkx as nx

    from probes.labels import node_label, parse_node

    out = nx.DiGraph(**route.graph)
    names = {}
    for n, d in route.nodes(data=True):
        k, l, p = parse_node(n)
        if p - offset >= 0:
            names[n] = node_label(k, l, p - offset)
            out.add_node(names[n], **{**d, "pos": p - offset})
    for u, v, d in route.edges(data=True):
        if u in names and v in names:
            out.add_edge(names[u], names[v], **d)
    return out


@dataclass(frozen=True)
class RouteComparison:
    """Two contexts' routes side by side (:func:`analyses.routes.compare`).

    Attributes:
        edges: :func:`compare_routes` rows (positions in ``a``'s coordinates); head_delta: [L, H] head importance in
            b's route minus a's; offset: b's position minus a's for aligned positions (right-aligned prompts);
        p_a, p_b: p(target) in each context (None without probes); target: token id.
        route_a, route_b: the two routes (b's in its own positions); str_tokens_a: a's tokens; labels: a short
            description of each context (prompt and model), for exports.
    """

    edges: pd.DataFrame
    head_delta: torch.Tensor
    position_a: int
    position_b: int
    offset: int
    target: int | None = None
    target_token: str | None = None
    p_a: float | None = None
    p_b: float | None = None
    route_a: Any = None
    route_b: Any = None
    str_tokens_a: tuple[str, ...] = ()
    parallel: bool = False
    labels: tuple[str, str] = ("a", "b")

    @property
    def delta_p(self) -> float | None:
        return None if self.p_a is None or self.p_b is None else self.p_b - self.p_a

    def counts(self) -> dict[str, int]:
        """Edges per status: kept, lost, gained, unaligned."""
        c = self.edges["status"].value_counts()
        return {k: int(c.get(k, 0)) for k in ("kept", "lost", "gained", "unaligned")}

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        from probes.labels import head_label

        hd = self.head_delta
        order = torch.argsort(hd.abs().flatten(), descending=True)[:k].tolist()
        heads = [{"head": head_label(i // hd.shape[1], i % hd.shape[1]), "delta": float(hd.flatten()[i])} for i in order]
        return {"position_a": self.position_a, "position_b": self.position_b, "offset": self.offset, **self.counts(),
                "target": self.target, "target_token": self.target_token, "p_a": self.p_a, "p_b": self.p_b,
                "delta_p": self.delta_p, "top_head_deltas": heads, "labels": list(self.labels),
                "top_edge_deltas": self.edges.head(k).replace({np.nan: None}).to_dict("records")}

    # ------------------------------------------------------------------ exports
    def _routes(self):
        if self.route_a is None or self.route_b is None:
            from probes.errors import ConfigError

            raise ConfigError("this comparison holds no routes to draw or export.",
                              hint="Build it with routes.compare(a, b), which keeps both routes.")
        return self.route_a, shift_route(self.route_b, self.offset)

    def graph(self):
        """One graph of both routes in ``a``'s positions: every node of either, every aligned edge once with
        ``status`` (kept, lost, gained), ``weight_a``, ``weight_b``, ``delta``, ``kind`` and ``layer``."""
        import networkx as nx

        ra, rb = self._routes()
        g = nx.DiGraph(position_a=self.position_a, position_b=self.position_b, offset=self.offset,
                       label_a=self.labels[0], label_b=self.labels[1])
        for r in (ra, rb):
            for n, d in r.nodes(data=True):
                if n not in g:
                    g.add_node(n, **d)
        for row in self.edges[self.edges.status != "unaligned"].itertuples():
            g.add_edge(row.source, row.target, status=row.status, kind=row.kind, layer=int(row.layer),
                       weight_a=float(row.weight_a), weight_b=float(row.weight_b), delta=float(row.delta),
                       weight=float(max(row.weight_a, row.weight_b)))
        return g

    def to_graphml(self, path: str | Path) -> Path:
        """Write :meth:`graph` as GraphML."""
        return write_graphml(self.graph(), path)

    def plot(self):
        """Both routes on one figure over a's tokens: edges kept (grey), lost (red, dotted: only in a) and gained
        (green: only in b)."""
        from .routes_plots import plot_route

        ra, rb = self._routes()
        L = self.head_delta.shape[0]
        dp = "" if self.delta_p is None else f"; p({self.target_token!r}) {self.p_a:.3f} → {self.p_b:.3f}"
        return plot_route(ra, list(self.str_tokens_a), L, self.parallel, compare=rb,
                          title=f"{self.labels[0]} vs {self.labels[1]}: grey kept, red dotted lost, green gained{dp}")

    def report_html(self, k: int = 15) -> bytes:
        """One self-contained HTML page (plotly.js inlined, opens offline): the figure, the counts, Δp, and the heads
        and edges that changed most."""
        from .core.report import html_page

        d = self.to_dict(k)
        facts = {"context a": self.labels[0], "context b": self.labels[1], "positions": f"{self.position_a} (a), "
                 f"{self.position_b} (b), offset {self.offset}", **{n: d[n] for n in ("kept", "lost", "gained", "unaligned")}}
        if self.delta_p is not None:
            facts[f"p({self.target_token!r})"] = f"{self.p_a:.4f} (a), {self.p_b:.4f} (b), Δp {self.delta_p:+.4f}"
        return html_page("Routes compared", facts=facts, figures={"Both routes over a's tokens": self.plot()},
                         tables={"Heads whose importance changed most (b − a)": pd.DataFrame(d["top_head_deltas"]),
                                 "Edges whose weight changed most": self.edges.head(k)})
