"""Bigram subnetwork page: learn (briefly) or load a mask, then see where it lives and what it predicts."""

from __future__ import annotations

import streamlit as st

from pathlib import Path

from analyses import bigram as B
from dashboard import components, state, workbench
from probes import ConfigError, SondeError
from dashboard.state import cached, param, show_error

probe = workbench.start_page(
    "Bigram subnetwork",
    "Chang & Bergen (2025): the sparse set of block weights that maps the current token to bigram "
    "next-token predictions (continuous sparsification, soft mask σ(β·s), keep s > 0).")


def _table(probe, corpus: str) -> B.BigramTable:
    return B.BigramTable.from_ids(B.load_corpus_ids(probe, corpus), probe.info.d_vocab)


def _load(path: str) -> B.BigramResult:
    return B.BigramResult.load(path)


def _layers_ok(v: str) -> str | None:
    if v.strip() in ("", "all"):
        return None
    try:
        got = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        return "expected comma-separated block indices or 'all'"
    bad = [x for x in got if not 0 <= x < probe.info.n_layers]
    return f"block {bad[0]} is outside 0–{probe.info.n_layers - 1}" if bad else None


def _mask_ok(v: str) -> str | None:
    if state.inside_results(v) is None:
        return "the folder is outside the results root"
    return None if (Path(state.inside_results(v)) / "manifest.json").is_file() else "no saved result there"


def _corpus_ok(v: str) -> str | None:
    if v == "builtin":
        return None
    return None if state.inside_results(v) is not None and Path(v).suffix in (".txt", ".jsonl") else \
        "a link may name 'builtin' or a .txt/.jsonl file inside the results root"


with st.sidebar:
    st.markdown("### Bigram mask")
    saved_dir = st.text_input("Load a saved result folder (optional)", value=param("mask", "", check=_mask_ok),
                              help="A folder written by `sonde run bigram` (inside the results root). Empty: the newest saved "
                                   "bigram result of this model, if any.")
    corpus = st.text_input("Corpus", value=param("corpus", "builtin", check=_corpus_ok), help="'builtin' or a UTF-8 .txt/.jsonl path.")
    lam = st.number_input("λ (sparsity)", min_value=0.0, max_value=1e6, value=param("lam", 10.0, kind=float, lo=0.0, hi=1e6), step=1.0)
    steps = st.number_input("Steps", min_value=1, max_value=2000, value=param("steps", 4, kind=int, lo=1, hi=2000),
                            help="Short CPU schedule; the paper uses up to 15,000 steps at lr 5e-5.")
    lr = st.number_input("Learning rate", min_value=1e-6, max_value=1.0, value=param("lr", 0.05, kind=float, lo=1e-6, hi=1.0), format="%.5f")
    layers_txt = st.text_input("Blocks to mask", value=param("layers", "0", check=_layers_ok), help="Comma-separated block indices, or 'all'.")
    target = st.selectbox("Target", ["bigram", "self"], index=["bigram", "self"].index(param("target", "bigram", choices=["bigram", "self"])),
                          help="'self' = optimal pruning (distil the full model).")
for k, v in {"corpus": corpus, "lam": f"{lam:g}", "steps": str(steps), "lr": f"{lr:g}", "layers": layers_txt, "target": target}.items():
    st.query_params[k] = v

try:
    if (why := _layers_ok(layers_txt)):
        raise ConfigError(f"Blocks to mask: {why}.")
    layers = None if layers_txt.strip() in ("", "all") else tuple(int(x) for x in layers_txt.split(",") if x.strip())
    cfg = B.Config(lam=lam, lr=lr, steps=int(steps), batch=1, seq_len=32, eval_rows=2, reuse=True, layers=layers,
                   target=target, log_every=1)
except (ValueError, ConfigError) as e:
    show_error(e)
    st.stop()


def _mask_label(row: tuple[str, int, str]) -> str:
    src, steps, created = row
    if src == "shipped":
        return f"the mask shipped with Sonde · {steps:,} steps"
    return f"{Path(src).name} · {steps:,} steps · saved {created[:16].replace('T', ' ')}"


def _masks() -> list[tuple[str, int, str]]:
    """This model's masks, best first (:func:`analyses.component.bigram_masks`: most steps, then newest; the
    component panels read the first one too)."""
    from analyses.component import bigram_masks

    try:
        rows = bigram_masks(probe.info.fingerprint)
    except Exception:  # noqa: BLE001 - an unreadable results store: only the shipped mask, if it fits
        return []
    return [r for r in rows if r[0] == "shipped" or state.inside_results(r[0]) is not None]


train_sig = st.session_state.get("bigram_train_sig")
if st.button("Train a mask with these settings", key="bigram_train", icon=":material/model_training:",
             help="Runs in the background (progress bar + Cancel); the page stays usable."):
    try:  # the content key of this training run: a mask saved with these settings (CLI, notebook, session) is shown at once
        st.session_state["bigram_train_sig"] = train_sig = B.result_key(probe, corpus, config=cfg)
    except SondeError as e:
        show_error(e)
        st.stop()
source = None
if saved_dir.strip():
    if state.inside_results(saved_dir.strip()) is None:
        show_error(SondeError(f"{saved_dir.strip()!r} is outside the results root.", hint="Pick a folder the Results page lists."))
        st.stop()
    st.query_params["mask"] = saved_dir
    source = str(state.inside_results(saved_dir.strip()))
elif train_sig is None:
    masks = _masks()
    if masks:
        labels = {r[0]: _mask_label(r) for r in masks}
        state.choose("bigram_mask", list(labels), masks[0][0])
        source = st.selectbox("Mask", list(labels), key="bigram_mask", format_func=labels.get,
                              help="This model's masks, the most trained first (a short test run never replaces a "
                                   "longer one as the default; component panels read the first one).")
if source == "shipped":
    res = cached(B.default_result)
    st.caption("Showing the mask shipped with Sonde for this model (trained by `benchmarks/bigram.py --long`; see "
               "benchmarks/RESULTS.md). **Train a mask with these settings** learns a new one.")
elif source is not None:
    res = cached(_load, source)
    if res is not None:
        st.caption(f"Showing the saved bigram result `{source}`. **Train a mask with these settings** learns a new one.")
elif train_sig is not None:
    # training runs in the background (progress bar + Cancel); the page stays usable meanwhile
    def _train(job, probe=probe, corpus=corpus, cfg=cfg):
        # the masks sit on the shared model: their block holds the probe's lock, so no other run sees them
        return B.run(probe, corpus, config=cfg, progress=job.step)

    res = workbench.background_result("bigram_train", "Learning a mask", train_sig, _train,
                                      waiting="The mask is being learned in the background; results appear when it finishes.")
else:
    st.info("No saved bigram result for this model yet. Click **Train a mask with these settings** (a short CPU run), or "
            "save one with `sonde run bigram`.", icon=":material/info:")
    st.stop()
if res is None:
    st.stop()

c1, c2, c3, c4 = st.columns(4)
c1.metric("Kept (of masked weights)", f"{res.sparsity:.3%}")
c2.metric("Steps", res.steps_done)
c3.metric("Masked matrices", len(res.masks))
top = res.per_layer().sort_values("fraction").iloc[-1]
c4.metric("Densest layer", f"L{int(top['layer'])}", f"{top['fraction']:.3%} kept")
st.markdown(f"Mask kept fraction **{res.sparsity:.4%}** over {int(res.matrices['total'].sum()):,} block weights "
            f"(corpus: `{res.corpus}`, λ = {res.config.lam}, target = {res.config.target}).")

st.subheader("Sparsity by layer and matrix")
st.plotly_chart(components.axis_titles(res.plot(), "layer", "kept fraction"), width="stretch")
h1, h2 = st.columns(2)
with h1:
    ev = st.plotly_chart(workbench.selectable_heads(components.axis_titles(res.plot_heads(), "head", "layer")), width="stretch", key="bigram_heads", on_select="rerun", selection_mode="points")
    head = workbench.head_from_selection(ev)
    if head is not None and head != st.session_state.get("_bigram_last_click"):
        st.session_state["_bigram_last_click"] = head
        st.query_params["component"] = head
with h2:
    st.plotly_chart(components.axis_titles(res.plot_neurons(), "neuron", "layer"), width="stretch")
sel = param("component", "", check=workbench.component_check(probe))
if sel and res.model.get("fingerprint") == probe.info.fingerprint:
    workbench.component_panel(probe, sel, prompt=state.context()["prompt"], key="bigram-cp")
else:
    st.caption("Click a head in the heat map to open its component panel (save this mask with `sonde run bigram` or "
               "`res.save()` so panels show its membership).")

st.subheader("Ablations")
st.caption("Mean surprisal of held-out tokens (bits), soft CE to the bigram rows (nats), Pearson r with bigram surprisal.")
if len(res.ablation):
    st.dataframe(components.readable(res.ablation, digits=4), hide_index=True)  # the bigram row keeps no mask: kept —
else:
    st.info("This result has no ablation table (run `sonde run bigram-eval --mask DIR`).")

st.subheader("Predictions for a prompt")
_SOURCES = {"bigram": "the bigram table", "full": "the full model", "subnetwork": "the model with only the mask's weights"}
# short headers with help, so the twelve columns fit a 1280-px window (none scrolls sideways)
_PRED_COLUMNS = {"pos": st.column_config.NumberColumn("pos", width=44),
                 "token": st.column_config.TextColumn("token", width=74),
                 "next": st.column_config.TextColumn("next", width=74, help="The prompt's next token (— at the last position)."),
                 **{k: st.column_config.TextColumn("subnet" if k == "subnetwork" else k, width=74, help=f"Top-1 next token of {v}.")
                    for k, v in _SOURCES.items()},
                 **{f"p_{k}": st.column_config.NumberColumn("p", width=60, format="%.3f", help=f"Probability of {v}'s top-1.")
                    for k, v in _SOURCES.items()},
                 **{f"s_{k}": st.column_config.Column("bits", width=60, help=f"Surprisal of the next token under {v} (bits; "
                                                                            "∞: probability 0, —: no next token).")
                    for k, v in _SOURCES.items()}}
prompt = state.prompt_input()
if res.model.get("fingerprint") != probe.info.fingerprint:
    st.warning("This mask was trained on another model; pick that model in the sidebar to compare predictions.")
else:
    corpus_for_table = res.corpus if res.corpus != "ids" else "builtin"
    table = cached(_table, corpus_for_table, _probe=probe)
    if table is not None:
        try:
            df = B.compare_predictions(probe, res, table, prompt)
            if len(df) > 64:
                st.caption(f"The prompt has {len(df):,} positions: the last 64 are shown; the export holds all of them.")
            st.dataframe(components.readable(df.tail(64)), hide_index=True, column_config=_PRED_COLUMNS)  # p = 0: ∞ bits; last: —
        except SondeError as e:
            show_error(e)

st.subheader("Training curve")
if len(res.curve):
    st.plotly_chart(components.axis_titles(res.plot_curve(), "step", "cross-entropy (nats)", "fraction of masked weights"), width="stretch")
else:
    st.info("No training curve (λ = ∞ baseline or a loaded mask without one).")

_code = (f"from probes import load_model\nfrom analyses import bigram as B\n\nprobe = load_model({probe.info.name!r}, backend={probe.backend!r})\n"
         + (f"res = B.BigramResult.load({saved_dir.strip()!r})\n" if saved_dir.strip() else f"res = B.run(probe, {corpus!r}, config=B.{cfg!r})\n")
         + "res.plot().show(); res.plot_heads().show()\nres.save()   # component panels then show bigram-mask membership")
components.export_bar("bigram", figure=res.plot(), table=res.to_frame(), result=res, code=_code, key="exp-bigram",
                      figures={"Sparsity": res.plot(), "Heads": res.plot_heads()})
components.notebook_snippet(_code)
