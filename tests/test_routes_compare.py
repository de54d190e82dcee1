"""Two contexts side by side (routes.compare): aligned positions, kept/lost/gained edges, Δ head importance, Δp."""

from __future__ import annotations

import json

import pytest
import torch

from analyses import routes
from probes import ConfigError


def test_same_context_keeps_every_edge(tiny):
    probe = tiny("llama")
    a = routes.run(probe, "abc def gh")
    c = routes.compare(a, a, probe_a=probe)
    n = a.route().number_of_edges()
    assert c.counts() == {"kept": n, "lost": 0, "gained": 0, "unaligned": 0}
    assert c.head_delta.abs().max() == 0 and c.delta_p == 0 and c.offset == 0
    json.dumps(c.to_dict())


def test_ablated_head_changes_the_route(embedded):
    cfg = routes.Config(mode="route")
    a = routes.run(embedded, "The Eiffel Tower is in Paris", config=cfg)
    hi = a.head_importance()
    l, h = divmod(int(hi.argmax()), hi.shape[1])
    b = routes.run(embedded, "The Eiffel Tower is in Paris", config=cfg, edits=[f"L{l}H{h}"])
    c = routes.compare(a, b)
    assert c.head_delta[l, h] < 0  # the ablated head leaves the route
    assert c.counts()["lost"] + c.counts()["gained"] > 0
    e = c.edges
    assert set(e.status) <= {"kept", "lost", "gained"}
    assert (e.loc[e.status == "lost", "weight_b"] == 0).all() and (e.loc[e.status == "gained", "weight_a"] == 0).all()
    assert torch.allclose(torch.tensor((e.weight_b - e.weight_a).to_numpy()), torch.tensor(e.delta.to_numpy()))


def test_two_models_and_right_alignment(tiny, embedded):
    pa, pb = tiny("llama", seed=0), tiny("llama", seed=1)
    a = routes.run(pa, torch.arange(10, 16))
    b = routes.run(pb, torch.arange(8, 16))  # two more tokens in front: b's position t + 2 is a's t
    c = routes.compare(a, b, probe_a=pa, probe_b=pb)
    assert c.offset == 2 and c.position_a == 5 and c.position_b == 7
    assert c.target is not None and 0 <= c.p_a <= 1 and 0 <= c.p_b <= 1
    assert all(int(n.split("_")[1]) >= 0 for n in c.edges[c.edges.status != "unaligned"].source)
    with pytest.raises(ConfigError, match="differ in shape"):
        routes.compare(a, routes.run(embedded, torch.arange(10, 16), config=routes.Config(mode="route")))


def test_graphml_declares_each_attribute_once(tmp_path):
    """A weight of 1 (an int) beside 0.5 (a float) must not make GraphML declare two "weight" keys."""
    import re
    from collections import Counter

    import networkx as nx

    from analyses.routes_graph import write_graphml

    g = nx.DiGraph()
    g.add_node("X0_0", kind="X", layer=-1, pos=0, token="a")
    g.add_node("I0_0", kind="I", layer=0, pos=0, token="a")
    g.add_node("A0_0", kind="A", layer=0, pos=0, token="a")
    g.add_edge("X0_0", "A0_0", weight=1, kind="resid", layer=0)
    g.add_edge("A0_0", "I0_0", weight=0.5, kind="resid", layer=0, heads=[0.25, 0.25])
    text = write_graphml(g, tmp_path / "g.graphml").read_text()
    keys = Counter(re.findall(r'<key [^>]*for="(\w+)" attr.name="(\w+)"', text))
    assert all(n == 1 for n in keys.values()), keys
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert back.edges["X0_0", "A0_0"]["weight"] == 1.0


def test_exports_graphml_and_offline_html(tiny, tmp_path):
    import networkx as nx

    pa, pb = tiny("llama", seed=0), tiny("llama", seed=1)
    a = routes.run(pa, torch.arange(10, 16))
    b = routes.run(pb, torch.arange(8, 16))
    c = routes.compare(a, b, probe_a=pa, probe_b=pb, labels=("base", "other"))
    g = nx.read_graphml(c.to_graphml(tmp_path / "cmp.graphml"))
    aligned = c.edges[c.edges.status != "unaligned"]
    assert g.number_of_edges() == len(aligned) > 0
    for row in aligned.itertuples():  # every aligned edge once, with both weights and its status
        e = g.edges[row.source, row.target]
        assert e["status"] == row.status and e["weight_a"] == pytest.approx(row.weight_a) and e["weight_b"] == pytest.approx(row.weight_b)
    html = c.report_html().decode()
    assert "base" in html and "other" in html and "Plotly.newPlot" in html
    assert 'src="http' not in html and len(html) > 1_000_000  # plotly.js inlined, no remote script: opens offline


def test_cli_compare_two_prompts_json_html_graphml(tmp_path, capsys, tiny_dir, results_dir):
    from conftest import run_cli

    args = ["run", "routes", "--model", str(tiny_dir), "--prompt", "abc def gh", "--prompt-b", "abc xyz gh", "--compare",
            "--device", "cpu", "--mode", "route"]
    code, out, err = run_cli(args + ["--json", "--html", str(tmp_path / "c.html"), "--graphml", str(tmp_path / "c.graphml")], capsys)
    assert code == 0, err
    d = json.loads(out)["compare"]
    assert d["offset"] == 0 and d["kept"] + d["lost"] + d["gained"] > 0 and 0 <= d["p_a"] <= 1 and d["delta_p"] is not None
    assert (tmp_path / "c.html").read_text().startswith("<!DOCTYPE html>") and (tmp_path / "c.graphml").stat().st_size > 0
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "edges: kept" in out and "result b:" in out
    for bad, msg in (([], "needs a second context"), (["--prompt-b", "x", "--explain", "L1H0@2->1"], "runs on its own"),
                     (["--prompt-b", "x", "--out", str(tmp_path / "o")], "saves both")):
        a = [x for x in args if x not in ("--prompt-b", "abc xyz gh")] + bad
        code, out, err = run_cli(a, capsys)
        assert code == 2 and msg in err, err
    code, out, err = run_cli(["run", "routes", "--model", str(tiny_dir), "--prompt", "abc", "--prompt-b", "x", "--device", "cpu"], capsys)
    assert code == 2 and "Add --compare" in err


def test_graphml_escapes_control_characters(tmp_path):
    """Byte-level tokens such as a vertical tab cannot stand in XML 1.0: they are written escaped, the file parses."""
    import networkx as nx

    from analyses.routes_graph import write_graphml

    g = nx.DiGraph()
    g.add_node("X0_0", kind="X", layer=-1, pos=0, token="\x0b\x01")
    g.add_node("A0_0", kind="A", layer=0, pos=0, token="a\nb")
    g.add_edge("X0_0", "A0_0", weight=1.0, kind="resid", layer=0)
    back = nx.read_graphml(write_graphml(g, tmp_path / "g.graphml"))
    assert back.nodes["X0_0"]["token"] == "\\x0b\\x01" and back.nodes["A0_0"]["token"] == "a\nb"


# ----------------------------------------------------------------------------- one prompt on two models
def test_base_vs_adapter(embedded, embedded_adapter):
    """The adapter merged into a private copy (probe.adapter_probe) gives PEFT's own logits; the base probe is
    untouched; routes.compare reads p(target) of the adapted model. Measured: merged vs unmerged logits differ by
    5e-5 at most (p by 4e-6); Δp(' Paris') +0.030 at 'The Eiffel Tower is located in the city of'."""
    from conftest import ADAPTER_PROMPT

    folder, ref = embedded_adapter
    ids = embedded.to_tokens(ADAPTER_PROMPT)
    before = embedded.forward(ids).double()
    b = embedded.adapter_probe(folder)
    assert b.info.name == "embedded+lora-qvo" and b.info.fingerprint != embedded.info.fingerprint
    assert (b.forward(ids).double() - ref).abs().max() < 5e-4
    assert torch.equal(embedded.forward(ids).double(), before)  # the base probe kept its weights
    cfg = routes.Config(mode="route")
    ra, rb = routes.run(embedded, ADAPTER_PROMPT, config=cfg), routes.run(b, ADAPTER_PROMPT, config=cfg)
    assert ra.key != rb.key  # two models: two results in the store
    c = routes.compare(ra, rb, probe_a=embedded, probe_b=b)
    assert c.p_a == pytest.approx(float(before[0, -1].softmax(-1)[c.target]), abs=1e-5)
    assert c.p_b == pytest.approx(float(ref[0, -1].softmax(-1)[c.target]), abs=1e-4)
    assert abs(c.delta_p) > 1e-3 and c.head_delta.abs().max() > 0  # the adapter moves the prediction and the route


def test_cli_compare_adapter_and_dtype(embedded, embedded_adapter, tmp_path, capsys, results_dir):
    """--adapter-b and --dtype-b: base vs adapter, and one model in fp32 vs bf16. bf16 rounding moves p(' Paris') by
    -0.013 at 'The Eiffel Tower is located in the city of' (measured; also -0.010 and +0.010 on two other prompts,
    2026-12-07), and keeps all but a few edges: the bound is 0.05."""
    from conftest import ADAPTER_PROMPT, run_cli

    folder, ref = embedded_adapter
    args = ["run", "routes", "--prompt", "The Eiffel Tower is located in the city of", "--compare", "--device", "cpu",
            "--mode", "route", "--json"]
    code, out, err = run_cli(args + ["--dtype-b", "bfloat16"], capsys)
    assert code == 0, err
    d = json.loads(out)["compare"]
    assert d["target_token"] == " Paris" and 0 < abs(d["delta_p"]) < 0.05, d
    assert d["kept"] > 10 * (d["lost"] + d["gained"])
    assert "in bfloat16" in d["labels"][1]
    code, out, err = run_cli(["run", "routes", "--prompt", ADAPTER_PROMPT, "--compare", "--device", "cpu", "--mode", "route",
                              "--json", "--adapter-b", str(folder)], capsys)
    assert code == 0, err
    d = json.loads(out)["compare"]
    assert d["p_b"] == pytest.approx(float(ref[0, -1].softmax(-1)[d["target"]]), abs=1e-4)
    assert "adapter" in d["labels"][1]
    for bad, msg in ((["--dtype-b", "fp8"], "unknown dtype 'fp8'"), (["--adapter-b", str(tmp_path)], "not a LoRA adapter folder")):
        code, out, err = run_cli(args + bad, capsys)
        assert code == 2 and msg in err and "Traceback" not in err, err
    code, out, err = run_cli(["run", "routes", "--prompt", "abc", "--dtype-b", "bfloat16", "--device", "cpu"], capsys)
    assert code == 2 and "Add --compare" in err
