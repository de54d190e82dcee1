"""Model & prompt: the tokenized prompt, next-token top-k per position, and a logit-lens heat map.

Opens on ``state.DEFAULT_PROMPT`` so a result shows without typing. All numbers come from
``analyses.logit_lens.run``; this page only renders them.
"""

from __future__ import annotations

import streamlit as st

from analyses import logit_lens
from analyses.tokens_html import Token, token_strip
from dashboard import components, state, workbench
from probes import SondeError

probe = workbench.start_page("Model & prompt")

BACKGROUND_TOKENS = 256  # longer prompts run the lens in the background (progress bar, Cancel): minutes on a CPU
WINDOW = 48  # heat-map columns drawn at once (a 3,000-token prompt would be 90,000 text cells)
COLORS = {"final": "p(final prediction)", "top1": "p(lens top-1)"}

with st.form("prompt_form", border=False):
    prompt = state.prompt_input(area=True)
    c1, c3, c4 = st.columns([1, 2, 1])
    with c1:
        k = st.number_input("Top-k", min_value=1, max_value=20, value=state.param("k", 5, kind=int, lo=1, hi=20, widget="model_k"), key="model_k")
    with c3:
        color = st.radio("Heat-map colour", list(COLORS), format_func=COLORS.get, horizontal=True,
                         index=list(COLORS).index(state.param("color", "final", choices=list(COLORS), widget="model_color")), key="model_color")
    with c4:
        st.form_submit_button("Run", type="primary", icon=":material/play_arrow:")
bos = state.bos()

st.query_params.update({"k": str(int(k)), "color": color})

cfg = logit_lens.Config(k=int(k), prepend_bos=bool(bos))
try:
    n_tokens = int(probe.to_tokens(prompt, prepend_bos=bool(bos)).shape[-1]) if prompt.strip() else 0
except SondeError:
    n_tokens = 0  # logit_lens.result_key below reports the problem in one line
if n_tokens > BACKGROUND_TOKENS:
    # a long prompt: the lens runs in the background with a progress bar and Cancel; the page (and the previous
    # prompt's chart) is cleared meanwhile, so nothing old reads as the new prompt's result
    try:
        lens_key = logit_lens.result_key(probe, prompt, config=cfg)
    except SondeError as e:
        state.show_error(e)
        st.stop()
    res = workbench.background_result(
        "model_lens", f"Logit lens over {n_tokens:,} tokens", lens_key,
        lambda job, probe=probe, prompt=prompt, cfg=cfg: logit_lens.run(probe, prompt, config=cfg, progress=job.step),
        waiting=f"The logit lens of this {n_tokens:,}-token prompt runs in the background (a forward pass, then the "
                "unembedding in chunks); the charts appear when it finishes.")
else:
    res = state.result(lambda: logit_lens.result_key(probe, prompt, config=cfg), lambda: logit_lens.run(probe, prompt, config=cfg),
                       spinner="Running the logit lens…")
if res is None:  # the error is already shown
    st.stop()

# --- tokenized prompt ------------------------------------------------------------------------------
st.subheader("Tokens")
MAX_CHIPS = 400
ids = res.token_ids.tolist()
shown = range(max(0, len(ids) - MAX_CHIPS), len(ids))
if len(ids) > MAX_CHIPS:
    st.caption(f"Showing the last {MAX_CHIPS} of {len(ids):,} tokens.")
st.markdown(token_strip((Token(res.str_tokens[t], title=f"id {int(ids[t])} · pos {t}") for t in shown), chips=True),
            unsafe_allow_html=True)
st.caption(f"{len(res.str_tokens)} tokens · model {probe.info.name} · {probe.backend} backend · "
           f"computed in {sum(res.timings.values()):.2f} s")

# --- logit lens ----------------------------------------------------------------------------------
st.subheader("Logit lens")
st.caption("Each cell: block L's residual stream (resid_post) at one position, read through the final norm and the "
           "unembedding. The text is the lens's top-1 token; hover for the top-k. The top row is the model's output.")
T = len(res.str_tokens)
a, b = 0, T
if st.session_state.get("_model_window_T") != T:  # a new prompt starts on its last positions
    st.session_state.pop("model_window", None)
    st.session_state["_model_window_T"] = T
if T > WINDOW:
    a = st.slider("First position shown", 0, T - WINDOW, max(0, T - WINDOW), key="model_window",
                  help=f"The heat map shows {WINDOW} positions at a time; slide to move the window.")
    b = a + WINDOW
    st.caption(f"The prompt has {T:,} tokens: positions {a}–{b - 1} are drawn (move **First position shown**); "
               "the downloads hold every position.")
# cell labels shorten as columns grow (about 25 px a column at 48 columns): full labels overlap past ~20 columns
fig = res.plot(color=color, positions=(a, b), max_label=10 if b - a <= 20 else 6 if b - a <= 32 else 4)
st.plotly_chart(fig, key="logit_lens_heatmap", config={"displaylogo": False})
components.download_figure(fig, "logit-lens", key="dl-lens-fig")

# --- next-token predictions ----------------------------------------------------------------------
st.subheader(f"Next-token top-{cfg.k} per position")
nxt = res.next_frame()
st.dataframe(components.readable(nxt.iloc[a:b] if T > WINDOW else nxt), hide_index=True)  # whitespace tokens visible
components.download_frame(res.to_frame, "logit-lens", key="dl-lens-table")

components.notebook_snippet(f"""
from probes import load_model
from analyses import logit_lens

probe = load_model({probe.info.name!r}, backend={probe.backend!r})
res = logit_lens.run(probe, {prompt!r}, config=logit_lens.{cfg!r})
res.plot(color={color!r}).show()
res.next_frame()          # next-token top-k per position
res.save()                # -> <results store>/<key>, listed on the Results page
""")
