"""Information flow: the route to a prediction drawn over the prompt (Ferrando & Voita 2024)."""

from __future__ import annotations

import streamlit as st

from analyses import routes
from analyses.routes_lens import top_prediction
from analyses.routes_plots import plot_faithfulness, plot_qk, plot_route
from dashboard import components, state, workbench
from dashboard.state import param, show_error
from probes import Probe, SondeError, ffn_label, head_label, parse_node


def run_ids(probe, ids: tuple, *, config, edits=()):
    """``routes.run`` on token ids given as a tuple (hashable and fully in the cache key, unlike a tensor's repr)."""
    import torch

    return routes.run(probe, torch.tensor(ids, dtype=torch.long), config=config, edits=edits)


def _routes(probe, ids: tuple, config, edits=(), *, spinner: str | None = None):
    """The routes result of token ids ``ids``: from the results store when saved (by the CLI, a notebook or a session),
    else computed and saved there."""
    return state.result(lambda: routes.result_key(probe, list(ids), config=config, edits=edits),
                        lambda: run_ids(probe, ids, config=config, edits=edits), spinner=spinner)


def _lens_cached(probe, res, nodes):
    return state.memo(repr(("routes-lens", res.key, nodes)), lambda: res.logit_lens(probe, nodes, k=5))


IMPORTANCE = "route importance (Σ over edges, mean per prompt)"


def _dataset_job(probe, recs, cfg):
    """Background work: :func:`analyses.routes.run_dataset` over the prompts (its ``progress`` callback drives the
    progress bar and Cancel, its ``partial`` callback the statistics so far), saved so component panels read route
    frequencies from it."""

    def work(job):
        def partial(res):
            job.partial = res

        res = routes.run_dataset(probe, recs, config=cfg, progress=job.step, partial=partial, partial_every=1)
        try:
            res.save()
        except (OSError, SondeError):  # a read-only results folder: the statistics stay on the page
            pass
        return res

    return work


def _upload_records(name: str, data: bytes) -> list:
    """An uploaded prompts file (.jsonl: ``text`` and optional ``domain`` per line; .txt: one prompt per line) read by
    :func:`analyses.core.io.iter_records`, the CLI's reader (bad lines are one error naming the line)."""
    import tempfile
    from pathlib import Path

    from analyses.core.io import iter_records

    state.decode_upload(name, data)  # other encodings: one error with the byte offset
    with tempfile.TemporaryDirectory(prefix="sonde-upload-") as d:
        f = Path(d) / components.safe_name(name)
        f.write_bytes(data)
        return list(iter_records(f))


def _show_stats(stats) -> None:
    state.choose("routes_domain", ["(all)"] + stats.domains, "(all)")
    dom = st.selectbox("Domain", ["(all)"] + stats.domains, key="routes_domain")
    fig = stats.plot(None if dom == "(all)" else dom)
    # head_mean is, per prompt, the head's importance summed over the route's attention edges, then averaged over
    # prompts: a mean of sums (it exceeds 1 when a head carries several edges), so it is labelled as such
    fig.update_layout(coloraxis_colorbar_title_text="Σ importance<br>(mean/prompt)",
                      title=f"Head importance on routes, summed over edges, mean per prompt: {dom}")
    st.plotly_chart(fig, key="routes_stats")
    df = stats.to_frame()
    st.caption(f"**{IMPORTANCE}**: for each prompt, the head's importance summed over the attention edges of its route "
               "(several edges per head, so above 1 is possible), averaged over prompts; **freq**: share of prompts whose route uses it.")
    st.dataframe(df.sort_values("mean_importance", ascending=False).head(30).rename(columns={"mean_importance": IMPORTANCE}),
                 hide_index=True)
    components.export_bar("routes-dataset", figure=fig, table=df, result=stats, key="exp-routes-dataset")


def _dataset_view(probe) -> None:
    with st.expander("Dataset view: compare domains", expanded="routes_dataset" in st.session_state.get("_sonde_jobs", {})):
        st.caption("Upload a JSONL file (one object per line with 'text' and optional 'domain'), or use the built-in "
                   "domains. Each prompt's route to its last token is computed in the background (cancellable); "
                   "heads are compared per domain and the result is saved, so component panels show route frequencies.")
        up = st.file_uploader("Prompts (.jsonl)", type=["jsonl", "txt"], key="routes_dataset")
        n_builtin = st.number_input("Built-in prompts per domain", 1, 32, 3, key="routes_dataset_n")
        use_builtin = st.button("Use the built-in domains (prose, code, arithmetic)", key="routes_dataset_builtin")
        from analyses.core.io import Record

        recs = []
        if up is not None:
            try:
                recs = _upload_records(up.name, up.getvalue())
            except SondeError as e:
                show_error(e)
                return
            if not recs:
                show_error(SondeError(f"{up.name} holds no prompts.", hint="Each line needs a non-empty 'text' field."))
                return
        elif use_builtin:
            from analyses.core.domains import domain_texts

            recs = [Record(text=t, domain=d, line=i) for d in ("prose", "code", "arithmetic")
                    for i, t in enumerate(domain_texts(d, n=int(n_builtin)))]
        if recs:
            recs = recs[:64]
            cfg = routes.DatasetConfig(max_tokens=48)
            sig = (probe.info.fingerprint, tuple((r.text, r.domain) for r in recs))
            if st.session_state.get("_routes_dataset_sig") != sig:
                st.session_state["_routes_dataset_sig"] = sig
                import hashlib

                workbench.run_job("routes_dataset", "Routes over the dataset", _dataset_job(probe, recs, cfg),
                                  job_id="routes-dataset:" + hashlib.sha256(repr(sig).encode()).hexdigest()[:16])
                st.rerun()
        job = workbench.job_view("routes_dataset", partial=lambda r: st.plotly_chart(
            r.plot(), width="stretch", key="routes_dataset_partial"))  # the statistics so far
        if job is not None and job.finished and job.result is not None:
            _show_stats(job.result)


MAX_TOKENS = 256  # longest window the page traces by default (routes over thousands of tokens take minutes on a CPU)


def _route_figure(res, route, **kw):
    """The route figure of :func:`analyses.routes_plots.plot_route` (the one ``RoutesResult.plot()`` draws)."""
    return plot_route(route, res.str_tokens, res.n_layers, res.parallel, **kw)


def _ablation_view(probe, res, tokens, cfg, label: str, pos: int, tau: float, renorm: bool, offset: int = 0) -> None:
    """The route recomputed with one head zero-ablated, drawn on ONE graph with the original: kept, lost, gained edges."""
    from probes import Ablate, parse_head, site

    try:
        l, h = parse_head(label)
        edits = (Ablate(site("z", l).name, heads=[h]),)
    except SondeError as e:
        show_error(e)
        return
    abl = _routes(probe, tokens, cfg, edits, spinner=f"Routes with {label} ablated…")
    if abl is None:
        return
    st.subheader(f"Routes with {label} ablated")
    try:
        r0, r1 = res.route(pos, tau=tau, renormalize=renorm), abl.route(pos, tau=tau, renormalize=renorm)
    except SondeError as e:
        show_error(e)
        return
    e0, e1 = set(r0.edges()), set(r1.edges())
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Edges kept", len(e0 & e1))
    c2.metric("Edges lost", len(e0 - e1))
    c3.metric("Edges gained", len(e1 - e0))
    last = f"I{res.n_layers - 1}_{pos}"
    try:  # the model's prediction at pos and its probability with the head ablated, from the full output distribution
        _, pred, p0, p1 = state.memo(repr(("routes-prediction", res.key, abl.key, last)),
                                     lambda: top_prediction(probe, res.residuals, last, abl.residuals))
    except SondeError:
        pred = None
    if pred is not None:
        c4.metric(f"p({pred!r})", f"{p1:.3f}", f"{p1 - p0:+.3f} vs original {p0:.3f}")
    fig = _route_figure(res, r0, compare=r1, offset=offset, title=f"Original route vs {label} ablated: grey kept, red dotted lost, green gained")
    st.plotly_chart(fig, key="routes_cmp", config={"displaylogo": False})
    d = (abl.head_importance(pos, tau=tau, renormalize=renorm) - res.head_importance(pos, tau=tau, renormalize=renorm))
    import pandas as pd

    flat = [(head_label(i, j), float(d[i, j])) for i in range(d.shape[0]) for j in range(d.shape[1]) if abs(float(d[i, j])) > 1e-9]
    df = pd.DataFrame(sorted(flat, key=lambda kv: -abs(kv[1]))[:15], columns=["head", "Δ importance"])
    st.caption("Heads whose importance on the route changed most when the head is ablated.")
    st.dataframe(df, hide_index=True)
    components.export_bar(f"routes-{label}-ablated", figure=fig, table=abl.route_frame(pos, tau=tau, renormalize=renorm),
                          graph=abl, graph_position=pos, result=abl, key="exp-routes-ablated")


def _attn_edges(route, node: str) -> list[tuple[int, int, int, int, float]]:
    """The attention edges of the route, one per head: ``(layer, head, query position, key position, weight)``,
    heaviest first; those entering ``node`` when it is an after-attention node (``A…``), else all of them (layer 0
    included: its scores split into the embedding and the bias part)."""
    out = []
    for u, v, d in route.edges(data=True):
        if d["kind"] != "attn" or (node[0] == "A" and v != node):
            continue
        (_, _, kp), (_, _, qp) = parse_node(u), parse_node(v)
        out += [(int(d["layer"]), h, qp, kp, float(w)) for h, w in enumerate(d.get("heads") or []) if w > 0]
    return sorted(out, key=lambda e: -e[4])


def _qk_view(probe, res, route, node: str, offset: int) -> None:
    """Why this head attends: the chosen attention edge's score split into query-side and key-side contributors
    (:func:`analyses.routes.explain_attention`), computed when an edge is set."""
    st.subheader("Why this head attends")
    edges = _attn_edges(route, node)
    if not edges:
        st.caption(f"No attention edge of the route enters {node}." if node[0] == "A" else "The route has no attention edge.")
        return
    fmt = {e: f"{head_label(e[0], e[1])} · key {e[3] + offset} {res.str_tokens[e[3]]!r} → query {e[2] + offset} "
              f"{res.str_tokens[e[2]]!r} · weight {e[4]:.3f}" for e in edges}
    options = edges if node[0] == "A" else [None] + edges  # an A node: its heaviest edge; else nothing until chosen
    state.choose("routes_qk_edge", options, options[0])
    edge = st.selectbox(f"Attention edge into {node}" if node[0] == "A" else "Attention edge of the route", options,
                        key="routes_qk_edge", format_func=lambda e: "(choose an edge)" if e is None else fmt[e],
                        help="Layer, head and key position of an attention edge; its pre-softmax score is split into what "
                             "the query and key residuals are made of (embedding, earlier heads, FFNs, biases).")
    if edge is None:
        st.caption("Select an after-attention node (A…) or choose an edge to see why its head attends there.")
        return
    layer, head, qp, kp, _ = edge
    try:
        with st.spinner(f"Explaining {head_label(layer, head)} attending from {qp + offset} to {kp + offset}…"):
            ex = _explained(probe, res, edge)
    except SondeError as e:
        show_error(e)
        return
    fig = plot_qk(ex, k=10)
    if offset:
        fig.layout.annotations[0].text = f"query side: position {qp + offset} {ex.query_token!r}"
        fig.layout.annotations[1].text = f"key side: position {kp + offset} {ex.key_token!r}"
    st.plotly_chart(fig, key="routes_qk", config={"displaylogo": False})
    model = "" if ex.model_score is None else f" (the model's own q·k·scale: {ex.model_score:.4f})"
    st.caption(f"Score {ex.score:.4f}{model}; attention weight {ex.probability:.3f}. Each side's contributors sum to the "
               f"score; the {ex.norm} scales are frozen at their values on this prompt. `L2H5@3`: head L2H5 reading "
               "position 3; red bars lower the score.")
    with st.popover("Top (query part, key part) pairs"):
        st.dataframe(ex.top_pairs(10), hide_index=True)
    st.checkbox("Add the top contributors to the graph", key="routes_qk_add",
                help="Draws the 5 largest query-side and key-side contributors as dashed edges into the route graph: from "
                     "the component's node to the node each side of the score reads.")


def _explained(probe, res, edge):
    """The QK attribution of one attention edge ``(layer, head, query, key, weight)``, computed once per result."""
    layer, head, qp, kp, _ = edge
    return state.memo(repr(("routes-qk", res.key, layer, head, qp, kp)),
                      lambda: routes.explain_attention(probe, res.tokens, layer, head, qp, kp, config=res.config))


def _qk_overlay(probe, res, route) -> list | None:
    """The QK contributor edges of the chosen attention edge, when "Add the top contributors to the graph" is on."""
    edge = st.session_state.get("routes_qk_edge")
    if not st.session_state.get("routes_qk_add") or edge is None or tuple(edge) not in set(_attn_edges(route, "-")):
        return None
    try:
        return _explained(probe, res, tuple(edge)).qk_edges(5, parallel=res.parallel)
    except SondeError:
        return None


def _faithfulness_view(probe, res, pos: int, tau: float, renorm: bool) -> None:
    """Is this route faithful? :func:`analyses.routes.faithfulness` on the route shown (page τ and renormalisation),
    run on request, its table and p(target) per condition."""
    import dataclasses

    key = repr(("routes-faithful", res.key, pos, round(tau, 4), renorm))
    asked = st.session_state.get("_routes_faith") == key
    with st.expander("Is this route faithful?", expanded=asked):
        st.caption("p(target) with everything off the route ablated (a faithful route keeps it), with the route's "
                   "heads and FFNs ablated (it should collapse), and with random sets of the same size (4 draws).")
        mean = st.checkbox("Mean ablation too (slower: reads a reference corpus)", key="routes_faith_mean")
        if st.button("Run the ablation checks", key="routes_faith_run", icon=":material/science:"):
            st.session_state["_routes_faith"] = key
            asked = True
        if not asked:
            return
        cfg = dataclasses.replace(res.config, tau=tau, renormalize=renorm, position=pos)
        view = dataclasses.replace(res, config=cfg)  # the same importances, read at the page's τ
        ablations = ("zero", "mean") if mean else ("zero",)
        try:
            with st.spinner("Ablating the route, its complement and random sets…"):
                f = state.memo(key + repr(ablations), lambda: routes.faithfulness(
                    probe, res.tokens, config=cfg, n_random=4, seed=0, ablations=ablations, result=view))
        except SondeError as e:
            show_error(e)
            return
        table = f.summary()
        st.dataframe(table, hide_index=True, key="routes_faith_table",  # probabilities down to 1e-9: scientific notation
                     column_config={c: st.column_config.NumberColumn(c, format="%.2e") for c in table.columns
                                    if c.startswith("p_")})
        st.plotly_chart(plot_faithfulness(f), key="routes_faith_chart", config={"displaylogo": False})
        st.caption(f"Route: {len(f.heads)} of {f.n_heads_total} heads, {len(f.ffns)} of {f.n_ffns_total} FFNs; "
                   f"target {f.target_token!r}; mean reference: {f.reference}.")


def _edge_table(res, pos, tau, renorm):
    """The route's edges by weight; trivial edges last: residual edges (the stay-in-place path) and the FFN reading
    its own block's attention output (A_l → M_l, weight 1 by construction)."""
    df = res.route_frame(pos, tau=tau, renormalize=renorm)
    trivial = df["kind"].eq("resid") | (df["source"].str.startswith("A") & df["target"].str.startswith("M"))
    return df.assign(_t=trivial).sort_values(["_t", "weight"], ascending=[True, False]).drop(columns="_t").reset_index(drop=True)


def _head_label_ok(probe):
    from probes import parse_head

    def check(v):
        try:
            l, h = parse_head(v)
        except SondeError as e:
            return str(e).rstrip(".")
        if not (0 <= l < probe.info.n_layers and 0 <= h < probe.info.n_heads):
            return f"this model has {probe.info.n_layers} layers × {probe.info.n_heads} heads"
        return None

    return check


# ----------------------------------------------------------------------------- two contexts side by side
COMPARE = {"off": "off", "prompt": "a second prompt (same model)", "model": "a second model (same prompt)",
           "adapter": "this model with a LoRA adapter", "dtype": "this model in another dtype"}
B_PARAM = {"prompt": "prompt_b", "model": "model_b", "adapter": "adapter_b", "dtype": "dtype_b"}  # context b's URL parameter
B_DTYPES = [d for d in state.DTYPES if d != "auto"]  # the sidebar's dtypes: b names one explicitly


def _nonempty(what: str):
    return lambda v: f"the {what} is empty" if not v.strip() else None


def _adapter_folder(v: str) -> str | None:
    """Why ``v`` is no LoRA adapter folder (:func:`probes.weights.check_adapter_folder`), or None."""
    from probes.weights import check_adapter_folder

    if not v.strip():
        return "the adapter folder is empty"
    try:
        check_adapter_folder(v.strip())
    except SondeError as e:
        return str(e).rstrip(".")
    return None


def _compare_controls() -> tuple[str, str]:
    """The compare mode and context b (a prompt, a model name, an adapter folder or a dtype), from the widgets or a
    link's ``cmp``, ``prompt_b``, ``model_b``, ``adapter_b`` and ``dtype_b``; every one validated by
    :func:`dashboard.state.param` and written back to the URL."""
    wanted = param("cmp", "off", choices=list(COMPARE), widget="routes_compare")
    state.choose("routes_compare", list(COMPARE), wanted)
    mode = st.radio("Compare with", list(COMPARE), key="routes_compare", format_func=COMPARE.get, horizontal=True,
                    help="Context b beside this one: a second prompt on this model (clean vs corrupted), or this prompt "
                         "on a second model of the same shape (another checkpoint), on this model with a LoRA adapter "
                         "merged (base vs adapter), or on this model in another dtype (fp32 vs bf16). Backend and device "
                         "are the sidebar's.")
    checks = {"prompt_b": _nonempty("prompt b"), "model_b": _nonempty("model b"), "adapter_b": _adapter_folder}
    for name, check in checks.items():
        if f"routes_{name}" not in st.session_state:
            st.session_state[f"routes_{name}"] = param(name, "", check=check, widget=f"routes_{name}")
    if "routes_dtype_b" not in st.session_state:
        st.session_state["routes_dtype_b"] = param("dtype_b", "bfloat16", choices=B_DTYPES, widget="routes_dtype_b")
    if mode == "off":
        for name in ("cmp", *B_PARAM.values()):
            if name in st.query_params:
                del st.query_params[name]
        return mode, ""
    name = B_PARAM[mode]
    if mode == "prompt":
        text = st.text_input("Prompt b", key="routes_prompt_b", help="The second prompt, e.g. the corrupted one. "
                             "Positions are right-aligned: prompts of equal length align one to one.")
    elif mode == "model":
        text = st.text_input("Model b", key="routes_model_b", help="'embedded', an HF id, a local folder or a .gguf "
                             "file: a model with as many layers and heads as this one (the prompt and BOS policy stay the same).")
    elif mode == "adapter":
        text = st.text_input("Adapter folder", key="routes_adapter_b", help="A LoRA adapter saved by PEFT "
                             "(adapter_config.json + adapter_model.safetensors; no pickle): merged into a private copy "
                             "of this model's weights.")
    else:
        text = st.selectbox("Dtype b", B_DTYPES, key="routes_dtype_b", help="This model loaded again in this dtype "
                            "(on the sidebar's device): rounding's effect on the route and on p(target).")
    st.query_params["cmp"] = mode
    if text.strip():
        st.query_params[name] = text
    elif name in st.query_params:
        del st.query_params[name]
    for other in B_PARAM.values():
        if other != name and other in st.query_params:
            del st.query_params[other]
    return mode, text


@st.cache_resource(max_entries=1, show_spinner=False)
def _adapter_probe(model: str, backend: str, device: str, dtype: str, folder: str, stamp: float) -> Probe:
    """The sidebar's model with the adapter in ``folder`` merged (one kept; ``stamp``: the adapter file's mtime, so a
    re-saved adapter loads again)."""
    return state.get_probe(model, backend, device, dtype).adapter_probe(folder)


def _context_b(probe, mode: str, text: str, ctx) -> tuple[Probe, str, str]:
    """Context b's probe, its model as the comparison names it (:func:`analyses.routes.context_model`) and its model
    argument for the notebook snippet; raises SondeError for a b that cannot load."""
    from pathlib import Path

    model_a = str(ctx["model"]).strip()
    if mode == "prompt":
        return probe, model_a, model_a
    if mode == "model":
        model_b = text.strip()
        with st.spinner(f"Loading {model_b}…"):
            return state.get_probe(model_b, ctx["backend"], ctx["device"], ctx["dtype"]), model_b, model_b
    if mode == "dtype":
        with st.spinner(f"Loading {model_a} in {text}…"):
            return (state.get_probe(model_a, ctx["backend"], ctx["device"], text),
                    routes.context_model(model_a, dtype=text), model_a)
    from probes.weights import check_adapter_folder

    folder = check_adapter_folder(text.strip())
    with st.spinner(f"Merging the adapter {folder}…"):
        pb = _adapter_probe(model_a, ctx["backend"], ctx["device"], ctx["dtype"], str(folder.resolve()),
                            (folder / "adapter_model.safetensors").stat().st_mtime)
    return pb, routes.context_model(model_a, adapter=text.strip()), model_a


def _delta_heads_figure(delta, pos_label: str):
    """Layer × head heat map of Δ head importance (b − a) on the two routes, diverging around 0."""
    import plotly.express as px

    m = float(delta.abs().max()) or 1.0
    fig = px.imshow(delta.numpy(), origin="lower", aspect="auto", color_continuous_scale="RdBu", zmin=-m, zmax=m,
                    labels=dict(x="head", y="layer", color="Δ importance"))
    fig.update_layout(height=max(300, 14 * delta.shape[0]), margin=dict(l=40, r=20, t=60, b=40),  # two title lines: half a 1280 window
                      title=f"Δ head importance (b − a) at {pos_label}<br><sup>red: lower in b · blue: higher in b</sup>")
    return fig


def _aligned_frame(cmp, tokens_a, tokens_b, offset_a: int, offset_b: int):
    """The right-aligned positions of both contexts (prompt positions), the compared one marked."""
    import pandas as pd

    rows = []
    for t, tok in enumerate(tokens_a):
        tb = t + cmp.offset
        if 0 <= tb < len(tokens_b):
            rows.append({"a": t + offset_a, "token a": repr(tok), "b": tb + offset_b, "token b": repr(tokens_b[tb]),
                         "same token": tok == tokens_b[tb], "compared": "◀" if t == cmp.position_a else ""})
    return pd.DataFrame(rows)


def _comparison_graphml(cmp) -> bytes:
    """:meth:`RouteComparison.to_graphml` (the CLI's ``--graphml``) as bytes."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="sonde-compare-") as d:
        return Path(cmp.to_graphml(Path(d) / "compare.graphml")).read_bytes()


def _compare_view(probe, res, cfg, mode: str, text: str, *, prompt: str, bos: bool, pos: int, tau: float,
                  renorm: bool, offset: int) -> None:
    """Two contexts side by side: this page's route (a) against a second prompt or a second model (b), by
    :func:`analyses.routes.compare` (the one ``sonde run routes --compare`` calls): aligned positions, kept/lost/gained
    edges on one graph, Δ head importance, Δp of the target, and the CLI's GraphML and offline HTML exports."""
    import dataclasses

    st.subheader("Two contexts side by side")
    if not text.strip():
        st.info("Type " + {"prompt": "the second prompt", "model": "the second model", "adapter": "the adapter folder"}.get(mode, "context b")
                + " above to compare.",
                icon=":material/info:")
        return
    ctx = state.context()
    model_a = str(ctx["model"]).strip()
    prompt_b = text if mode == "prompt" else prompt
    try:
        probe_b, model_b, load_b = _context_b(probe, mode, text, ctx)
        ids_b = probe_b.to_tokens(prompt_b, prepend_bos=bos)[0]
    except SondeError as e:
        show_error(e)
        return
    offset_b = max(0, int(ids_b.shape[0]) - MAX_TOKENS)
    if offset_b:
        ids_b = ids_b[-MAX_TOKENS:]
        st.caption(f"Context b has {int(ids_b.shape[0]) + offset_b:,} tokens; its route is traced over its last {MAX_TOKENS}.")
    res_b = _routes(probe_b, tuple(int(t) for t in ids_b.tolist()), cfg, spinner="Computing routes of context b…")
    if res_b is None:
        return
    if pos + res_b.n_tokens - res.n_tokens < 0:  # right-aligned: b, shorter, has no position facing a's
        show_error(SondeError(f"position {pos + offset} of a has no aligned position in b: b has {res_b.n_tokens} tokens, "
                              f"{res.n_tokens - res_b.n_tokens} fewer than a, and positions are right-aligned.",
                              hint="Pick a later predicted position, or a longer prompt b."))
        return
    labels = (routes.context_label(prompt, model_a), routes.context_label(prompt_b, model_b))

    def view(r):  # the same importances, read at the page's τ and renormalisation
        return dataclasses.replace(r, config=r.config.replace(tau=tau, renormalize=renorm))

    try:
        cmp = state.memo(repr(("routes-compare", res.key, res_b.key, pos, round(tau, 4), renorm, labels)),
                         lambda: routes.compare(view(res), view(res_b), position_a=pos, probe_a=probe, probe_b=probe_b,
                                                labels=labels))
    except SondeError as e:
        show_error(e)
        return
    pa, pb = cmp.position_a + offset, cmp.position_b + offset_b
    st.caption(f"**a**: {labels[0]}, position {pa} ({res.str_tokens[cmp.position_a]!r}) · **b**: {labels[1]}, position "
               f"{pb} ({res_b.str_tokens[cmp.position_b]!r}); positions right-aligned (offset {cmp.offset:+d}).")
    n = cmp.counts()
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Edges kept", n["kept"])
    m2.metric("Edges lost", n["lost"], help="On a's route only.")
    m3.metric("Edges gained", n["gained"], help="On b's route only." + (f" {n['unaligned']} of b's edges read positions "
                                                                        "before a's first token." if n["unaligned"] else ""))
    if cmp.delta_p is not None:
        m4.metric(f"p({cmp.target_token!r})", f"{cmp.p_b:.3f}", f"{cmp.delta_p:+.3f} vs a's {cmp.p_a:.3f}",
                  help="The target is a's top token at its position; the value is its probability in b, the delta b − a.")
    fig = cmp.plot()  # the figure of the CLI's --html, titled here without the labels (the caption above has them)
    dp = "" if cmp.delta_p is None else f"; p({cmp.target_token!r}) {cmp.p_a:.3f} (a) → {cmp.p_b:.3f} (b)"
    fig.update_layout(title_text=f"Both routes over a's tokens: grey kept, red dotted lost, green gained{dp}")
    st.plotly_chart(fig, key="routes_compare_graph", config={"displaylogo": False})
    left, right = st.columns(2)
    with left:
        heads = _delta_heads_figure(cmp.head_delta, f"position {pa} (a)")
        st.plotly_chart(heads, key="routes_compare_heads", config={"displaylogo": False})
    with right:
        st.caption("Aligned positions")
        st.dataframe(_aligned_frame(cmp, res.str_tokens, res_b.str_tokens, offset, offset_b), hide_index=True,
                     key="routes_compare_aligned", height=min(400, 40 + 35 * res.n_tokens))
    st.caption("Edges whose weight changed most (positions in a's tokens; lost edges weigh 0 in b, gained ones 0 in a).")
    st.dataframe(cmp.edges.head(30), hide_index=True, key="routes_compare_edges")
    stem = components.safe_name(f"routes-compare-{pa}")
    with st.container(horizontal=True, gap="small", key="exp-routes-compare-bar"):
        st.download_button("GraphML", data=lambda: _comparison_graphml(cmp), file_name=f"{stem}.graphml",
                           mime="application/xml", on_click="ignore", key="exp-routes-compare-graphml",
                           icon=":material/download:", width="content", help="One graph of both routes; edges carry "
                           "status, weight_a, weight_b and delta (the CLI's --compare --graphml).")
        st.download_button("Comparison report", data=cmp.report_html, file_name=f"{stem}.html", mime="text/html",
                           on_click="ignore", key="exp-routes-compare-html", icon=":material/description:",
                           width="content", type="primary", help="One offline HTML page: figure, counts, Δp, the heads "
                           "and edges that changed most (the CLI's --compare --html).")
    components.notebook_snippet(_compare_code(probe, prompt, prompt_b, model_a, load_b, pos + offset, tau, renorm, bos,
                                              adapter=text.strip() if mode == "adapter" else None,
                                              dtype=text if mode == "dtype" else None),
                                title="Reproduce the comparison in a notebook")


def _compare_code(probe, prompt: str, prompt_b: str, model_a: str, model_b: str, pos: int, tau: float, renorm: bool,
                  bos: bool, *, adapter: str | None = None, dtype: str | None = None) -> str:
    head = f"from probes import load_model\nfrom analyses import routes\n\nprobe = load_model({model_a!r}, backend={probe.backend!r})\n"
    probe_b = "probe" if model_b == model_a and adapter is None and dtype is None else "probe_b"
    if adapter is not None:
        head += f"probe_b = probe.adapter_probe({adapter!r})  # the LoRA adapter merged into a private copy\n"
    elif probe_b != "probe":
        head += f"probe_b = load_model({model_b!r}, backend={probe.backend!r}{'' if dtype is None else f', dtype={dtype!r}'})\n"
    cfg = f"routes.Config(tau={tau:.2f}, renormalize={renorm!r}, prepend_bos={bos!r})"
    return (head + f"cfg = {cfg}\na = routes.run(probe, {prompt!r}, config=cfg)\nb = routes.run({probe_b}, {prompt_b!r}, config=cfg)\n"
            f"cmp = routes.compare(a, b, position_a={pos}, probe_a=probe, probe_b={probe_b})\n"
            "cmp.to_dict(); cmp.plot().show(); cmp.to_graphml('compare.graphml'); open('compare.html', 'wb').write(cmp.report_html())")


def main() -> None:
    probe = workbench.start_page(
        "Information flow",
        "Routes (Ferrando & Voita 2024): which tokens, heads and FFNs carry information to a prediction. "
        "Edges are block parts whose L1 proximity to the block output exceeds τ. Click a head in the heat map "
        "(or pick it below) to open its component panel.")
    prompt = state.prompt_input()
    bos = state.bos()
    c1, c2, c3 = st.columns([2, 1, 2])
    tau = c1.slider("τ (threshold)", 0.01, 0.10, param("tau", 0.04, kind=float, lo=0.01, hi=0.10, widget="routes_tau"), 0.01, key="routes_tau")
    renorm = c2.checkbox("Renormalize", value=param("renorm", True, kind=bool, widget="routes_renorm"), key="routes_renorm")
    st.query_params.update({"tau": f"{tau:.2f}", "renorm": "1" if renorm else "0"})
    cmp_mode, cmp_text = _compare_controls()
    if not prompt.strip():
        show_error(SondeError("the prompt is empty.", hint="Type a prompt of at least one token."))
        return
    try:
        cfg = routes.Config(keep_residuals=True, prepend_bos=bos)
        all_ids = probe.to_tokens(prompt, prepend_bos=bos)[0]
    except SondeError as e:
        show_error(e)
        return
    n_all = int(all_ids.shape[0])
    tokens = all_ids
    offset = 0  # the prompt position of the window's first token: every position shown is a position in the prompt
    if n_all > MAX_TOKENS:
        window = st.slider("Tokens to trace (the last N of the prompt)", 2, n_all, MAX_TOKENS, key="routes_window",
                           help="Routes over thousands of tokens take minutes on a CPU and their graph is unreadable.")
        tokens = all_ids[-int(window):]
        offset = n_all - int(window)
        st.caption(f"The prompt has {n_all:,} tokens; the route is traced over its last {int(window):,} (positions "
                   f"{n_all - int(window)}–{n_all - 1}; set **Tokens to trace** above).")
    # a new prompt starts at its last position; a link's position applies to the prompt it came with
    sig = (prompt, bos, int(tokens.shape[0]))
    new_prompt = st.session_state.get("_routes_sig") not in (None, sig)
    if new_prompt:  # every selection starts again from the new prompt's defaults
        for k in ("position", "node", "component"):
            if k in st.query_params:
                del st.query_params[k]
    st.session_state["_routes_sig"] = sig
    limit = routes.max_prompt_tokens(probe.info.n_layers, probe.info.n_heads, cfg.max_memory_gb)
    if tokens.shape[0] > limit:
        show_error(SondeError(f"{int(tokens.shape[0])} tokens exceed the {limit} this model's route importances fit in "
                              f"{cfg.max_memory_gb:g} GB.", hint="Lower **Tokens to trace** above."))
        return
    res = _routes(probe, tuple(int(t) for t in tokens.tolist()), cfg, spinner="Computing routes…")
    if res is None:
        return
    T = res.n_tokens
    default_pos = param("position", T - 1, kind=int, lo=0, hi=T - 1, widget="routes_position")
    labels = [f"{t + offset}: {tok!r}" for t, tok in enumerate(res.str_tokens)]
    state.choose("routes_position", labels, labels[default_pos], reset=new_prompt)
    choice = c3.selectbox("Predicted position", labels, key="routes_position")
    pos = labels.index(choice)
    st.query_params["position"] = str(pos)
    try:
        route = res.route(pos, tau=tau, renormalize=renorm)
    except SondeError as e:
        show_error(e)
        return
    nodes = tuple(sorted(route.nodes))
    last = f"I{res.n_layers - 1}_{pos}"
    lens = _lens_cached(probe, res, nodes)
    hover = {n: "lens: " + ", ".join(f"{t!r} {p:.2f}" for t, p in top[:3]) for n, top in lens.items()}
    pred = lens.get(last, [])
    st.markdown(f"**Route to position {pos + offset}** ({res.str_tokens[pos]!r}) — {route.number_of_nodes()} nodes, "
                f"{route.number_of_edges()} edges; model predicts "
                + ", ".join(f"{components.token_chip(t)} ({p:.2f})" for t, p in pred[:3]))

    if cmp_mode != "off":
        _compare_view(probe, res, cfg, cmp_mode, cmp_text, prompt=prompt, bos=bos, pos=pos, tau=tau, renorm=renorm,
                      offset=offset)
        st.divider()

    # the selected head and node (from the URL, a click, or the boxes below)
    imp = res.head_importance(pos, tau=tau, renormalize=renorm)
    order = sorted(((head_label(l, h), float(imp[l, h])) for l in range(imp.shape[0]) for h in range(imp.shape[1])), key=lambda kv: -kv[1])
    head_labels = [k for k, _ in order]
    wanted = param("component", head_labels[0], check=_head_label_ok(probe), widget="routes_component")
    wanted_node = param("node", last, check=lambda v: None if v in nodes else "not a node of this route", widget="routes_node")
    all_zero = not float(imp.max()) > 0  # no head on the route: keep the selected head rather than fall back to L0H0
    state.choose("routes_component", head_labels, wanted if wanted in head_labels else head_labels[0], reset=new_prompt and not all_zero)
    state.choose("routes_node", nodes, wanted_node if wanted_node in nodes else last if last in nodes else nodes[0], reset=new_prompt)
    # the selected node: a click on the route graph (read before the graph is drawn, so it rings the node), the URL, the box
    clicked_node = workbench.node_from_selection(st.session_state.get("routes_graph"))
    if clicked_node in nodes and clicked_node != st.session_state.get("_routes_last_node"):
        st.session_state["_routes_last_node"] = clicked_node
        st.session_state["routes_node"] = clicked_node
    node = st.session_state["routes_node"]
    graph_ph = st.container()

    left, right = st.columns(2)
    with left:
        st.subheader("Head importance in this route")
        heads_fig = workbench.selectable_heads(res.plot_heads(pos, tau=tau, renormalize=renorm))
        heads_fig.update_layout(title="Click a head to open its panel and highlight its edges")
        if all_zero:  # a uniform map would read as data
            st.info(f"No head is on the route at this τ ({tau:.2f}, position {pos + offset}): every attention edge's proximity "
                    "falls below τ. Lower τ to see heads.", icon=":material/info:")
            clicked = None
        else:
            ev = st.plotly_chart(heads_fig, key="routes_heads", on_select="rerun", selection_mode="points")
            clicked = workbench.head_from_selection(ev)
    if clicked is not None and clicked != st.session_state.get("_routes_last_click"):
        st.session_state["_routes_last_click"] = clicked
        st.session_state["routes_component"] = clicked
    with graph_ph:
        selected_head = st.session_state["routes_component"]
        graph_fig = _route_figure(res, route, hover=hover, head=selected_head, selected=node, qk=_qk_overlay(probe, res, route),
                                  offset=offset, title=f"Route to position {pos + offset} · {selected_head} highlighted · click a node to inspect it")
        st.plotly_chart(graph_fig, key="routes_graph", on_select="rerun", selection_mode="points")
        _faithfulness_view(probe, res, pos, tau, renorm)
    with right:
        st.subheader("Inspect a node")
        node = st.selectbox("Node", nodes, key="routes_node")
        st.query_params["node"] = node
        st.markdown("Logit lens: " + ", ".join(f"{components.token_chip(t)} {p:.3f}" for t, p in lens.get(node, [])))
        contrib = {}
        for u, v, d in route.in_edges(node, data=True):
            if d["kind"] == "attn" and d.get("heads"):
                for h, w in enumerate(d["heads"]):
                    if w > 0:
                        contrib[head_label(d["layer"], h)] = contrib.get(head_label(d["layer"], h), 0.0) + w
            else:
                contrib[f"{u} ({d['kind']})"] = contrib.get(f"{u} ({d['kind']})", 0.0) + d["weight"]
        if contrib:
            import plotly.graph_objects as go

            top = sorted(contrib.items(), key=lambda kv: -kv[1])[:10]
            bar = go.Figure(go.Bar(x=[w for _, w in top][::-1], y=[k for k, _ in top][::-1], orientation="h", marker_color="#1f77b4"))
            bar.update_layout(height=60 + 26 * len(top), margin=dict(l=10, r=10, t=30, b=40), title=f"What flows into {node}",
                              xaxis_title="contribution (edge weight on the route)", yaxis_title=None)
            st.plotly_chart(bar, key="routes_node_contrib", config={"displaylogo": False})
        else:
            st.caption("No edge enters this node (a token embedding).")
        _, nlayer, npos = parse_node(node)
        parts = [k for k, _ in sorted(contrib.items(), key=lambda kv: -kv[1]) if k.startswith("L")] if node[0] == "A" else []
        if node[0] in ("M", "I"):
            parts = [ffn_label(nlayer)] + parts
        if parts:
            state.choose("routes_part", parts, parts[0])
            part = st.selectbox("Vocabulary projection of", parts, key="routes_part",
                                help="What this head (z_h W_O,h) or FFN writes at this position, read through the unembedding.")
            from analyses import component as _component

            try:
                part_lens = state.memo(repr(("routes-part-lens", res.key, part, npos)),
                                       lambda: _component.output_lens(probe, res.tokens, part, npos, k=6))
            except SondeError as e:
                show_error(e)
                part_lens = None
            if part_lens:
                up_, down_ = part_lens
                st.markdown(f"**{part} at position {npos + offset}** promotes " + ", ".join(components.token_chip(t) for t, _ in up_)
                            + " · suppresses " + ", ".join(components.token_chip(t) for t, _ in down_))
        tok = res.str_tokens[npos]
        if tok.strip() and npos > 0:
            # propose what the model itself found likely at this position (its prediction one token earlier)
            prev = res.logit_lens(probe, [f"I{res.n_layers - 1}_{npos - 1}"], k=8).get(f"I{res.n_layers - 1}_{npos - 1}", [])
            alt = next((t for t, _ in prev if t.strip() and t.strip() != tok.strip()), None)
            if alt is not None and st.button(f"Intervene on token {npos} ({tok!r} → {alt!r}) in a counterfactual", key="routes_token_cf",
                                             icon=":material/call_split:",
                                             help="Opens Counterfactuals with a prompt edit: the token replaced by the model's own "
                                                  "next most likely token at that position."):
                workbench.go("counterfactual", **state.url_context(), kind="prompt", old=tok.strip(), new=alt.strip())
        st.caption("Edges by weight; trivial edges last (residual stay-in-place edges and each FFN reading its own block's input).")
        st.dataframe(_edge_table(res, pos, tau, renorm).head(30), width="stretch", hide_index=True)

    _qk_view(probe, res, route, node, offset)

    # ---- the component panel: a click on the heat map, or the selection fallback
    comp = st.selectbox("Component (heads by importance on this route)", head_labels, key="routes_component",
                        format_func=lambda k: f"{k} · {dict(order)[k]:.3f}")
    st.query_params["component"] = comp
    workbench.component_panel(probe, comp, prompt=prompt, routes_result=res, position=pos, key="routes-cp")

    ablated = param("ablated", "", check=_head_label_ok(probe))
    if ablated:
        st.query_params["ablated"] = ablated
        _ablation_view(probe, res, tuple(int(t) for t in tokens.tolist()), cfg, ablated, pos, tau, renorm, offset)
        if st.button("Hide the ablated comparison", key="routes_hide_ablated"):
            del st.query_params["ablated"]
            st.rerun()

    st.subheader("Export")
    import plotly.graph_objects as go

    # exported figures are static: their titles carry no click hints
    graph_out = go.Figure(graph_fig).update_layout(title_text=f"Route to position {pos + offset} · {selected_head} highlighted")
    heads_out = go.Figure(heads_fig).update_layout(title_text=f"Head importance on the route to position {pos + offset}")
    components.export_bar(f"routes-{pos}", figure=graph_out, table=_edge_table(res, pos, tau, renorm), graph=res,
                          graph_position=pos, result=res, figures={"Route graph": graph_out, "Head importance": heads_out},
                          notes=(f"Prompt: {prompt!r}; position {pos + offset}; τ = {tau:.2f}; renormalize = {renorm}; BOS {bos}.",),
                          code=_code(probe, prompt, pos, tau, bos, window=T if offset else None), key="exp-routes")
    _dataset_view(probe)
    components.notebook_snippet(_code(probe, prompt, pos, tau, bos, window=T if offset else None))


def _code(probe, prompt: str, pos: int, tau: float, bos: bool, window: int | None = None) -> str:
    """The Python of the view: ``pos`` counts in the traced tokens, which are the prompt's last ``window`` tokens when
    the page traces a window of a long prompt (then position ``pos`` of the window is prompt position ``pos + offset``)."""
    head = f"from probes import load_model\nfrom analyses import routes\n\nprobe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
    cfg = f"config=routes.Config(keep_residuals=True, prepend_bos={bos!r})"
    if window is None:
        run = f"res = routes.run(probe, {prompt!r}, {cfg})\n"
    else:
        run = (f"tokens = probe.to_tokens({prompt!r}, prepend_bos={bos!r})[0][-{window}:]  # the traced window: the last {window} tokens\n"
               f"res = routes.run(probe, tokens, {cfg})  # position {pos} of the window\n")
    return head + run + f"res.plot({pos}, tau={tau:.2f}).show(); res.plot_heads({pos}, tau={tau:.2f}).show()"


main()
