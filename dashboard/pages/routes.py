"""Information flow: the route to a prediction drawn over the prompt (Ferrando & Voita 2024)."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # AppTest / `streamlit run` on this file alone
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from analyses import routes  # noqa: E402
from dashboard import components, workbench  # noqa: E402
from dashboard.state import DEFAULT_PROMPT, cached, query_param, show_error, sidebar_probe  # noqa: E402
from analyses.store import hash_inputs  # noqa: E402
from probes import SondeError  # noqa: E402


def _lens_cached(probe, res, nodes):
    key = ("routes_lens", probe.info.fingerprint, res.input_hash, repr(res.config), nodes)
    store = st.session_state.setdefault("_routes_lens", {})
    if key not in store:
        store[key] = res.logit_lens(probe, nodes, k=5)
        if len(store) > 16:
            store.pop(next(iter(store)))
    return store[key]


def _dataset_job(probe, recs, cfg):
    """Background work: fold prompts into route statistics, publishing a partial result after each prompt."""

    def work(job):
        stats = routes.RouteStats(probe.info.n_layers, probe.info.n_heads)

        def progress(n):
            try:
                job.partial = routes.stats_result(probe, stats, config=cfg)
            except SondeError:  # nothing usable yet (the first prompts were skipped)
                pass
            job.step(n)

        stats, skipped = routes.accumulate(workbench.LockedProbe(probe), recs, config=cfg, stats=stats, on_progress=progress)
        res = routes.stats_result(probe, stats, config=cfg, n_skipped=skipped,
                                  input_hash=hash_inputs([r.text for r in recs], [r.domain for r in recs]))
        try:  # saved, so component panels read route frequencies from it
            res.save()
        except OSError:
            pass
        return res

    return work


def _show_stats(stats, key: str) -> None:
    dom = st.selectbox("Domain", ["(all)"] + stats.domains, key=f"routes_domain_{key}")
    fig = stats.plot(None if dom == "(all)" else dom)
    st.plotly_chart(fig, key=f"routes_stats_{key}")
    df = stats.to_frame()
    st.dataframe(df.sort_values("mean_importance", ascending=False).head(30), hide_index=True)
    if key == "final":
        components.export_bar("routes-dataset", figure=fig, table=df, result=stats, key="exp-routes-dataset")


def _dataset_view(probe) -> None:
    with st.expander("Dataset view: compare domains", expanded="routes_dataset" in st.session_state.get("_sonde_jobs", {})):
        st.caption("Upload a JSONL file (one object per line with 'text' and optional 'domain'), or use the built-in "
                   "domains. Each prompt's route to its last token is computed in the background (cancellable); "
                   "heads are compared per domain and the result is saved, so component panels show route frequencies.")
        up = st.file_uploader("Prompts (.jsonl)", type=["jsonl", "txt"], key="routes_dataset")
        n_builtin = st.number_input("Built-in prompts per domain", 1, 32, 3, key="routes_dataset_n")
        use_builtin = st.button("Use the built-in domains (prose, code, arithmetic)", key="routes_dataset_builtin")
        import json

        from analyses.io import Record

        recs = []
        if up is not None:
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
        elif use_builtin:
            from analyses.domains import domain_texts

            recs = [Record(text=t, domain=d, line=i) for d in ("prose", "code", "arithmetic")
                    for i, t in enumerate(domain_texts(d, n=int(n_builtin)))]
        if recs:
            recs = recs[:64]
            cfg = routes.DatasetConfig(max_tokens=48)
            sig = (probe.info.fingerprint, tuple((r.text, r.domain) for r in recs))
            if st.session_state.get("_routes_dataset_sig") != sig:
                st.session_state["_routes_dataset_sig"] = sig
                workbench.run_job("routes_dataset", "Routes over the dataset", _dataset_job(probe, recs, cfg),
                                  total=len(recs), restart=True)
                st.rerun()
        job = workbench.job_view("routes_dataset", partial=lambda p: _show_stats(p, "partial"))
        if job is not None and job.finished and job.result is not None:
            _show_stats(job.result, "final")


def _ablation_view(probe, res, prompt: str, cfg, label: str, pos: int, tau: float, renorm: bool) -> None:
    """The route recomputed with one head zero-ablated, beside the original (head importance difference)."""
    from probes import Ablate, parse_head

    try:
        l, h = parse_head(label)
        edits = (Ablate(f"blocks.{l}.attn.hook_z", heads=[h]),)
    except SondeError as e:
        show_error(e)
        return
    with st.spinner(f"Routes with {label} ablated…"):
        abl = cached(routes.run, prompt, config=cfg, edits=edits, _probe=probe, _store=True)
    if abl is None:
        return
    st.subheader(f"Routes with {label} ablated")
    try:
        r0, r1 = res.route(pos, tau=tau, renormalize=renorm), abl.route(pos, tau=tau, renormalize=renorm)
    except SondeError as e:
        show_error(e)
        return
    e0, e1 = set(r0.edges()), set(r1.edges())
    c1, c2, c3 = st.columns(3)
    c1.metric("Edges kept", len(e0 & e1))
    c2.metric("Edges lost", len(e0 - e1))
    c3.metric("Edges gained", len(e1 - e0))
    a, b = st.columns(2)
    a.plotly_chart(res.plot(route=r0).update_layout(title="original", height=420), key="routes_cmp_orig")
    b.plotly_chart(abl.plot(route=r1).update_layout(title=f"{label} ablated", height=420), key="routes_cmp_abl")
    d = (abl.head_importance(pos, tau=tau, renormalize=renorm) - res.head_importance(pos, tau=tau, renormalize=renorm))
    import pandas as pd

    flat = [(f"L{i}H{j}", float(d[i, j])) for i in range(d.shape[0]) for j in range(d.shape[1]) if abs(float(d[i, j])) > 1e-9]
    df = pd.DataFrame(sorted(flat, key=lambda kv: -abs(kv[1]))[:15], columns=["head", "Δ importance"])
    st.caption("Heads whose importance on the route changed most when the head is ablated.")
    st.dataframe(df, hide_index=True)
    components.export_bar(f"routes-{label}-ablated", figure=abl.plot(route=r1), table=abl.route_frame(pos, tau=tau, renormalize=renorm),
                          graph=abl, graph_position=pos, result=abl, key="exp-routes-ablated")


def main() -> None:
    st.title("Information flow")
    st.caption("Routes (Ferrando & Voita 2024): which tokens, heads and FFNs carry information to a prediction. "
               "Edges are block parts whose L1 proximity to the block output exceeds τ. Click a head in the heat map "
               "(or pick it below) to open its component panel.")
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
        res = cached(routes.run, prompt, config=cfg, _probe=probe, _store=True)
    if res is None:
        return
    T = res.n_tokens
    labels = [f"{t}: {s!r}" for t, s in enumerate(res.str_tokens)]
    try:
        default_pos = int(query_param("position", str(T - 1)))
    except ValueError:
        default_pos = T - 1
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
    graph_fig = res.plot(route=route, hover=hover)
    ev_graph = st.plotly_chart(graph_fig, key="routes_graph", on_select="rerun", selection_mode="points")
    clicked_node = workbench.node_from_selection(ev_graph)
    if clicked_node is not None and clicked_node != st.session_state.get("_routes_last_node"):
        st.session_state["_routes_last_node"] = clicked_node
        st.session_state["routes_node"] = clicked_node

    left, right = st.columns(2)
    with left:
        st.subheader("Head importance in this route")
        heads_fig = workbench.selectable_heads(res.plot_heads(pos, tau=tau, renormalize=renorm))
        ev = st.plotly_chart(heads_fig, key="routes_heads", on_select="rerun", selection_mode="points")
        clicked = workbench.head_from_selection(ev)
    with right:
        st.subheader("Inspect a node")
        if st.session_state.get("routes_node") not in nodes:
            st.session_state.pop("routes_node", None)
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
        npos = int(node.split("_")[1])
        tok = res.str_tokens[npos]
        if tok.strip() and npos > 0:
            if st.button(f"Intervene on token {npos} ({tok!r}) in a counterfactual", key="routes_token_cf",
                         icon=":material/call_split:", help="Opens the Counterfactuals page with a prompt edit at this token."):
                workbench.go("counterfactual", prompt=prompt, kind="prompt", old=tok.strip(), new="")
        st.dataframe(res.route_frame(pos, tau=tau, renormalize=renorm).sort_values("weight", ascending=False).head(20),
                     use_container_width=True, hide_index=True)

    # ---- the component panel: a click on the heat map, or the selection fallback
    imp = res.head_importance(pos, tau=tau, renormalize=renorm)
    order = sorted(((f"L{l}H{h}", float(imp[l, h])) for l in range(imp.shape[0]) for h in range(imp.shape[1])), key=lambda kv: -kv[1])
    head_labels = [k for k, _ in order]
    if clicked is not None and clicked != st.session_state.get("_routes_last_click"):
        st.session_state["_routes_last_click"] = clicked
        st.session_state["routes_component"] = clicked
    if st.session_state.get("routes_component") not in head_labels:
        st.session_state.pop("routes_component", None)
    wanted = query_param("component", head_labels[0])
    comp = st.selectbox("Component (heads by importance on this route)", head_labels,
                        index=head_labels.index(wanted) if wanted in head_labels else 0, key="routes_component",
                        format_func=lambda k: f"{k} · {dict(order)[k]:.3f}")
    st.query_params["component"] = comp
    workbench.component_panel(probe, comp, prompt=prompt, routes_result=res, position=pos, key="routes-cp")

    ablated = query_param("ablated", "")
    if ablated:
        st.query_params["ablated"] = ablated
        _ablation_view(probe, res, prompt, cfg, ablated, pos, tau, renorm)
        if st.button("Hide the ablated comparison", key="routes_hide_ablated"):
            del st.query_params["ablated"]
            st.rerun()

    st.subheader("Export")
    components.export_bar(f"routes-{pos}", figure=graph_fig, table=res.route_frame(pos, tau=tau, renormalize=renorm), graph=res,
                          graph_position=pos, result=res, figures={"Route graph": graph_fig, "Head importance": heads_fig},
                          notes=(f"Prompt: {prompt!r}; position {pos}; τ = {tau:.2f}; renormalize = {renorm}.",),
                          code=_code(probe, prompt, pos, tau), key="exp-routes")
    _dataset_view(probe)
    components.notebook_snippet(_code(probe, prompt, pos, tau))


def _code(probe, prompt: str, pos: int, tau: float) -> str:
    return (f"from probes import load_model\nfrom analyses import routes\n\nprobe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
            f"res = routes.run(probe, {prompt!r}, config=routes.Config(keep_residuals=True))\n"
            f"res.plot({pos}, tau={tau:.2f}).show(); res.plot_heads({pos}, tau={tau:.2f}).show()")


main()
