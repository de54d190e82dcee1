"""Counterfactuals: what the model would have written under a token / prompt / model edit, with the same noise."""

from __future__ import annotations

import html

import streamlit as st

from analyses import counterfactual as cf
from analyses.tokens_html import Token, token_strip
from dashboard import components, state, workbench
from dashboard.state import cached, param, show_error
from probes import SondeError

probe = workbench.start_page(
    "Counterfactuals",
    "Gumbel-Max sampling as a causal model (Chatzi et al. 2024): the counterfactual keeps the factual "
    "noise, so it differs from the factual text only because of the intervention. The interventional "
    "baseline uses fresh noise.")

with st.sidebar:
    st.markdown("### Sampling")
    temperature = st.slider("Temperature (0 = greedy)", 0.0, 2.0, param("temperature", 0.8, kind=float, lo=0.0, hi=2.0), 0.05)
    top_p = st.slider("Top-p (1 = off)", 0.05, 1.0, param("top_p", 1.0, kind=float, lo=0.05, hi=1.0), 0.05)
    top_k = st.number_input("Top-k (0 = off)", 0, 1000, param("top_k", 0, kind=int, lo=0, hi=1000))
    seed = st.number_input("Seed", 0, 10**9, param("seed", 0, kind=int, lo=0, hi=10**9))
    max_new = st.slider("New tokens", 4, 60, param("max_new_tokens", 20, kind=int, lo=4, hi=60))

prompt = state.prompt_input()
observed = param("observed", "")
if observed:
    c_obs, c_clear = st.columns([5, 1])
    observed = c_obs.text_area("Observed response (its noise is inferred instead of sampling a new one)", value=observed,
                               key="cf_observed", height=70)
    if c_clear.button("Sample instead", key="cf_clear_observed"):
        del st.query_params["observed"]
        st.rerun()
config = cf.Config(temperature=float(temperature), top_p=None if top_p >= 1 else float(top_p), top_k=int(top_k) or None,
                   seed=int(seed), max_new_tokens=int(max_new))
if observed:
    st.query_params["observed"] = observed
st.query_params.update({"temperature": str(temperature), "top_p": str(top_p), "top_k": str(top_k),
                        "seed": str(seed), "max_new_tokens": str(max_new)})


def _readable(label: str) -> str:
    """An intervention label with token ids shown as their text (``token:3=id:253`` -> ``token:3=' Paris'``)."""
    import re

    def text(m):
        return repr(probe.tokenizer.decode([int(x) for x in m.group(1).split(",") if x.strip()]))

    return re.sub(r"id:([\d,]+)", text, label)


def _components_ok(v: str) -> str | None:
    from analyses.component import parse_component

    try:
        for part in v.split(","):
            parse_component(part.strip(), probe.info)
    except SondeError as e:
        return str(e).rstrip(".")
    return None


def _spans(strs, factual, ids, start) -> str:
    """A continuation as a token strip: tokens that differ from the factual one highlighted, the edit's start marked."""
    return token_strip(Token(s, title=f"pos {p}", changed=not (p < len(factual) and factual[p] == t), start=p == start)
                       for p, (s, t) in enumerate(zip(strs, ids)))


def _run(spec, cfg):
    """``cf.run`` from the results store when saved there (by the CLI, a notebook or a session), else computed and saved."""
    return state.result(lambda: cf.result_key(probe, prompt, spec, config=cfg, observed=observed or None),
                        lambda: cf.run(probe, prompt, spec, config=cfg, observed=observed or None))


tab_cf, tab_bias = st.tabs(["Counterfactual", "Bias sweep"])

with tab_cf:
    with st.spinner("Sampling the factual continuation…"):
        base = _run("none", config.replace(interventional=False))
    if base is None:
        st.stop()
    kind = st.radio("Intervention", ["token edit", "prompt edit", "model edit"], horizontal=True,
                    index={"token": 0, "prompt": 1, "ablate": 2}[param("kind", "token", choices=["token", "prompt", "ablate"])])
    spec = None
    if kind == "token edit":
        n = len(base.factual)
        labels = [f"{p}:{s.replace(chr(10), '⏎')}" for p, s in enumerate(base.factual_str)]
        qpos = param("pos", min(3, max(n - 1, 0)), kind=int, lo=0, hi=max(n - 1, 0))
        default = labels[qpos] if n else None
        pick = st.pills("Click a generated token to intervene there", labels, default=default) if n else None
        if pick is not None:
            pos = int(pick.split(":", 1)[0])
            alts = [int(t) for t in base.alternatives[pos].tolist() if int(t) != base.factual[pos]]
            choices = [probe.tokenizer.decode([t]) for t in alts]
            c1, c2 = st.columns(2)
            alt_q = param("alt", choices[0] if choices else "", check=lambda v: None if v in choices else "not one of the model's likely tokens here")
            alt = c1.selectbox("Replace by one of the model's likely tokens", choices, index=choices.index(alt_q) if choices else None)
            custom = c2.text_input("…or type a replacement", value=param("new", ""))
            if alt is not None:
                st.query_params["alt"] = alt
            if custom:
                st.query_params["new"] = custom
            elif "new" in st.query_params:
                del st.query_params["new"]
            if custom.strip():
                spec = f"token:{pos}={custom}"
            elif alt is not None:
                spec = cf.TokenEdit(pos, (alts[choices.index(alt)],))
            st.query_params["pos"] = str(pos)
    elif kind == "prompt edit":
        c1, c2 = st.columns(2)
        words = prompt.split()
        old = c1.text_input("Replace", value=param("old", words[-1] if words else "",
                                                   check=lambda v: None if v in prompt else "not a part of the prompt"))
        new = c2.text_input("by", value=param("new", "Maeve"))
        st.query_params.update({"old": old, "new": new})
        spec = f"prompt:{old}->{new}"
    else:
        heads_txt = st.text_input("Heads / neurons to zero", value=param("ablate", "L5H3" if probe.info.n_layers > 5 and probe.info.n_heads > 3 else "L0H0",
                                                                        check=_components_ok),
                                  help="Comma-separated L<layer>H<head> and L<layer>N<neuron> labels.")
        st.query_params["ablate"] = heads_txt
        spec = "ablate:" + heads_txt
    st.query_params["kind"] = {"token edit": "token", "prompt edit": "prompt", "model edit": "ablate"}[kind]
    if spec is not None:
        with st.spinner("Counterfactual and interventional continuations…"):
            res = _run(spec, config)
        if res is not None:
            for note in res.notes:
                st.info(note)
            cols = st.columns(2)
            cols[0].markdown("**Factual**")
            cols[0].markdown(_spans(res.factual_str, res.factual, res.factual, None), unsafe_allow_html=True)
            cols[1].markdown(f"**Counterfactual** · `{_readable(res.intervention)}`")
            cols[1].markdown(_spans(res.str_rows[0], res.factual, res.rows[0], res.edit_pos), unsafe_allow_html=True)
            if len(res.rows) > 1:
                cols[1].markdown("**Interventional** (fresh noise)")
                cols[1].markdown(_spans(res.str_rows[1], res.factual, res.rows[1], res.edit_pos), unsafe_allow_html=True)
            st.dataframe(res.divergence_frame(), hide_index=True)
            fig = res.plot()
            fig.update_layout(title_text=fig.layout.title.text.replace(res.intervention, _readable(res.intervention), 1))  # as the header
            st.plotly_chart(fig, width="stretch", key="cf_plot")
            code = (f"from probes import load_model\nfrom analyses import counterfactual as cf\n\n"
                    f"probe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
                    f"res = cf.run(probe, {prompt!r}, {res.intervention!r}, config=cf.{config!r}"
                    + (f", observed={observed!r}" if observed else "") + ")\nres.divergence_frame(); res.plot().show()")
            components.export_bar(f"counterfactual-{res.intervention}", figure=fig, table=res.to_frame(), result=res,
                                  tables={"divergence": res.divergence_frame(), "rows": res.to_frame()},
                                  notes=(f"Prompt: {prompt!r}", f"Factual: {''.join(res.factual_str)!r}",
                                         f"Counterfactual ({res.intervention}): {''.join(res.str_rows[0])!r}"),
                                  code=code, key="exp-cf")
            components.notebook_snippet(code)
    if kind == "token edit" and pick is not None:
        with st.expander("Tree of alternatives at this position"):
            if st.button("Grow the tree (3 branches)"):
                try:
                    import plotly.graph_objects as go

                    brs = cached(cf.branches, prompt, pos, _probe=probe, k=3, config=config) or []
                    root = "…" + "".join(base.factual_str[max(0, pos - 4):pos])
                    ids, parents, labels = ["root", "f"], ["", "root"], [root, "".join(base.factual_str[pos:])]
                    for i, b in enumerate(brs):
                        ids.append(f"b{i}")
                        parents.append("root")
                        labels.append("".join(b.str_rows[0][pos:]))
                    fig = go.Figure(go.Treemap(ids=ids, parents=parents, labels=[html.escape(x) for x in labels], root_color="#eef2f7"))
                    fig.update_layout(margin=dict(t=10, l=10, r=10, b=10), height=320)
                    st.plotly_chart(fig, width="stretch")
                    st.caption("First tile: the factual continuation; the others replace the token by the model's next likely "
                               "tokens and continue with the factual noise.")
                except SondeError as e:
                    show_error(e)

with tab_bias:
    st.markdown("Swap the protagonist attribute with the **same noise** and compare an attribute extracted by patterns.")
    template = st.text_input("Template ({group} is the slot)", value=cf.BiasConfig.template)
    groups = st.text_input("Groups (first = factual world)", value="man, woman")
    n_samples = st.slider("Samples per group", 4, 64, 8)
    if st.button("Run sweep"):
        try:
            bcfg = cf.BiasConfig(template=template, groups=tuple(g.strip() for g in groups.split(",") if g.strip()),
                                 n_samples=int(n_samples), max_new_tokens=8, temperature=config.temperature, seed=config.seed)
        except SondeError as e:
            show_error(e)
        else:
            b = state.stored(cf.bias_sweep_key(probe, config=bcfg), lambda: cf.bias_sweep(probe, config=bcfg))
            if b is not None:
                st.plotly_chart(b.plot(), width="stretch")
                st.dataframe(b.summary[b.summary["count"] > 0], hide_index=True)
                st.dataframe(b.samples, hide_index=True)
