"""Results: browse saved results (CLI, notebooks, dashboard all write the same folders).

Lists ``analyses.core.store.list_results(folder)``; for a chosen result shows its manifest and tables and,
when its analysis module is registered, re-plots it with ``analyses.core.base.load_result(path).plot()``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from analyses.core import store
from analyses.core.base import load_result
from dashboard import components, state, workbench
from probes import SondeError

workbench.start_page("Results", "Results saved by `sonde run …`, notebooks (`result.save()`) and the dashboard. "
                     "Each is a folder with manifest.json, Parquet tables and safetensors arrays.",
                     load=False)  # the shared context stays in the sidebar and the URL

ROOT = Path(store.results_root()).expanduser().resolve()


def _dir_ok(v: str) -> str | None:
    return None if state.inside_results(v, ROOT) is not None else f"only folders inside the results root {str(ROOT)!r} are browsed"


folder = st.text_input("Results folder", value=state.param("dir", str(ROOT), check=_dir_ok, widget="results_dir"), key="results_dir",
                       help="A folder inside the results store ($SONDE_RESULTS, default ~/.local/share/sonde/results).")
st.query_params["dir"] = folder
root = state.inside_results(folder, ROOT)
if root is None:
    state.show_error(SondeError(f"{folder!r} is outside the results root {str(ROOT)!r}.",
                                hint="Point $SONDE_RESULTS at another folder to browse it."))
    st.stop()
if not root.is_dir():
    st.info(f"No folder {str(root)!r} yet. Save a result first, e.g. `sonde run logit-lens`, "
            "or point this box at another folder inside the results root.", icon=":material/folder_off:")
    st.stop()

df, skipped = state.results_listing(root)
if skipped:
    st.warning(f"Skipped {len(skipped)} malformed result folder{'s' if len(skipped) > 1 else ''}: "
               + "; ".join(skipped[:3]) + ("…" if len(skipped) > 3 else ""), icon=":material/report:")
if df.empty:
    st.info(f"No saved results under {str(root)!r}. Try `sonde run logit-lens --prompt \"...\"`.", icon=":material/inbox:")
    st.stop()

analyses_found = sorted(a for a in df["analysis"].dropna().unique())
pick = st.multiselect("Analyses", analyses_found, default=analyses_found, key="results_filter")
shown = df[df["analysis"].isin(pick)].sort_values("created_at", ascending=False).reset_index(drop=True)
# what fits a 1280-px window without scrolling sideways: the folder under the root, not its absolute path; the key and
# the path are in the chosen result's details below, long inputs are cut here and shown whole there
listing = shown.assign(folder=[str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else Path(p).name for p in shown["path"]],
                       created=[str(c)[:16].replace("T", " ") for c in shown["created_at"]])
st.dataframe(listing, hide_index=True, column_order=["folder", "analysis", "model", "inputs", "created", "seconds"], column_config={
    "folder": st.column_config.TextColumn("folder", width=160, help="The result's folder under the results folder above."),
    "analysis": st.column_config.TextColumn("analysis", width=104), "model": st.column_config.TextColumn("model", width=120),
    "inputs": st.column_config.TextColumn("inputs", width=226, help="What the analysis read (a long one is cut: the chosen result's details show it whole)."),
    "created": st.column_config.TextColumn("created (UTC)", width=130),
    "seconds": st.column_config.NumberColumn("seconds", format="%.2f", width=70)})
if shown.empty:
    st.stop()


def _label(p: str) -> str:
    row = shown[shown["path"] == p].iloc[0]
    return f"{row['analysis']} · {row['model']} · {row['created_at']} · {Path(p).name}"


paths = shown["path"].tolist()
wanted = state.param("result", paths[0], check=lambda v: None if v in paths else "not a result listed under this folder")
path = st.selectbox("Result", paths, index=paths.index(wanted), format_func=_label, key="results_pick")
st.query_params["result"] = path

try:
    stored = state.read_result(path)
except (SondeError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    st.warning(f"Could not read `{Path(path).name}`: {type(e).__name__}: {e}", icon=":material/report:")
    st.stop()

man = stored.manifest
model, timings = ({} if not isinstance(man.get(k), dict) else man[k] for k in ("model", "timings"))
st.subheader(f"{man['analysis']} on {model.get('name')}")
st.caption(f"Inputs: {man.get('inputs') or '—'} · key `{man.get('key', '—')}` · folder `{path}`")
c1, c2, c3 = st.columns(3)
c1.metric("Tables", len(stored.tables))
c2.metric("Arrays", len(stored.arrays))
secs = [v for v in timings.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
c3.metric("Seconds", f"{sum(secs):.2f}" if secs and sum(secs) > 0 else "—",
          help=None if secs and sum(secs) > 0 else "This result recorded no timings.")

try:
    res = load_result(path)
except SondeError as e:
    st.info(f"No plot: {e} (its analysis module is not installed here).", icon=":material/info:")
    res = None
except Exception as e:  # a stored result from another version that no longer reads back
    st.warning(f"Could not rebuild this result for plotting: {type(e).__name__}: {e}")
    res = None
if res is not None:
    try:
        fig = res.plot()
    except NotImplementedError:
        fig = None
    except Exception as e:  # noqa: BLE001 - a result that cannot be drawn still shows its tables
        st.warning(f"Could not plot this result: {type(e).__name__}: {e}")
        fig = None
    if fig is not None:
        st.plotly_chart(fig, key="result_plot", config={"displaylogo": False})
        components.download_figure(fig, Path(path).name, key="dl-result-fig")

components.export_bar(Path(path).name, result=path, key="exp-result")  # one-file HTML report with the manifest
with st.expander("Manifest", icon=":material/description:"):
    st.json(man, expanded=1)
for name, table in stored.tables.items():
    with st.expander(f"Table `{name}` · {len(table)} rows", expanded=name == "main" and len(stored.tables) == 1):
        st.dataframe(table.head(1000), hide_index=True)
        components.download_frame(table, f"{Path(path).name}-{name}", key=f"dl-{name}")
if stored.arrays:
    st.caption("Arrays: " + ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in stored.arrays.items()))

module = man["analysis"].replace("-", "_")
components.notebook_snippet(f"""
from analyses.core.base import load_result
res = load_result({path!r})       # {module} result
res.to_frame()
res.plot().show()
""")
