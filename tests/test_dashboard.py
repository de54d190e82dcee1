"""Dashboard shell: AppTest runs of dashboard/app.py, the Model & prompt page and the Results page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402
from conftest import wait_background  # noqa: E402

TIMEOUT = 240  # the first run loads the embedded model and runs the lens on a busy 2-core CPU


def _app(rel: str) -> AppTest:
    return AppTest.from_file(str(ROOT / rel), default_timeout=TIMEOUT)


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _charts(at: AppTest):
    return at.get("plotly_chart")


def test_app_opens_on_model_page_with_heat_map():
    at = _app("dashboard/app.py").run()
    _ok(at)
    assert at.title[0].value == "Model & prompt"
    assert len(_charts(at)) == 1
    assert not at.sidebar.get("plotly_chart")  # the plotly.js preload chart (dashboard.warm) is gone once the model is in


def test_model_page_default_prompt_and_controls():
    at = _app("dashboard/views/model.py").run()
    _ok(at)
    assert at.text_area("ctx_prompt").value.startswith("The Eiffel Tower")
    assert len(_charts(at)) == 1
    assert len(at.dataframe) == 1  # next-token top-k table
    df = at.dataframe[0].value
    assert df["top1"].iloc[-1] == " Paris"
    # switch the colour and top-k through the form: still one chart, k columns follow
    at.radio("model_color").set_value("top1")
    at.number_input("model_k").set_value(3)
    at.button[0].click().run()  # the form's Run button
    _ok(at)
    assert len(_charts(at)) == 1
    assert "top3" in at.dataframe[0].value.columns and "top4" not in at.dataframe[0].value.columns


def test_model_page_bad_model_shows_error_not_exception():
    at = _app("dashboard/views/model.py").run()
    at.sidebar.text_input("ctx_model").set_value("no-such-org/no-such-model").run()
    assert not at.exception
    assert at.error and "no-such-org/no-such-model" in at.error[0].value
    assert len(_charts(at)) == 0


def test_model_page_empty_prompt_shows_error():
    at = _app("dashboard/views/model.py")
    at.query_params["prompt"] = "   "
    at.run()  # a link's empty prompt: one error line, the default prompt kept
    assert not at.exception
    assert len(at.error) == 1 and "empty" in at.error[0].value
    assert at.text_area("ctx_prompt").value.startswith("The Eiffel Tower") and len(_charts(at)) == 1
    at.text_area("ctx_prompt").set_value("   ")
    at.button[0].click().run()  # typed: the lens refuses it
    assert not at.exception
    assert at.error and "empty" in at.error[0].value
    assert len(_charts(at)) == 0


def test_results_page_lists_and_replots(embedded, tmp_path, monkeypatch):
    from analyses import logit_lens

    root = tmp_path / "res"
    logit_lens.run(embedded, "Hello world", config=logit_lens.Config(layers=(0, 29), k=2)).save(root / "one")
    monkeypatch.setenv("SONDE_RESULTS", str(root))
    at = _app("dashboard/views/results.py").run()
    _ok(at)
    assert at.title[0].value == "Results"
    assert len(_charts(at)) == 1  # re-plotted through load_result(...).plot()
    assert at.dataframe[0].value["analysis"].tolist() == ["logit_lens"]


def test_results_page_empty_and_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "nothing-here"))
    at = _app("dashboard/views/results.py").run()
    _ok(at)
    assert at.info and "No folder" in at.info[0].value
    (tmp_path / "nothing-here" / "empty").mkdir(parents=True)
    at.text_input("results_dir").set_value(str(tmp_path / "nothing-here" / "empty")).run()
    _ok(at)
    assert at.info and "No saved results" in at.info[0].value


def test_results_page_unregistered_analysis_shows_tables(tmp_path, monkeypatch):
    import pandas as pd

    from analyses.core import store

    root = tmp_path / "res"
    store.write_result(root / "x", analysis="not_a_module", model={"name": "m", "fingerprint": "f"}, config={}, input_hash="h",
                       tables={"main": pd.DataFrame({"a": [1, 2]})})
    monkeypatch.setenv("SONDE_RESULTS", str(root))
    at = _app("dashboard/views/results.py").run()
    assert not at.exception
    assert len(_charts(at)) == 0
    assert any("No plot" in i.value for i in at.info)


def test_components_helpers():
    import pandas as pd
    import plotly.graph_objects as go

    from dashboard import components

    assert components.safe_name("a b/c?") == "a-b-c"
    html = components.figure_to_html(go.Figure(go.Heatmap(z=[[1, 2]])))
    assert html.lower().startswith(b"<!doctype html>") and b"plotly" in html
    df = pd.DataFrame({"x": [1, 2]})
    import io

    assert pd.read_parquet(io.BytesIO(components.frame_to_parquet(df))).equals(df)


def test_analyses_do_not_import_streamlit():
    import ast

    for f in (ROOT / "analyses").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "streamlit" for n in names), f"{f} imports streamlit"


def test_one_page_registry():
    """One registry (dashboard.workbench.PAGES) lists every page file, and app.py builds its navigation from it; no
    page edits sys.path or reaches into Streamlit's private modules, and nothing lives in a legacy pages/ folder."""
    from dashboard.workbench import PAGES

    files = sorted(p.name for p in (ROOT / "dashboard" / "views").glob("*.py"))
    assert sorted(spec.file for spec in PAGES.values()) == files
    assert all(Path(spec.path).is_file() and name == spec.file[:-3] for name, spec in PAGES.items())
    assert "PAGES" in (ROOT / "dashboard" / "app.py").read_text()
    assert not (ROOT / "dashboard" / "pages").exists()
    for f in (ROOT / "dashboard").rglob("*.py"):
        text = f.read_text()
        assert "sys.path" not in text, f
        assert "streamlit.runtime" not in text and "use_container_width" not in text, f


# ----------------------------------------------------------------------------- every page through the app
def _page(page: str, **query) -> AppTest:
    at = _app("dashboard/app.py")
    at.switch_page(f"views/{page}")
    at.query_params.update(query)
    return wait_background(at.run())  # bigram training and the critical search run in the background


# (page, query, expected title, a label of a download button every page shows)
PAGE_CASES = [
    ("routes.py", {"prompt": "The Eiffel Tower is in"}, "Information flow"),
    ("sinks.py", {"T": "16", "n": "1"}, "Sinks & dormant heads"),
    ("component.py", {"component": "L3H4"}, "Component"),
    ("counterfactual.py", {"prompt": "Once upon a time, Lyra", "max_new_tokens": "6"}, "Counterfactuals"),
    ("fiber.py", {"tokens": "0:49152:2000", "vol_max": "100"}, "Embedding geometry"),
]


@pytest.mark.parametrize("page,query,title", PAGE_CASES, ids=[c[0] for c in PAGE_CASES])
def test_every_page_renders_with_exports_and_notebook_line(page, query, title, tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "res"))
    at = _page(page, **query)
    _ok(at)
    assert at.title[0].value == title
    assert len(_charts(at)) >= 1
    labels = {d.label for d in at.get("download_button")}
    assert {"Chart HTML", "CSV", "Report"} <= labels, labels
    assert any(e.label == "Reproduce in a notebook" for e in at.expander)
    for k, v in query.items():  # the URL keeps the view's settings
        got = at.query_params[k]
        assert (got[0] if isinstance(got, list) else got) == v, k


@pytest.mark.slow
@pytest.mark.parametrize("page,query,title", [
    ("bigram.py", {"steps": "2", "component": "L0H1"}, "Bigram subnetwork"),
    ("critical.py", {"rollouts": "1", "max_new": "1"}, "Critical tokens"),
], ids=["bigram.py", "critical.py"])
def test_slow_pages_render(page, query, title, tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "res"))
    at = _page(page, **query)
    _ok(at)
    assert at.title[0].value == title
    assert any(d.label == "Report" for d in at.get("download_button"))
    if page == "bigram.py":
        assert any(m.value.startswith("#### Component L0H1") for m in at.markdown)


def test_routes_token_opens_counterfactual_prompt_edit(tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "res"))
    at = _page("routes.py", prompt="The Eiffel Tower is in")
    _ok(at)
    at.selectbox(key="routes_node").set_value("X0_3").run()  # "The", " E", "iffel", " Tower" (no BOS by default)
    _ok(at)
    graph = next(json.loads(c.proto.spec) for c in _charts(at) if "Route to position" in str(json.loads(c.proto.spec)["layout"].get("title")))
    names = [t.get("name") for t in graph["data"]]
    assert "X0_3 (selected node)" in names  # the route graph rings the node the page inspects
    assert any("X0_3" in (t.get("customdata") or []) for t in graph["data"])  # and a click on it names it
    button = [b for b in at.button if b.key == "routes_token_cf"][0]
    assert "' Tower' →" in button.label  # proposes the model's own alternative, not a fixed name
    button.click().run()
    _ok(at)
    assert at.title[0].value == "Counterfactuals"
    assert at.radio[0].value == "prompt edit"
    replace = [w for w in at.text_input if w.label == "Replace"][0]
    by = [w for w in at.text_input if w.label == "by"][0]
    assert replace.value == "Tower" and by.value not in ("", "Tower", "Maeve")  # the token is the intervention point
    assert at.sidebar.text_input("ctx_model").value == "embedded"  # the link carried the model



def test_routes_why_this_head_attends_and_faithfulness(tmp_path, monkeypatch):
    """An after-attention node's heaviest incoming attention edge is explained (two bar charts, query side and key
    side, each summing to the score in the title); the faithfulness button shows its table and p(target) chart."""
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "res"))
    at = _page("routes.py", prompt="The Eiffel Tower is in")
    _ok(at)
    assert "Why this head attends" in [s.value for s in at.subheader]
    assert at.selectbox(key="routes_qk_edge").value is None  # the last block output: nothing computed until chosen
    a_node = "A23_5"  # on the embedded model: L23H4 at ' in' reads 'iffel' (position 2)
    assert a_node in at.selectbox(key="routes_node").options
    at.selectbox(key="routes_node").set_value(a_node).run()
    _ok(at)
    layer, head, qp, kp, _ = at.selectbox(key="routes_qk_edge").value
    assert f"A{layer}_{qp}" == a_node  # the box lists the node's own incoming edges
    qk = [json.loads(c.proto.spec) for c in _charts(at) if "score" in str(json.loads(c.proto.spec)["layout"].get("title"))]
    assert len(qk) == 1
    bars = [t for t in qk[0]["data"] if t["type"] == "bar"]
    assert len(bars) == 2 and all(t["orientation"] == "h" and len(t["y"]) >= 1 for t in bars)
    assert f"L{layer}H{head}@{qp}->{kp}" in qk[0]["layout"]["title"]["text"]
    assert not any(d.key == "routes_faith_table" for d in at.dataframe)
    at.button(key="routes_faith_run").click().run()
    _ok(at)
    table = [d for d in at.dataframe if list(d.value.columns[:4]) == ["ablation", "p_clean", "p_off_route", "p_route"]]
    assert len(table) == 1 and list(table[0].value.ablation) == ["zero"]
    assert 0 < table[0].value.p_clean.iloc[0] <= 1
    faith = [json.loads(c.proto.spec) for c in _charts(at) if "per condition" in str(json.loads(c.proto.spec)["layout"].get("title"))]
    assert len(faith) == 1 and len(faith[0]["data"][0]["x"]) == 5
    at.run()  # the checks stay on the page after the click
    _ok(at)
    assert any(list(d.value.columns[:2]) == ["ablation", "p_clean"] for d in at.dataframe)

@pytest.mark.slow
def test_critical_token_opens_counterfactual_at_that_position(tmp_path, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "res"))
    at = _page("critical.py", rollouts="2", max_new="2")
    _ok(at)
    hits = [b for b in at.button if b.key == "critical_to_cf"]
    if not hits:
        pytest.skip("this search found no critical token")
    hits[0].click().run()
    _ok(at)
    assert at.title[0].value == "Counterfactuals"
    assert at.text_area(key="cf_observed").value == "3 + 4 = 8."
    assert at.radio[0].value == "token edit"


def test_head_from_selection_reads_clicks():
    import plotly.express as px

    from dashboard import workbench

    fig = workbench.selectable_heads(px.imshow([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], origin="lower"))
    over = fig.data[-1]
    assert over.type == "scatter" and len(over.x) == 6 and list(over.customdata[:2]) == ["L0H0", "L0H1"]
    assert list(fig.layout.yaxis.range) == [-0.5, 1.5]
    assert workbench.head_from_selection({"selection": {"points": [{"x": 2, "y": 1, "customdata": "L1H2"}]}}) == "L1H2"
    assert workbench.head_from_selection({"selection": {"points": [{"x": "H4", "y": "L7"}]}}) == "L7H4"
    assert workbench.head_from_selection({"selection": {"points": []}}) is None
    assert workbench.node_from_selection({"selection": {"points": [{"customdata": "A5_3"}]}}) == "A5_3"


def test_token_strip_escapes_and_highlights():
    from analyses.tokens_html import CHANGED, Token, token_strip

    out = token_strip([Token("<b>", title="it's 'q'"), Token("a\nb", changed=True), Token(" x", marked=True, start=True)])
    assert "<b>" not in out and "&lt;b&gt;" in out and "it&#x27;s" in out  # text and titles escaped
    assert "a⏎b" in out and "\n" not in out  # line breaks made visible
    assert f"background:{CHANGED}" in out and "border:2px solid" in out and "border-left:2px dashed" in out
    assert out.count("<span") == 3 and "white-space:pre-wrap" in out  # one span per token, spaces kept
    assert "display:inline-block" in token_strip([Token("t")], chips=True)


def test_route_figure_is_the_library_figure(tiny):
    """RoutesResult.plot() and the Information flow page draw one figure (analyses.routes_plots.plot_route): node
    markers carry their names for clicks, the selected node's ring takes no clicks, one palette."""
    from analyses import routes
    from analyses.routes_plots import NODE_COLOURS, NODE_NAMES, plot_route
    from probes import Ablate, site

    p = tiny("llama")
    res = routes.run(p, "Hello world again", config=routes.Config(keep_residuals=True))
    r = res.route()
    last = f"I{res.n_layers - 1}_{res.n_tokens - 1}"
    plain = res.plot()
    nodes = [t for t in plain.data if t.customdata is not None]
    assert {t.name for t in nodes} <= set(NODE_NAMES.values()) and sum(len(t.customdata) for t in nodes) == r.number_of_nodes()
    assert all(t.marker.color == NODE_COLOURS[k] for k, name in NODE_NAMES.items() for t in nodes if t.name == name)
    page = plot_route(r, res.str_tokens, res.n_layers, res.parallel, selected=last, head="L0H0", title="t")
    names = [t.name for t in page.data]
    ring = names.index(f"{last} (selected node)")
    assert page.data[ring].hoverinfo == "skip" and ring < min(i for i, t in enumerate(page.data) if t.customdata is not None)
    assert page.data[ring].cliponaxis is False  # the ring around a top-row node is drawn whole, not cut by the plot's edge
    assert "L0H0 (selected head)" in names and page.layout.title.text == "t"
    assert [t.marker.color for t in page.data if t.customdata is not None] == [t.marker.color for t in nodes]
    abl = routes.run(p, "Hello world again", config=routes.Config(keep_residuals=True), edits=[Ablate(site("z", 0).name, heads=[0])])
    cmp = plot_route(r, res.str_tokens, res.n_layers, res.parallel, compare=abl.route())
    assert any(t.name.startswith(("kept ", "lost ", "gained ")) for t in cmp.data)


def test_route_figure_edges_never_cover_nodes(tiny):
    """Every hover point of the route figure that is not a node lies off the nodes (edge lines take no hover, their
    hover text sits at edge midpoints), and the nodes are drawn last: a click on any node, A nodes included, names it."""
    from analyses import routes
    from analyses.routes_plots import plot_route

    p = tiny("llama")
    res = routes.run(p, "Hello world again", config=routes.Config(keep_residuals=True))
    r = res.route()
    fig = plot_route(r, res.str_tokens, res.n_layers, res.parallel, selected=f"A1_{res.n_tokens - 1}", head="L1H0")
    node_xy = {(round(x, 6), round(y, 6)) for t in fig.data if t.customdata is not None for x, y in zip(t.x, t.y)}
    assert any(n.startswith("A") for t in fig.data if t.customdata is not None for n in t.customdata)
    for t in fig.data:
        if t.customdata is not None or t.hoverinfo == "skip":
            continue
        pts = {(round(x, 6), round(y, 6)) for x, y in zip(t.x, t.y) if x is not None}
        assert not pts & node_xy, (t.name, sorted(pts & node_xy)[:3])
    last_non_node = max(i for i, t in enumerate(fig.data) if t.customdata is None)
    assert last_non_node < min(i for i, t in enumerate(fig.data) if t.customdata is not None)


def test_top_prediction_reads_the_full_distribution(tiny):
    """p(predicted token) with a head ablated comes from the whole output distribution, not from a top-k list."""
    import torch

    from analyses import routes
    from analyses.routes_lens import node_lens, node_probs, top_prediction
    from probes import Ablate, site

    p = tiny("llama")
    cfg = routes.Config(keep_residuals=True)
    res = routes.run(p, "Hello world again", config=cfg)
    abl = routes.run(p, "Hello world again", config=cfg, edits=[Ablate(site("z", 1).name, heads=[0, 1])])
    last = f"I{res.n_layers - 1}_{res.n_tokens - 1}"
    tid, tok, p0, p1 = top_prediction(p, res.residuals, last, abl.residuals)
    assert (tok, p0) == pytest.approx(node_lens(p, res.residuals, [last], k=1)[last][0])
    probs = node_probs(p, abl.residuals, [last])[0]
    assert p1 == pytest.approx(float(probs[tid])) and p1 > 0
    assert torch.allclose(probs.sum(), torch.tensor(1.0), atol=1e-4)


def test_bigram_page_shows_the_shipped_mask_without_training(tmp_path, monkeypatch):
    """A fresh results root on the embedded model: the page shows the mask shipped with Sonde at once."""
    monkeypatch.setenv("SONDE_RESULTS", str(tmp_path / "res"))
    at = _page("bigram.py")
    _ok(at)
    assert any("shipped with Sonde" in c.value for c in at.caption)
    assert any(m.label.startswith("Kept") for m in at.metric)
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("manifest.json"))  # nothing was trained


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_server_lets_idle_openmp_workers_sleep_unless_told(preset, expected):
    """`sonde dashboard` (dashboard.serve) sets OMP_WAIT_POLICY=PASSIVE before torch loads, keeping a value the user set:
    spinning workers fight the browser for the cores (benchmarks/cpu_threads.py)."""
    code = ("import os, sys\nfrom dashboard import serve\ntry:\n    serve.main(['--server.port', 'not-a-port'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"SONDE_NO_WARM": "1", **({"OMP_WAIT_POLICY": preset} if preset else {})})
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.split()[-2:] == ["False", expected], (p.stdout, p.stderr[-2000:])


def test_token_chips_do_not_wrap_inside():
    """A token chip keeps its quotes and whitespace visible and holds no breakable space, so a line of chips
    wraps between chips, never after a chip's opening quote."""
    from dashboard.components import token_chip

    assert token_chip(" comprom") == "`'\u00a0comprom'`" and " " not in token_chip(" a b ")
    assert token_chip("\n") == "`'\\n'`"
