"""Sinks & dormant heads: sink mass per head and domain, value drains, residual peaks, the BB toy."""

from __future__ import annotations

import streamlit as st

from analyses import bbtoy, dormant, sinks
from analyses.core.domains import BUILTIN
from dashboard import components, state, workbench
from dashboard.state import cached, param, show_error

probe = workbench.start_page(
    "Sinks & dormant heads",
    "Attention sinks (Gu et al. 2024), value-state drains, residual-state peaks and active/dormant heads "
    "(Guo et al. 2024). Small defaults so the page answers in seconds on a CPU. Click a head in a heat map to "
    "open its component panel.", stop=False)  # the Bigram-Backcopy toy needs no model
tab_sink, tab_dorm, tab_toy = st.tabs(["Sink metric", "Dormant heads by domain", "Bigram-Backcopy toy"])

with tab_sink:
    c1, c2, c3, c4 = st.columns(4)
    domain = c1.selectbox("Domain", BUILTIN, index=BUILTIN.index(param("domain", "prose", choices=list(BUILTIN))))
    eps = c2.slider("ε", 0.05, 0.95, param("eps", 0.3, kind=float, lo=0.05, hi=0.95), 0.05)
    n = c3.number_input("Samples", 1, 100, param("n", 2, kind=int, lo=1, hi=100))
    T = c4.number_input("T", 8, 256, param("T", 64, kind=int, lo=8, hi=256))
    st.query_params.update({"domain": domain, "eps": str(eps), "n": str(n), "T": str(T)})
    res = None
    if probe is not None:
        try:
            cfg = sinks.Config(eps=round(eps, 2), n_samples=int(n), T=int(T), batch_size=int(n), mlp_ablation=False,
                               bos="always" if state.bos() else "tokenizer")
        except Exception as e:  # ConfigError
            show_error(e)
            cfg = None
        if cfg is not None:
            res = state.result(lambda: sinks.result_key(probe, domain=domain, config=cfg),  # a domain that does not tokenize: an error
                               lambda: sinks.run(probe, domain=domain, config=cfg), spinner="Measuring α per head…")
    if res is not None:
        s = res.summary()
        m1, m2, m3 = st.columns(3)
        m1.metric(f"Sink_1^{cfg.eps}", f"{res.sink_pct():.1f}%")
        L = res.alpha_mean.shape[0]
        m2.metric("Sink_1 past layer 1", f"{res.sink_pct(layers=range(2, L)) if L > 2 else res.sink_pct():.1f}%")
        m3.metric("Max residual peak ratio", f"{s['max residual peak ratio']:.1f}×")
        st.markdown(f"**Sink heads** (majority of samples): {s['sink heads (majority)']} · samples {res.n_samples}, "
                    f"skipped {res.n_skipped}")
        heads_fig = workbench.selectable_heads(components.axis_titles(res.plot("heads"), "head", "layer"))
        ev = st.plotly_chart(heads_fig, key="sinks_heads", on_select="rerun", selection_mode="points")
        head = workbench.head_from_selection(ev)
        if head is not None and head != st.session_state.get("_sinks_last_click"):
            st.session_state["_sinks_last_click"] = head
            st.query_params["component"] = head
        if not st.query_params.get("component"):
            st.caption("Click a cell of the heat map to open that head's component panel (below the tabs).")
        norm_kinds = {"value drain ‖v W_O,h‖": "values", "raw value ‖v‖": "raw_values", "key ‖k‖": "keys"}
        if not res.key_norm.numel():  # the backend gives no keys for this model
            norm_kinds.pop("key ‖k‖")
        if not res.value_state_norm.numel():
            norm_kinds.pop("raw value ‖v‖")
        state.choose("sinks_norm_metric", list(norm_kinds), list(norm_kinds)[0])  # a kind this backend lacks: the first
        metric = st.selectbox("Norm per position", list(norm_kinds), key="sinks_norm_metric")
        vfig = components.axis_titles(res.plot(norm_kinds[metric]), "position", f"{metric} (log scale)")
        if vfig.layout.yaxis.type == "log":  # one label per decade (plotly's default labels 2 and 5 too: "100 5 2 10 5 2 1")
            vfig.update_yaxes(dtick=1)
        import plotly.colors as pc

        import plotly.graph_objects as pgo

        nL = len(vfig.data)
        for l, tr in enumerate(vfig.data):  # one colour ramp over the layers and a colour bar instead of a 30-entry legend
            tr.line.color = pc.sample_colorscale("Viridis", [l / max(1, nL - 1)])[0]
            tr.showlegend = False
            tr.hovertemplate = f"layer {l}<br>position %{{x}}<br>norm %{{y:.3g}}<extra></extra>"
        vfig.add_trace(pgo.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                                   marker=dict(colorscale="Viridis", cmin=0, cmax=max(1, nL - 1), color=[0], showscale=True,
                                               colorbar=dict(title="layer", thickness=14))))
        vfig.update_layout(height=440)
        st.plotly_chart(vfig, width="stretch", key="sinks_values")
        a, b = st.columns(2)
        a.plotly_chart(components.axis_titles(res.plot("resid"), "position", "layer"), width="stretch", key="sinks_resid")
        b.plotly_chart(components.axis_titles(res.plot("eps"), "ε", "%"), width="stretch", key="sinks_eps")
        code = (f"from probes import load_model\nfrom analyses import sinks\n\nprobe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
                f"res = sinks.run(probe, domain={domain!r}, config=sinks.{cfg!r})\nres.summary(); res.plot('heads').show()")
        components.export_bar(f"sinks-{domain}", figure=heads_fig, table=res.to_frame(), result=res, code=code, key="exp-sinks",
                              figures={"Sink mass per head": heads_fig, "Sink % vs ε": res.plot("eps")})
        components.notebook_snippet(code)

with tab_dorm:
    doms = st.multiselect("Domains", BUILTIN, default=["prose", "code"])
    c1, c2, c3 = st.columns(3)
    theta = c1.slider("θ (dormant threshold)", 0.5, 0.99, 0.9, 0.01)
    nd = c2.number_input("Samples per domain", 1, 64, 2, key="dormant_n")
    head_txt = c3.text_input("Heads for the causal check (e.g. L20H6)", "")
    go = st.button("Compute dormant map", key="dormant_go", help="One forward per domain, plus one per tested head and domain; runs in the "
                   "background with a progress bar and Cancel.")
    if go and probe is not None and doms:
        try:
            dcfg = dormant.Config(theta=theta, n_samples=int(nd), batch_size=1,
                                  heads=tuple(h.strip() for h in head_txt.split(",") if h.strip()) or None,
                                  max_heads=0 if not head_txt.strip() else 6,
                                  intervention="attn_to_sink" if head_txt.strip() else "none")
        except Exception as e:
            show_error(e)
        else:
            # a map saved by the CLI, a notebook or another session is shown at once; else it runs in the background
            st.session_state["dormant_key"] = dkey = dormant.result_key(probe, tuple(doms), config=dcfg)
            # a run for other settings is cancelled (its result would not have this key); one with this key, from this
            # or another tab, is attached to; the run saves its result to the store itself
            if state.find(dkey, caption=False) is None:
                workbench.run_job("dormant", "Dormant map",
                                  lambda job: dormant.run(probe, tuple(doms), config=dcfg, progress=job.step),
                                  job_id=dkey, on_done=state._save)
    dkey = st.session_state.get("dormant_key")
    job = workbench.job_view("dormant")
    dres = state.find(dkey) if dkey is not None else None
    if dres is None and job is not None and job.finished and job.result is not None and dkey is not None:
        dres = state.keep(dkey, job.result)
    if dres is not None:
        view = st.radio("View", ["map", "diff"], horizontal=True)
        d1 = st.selectbox("Domain", dres.domains)
        d2 = st.selectbox("minus", dres.domains, index=min(1, len(dres.domains) - 1)) if view == "diff" else None
        dfig = workbench.selectable_heads(components.axis_titles(dres.plot(view, domain=d1, other=d2), "head", "layer"))
        ev = st.plotly_chart(dfig, key="dormant_map", on_select="rerun", selection_mode="points")
        head = workbench.head_from_selection(ev)
        if head is not None and head != st.session_state.get("_dormant_last_click"):
            st.session_state["_dormant_last_click"] = head
            st.query_params["component"] = head
        components.export_bar("dormant-map", figure=dfig, table=dres.to_frame(), result=dres, key="exp-dormant")
        st.markdown(f"**Heads that flip between domains:** {len(dres.flips)}")
        st.dataframe(dres.flips, width="stretch")
        if dres.tested:
            st.plotly_chart(components.axis_titles(dres.plot("delta"), None, None), width="stretch")
        lab = st.text_input("Show a head's attention on a prompt (e.g. L20H6)", "")
        prompt = st.text_input("Prompt", "Summer is warm. Winter is cold.")
        if lab and probe is not None:
            try:
                from probes import parse_head, site

                l, h = parse_head(lab)
                toks = probe.to_tokens(prompt, prepend_bos=True)
                A = probe.cache(toks, [site("pattern", l).name])[site("pattern", l).name][0, h]
                import plotly.graph_objects as pgo

                strs = probe.to_str_tokens(toks[0])
                st.plotly_chart(pgo.Figure(pgo.Heatmap(z=A.numpy(), x=strs, y=strs, colorscale="Viridis")).update_layout(
                    title=f"{lab} attention", yaxis_autorange="reversed"), width="stretch")
            except Exception as e:
                show_error(e)

with tab_toy:
    c1, c2, c3, c4 = st.columns(4)
    layers = c1.selectbox("Layers", [1, 3])
    att = c2.selectbox("Attention", ["softmax", "relu"])
    opt = c3.selectbox("Optimizer", ["adam", "sgd"])
    steps = c4.number_input("Steps", 10, 5000, 200)
    if st.button("Train the toy", help="A few seconds per 100 steps on a CPU."):
        try:
            st.session_state["bb_res"] = cached(bbtoy.run, bbtoy.Config(n_layers=layers, attention=att, optimizer=opt,
                                                                          steps=int(steps)))
        except Exception as e:
            show_error(e)
    bres = st.session_state.get("bb_res")
    if bres is not None:
        st.plotly_chart(bres.plot(), width="stretch")
        st.json(bres.summary())

sel = param("component", "", check=workbench.component_check(probe)) if probe is not None else ""
if sel and probe is not None:
    st.divider()
    workbench.component_panel(probe, sel, prompt=state.context()["prompt"], key="sinks-cp")
