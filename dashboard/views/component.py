"""Component: one head (``L5H3``) or MLP neuron (``L2N17``) as every analysis sees it.

Sink mass per domain and active/dormant status, route frequency, bigram-mask membership and the tokens its
output direction promotes (``analyses.component.profile``), with actions that open the Counterfactuals and
Information flow pages on it. Other pages link here with ``?component=L5H3&prompt=...``.
"""

from __future__ import annotations

import streamlit as st

from analyses import component
from dashboard import components, state, workbench
from probes import SondeError, format_label

probe = workbench.start_page(
    "Component",
    "A head or an MLP neuron across the workbench: its sink mass per domain (dormant when above θ), how often "
    "it lies on prediction routes, whether the bigram subnetwork keeps it, and what its output direction "
    "writes. Saved results are read from the results store when present.")

c1, c2 = st.columns([1, 3])
label = c1.text_input("Head or neuron", value=state.param("component", "L5H3" if probe.info.n_layers > 5 else "L0H0",
                                                        check=workbench.component_check(probe), widget="component_label"),
                    key="component_label",
                      help="L<layer>H<head> (e.g. L5H3) or L<layer>N<neuron> (e.g. L2N17).")
with c2:
    prompt = state.prompt_input("Prompt (for the actions)")
st.query_params["component"] = label.strip()

try:
    kind, layer, idx = component.parse_component(label, probe.info)
except SondeError as e:
    state.show_error(e)
    st.stop()

# neighbours: step through heads/neurons without typing
i = probe.info
n = i.n_heads if kind == "head" else i.d_mlp


def _step(target: str) -> None:
    # a callback runs before the widgets are drawn, so it may set the label box (a shareable URL follows)
    st.session_state["component_label"] = target
    st.query_params["component"] = target


prev_t = format_label(kind, layer, idx - 1) if idx > 0 else format_label(kind, layer - 1, n - 1)
next_t = format_label(kind, layer, idx + 1) if idx < n - 1 else format_label(kind, layer + 1, 0)
b1, b2, _ = st.columns([1, 1, 6])
b1.button(f"◀ {prev_t}", key="component_prev", disabled=layer == 0 and idx == 0, on_click=_step, args=(prev_t,))
b2.button(f"{next_t} ▶", key="component_next", disabled=layer == i.n_layers - 1 and idx == n - 1, on_click=_step, args=(next_t,))

prof = workbench.component_panel(probe, label.strip(), prompt=prompt, key="page-cp", page_link_to_self=False)
if prof is not None:
    st.subheader("Tables")
    st.dataframe(components.readable(prof.to_frame(), digits=4), hide_index=True)  # no routes saved: route columns read —
    st.dataframe(prof.tokens_frame(), hide_index=True)
    components.notebook_snippet(workbench._profile_code(probe, prof.component) + "\nprof.plot().show()\nprof.save()")
