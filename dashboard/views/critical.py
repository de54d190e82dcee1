"""Critical tokens (Lin et al. 2024): which token of a failed trace makes success unreachable."""

from __future__ import annotations

import streamlit as st

from analyses import critical as C
from analyses.tasks import Problem, format_prompt, make_checker
from analyses.tokens_html import Token, token_strip
from dashboard import components, state, workbench
from dashboard.state import cached, param, show_error

probe = workbench.start_page(
    "Critical tokens",
    "Rollout search on an incorrect reasoning trace (Lin et al. 2024, *Critical Tokens Matter*): each prefix of the "
    "response is completed by sampled rollouts; the critical token is the one after which no rollout reaches the "
    "right answer. Keep rollouts small on CPU.")

DEFAULT_Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
c1, c2 = st.columns([3, 1])
_nonempty = lambda v: "it is empty" if not v.strip() else None  # noqa: E731
question = c1.text_area("Question", value=param("question", DEFAULT_Q, check=_nonempty), height=70)
reference = c2.text_input("Reference answer", value=param("answer", "7", check=_nonempty))
response = st.text_area("Incorrect response to analyse", value=param("response", "3 + 4 = 8.", check=_nonempty), height=70,
                        help="The trace y whose prefixes are rolled out. Sample one with the model under 'Across problems'.")
# the link's search settings are read here, outside the collapsed box: a bad one is one visible error line
q_rollouts = param("rollouts", 3, kind=int, lo=1, hi=256)
q_max_new = param("max_new", 2, kind=int, lo=1, hi=1024)
q_granularity = param("granularity", "token", choices=["token", "step", "bisect"])
with st.expander("Search settings", expanded=False):
    s1, s2, s3, s4 = st.columns(4)
    n_rollouts = s1.number_input("Rollouts per prefix", 1, 256, q_rollouts)
    max_new = s2.number_input("Max new tokens", 1, 1024, q_max_new)
    granularity = s3.selectbox("Granularity", ["token", "step", "bisect"], index=["token", "step", "bisect"].index(q_granularity))
    temperature = s4.number_input("Temperature", 0.05, 2.0, 0.7, step=0.05)
    a1, a2, a3 = st.columns(3)
    alternatives = a1.selectbox("Counterfactual", ["topk", "sample", "none"])
    n_alt = a2.number_input("Alternatives", 0, 64, 2)
    seed = a3.number_input("Seed", 0, 10_000, 0)
    adapters = st.text_input("LoRA adapters folder (optional, from `sonde run contrastive-train`)", value="")
for k, v in {"question": question, "answer": reference, "response": response, "rollouts": str(n_rollouts),
             "max_new": str(max_new), "granularity": granularity}.items():
    st.query_params[k] = v

cfg = C.Config(n_rollouts=int(n_rollouts), max_new_tokens=int(max_new), granularity=granularity, temperature=float(temperature),
               alternatives=alternatives, n_alternatives=int(n_alt), alt_rollouts=1, seed=int(seed))
try:
    problem = Problem(question, reference)
    checker = make_checker(problem)
except Exception as e:  # noqa: BLE001 - SondeError from the checker
    show_error(e)
    st.stop()
prompt = format_prompt(probe, problem)


# the rollout search runs in the background (progress per rolled-out prefix, Cancel); results are kept per setting
def _work(job, probe=probe, args=(prompt, response, reference, cfg), q=question):
    p, r, ref, c = args
    return C.search(probe, p, r, make_checker(Problem("", ref)), config=c, question=q, reference=ref, progress=job.step)


try:
    key = C.search_key(probe, prompt, response, config=cfg, reference=reference)
except Exception as e:  # noqa: BLE001 - SondeError: a response that does not tokenize
    show_error(e)
    st.stop()
res = workbench.background_result("critical_search", "Critical-token search", key, _work,
                                  waiting="Rollouts run in the background; the trace appears when the search finishes.")
row = res.traces.iloc[0]
tok = res.tokens

ce = None
if adapters.strip():
    try:
        ce = cached(C.contrastive_scores, adapters.strip(), res.ids["prompt"][0], res.ids["response"][0], _probe=probe)
    except Exception as e:  # noqa: BLE001
        show_error(e)

m1, m2, m3, m4 = st.columns(4)
m1.metric("Critical token", "—" if row.critical_token is None else repr(row.critical_token))
m2.metric("Success before → after", "—" if row.score_before is None else f"{row.score_before:.2f} → {row.score_after:.2f}")
m3.metric("Alternatives' success", "—" if row.alt_success is None or row.alt_success != row.alt_success else f"{row.alt_success:.2f}")
m4.metric("Rollouts", int(row.n_rollouts))
if row.note:
    st.info(row.note)

# the trace, each token coloured by the success rate after it
alts = res.alternatives
spans = []
for _, t in tok.iterrows():
    s = t.score_after
    scored = s is not None and s == s
    tip = [f"pos {t.pos}", f"success after: {f'{s:.2f}' if scored else 'n/a'}"]
    if t.score_before is not None and t.score_before == t.score_before:
        tip.append(f"before: {t.score_before:.2f}")
    if bool(t.critical) and len(alts):
        tip.append("alternatives: " + ", ".join(f"{a.token!r} {a.success:.2f}" for _, a in alts.head(6).iterrows()))
    if ce is not None:
        c = ce.iloc[int(t.pos)]
        tip.append(f"CE p_ce {c.p_ce:.3f}, log-ratio {c.log_ratio:+.3f}")
    bg = f"rgba({int(255 * (1 - s))},{int(200 * s + 55)},80,0.45)" if scored else "#eeeeee"
    spans.append(Token(t.token, title="; ".join(tip), background=bg, marked=bool(t.critical)))
st.markdown(token_strip(spans), unsafe_allow_html=True)
st.caption("Green: rollouts after this token still succeed; red: they fail; grey: prefix not evaluated. Hover for details.")

if row.critical_pos is not None and row.critical_pos == row.critical_pos:
    cpos = int(row.critical_pos)
    if st.button(f"Open the critical token (position {cpos}) in Counterfactuals", key="critical_to_cf", icon=":material/call_split:",
                 help="The response is kept as the observed text (its sampling noise is inferred); the token at this "
                      "position is the intervention point."):
        workbench.go("counterfactual", prompt=prompt, observed=response, kind="token", pos=cpos)
fig = res.plot(0)
st.plotly_chart(fig, width="stretch")
_code = (f"from probes import load_model\nfrom analyses import critical as C\nfrom analyses.tasks import Problem, format_prompt, make_checker\n\n"
         f"probe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
         f"problem = Problem({question!r}, {reference!r})\n"
         f"res = C.search(probe, format_prompt(probe, problem), {response!r}, make_checker(problem), config=C.{cfg!r})\nres.plot(0).show()")
components.export_bar("critical", figure=fig, table=res.tokens, result=res, code=_code, key="exp-critical")
components.notebook_snippet(_code)

if len(alts):
    st.subheader("Counterfactual: alternatives at the critical position")
    st.dataframe(alts[["token", "prob", "n", "n_correct", "success", "example"]], hide_index=True)
if ce is not None:
    st.write("CE vs rollouts:", C.compare_contrastive(res, ce))

st.subheader("Replace a token and regenerate")
r1, r2, r3 = st.columns([1, 1, 1])
pos_default = int(row.critical_pos) if row.critical_pos is not None and row.critical_pos == row.critical_pos else 0
pos = r1.number_input("Position", 0, max(0, len(tok) - 1), pos_default)
replacement = r2.text_input("Replacement text", value=" 7")
if r3.button("Replace and regenerate"):
    new_resp = res.ids["response"][0][: int(pos)] + probe.tokenizer(replacement, add_special_tokens=False).input_ids
    got = cached(C.rollout_success, res.ids["prompt"][0], new_resp, len(new_resp), checker, int(n_rollouts), cfg, _probe=probe)
    if got is not None:
        st.write(f"success rate with the replacement: {got[0]}/{int(n_rollouts)}")
        st.dataframe({"rollout": got[1]})

with st.expander("Across problems: sample traces, search each failure"):
    n_prob = st.number_input("Built-in problems", 1, 50, 2)
    n_samp = st.number_input("Samples per problem", 1, 64, 4)
    if st.button("Run"):
        from analyses.tasks import builtin_arith

        problems = builtin_arith(int(n_prob), seed=int(seed))
        mcfg = cfg.replace(n_samples=int(n_samp), granularity="bisect", max_new_tokens=max(int(max_new), 48))
        many = state.result(lambda: C.result_key(probe, problems, config=mcfg), lambda: C.run(probe, problems, config=mcfg))
        if many is not None:
            st.dataframe(many.traces[["problem", "question", "response", "critical_token", "score_before", "score_after", "note"]], hide_index=True)
            st.write("Most frequent critical tokens")
            st.dataframe(many.top_critical_tokens(), hide_index=True)
