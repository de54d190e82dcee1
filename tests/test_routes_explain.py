"""QK attribution of attention edges (analyses.routes_explain): the parts of the query-side and key-side
residuals add up to the model's own pre-softmax score, on tiny random models of four families and the
embedded model, behind both backends."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analyses import routes
from analyses.routes_explain import parse_edge
from probes import InputError

from conftest import run_cli

TEXT = "abc def ghij"


def _check(ex, tol=1e-4):
    assert ex.pairs.shape == (len(ex.query_parts), len(ex.key_parts))
    assert ex.score == pytest.approx(float(ex.pairs.sum()), abs=1e-9)
    assert float(ex.query_marginals.sum()) == pytest.approx(ex.score, abs=1e-9)
    assert float(ex.key_marginals.sum()) == pytest.approx(ex.score, abs=1e-9)
    assert ex.model_score is not None
    assert abs(ex.score - ex.model_score) < tol
    assert ex.frozen_norm and "bias" in ex.query_parts and "embed" in ex.key_parts


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_parts_sum_to_model_score_tiny(tiny, family, backend):
    probe = tiny(family, backend)
    ex = routes.explain_attention(probe, TEXT, layer=1, head=3, query_pos=-1, key_pos=2)
    assert ex.kv_head == 3 // (probe.info.n_heads // probe.info.n_kv_heads)  # GQA: the KV head the query head reads
    assert any(n.startswith("L0H") and "@" in n for n in ex.query_parts)  # heads split by source position
    assert "L0.mlp" in ex.query_parts and ("L0.attn_bias" in ex.query_parts) == (family in ("gpt2", "gpt_neox"))
    if ex.model_score is None:  # no post-rotary q/k on this backend (TransformerLens, GPT-NeoX): check against the pattern
        assert backend == "transformer_lens" and family == "gpt_neox"
        other = routes.explain_attention(probe, TEXT, layer=1, head=3, query_pos=-1, key_pos=0)
        assert ex.score - other.score == pytest.approx(math.log(ex.probability) - math.log(other.probability), abs=1e-4)
        assert abs(float(ex.pairs.sum()) - ex.score) < 1e-9
        return
    _check(ex)
    summed = routes.explain_attention(probe, TEXT, layer=1, head=3, query_pos=-1, key_pos=2, by_source=False)
    assert "L0H2" in summed.query_parts and abs(summed.score - ex.score) < 1e-9
    assert abs(summed.query_marginals["L0H2"] - ex.query_marginals[[n for n in ex.query_parts if n.startswith("L0H2@")]].sum()) < 1e-9


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_parts_sum_to_model_score_embedded(embedded, embedded_tl, backend):
    probe = embedded if backend == "nnsight" else embedded_tl
    for layer, head, q, k in ((5, 3, -1, 2), (12, 0, 4, 4)):
        ex = routes.explain_attention(probe, "The Eiffel Tower is in Paris", layer, head, q, k)
        _check(ex)
        assert ex.norm == "RMSNorm" and 0 <= ex.probability <= 1
    top = ex.top(3)
    assert set(top.side) == {"query", "key"} and len(top) == 6
    pairs = ex.top_pairs(4)
    assert len(pairs) == 4 and np.all(np.diff(pairs.contribution.abs().to_numpy()) <= 0)
    json.dumps(ex.to_dict())


def test_bad_edges(tiny):
    probe = tiny("llama")
    assert parse_edge("L5H3@12->4") == (5, 3, 12, 4)
    for bad in ("L5H3", "5.3@1->2", ""):
        with pytest.raises(InputError):
            parse_edge(bad)
    with pytest.raises(InputError, match="after query"):
        routes.explain_attention(probe, TEXT, 1, 0, 1, 3)
    with pytest.raises(InputError, match="no head"):
        routes.explain_attention(probe, TEXT, 7, 0, 1, 0)
    with pytest.raises(InputError, match="outside"):
        routes.explain_attention(probe, TEXT, 1, 0, 99, 0)


def test_cli_explain(tmp_path, capsys):
    code, out, err = run_cli(["run", "routes", "--model", "embedded", "--prompt", "The Eiffel Tower is in Paris",
                              "--mode", "route", "--explain", "L5H3@-1->2", "--json", "--device", "cpu",
                              "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    data = json.loads(out)
    ex = data["explain"]
    assert ex["edge"].startswith("L5H3@") and ex["query"] and ex["key"] and ex["pairs"]
    assert abs(ex["score"] - ex["model_score"]) < 1e-4


def test_layer_zero_edges_are_explained_too():
    """A layer-0 head's input is the embedding alone: its score splits into the embedding and the bias part."""
    import tiny_models

    from analyses import routes

    p = tiny_models.probe("llama")
    e = routes.explain_attention(p, "abc def", 0, 1, 4, 2)
    assert e.layer == 0 and e.model_score is not None


def test_qk_contributors_as_graph_edges():
    """The top contributors become graph edges: from the contributor's node at its side's position into the node that
    side reads; drawn on the route figure as a second (dashed) kind of edge."""
    import tiny_models

    from analyses import routes
    from probes.labels import parse_node

    p = tiny_models.probe("llama")
    res = routes.run(p, "abc def")
    ex = routes.explain_attention(p, "abc def", 1, 2, 5, 3)
    qk = ex.qk_edges(k=3)
    top = ex.top(4)
    for side, target in (("query", "A1_5"), ("key", "I0_3")):
        es = [e for e in qk if e["side"] == side]
        assert 1 <= len(es) <= 3 and all(e["target"] == target for e in es)
        want = {r.component: r.contribution for r in top[top.side == side].itertuples() if r.component != "bias"}
        for e in es:
            assert e["contribution"] == pytest.approx(want[e["component"]])
            k, l, pos = parse_node(e["source"])
            assert pos == (5 if side == "query" else 3)
            assert (k, l) == (("X", 0) if e["component"] == "embed" else ("M", int(e["component"][1])) if e["component"].endswith(".mlp")
                              else ("A", int(e["component"][1])))
    assert {e["target"] for e in routes.explain_attention(p, "abc def", 0, 1, 4, 2).qk_edges(3) if e["side"] == "key"} == {"X0_2"}
    fig = res.plot()
    from analyses.routes_plots import plot_route

    with_qk = plot_route(res.route(), res.str_tokens, res.n_layers, qk=qk)
    names = [t.name for t in with_qk.data]
    assert "QK contributor (query side)" in names and "QK contributor (key side)" in names
    assert len(with_qk.data) > len(fig.data)
