"""Embedding geometry: fiber-bundle / manifold test of token embeddings (Robinson, Dey & Chiang 2025)."""

from __future__ import annotations

import streamlit as st

from dashboard import components, state, workbench
from dashboard.state import cached, param, show_error

from analyses import fiber as F
from analyses.cli.fiber import parse_tokens
from analyses.core.report import format_p
from probes import SondeError

probe = workbench.start_page(
    "Embedding geometry",
    "Does the cloud of token embeddings look like a manifold around each token? Log neighbour count vs log radius "
    "should be piecewise linear with slopes that only drop; a significant change rejects the manifold hypothesis, "
    "an increase also rejects the fiber bundle (Robinson, Dey & Chiang 2025).")

V = probe.info.d_vocab


MAX_TESTED = 5000  # tokens tested per page run (the whole vocabulary takes minutes on a CPU: `sonde run fiber`)


def _tokens_ok(v: str) -> str | None:
    """Why a token spec cannot run on this page (None when it can); checked before any range is expanded."""
    if v.strip() in ("", "all"):
        return f"the whole vocabulary ({V:,} tokens) takes minutes here; use `sonde run fiber`, or a range such as 0:{V}:10"
    n = 0
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            a = [int(x) for x in part.split(":")]
        except ValueError:
            return f"{part!r} is not an id or a range a:b[:step]"
        if len(a) > 3 or (len(a) == 3 and a[2] <= 0):
            return f"{part!r} is not an id or a range a:b[:step]"
        if any(not 0 <= x <= V for x in a[:2]):
            return f"{part!r} reaches outside the vocabulary (0–{V - 1})"
        n += len(range(*a)) if len(a) > 1 else 1
    if n == 0:
        return "it selects no token"
    return f"it selects {n:,} tokens; this page tests at most {MAX_TESTED:,}" if n > MAX_TESTED else None


with st.sidebar:
    st.markdown("### Test")
    default_tokens = f"0:{V}:{max(1, V // 600)}"
    spec = st.text_input("Tokens", value=param("tokens", default_tokens, check=_tokens_ok),
                         help="Rows to test: 0:5000, 0:49152:10 or 17,42,99 (neighbours come from the whole vocabulary). "
                              "The full vocabulary takes minutes on CPU: use `sonde run fiber` for it.")
    matrix = st.selectbox("Matrix", ["input", "output"], index=["input", "output"].index(param("matrix", "input", choices=["input", "output"])))
    vmax = max(51, min(5000, V))
    vol_max = st.number_input("vol_max", 51, vmax, param("vol_max", min(300, vmax), kind=int, lo=51, hi=vmax), step=50,
                              help="Largest neighbour rank (page default 1000 for the CLI; 300 here to stay fast).")
    mode = st.radio("Mode", ["calibrated", "parity"], index=["calibrated", "parity"].index(param("mode", "calibrated", choices=["calibrated", "parity"])),
                    help="calibrated: a likelihood-ratio scan of the neighbour spacings, valid at alpha, with gaps apart; "
                         "parity: the published procedure.")
    alpha = st.select_slider("alpha", [1e-4, 1e-3, 1e-2, 5e-2], value=1e-3)
    correction = st.radio("Vocabulary correction", ["none", "holm", "bh"], horizontal=True,
                          index=["none", "holm", "bh"].index(param("correction", "none", choices=["none", "holm", "bh"])))
st.query_params.update({"tokens": spec, "matrix": matrix, "vol_max": str(vol_max), "mode": mode, "correction": correction})

try:
    if (why := _tokens_ok(spec)):
        raise SondeError(f"Tokens {spec!r}: {why}.")
    cfg = F.Config(matrix=matrix, tokens=parse_tokens(spec), vol_max=int(vol_max), mode=mode, alpha=float(alpha),  # type: ignore[arg-type]
                   correction=correction, keep_curves="all")  # type: ignore[arg-type]
except SondeError as e:
    show_error(e)
    st.stop()

res = state.result(lambda: F.result_key(probe, config=cfg), lambda: F.run(probe, config=cfg),  # a tied output matrix is refused
                   spinner="Nearest neighbours and change-point tests…")
if res is None:
    st.stop()

st.markdown(f"**{res.mode_label}** · {res.source} · {len(res.token_strs)} tokens tested against {res.n_points} rows "
            f"(dim {res.dim}) · volumes {cfg.vol_min}–{cfg.vol_max - 1} · α = {cfg.alpha:g}")
for w in res.warnings:
    st.warning(w)
# the two summary tables side by side where they fit, one under the other in a narrower window (none scrolls sideways)
COUNT_LABELS = {"no_rejection": ("neither", "Neither singular nor gap."),
                "reject_fb_small": ("FB small", "Singular with a dimension rise at the first change: rejects the fiber bundle at small radii."),
                "reject_fb_large": ("FB large", "Singular with a significant rise at the second change: rejects the fiber bundle at large radii.")}
with st.container(horizontal=True, gap="medium", key="fiber-summary"):
    with st.container(width="content"):
        st.dataframe(res.counts(), hide_index=True, width="content",
                     column_config={k: st.column_config.NumberColumn(lab, help=h) for k, (lab, h) in COUNT_LABELS.items()})
        if cfg.mode == "calibrated":
            st.caption("singular: a change of local dimension (rejects “manifold”); gap: a tight group of neighbours, "
                       "then empty space (not counted as a singularity); neither: no rejection.", width=420)
    st.dataframe(res.kind_table(), hide_index=True, width="content",
                 column_config={"rate": st.column_config.NumberColumn("rate", format="%.3f", help="singular / tested")})

def _num(frame, col: str, label: str, help_: str, width: int, fmt: str = "%.2f"):
    """A number column's settings, or a text column's where :func:`components.readable` made it text ("—", "∞")."""
    if col in frame and frame[col].dtype.kind in "iuf":
        return st.column_config.NumberColumn(label, help=help_, width=width, format=fmt)
    return st.column_config.TextColumn(label, help=help_, width=width)


df = res.to_frame()
if "verdict" not in df:  # parity mode keeps no gap test: its verdict is singular or no rejection
    df["verdict"] = res.verdict()
q = st.text_input("Search tokens", value="", help="Substring of the token text.")
view = df[df["token"].str.contains(q, regex=False)] if q else df
view = view.sort_values("p_manifold")
adj = {"holm": "p_holm", "bh": "p_bh"}.get(correction)  # the adjusted p of the chosen correction (all are in the CSV)
cols = ["token_id", "token", "kind", "verdict", "p_manifold", adj, "p_gap", "dim_1", "dim_2", "change_volume_1"]
shown = view[[c for c in cols if c and c in view]]
if "reject_fb_small" in view:  # the two fiber-bundle rejections in one short column
    fb = view["reject_fb_small"].astype(int) + 2 * view["reject_fb_large"].astype(int)
    shown = shown.assign(fb=fb.map({0: "no", 1: "small", 2: "large", 3: "both"}).to_numpy())
pcols = [c for c in F.FiberResult.p_value_columns if c in shown]  # the columns the result declares as p-values
shown = components.readable(shown.drop(columns=pcols), digits=2).assign(**{c: shown[c] for c in pcols})[list(shown.columns)]
data, pconf = components.p_value_table(
    shown, pcols, labels={"p_manifold": "p", "p_holm": "p (Holm)", "p_bh": "p (BH)", "p_gap": "p gap"},
    helps={"p_manifold": "The token's p of a change in the neighbour spacings (no vocabulary correction).",
           "p_holm": "p adjusted over the tested tokens (Holm, family-wise error).",
           "p_bh": "p adjusted over the tested tokens (Benjamini–Hochberg, false discovery rate).",
           "p_gap": "p of a gap: a tight group of neighbours, then empty space."}, width=78)
st.dataframe(data, hide_index=True, height=280, column_config={
    "token_id": st.column_config.NumberColumn("id", width=56), "token": st.column_config.TextColumn("token", width=110),
    "kind": st.column_config.TextColumn("kind", width=110), "verdict": st.column_config.TextColumn("verdict", width=96),
    "dim_1": _num(shown, "dim_1", "D₁", "Local dimension of the first segment.", 56),
    "dim_2": _num(shown, "dim_2", "D₂", "Local dimension of the second segment.", 56),
    "change_volume_1": _num(shown, "change_volume_1", "change k", "Neighbour count where the second segment starts.", 72, "%d"),
    "fb": st.column_config.TextColumn("FB", width=56, help="Rejects the fiber bundle: at small radii (a dimension rise at the "
                                                           "first change), at large radii (at the second), both, or no."),
    **pconf})
st.caption("Every column, with the p of each correction, is in the table download below.")

ids = view["token_id"].tolist() or df["token_id"].tolist()
labels = {int(r.token_id): f"{r.token_id}: {r.token!r} (p = {format_p(r.p_manifold, 1)})" for r in view.itertuples()}
tok = st.selectbox("Token", ids[:500], format_func=lambda i: labels.get(int(i), str(i)))
tab1, tab2, tab3 = st.tabs(["Volume curve", "Neighbourhood", "Dimension histogram"])
with tab1:
    cfig = res.plot_curve(int(tok))
    for i, ann in enumerate(cfig.layout.annotations or ()):  # change-point labels: stagger them so none overlap
        ann.update(yshift=-16 * i, font=dict(size=10), bgcolor="rgba(255,255,255,0.8)")
    st.plotly_chart(components.axis_titles(cfig, "log radius", "log neighbour count"), width="stretch")
with tab2:
    n3 = st.radio("View", ["3-D", "2-D"], horizontal=True)
    E = (probe.W_E if matrix == "input" else probe.W_U.T).detach().float()
    try:
        nb = F.neighborhood(E, res, int(tok), n_components=3 if n3 == "3-D" else 2)
        st.plotly_chart(res.plot_neighbors(nb, title=f"{cfg.n_neighbors} nearest neighbours of {labels.get(int(tok), tok)} "
                                                     f"(PCA) · {res.mode_label}"), width="stretch")
    except SondeError as e:
        show_error(e)
with tab3:
    st.plotly_chart(res.plot_hist(), width="stretch")
    st.plotly_chart(res.plot_kinds(), width="stretch")

with st.expander("Stability across volume ranges"):
    st.markdown("Which tokens are rejected depends on the range of neighbour counts tested: a wider range can see "
                "structure at larger radii (and curvature), a narrower one has fewer window positions to correct for. "
                "The table tests the same tokens over several ranges (one nearest-neighbour pass) and gives the "
                "Jaccard index of the sets of manifold rejections between every two ranges.")
    top = min(1000, res.n_points)
    ranges = tuple((10, b) for b in (200, 300, 500, 1000) if b <= top)
    if ranges and st.button("Compute", key="fiber-stability"):
        stab = cached(F.volume_stability, config=cfg.replace(keep_curves="none"), ranges=ranges, _probe=probe)
        if stab is not None:
            st.dataframe(stab, hide_index=True)
            st.caption(f"{res.mode_label} · α = {cfg.alpha:g} · correction: {cfg.correction}. Default volumes 10–1000 "
                       "(the method page's recommendation: the paper's figures span about 10–1000).")

_code = (f"from probes import load_model\nfrom analyses import fiber as F\n\nprobe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
         f"res = F.run(probe, config=F.{cfg!r})\nres.counts(); res.plot_hist().show()")
components.export_bar("fiber", figure=res.plot_hist(), table=res.to_frame(), result=res, code=_code, key="exp-fiber",
                      figures={"Dimension histogram": res.plot_hist(), "Kinds": res.plot_kinds()})
components.notebook_snippet(_code)
