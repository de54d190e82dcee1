"""The workbench: component profiles, exports and reports, and the links between dashboard pages.

Unit tests use tiny random models and hand cases; the AppTest tests drive the real dashboard
(dashboard/app.py with st.navigation) on the embedded model: a click on a head opens its panel, the panel's
actions open the Counterfactuals / Information flow pages with the head as the intervention, and a page's
URL query string reproduces its view.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analyses import component as C  # noqa: E402
from analyses.core import report  # noqa: E402
from probes import ConfigError, InputError  # noqa: E402

TIMEOUT = 300


# ----------------------------------------------------------------------------- labels and math
def test_parse_component_labels_and_errors(tiny):
    p = tiny("llama")
    assert C.parse_component("L1H0", p.info) == ("head", 1, 0)
    assert C.parse_component(" l0n5 ") == ("neuron", 0, 5)
    with pytest.raises(InputError, match="L<layer>H<head>") as e:
        C.parse_component("head 3")
    assert "L5H3" in e.value.hint
    with pytest.raises(InputError, match="layer 7 does not exist"):
        C.parse_component("L7H0", p.info)
    with pytest.raises(InputError, match=f"has {p.info.n_heads} heads"):
        C.parse_component(f"L0H{p.info.n_heads}", p.info)
    with pytest.raises(InputError, match="neuron"):
        C.parse_component(f"L0N{p.info.d_mlp}", p.info)


def test_config_validates():
    with pytest.raises(ConfigError, match="domains"):
        C.Config(domains=())
    with pytest.raises(ConfigError, match="theta"):
        C.Config(theta=1.5)
    with pytest.raises(ConfigError, match="k="):
        C.Config(k=0)


def test_principal_direction_hand_case():
    d = 6
    e2 = torch.zeros(d)
    e2[2] = 1.0
    # rows = multiples of -e2 plus a small orthogonal part: the principal direction is ±e2, signed so its largest entry is > 0
    W = torch.stack([-3 * e2, -1 * e2, 0.01 * torch.eye(d)[4]])
    u = C.principal_direction(W)
    assert torch.allclose(u, e2, atol=1e-3)
    assert abs(float(u.norm()) - 1) < 1e-6


def test_direction_tokens_hand_case():
    s = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0])
    top, bot = C.direction_tokens(s, lambda i: f"t{i}", 2)
    assert top == [("t2", 3.0), ("t4", 1.0)]
    assert bot == [("t1", -2.0), ("t3", 0.0)]


def test_direction_scores_cancel_norm_bias(tiny):
    # gpt2 has a LayerNorm with a bias before the unembedding: U(0) is not zero, U(u) - U(0) removes it
    p = tiny("gpt2")
    u = torch.randn(p.info.d_model)
    u = u / u.norm()
    s = C._direction_scores(p, u)
    assert s.shape == (p.info.d_vocab,)
    full = p.unembed(u[None]).float()[0]
    assert not torch.allclose(s, full)  # the bias term was there and is gone
    zero = p.unembed(torch.zeros(1, p.info.d_model)).float()[0]
    assert torch.allclose(s, full - zero, atol=1e-5)


# ----------------------------------------------------------------------------- profiles
def test_profile_head_computed_then_saved_results(tiny, tmp_path):
    from analyses import dormant, routes

    p = tiny("llama")
    cfg = C.Config(domains=("random", "repeat"), n_samples=2, T=8, k=3)
    prof = C.profile(p, "L1H2", config=cfg, root=tmp_path / "empty")
    assert prof.kind == "head" and (prof.layer, prof.index) == (1, 2)
    assert prof.sink["domain"].tolist() == ["random", "repeat"]
    assert ((prof.sink["sink_mass"] >= 0) & (prof.sink["sink_mass"] <= 1)).all()
    assert prof.status in ("active", "dormant", "mixed")
    assert prof.sources == {"sinks": "computed", "route": "no routes dataset saved", "bigram": "no bigram result saved"}
    assert prof.bigram_kept is None and prof.route.empty
    assert len(prof.top_tokens) == 3 and len(prof.bottom_tokens) == 3
    assert prof.top_tokens[0][1] >= prof.top_tokens[-1][1] > prof.bottom_tokens[0][1]

    # saved results of the same model are read instead: dormant map, routes dataset stats, bigram mask
    root = tmp_path / "store"
    dres = dormant.run(p, ("random", "repeat"), config=dormant.Config(T=8, n_samples=2, batch_size=2, intervention="none", max_heads=0))
    dpath = dres.save(root / "dorm")
    L, H = p.info.n_layers, p.info.n_heads
    freq = torch.zeros(2, L, H)
    freq[0, 1, 2], freq[1, 1, 2] = 0.25, 0.75
    rs = routes.RouteStatsResult(config=routes.DatasetConfig(), model=p.info.to_dict(), domains=["a", "b"], n=torch.tensor([4.0, 4.0]),
                                 head_freq=freq, head_mean=freq / 10, ffn_freq=torch.zeros(2, L), ffn_mean=torch.zeros(2, L))
    rpath = rs.save(root / "rds")
    _save_bigram(p, root / "bigram", head=(1, 2), kept=0.5)
    prof2 = C.profile(p, "L1H2", config=cfg, root=root)
    assert prof2.sources["sinks"] == str(dpath) and prof2.sources["route"] == str(rpath)
    assert torch.allclose(torch.tensor(prof2.sink["sink_mass"].to_numpy()), dres.sink_mass[:, 1, 2].float())
    assert prof2.route["freq"].tolist() == [0.25, 0.75] and prof2.route_frequency == pytest.approx(0.5)
    assert prof2.bigram_kept == pytest.approx(0.5) and prof2.bigram_member
    # another head is not in the mask
    assert C.profile(p, "L0H0", config=cfg, root=root).bigram_member is False
    # a saved result of another model is ignored
    other = tiny("llama", seed=1)
    assert other.info.fingerprint != p.info.fingerprint
    assert C.profile(other, "L1H2", config=cfg, root=root).sources["sinks"] == "computed"


def _save_bigram(p, out, head, kept, steps=0):
    from analyses import bigram as B

    L, H = p.info.n_layers, p.info.n_heads
    hk = torch.zeros(L, H)
    hk[head] = kept
    res = B.BigramResult(config=B.Config(), model=p.info.to_dict(), masks={},
                         matrices=pd.DataFrame({"layer": [0], "matrix": ["q"], "kept": [1], "total": [2], "fraction": [0.5]}),
                         head_kept=hk, neuron_kept=torch.zeros(L, p.info.d_mlp), curve=pd.DataFrame(), ablation=pd.DataFrame(),
                         sparsity=0.5, steps_done=steps)
    return res.save(out)


def test_profile_neuron_and_prompt_route(tiny, tmp_path):
    from analyses import routes

    p = tiny("llama")
    cfg = C.Config(domains=("random",), n_samples=1, T=8, k=4)
    prof = C.profile(p, "L0N3", config=cfg, root=tmp_path)
    assert prof.kind == "neuron" and prof.status == "n/a" and prof.sink.empty
    # a neuron's direction is its W_out row: the promoted tokens are the top of U(w) - U(0)
    w = p.W_out(0)[3].float()
    u = w / w.norm()
    want = C._direction_scores(p, u).topk(4).indices.tolist()
    assert [t for t, _ in prof.top_tokens] == [p.tokenizer.decode([i]) for i in want]

    r = routes.run(p, torch.randint(0, p.info.d_vocab, (1, 6)), config=routes.Config())
    imp = r.head_importance(tau=cfg.tau)
    l, h = divmod(int(imp.argmax()), imp.shape[1])
    on = C.profile(p, f"L{l}H{h}", config=cfg, routes_result=r, root=tmp_path)
    assert on.sources["route"] == "prompt" and on.route["freq"].tolist() == [1.0]
    assert on.route["mean_importance"].iloc[0] == pytest.approx(float(imp[l, h]))


def test_profile_save_load_roundtrip(tiny, tmp_path):
    from analyses.core.base import load_result

    p = tiny("llama")
    prof = C.profile(p, "L0H1", config=C.Config(domains=("random",), n_samples=1, T=8, k=3), root=tmp_path / "none")
    back = load_result(prof.save(tmp_path / "prof"))
    assert isinstance(back, C.ComponentProfile)
    assert back.summary() == prof.summary()
    assert back.top_tokens == prof.top_tokens and back.sink.equals(prof.sink)


# ----------------------------------------------------------------------------- exports
def _fig():
    import plotly.graph_objects as go

    return go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])).update_layout(width=300, height=200)


def test_figure_exports_decode():
    html = report.figure_bytes(_fig(), "html")
    assert html.lower().startswith(b"<!doctype html>") and b"plotly" in html
    with pytest.raises(ConfigError, match="png"):
        report.figure_bytes(_fig(), "jpeg")
    why = report.static_export_available()
    if why is not None:
        with pytest.raises(report.ExportError):
            report.figure_bytes(_fig(), "png")
        pytest.skip(why)
    from PIL import Image

    img = Image.open(io.BytesIO(report.figure_bytes(_fig(), "png", scale=1)))
    img.load()
    assert img.size == (300, 200)
    assert len(set(img.convert("RGB").getdata())) > 10  # a drawn heat map, not a blank image
    import xml.etree.ElementTree as ET

    svg = ET.fromstring(report.figure_bytes(_fig(), "svg"))
    assert svg.tag.endswith("svg")


def test_static_export_without_browser_is_one_clear_error(monkeypatch):
    pytest.importorskip("kaleido")
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.delenv("CHROMIUM_PATH", raising=False)
    monkeypatch.setattr(report, "CHROMIUM_CANDIDATES", ())
    assert "Chrome" in report.static_export_available()
    with pytest.raises(report.ExportError, match="PNG") as e:
        report.figure_bytes(_fig(), "png")
    assert "BROWSER_PATH" in e.value.hint


def test_table_exports_roundtrip():
    df = pd.DataFrame({"head": ["L0H1", "L2H3"], "mass": [0.5, 0.25], "flag": [True, None]})
    assert pd.read_csv(io.BytesIO(report.table_bytes(df, "csv")))["mass"].tolist() == [0.5, 0.25]
    back = pd.read_parquet(io.BytesIO(report.table_bytes(df, "parquet")))
    assert back["head"].tolist() == ["L0H1", "L2H3"]
    with pytest.raises(ConfigError, match="csv"):
        report.table_bytes(df, "xlsx")


def test_graphml_reads_back_in_networkx(tiny):
    import networkx as nx

    from analyses import routes

    p = tiny("llama")
    r = routes.run(p, torch.randint(0, p.info.d_vocab, (1, 5)), config=routes.Config())
    g = nx.read_graphml(io.BytesIO(report.graphml_bytes(r)))
    route = r.route()
    assert set(g.nodes) == set(route.nodes) and g.number_of_edges() == route.number_of_edges()
    with pytest.raises(ConfigError, match="RoutesResult"):
        report.graphml_bytes(pd.DataFrame())


def test_html_report_self_contained_with_manifest(tiny, tmp_path):
    from html.parser import HTMLParser

    p = tiny("llama")
    prof = C.profile(p, "L0H1", config=C.Config(domains=("random",), n_samples=1, T=8, k=3), root=tmp_path / "none")
    page = report.html_report(prof, notes=("Prompt: 'x'",), code="component.profile(probe, 'L0H1')").decode()
    for s in ("<h1>component on", "Summary", "Manifest", prof.key, "plotly", "Prompt: &#x27;x&#x27;", "Table sink"):
        assert s in page, s
    assert 'src="http' not in page and len(page) > 1_000_000  # plotly.js inlined, no remote script: opens offline

    class P(HTMLParser):
        tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

    P().feed(page)
    assert P.tags.count("table") >= 2 and "h1" in P.tags
    # a saved folder gives the same manifest as the one written to disk
    folder = prof.save(tmp_path / "saved")
    page2 = report.html_report(folder).decode()
    man = json.loads((folder / "manifest.json").read_text())
    assert man["created_at"] in page2 and man["key"] in page2


# ----------------------------------------------------------------------------- dashboard links (AppTest)
def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=TIMEOUT)


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _button(at, key):
    hits = [b for b in at.button if b.key == key]
    assert hits, f"no button {key!r}; buttons: {[b.key for b in at.button]}"
    return hits[0]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("workbench-store")


def test_routes_head_panel_ablate_and_compare(store_dir, monkeypatch):
    """Information flow → a head's panel → ablate it in a counterfactual; → compare routes with it ablated."""
    monkeypatch.setenv("SONDE_RESULTS", str(store_dir))
    at = _app()
    at.switch_page("views/routes.py")
    at.query_params.update({"prompt": "The Eiffel Tower is in", "component": "L5H3", "tau": "0.05"})
    at.run()
    _ok(at)
    assert at.title[0].value == "Information flow"
    assert at.selectbox(key="routes_component").value == "L5H3"  # the URL's node is selected
    assert at.slider(key="routes_tau").value == pytest.approx(0.05)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Status"] in ("active", "dormant", "mixed") and "Max sink mass" in metrics
    assert any("Sink mass per domain" in m.value for m in at.markdown)
    assert any(d.label == "Report" for d in at.get("download_button"))
    # selection fallback: another head updates the panel and the URL
    at.selectbox(key="routes_component").set_value("L0H0").run()
    _ok(at)
    assert at.query_params["component"] == ["L0H0"] or at.query_params["component"] == "L0H0"
    assert any(m.value.startswith("#### Component L0H0") for m in at.markdown)
    # compare routes with it ablated (same page, the ablated route beside the original)
    _button(at, "routes-cp-routes").click().run()
    _ok(at)
    assert at.title[0].value == "Information flow"
    assert any(s.value == "Routes with L0H0 ablated" for s in at.subheader)
    assert {m.label for m in at.metric} >= {"Edges kept", "Edges lost", "Edges gained"}
    # ablate it in a counterfactual: the Counterfactuals page opens with the head as a model edit
    _button(at, "routes-cp-ablate").click().run()
    _ok(at)
    assert at.title[0].value == "Counterfactuals"
    assert at.radio[0].value == "model edit"
    assert any("`ablate:L0H0`" in m.value for m in at.markdown)
    assert any(d.label == "Report" for d in at.get("download_button"))


def test_shared_url_reproduces_view_and_reads_store(store_dir, monkeypatch):
    """A pasted link (fresh session, same query string) shows the same view, loaded from the results store."""
    monkeypatch.setenv("SONDE_RESULTS", str(store_dir))
    q = {"prompt": "The Eiffel Tower is in", "component": "L5H3", "tau": "0.05", "position": "3"}
    first = _app()
    first.switch_page("views/routes.py")
    first.query_params.update(q)
    first.run()
    _ok(first)
    shared = {k: (v[0] if isinstance(v, list) else v) for k, v in first.query_params.items()}
    assert {k: shared[k] for k in q} == q  # the page writes back exactly what it shows
    again = _app()
    again.switch_page("views/routes.py")
    again.query_params.update(shared)
    t0 = time.perf_counter()
    again.run()
    _ok(again)
    assert any("Loaded from the results store" in c.value for c in again.caption)
    assert again.selectbox(key="routes_position").value.startswith("3:")
    assert again.selectbox(key="routes_component").value == "L5H3"
    assert [m.value for m in again.markdown if m.value.startswith("**Route to")] == \
        [m.value for m in first.markdown if m.value.startswith("**Route to")]
    assert time.perf_counter() - t0 < TIMEOUT


def test_component_page_links_and_bad_label(store_dir, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(store_dir))
    at = _app()
    at.switch_page("views/component.py")
    at.query_params.update({"component": "L2H8"})
    at.run()
    _ok(at)
    assert at.title[0].value == "Component"
    assert any(m.value.startswith("#### Component L2H8") for m in at.markdown)
    _button(at, "component_next").click().run()  # L2H8 is the last head of layer 2 -> L3H0
    _ok(at)
    assert at.text_input(key="component_label").value == "L3H0"
    at.text_input(key="component_label").set_value("L99H0").run()
    assert not at.exception
    assert at.error and "layer 99 does not exist" in at.error[0].value
    at.text_input(key="component_label").set_value("L1N7").run()
    _ok(at)
    assert {m.label: m.value for m in at.metric}["Status"] == "n/a"


def test_sinks_page_head_panel_from_url(store_dir, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(store_dir))
    at = _app()
    at.switch_page("views/sinks.py")
    at.query_params.update({"component": "L3H1", "T": "16", "n": "1"})
    at.run()
    _ok(at)
    assert any(m.value.startswith("#### Component L3H1") for m in at.markdown)
    assert any(d.label == "Report" for d in at.get("download_button"))


def test_sinks_dormant_map_runs_in_background_and_cancels(store_dir, monkeypatch):
    monkeypatch.setenv("SONDE_RESULTS", str(store_dir))
    at = _app()
    at.switch_page("views/sinks.py")
    at.query_params.update({"T": "16", "n": "1"})
    at.run()
    _ok(at)
    # a long run: cancel it
    at.number_input(key="dormant_n").set_value(64)
    _button(at, "dormant_go").click().run()
    _ok(at)
    assert at.get("progress"), ("no progress bar while the run is going", [w.value for w in at.warning])
    _button(at, "dormant-cancel").click().run()
    deadline = time.time() + 60
    while time.time() < deadline and not any("cancelled" in w.value for w in at.warning):
        time.sleep(0.5)
        at.run()
    assert any("cancelled" in w.value for w in at.warning), [w.value for w in at.warning]
    # a short run finishes and shows the map
    at.number_input(key="dormant_n").set_value(1)
    _button(at, "dormant_go").click().run()
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.key == "dormant_map" for c in at.get("plotly_chart")):
        time.sleep(0.5)
        at.run()
    _ok(at)
    assert any(c.key == "dormant_map" for c in at.get("plotly_chart"))


def test_output_lens_of_a_head_and_an_ffn(tiny):
    """A part's output read through the unembedding: the head vector is z_h W_O,h at the position, it depends only
    on the tokens up to the position (causal), and bad parts/positions are one clear error."""
    import torch

    from analyses import component
    from probes import ConfigError

    probe = tiny("llama")
    ids = probe.to_tokens("hello world")[0]
    up, down = component.output_lens(probe, ids, "L1H2", 3, k=4)
    assert len(up) == len(down) == 4 and [s for _, s in up] == sorted((s for _, s in up), reverse=True)
    # causal: appending tokens after the position changes nothing
    up2, _ = component.output_lens(probe, torch.cat([ids, ids]), "L1H2", 3, k=4)
    assert [t for t, _ in up2] == [t for t, _ in up]
    for a, b in zip(up2, up):
        assert abs(a[1] - b[1]) < 1e-4
    # the head's vector by hand: hook_z at the position times W_O,h
    z = probe.cache(ids[None, :4], ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"][0, 3, 2].float()
    scores = component._direction_scores(probe, z @ probe.W_O(1)[2].detach().float())
    assert [t for t, _ in component.direction_tokens(scores, lambda i: probe.tokenizer.decode([i]), 4)[0]] == [t for t, _ in up]
    ffn_up, _ = component.output_lens(probe, ids, "L0FFN", 2, k=3)
    assert len(ffn_up) == 3
    for bad, pos in (("L9H0", 1), ("L0H9", 1), ("X1", 1), ("L0H0", 99)):
        with pytest.raises(ConfigError):
            component.output_lens(probe, ids, bad, pos)


def test_profile_reads_the_shipped_bigram_mask_of_the_embedded_model(embedded, tmp_path):
    """With no bigram result saved, a component of the embedded model reads the mask shipped with Sonde (the one the
    Bigram page shows), and says so; it never reads it for another model."""
    from analyses import bigram, component

    p = component.profile(embedded, "L0H0", root=tmp_path)
    shipped = bigram.default_result()
    assert "shipped mask" in p.sources["bigram"]
    assert p.bigram_kept == pytest.approx(float(shipped.head_kept[0, 0]))


def test_the_default_bigram_mask_is_the_most_trained(embedded, tmp_path):
    """A short test run saved to the store (6 steps) does not replace the shipped mask (hundreds of steps) as the
    default that the Bigram page and the component panels show; a saved mask trained longer does."""
    from analyses import bigram, component

    shipped_steps = bigram.default_result().steps_done
    root = tmp_path / "store"
    short = _save_bigram(embedded, root / "short", head=(0, 1), kept=0.5, steps=6)
    rows = component.bigram_masks(embedded.info.fingerprint, root)
    assert [r[0] for r in rows] == ["shipped", str(short)] and rows[0][1] == shipped_steps > 6
    prof = component.profile(embedded, "L0H1", config=component.Config(n_samples=1, T=8, domains=("random",)), root=root)
    assert "shipped mask" in prof.sources["bigram"]
    long = _save_bigram(embedded, root / "long", head=(0, 1), kept=0.5, steps=shipped_steps + 1)
    assert component.bigram_masks(embedded.info.fingerprint, root)[0][0] == str(long)
    assert component.profile(embedded, "L0H1", config=component.Config(n_samples=1, T=8, domains=("random",)),
                             root=root).sources["bigram"] == str(long)
