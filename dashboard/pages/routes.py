"""Information flow: the route to a prediction drawn over the prompt (Ferrando & Voita 2024)."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # AppTest / `streamlit run` on this file alone
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from analyses import routes  # noqa: E402
from dashboard.state import DEFAULT_PROMPT, cached, query_param, show_error, sidebar_probe  # noqa: E402
from probes import SondeError  # noqa: E402


def _lens_cached(probe, res, nodes):
    key = ("routes_lens", probe.info.fingerprint, res.input_hash, repr(res.config), nodes)
    store = st.session_state.setdefault("_routes_lens", {})
    if key not in store:
        store[key] = res.logit_lens(probe, nodes, k=5)
        if len(store) > 16:
            store.pop(next(iter(store)))
    return store[key]


def _dataset_view(probe) -> None:
    with st.expander("Dataset view: compare domains", expanded=False):
        st.caption("Upload a JSONL file (one object per line with 'text' and optional 'domain'). "
                   "Each prompt's route to its last token is computed; heads are compared per domain.")
        up = st.file_uploader("Prompts (.jsonl)", type=["jsonl", "txt"], key="routes_dataset")
        if up is None:
            return
        import json

        from analyses.io import Record

        recs = []
        for no, line in enumerate(up.getvalue().decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line) if up.name.endswith(".jsonl") else {"text": line}
            except json.JSONDecodeError as e:
                show_error(SondeError(f"{up.name} line {no} is not valid JSON ({e.msg}).", hint="Fix the line and upload again."))
                return
            if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
                recs.append(Record(text=obj["text"], domain=obj.get("domain"), line=no))
        if not recs:
            show_error(SondeError(f"{up.name} holds no prompts.", hint="Each line needs a non-empty 'text' field."))
            return
        recs = recs[:64]
        cfg = routes.DatasetConfig(max_tokens=48)
        stats = cached(routes.run_dataset, tuple(recs), config=cfg, _probe=probe)
        if stats is None:
            return
        dom = st.selectbox("Domain", ["(all)"] + stats.domains, key="routes_domain")
        st.plotly_chart(stats.plot(None if dom == "(all)" else dom), use_container_width=True)
        df = stats.to_frame()
        st.dataframe(df.sort_values("mean_importance", ascending=False).head(30), use_container_width=True)


def main() -> None:
    st.title("Information flow")
    st.caption("Routes (Ferrando & Voita 2024): which tokens, heads and FFNs carry information to a prediction. "
               "Edges are block parts whose L1 proximity to the block output exceeds τ.")
    probe = sidebar_probe()
    if probe is None:
        return
    prompt = st.text_input("Prompt", value=query_param("prompt", DEFAULT_PROMPT), key="routes_prompt")
    st.query_params["prompt"] = prompt
    c1, c2, c3 = st.columns([2, 1, 2])
    tau = c1.slider("τ (threshold)", 0.01, 0.10, float(query_param("tau", "0.04")), 0.01, key="routes_tau")
    renorm = c2.checkbox("Renormalize", value=True, key="routes_renorm")
    st.query_params["tau"] = f"{tau:.2f}"
    try:
        cfg = routes.Config(keep_residuals=True)
    except SondeError as e:
        show_error(e)
        return
    with st.spinner("Computing routes…"):
        res = cached(routes.run, prompt, config=cfg, _probe=probe)
    if res is None:
        return
    T = res.n_tokens
    labels = [f"{t}: {s!r}" for t, s in enumerate(res.str_tokens)]
    default_pos = int(query_param("position", str(T - 1)))
    default_pos = default_pos if 0 <= default_pos < T else T - 1
    choice = c3.selectbox("Predicted position", labels, index=default_pos, key="routes_position")
    pos = labels.index(choice)
    st.query_params["position"] = str(pos)
    try:
        route = res.route(pos, tau=tau, renormalize=renorm)
    except SondeError as e:
        show_error(e)
        return
    nodes = tuple(sorted(route.nodes))
    lens = _lens_cached(probe, res, nodes)
    hover = {n: "lens: " + ", ".join(f"{t!r} {p:.2f}" for t, p in top[:3]) for n, top in lens.items()}
    pred = lens.get(f"I{res.n_layers - 1}_{pos}", [])
    st.markdown(f"**Route to position {pos}** ({res.str_tokens[pos]!r}) — {route.number_of_nodes()} nodes, "
                f"{route.number_of_edges()} edges; model predicts "
                + ", ".join(f"`{t!r}` ({p:.2f})" for t, p in pred[:3]))
    st.plotly_chart(res.plot(route=route, hover=hover), use_container_width=True, key="routes_graph")

    left, right = st.columns(2)
    with left:
        st.subheader("Head importance in this route")
        st.plotly_chart(res.plot_heads(pos, tau=tau, renormalize=renorm), use_container_width=True)
    with right:
        st.subheader("Inspect a node")
        node = st.selectbox("Node", nodes, index=nodes.index(f"I{res.n_layers - 1}_{pos}") if f"I{res.n_layers - 1}_{pos}" in nodes else 0,
                            key="routes_node")
        st.markdown("Logit lens: " + ", ".join(f"`{t!r}` {p:.3f}" for t, p in lens.get(node, [])))
        heads = {}
        for u, v, d in route.in_edges(node, data=True):
            for h, w in enumerate(d.get("heads", [])):
                heads[f"L{d['layer']}H{h}"] = heads.get(f"L{d['layer']}H{h}", 0.0) + w
        top = sorted(heads.items(), key=lambda kv: -kv[1])[:5]
        if top:
            st.markdown("Top contributing heads: " + ", ".join(f"{k} ({w:.3f})" for k, w in top if w > 0))
        else:
            st.caption("No attention edge enters this node.")
        st.dataframe(res.route_frame(pos, tau=tau, renormalize=renorm).sort_values("weight", ascending=False).head(20),
                     use_container_width=True, hide_index=True)
    _dataset_view(probe)


main()
