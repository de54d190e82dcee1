"""Information-flow routes: worked numbers of the method page, decomposition invariants on real
models (tiny GPT-2 with biases, tiny Llama-GQA, GPT-NeoX parallel blocks, the embedded SmolLM2),
backend parity, route extraction, dataset mode, CLI and dashboard page."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from analyses import routes
from analyses.routes import (Config, DatasetConfig, attention_importance, ffn_importance, neuron_importance,
                             threshold_renormalize)
from probes import ConfigError, InputError, OutOfMemoryError, UnsupportedModelError
from probes.attention import expand_kv

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The Eiffel Tower is in Paris"


# ----------------------------------------------------------------------------- worked numbers (LLM-TT tests)
def test_mlp_l1_worked_example():
    ffn, res = ffn_importance(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
    assert ffn.item() == pytest.approx(1.0, abs=1e-4) and res.item() == pytest.approx(0.0, abs=1e-4)


def test_attention_p2_worked_example():
    pattern = torch.ones(2, 1, 1)  # [H, Tq, Tk]
    vo = torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]])  # [Tk, H, d]: the two head parts
    a, r, _ = attention_importance(torch.tensor([[2.0, 1.0]]), torch.tensor([[2.0, 2.0]]), pattern, vo, p=2)
    assert a[0, 0].tolist() == pytest.approx([0.43613, 0.0], abs=1e-4)
    assert r.item() == pytest.approx(0.56387, abs=1e-4)


@pytest.mark.parametrize("pre,post,neurons,want,want_resid", [
    ([1.0, 1.0], [4.0, 4.0], [[1.0, 1.0], [2.0, 2.0]], [0.25, 0.5], 0.25),
    ([10.0, 10.0], [-10.0, 10.0], [[0.0, 1.0], [1.0, 0.0], [-21.0, -1.0]], [1.0, 0.0, 0.0], 0.0),
])
def test_neuron_p2_worked_examples(pre, post, neurons, want, want_resid):
    W = torch.tensor(neurons)
    n, r = neuron_importance(torch.tensor([pre]), torch.ones(1, W.shape[0]), W, torch.tensor([post]), p=2)
    assert n[0].tolist() == pytest.approx(want, abs=1e-4)
    assert r.item() == pytest.approx(want_resid, abs=1e-4)


def test_threshold_renormalize_worked_example():
    blocks, resid = threshold_renormalize(torch.tensor([[0.05, 0.15], [0.05, 0.05]]), torch.tensor([0.8, 0.9]), 0.1)
    assert blocks.tolist() == [pytest.approx([0.0, 0.157894], abs=1e-5), [0.0, 0.0]]
    assert resid.tolist() == pytest.approx([0.842105, 1.0], abs=1e-5)
    b, r = threshold_renormalize(torch.tensor([[0.05, 0.05]]), torch.tensor([0.05]), 0.1)  # all <= tau: no NaN
    assert torch.isfinite(b).all() and b.sum() == 0 and r.item() == 0


def test_chunked_equals_naive():
    torch.manual_seed(0)
    T, H, d = 7, 3, 5
    pattern = torch.softmax(torch.randn(H, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    vo, pre = torch.randn(T, H, d), torch.randn(T, d)
    whole = pre + torch.einsum("hij,jhd->id", pattern, vo)
    a1, r1, _ = attention_importance(pre, whole, pattern, vo, query_chunk=2)
    a2, r2, _ = attention_importance(pre, whole, pattern, vo, query_chunk=T)
    parts = torch.cat([(pattern.permute(1, 2, 0)[..., None] * vo[None]).reshape(T, T * H, d), pre[:, None]], 1)
    naive = routes.proximity(whole, parts)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(a1.reshape(T, T * H), naive[:, :-1])
    torch.testing.assert_close(r1, naive[:, -1])


# ----------------------------------------------------------------------------- invariants on real models
def _identities(probe, text, tol, layers=None):
    """resid chain identities and Σ_{j,h} z[i,j,h] + b_O = attn_out (GQA expansion), from one cached pass."""
    toks = probe.to_tokens(text, prepend_bos=True)
    i = probe.info
    layers = list(range(i.n_layers)) if layers is None else layers
    kinds = ["hook_resid_pre", "attn.hook_v", "attn.hook_pattern", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
    if not i.parallel_blocks:
        kinds.append("hook_resid_mid")
    sites = [f"blocks.{L}.{k}" for L in sorted(set(layers) | {L - 1 for L in layers if L > 0}) for k in kinds]
    cache = {k: v[0].double() for k, v in probe.cache(toks, sites).items()}
    for L in layers:
        c = {k: cache[f"blocks.{L}.{k}"] for k in kinds}
        if L > 0:
            torch.testing.assert_close(c["hook_resid_pre"], cache[f"blocks.{L - 1}.hook_resid_post"], atol=tol, rtol=0)
        if i.parallel_blocks:
            torch.testing.assert_close(c["hook_resid_pre"] + c["hook_attn_out"] + c["hook_mlp_out"], c["hook_resid_post"], atol=tol, rtol=0)
        else:
            torch.testing.assert_close(c["hook_resid_pre"] + c["hook_attn_out"], c["hook_resid_mid"], atol=tol, rtol=0)
            torch.testing.assert_close(c["hook_resid_mid"] + c["hook_mlp_out"], c["hook_resid_post"], atol=tol, rtol=0)
        v = expand_kv(c["attn.hook_v"], i.n_heads, dim=1)
        vo = torch.einsum("thk,hkd->thd", v, probe.W_O(L).double())
        parts = routes.decomposed_attention(c["attn.hook_pattern"], vo)  # [T, T, H, d]
        b = probe.b_O(L)
        total = parts.sum((1, 2)) + (0 if b is None else b.double())
        torch.testing.assert_close(total, c["hook_attn_out"], atol=tol, rtol=0)


def _check_rows(res, eps):
    T = res.n_tokens
    rows = res.attn.double().sum((2, 3)) + res.attn_resid.double()
    if res.parallel:
        rows = rows + res.ffn.double()
    else:
        torch.testing.assert_close(res.ffn.double() + res.ffn_resid.double(), torch.ones_like(rows), atol=1e-5, rtol=0)
    if res.attn_bias is not None:
        rows = rows + res.attn_bias.double()
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
    # future keys get exactly eps / Σ: equal to each other within a row, and tiny
    fut = torch.ones(T, T).triu(1).bool()
    a = res.attn[:, fut]  # [L, n_future, H]
    if a.numel():
        for l in range(res.n_layers):
            for q in range(T - 1):
                row = res.attn[l, q, q + 1:]
                assert torch.allclose(row, row.flatten()[0].expand_as(row), rtol=1e-6, atol=0)
                assert row.max() < 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_invariants_tiny(tiny, family):
    probe = tiny(family)
    _identities(probe, "abc def gh", tol=1e-5)
    res = routes.run(probe, "abc def gh", config=Config(include_bias=family == "gpt2", level="neuron"))
    _check_rows(res, 1e-5)
    torch.testing.assert_close(res.neurons.double().sum(-1) + res.neuron_resid.double(), torch.ones(2, res.n_tokens, dtype=torch.float64))


def test_invariants_embedded(embedded):
    _identities(embedded, PROMPT, tol=2e-3, layers=[0, 1, 14, 29])
    res = routes.run(embedded, PROMPT)
    _check_rows(res, 1e-5)
    r = res.route()
    assert f"I{embedded.info.n_layers - 1}_{res.n_tokens - 1}" in r
    assert any(n.startswith("X0_") for n in r), "a route reaches the embeddings"


def test_backend_parity_tiny_llama(tiny):
    a = routes.run(tiny("llama", "nnsight"), "hello there")
    b = routes.run(tiny("llama", "transformer_lens"), "hello there")
    for k in ("attn", "attn_resid", "ffn", "ffn_resid"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), atol=1e-4, rtol=1e-3)


def test_backend_parity_embedded(embedded, embedded_tl):
    a = routes.run(embedded, "Paris is the capital of")
    b = routes.run(embedded_tl, "Paris is the capital of")
    for k in ("attn", "attn_resid", "ffn", "ffn_resid"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), atol=2e-3, rtol=1e-2)
    assert set(a.route().edges) == set(b.route().edges)


# ----------------------------------------------------------------------------- route extraction
def _paper_route(res, pos, tau, renorm):
    """Paper Algorithm 1 on tensors: top-down, expand only nodes already in the route."""
    attn, ar, ffn, fr, thr = res.weights(tau, renorm)
    L = res.n_layers
    edges = set()
    active_I = {pos}
    for l in range(L - 1, -1, -1):
        active_A = set()
        for i in active_I:
            if ffn[l, i] > thr:
                edges |= {(f"M{l}_{i}", f"I{l}_{i}"), (f"A{l}_{i}", f"M{l}_{i}")}
                active_A.add(i)
            if fr[l, i] > thr:
                edges.add((f"A{l}_{i}", f"I{l}_{i}"))
                active_A.add(i)
        nxt = set()
        src = (lambda j: f"X0_{j}") if l == 0 else (lambda j: f"I{l - 1}_{j}")
        for i in active_A:
            w = attn[l, i].sum(-1).clone()
            w[i] += ar[l, i]
            for j in torch.nonzero(w > thr).flatten().tolist():
                edges.add((src(j), f"A{l}_{i}"))
                nxt.add(j)
        active_I = nxt
    return edges


def test_route_matches_paper_algorithm(embedded):
    res = routes.run(embedded, PROMPT)
    for renorm in (True, False):
        for pos in (-1, 3):
            r = res.route(pos, tau=0.04, renormalize=renorm)
            assert set(r.edges) == _paper_route(res, pos % res.n_tokens, 0.04, renorm)
    hi = res.head_importance()
    assert hi.shape == (embedded.info.n_layers, embedded.info.n_heads) and hi.sum() > 0


def test_save_load_graphml(tiny, tmp_path, results_dir):
    res = routes.run(tiny("gpt2"), "abc de", config=Config(level="head", include_bias=True))
    path = res.save(tmp_path / "r")
    back = routes.RoutesResult.load(path)
    torch.testing.assert_close(back.attn, res.attn)
    assert back.str_tokens == res.str_tokens and set(back.route().edges) == set(res.route().edges)
    from analyses.core.base import load_result

    assert isinstance(load_result(path), routes.RoutesResult)
    import networkx as nx

    g = nx.read_graphml(res.to_graphml(tmp_path / "route.graphml"))
    assert set(g.edges) == set(res.route().edges)
    df = res.to_frame()
    assert {"model", "layer", "head", "pos", "token", "value"} <= set(df.columns)
    assert df[df.kind == "attn"]["head"].notna().all()
    res.plot(), res.plot_heads()


# ----------------------------------------------------------------------------- bad input
def test_bad_input(tiny):
    with pytest.raises(ConfigError, match=r"tau=1.5 is not allowed; use a number in \(0, 1\)"):
        Config(tau=1.5)
    with pytest.raises(ConfigError, match="level="):
        Config(level="layer")
    probe = tiny("llama")
    with pytest.raises(InputError, match="position=20 is outside the prompt"):
        routes.run(probe, "abc", config=Config(position=20))
    with pytest.raises(OutOfMemoryError, match="fit prompts of at most"):
        routes.run(probe, "abcdefghijklmnop", config=Config(max_memory_gb=1e-6))
    with pytest.raises(UnsupportedModelError, match="gemma2 normalises the attention output"):
        routes.run(tiny("gemma2"), "abc")
    res = routes.run(probe, "abc")
    with pytest.raises(ConfigError, match="keep_residuals"):
        res.logit_lens(probe, ["I0_0"])


# ----------------------------------------------------------------------------- dataset mode
def test_dataset_merge_and_resume(tiny, tmp_path):
    from analyses.core.io import Checkpoint, Record

    probe = tiny("llama")
    recs = [Record(text=t, domain=d) for t, d in [("abc def", "a"), ("ghi", "b"), ("jkl mno p", "a"), ("qrs", "b"), ("tuv w", "a")]]
    cfg = DatasetConfig(checkpoint_every=2)
    full = routes.run_dataset(probe, recs, config=cfg)
    assert full.domains == ["a", "b"] and full.n.tolist() == [3, 2]
    # shards merged = one pass
    s1, s2 = routes.RouteStats(2, 4), routes.RouteStats(2, 4)
    for s, part in ((s1, recs[:2]), (s2, recs[2:])):
        r = routes.run_dataset(probe, part, config=cfg)
        for k, dom in enumerate(r.domains):
            n = int(r.n[k])
            s.merge(_as_stats(r, k, dom, n))
    f = s1.merge(s2).finalize()
    torch.testing.assert_close(f["head_mean"][[f["domains"].index(d) for d in full.domains]].float(), full.head_mean)
    # resume: a checkpoint after 4 prompts, then finish
    ck = Checkpoint(tmp_path / "ck", fingerprint="x")
    seen = []

    def stop_after(ev):
        seen.append(ev.done)
        if ev.done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        routes.run_dataset(probe, recs, config=cfg, checkpoint=ck, progress=stop_after)
    again = routes.run_dataset(probe, recs, config=cfg, checkpoint=Checkpoint(tmp_path / "ck", fingerprint="x"))
    torch.testing.assert_close(again.head_mean, full.head_mean)
    assert again.n.tolist() == full.n.tolist()
    path = again.save(tmp_path / "ds")
    from analyses.core.base import load_result

    back = load_result(path)
    assert isinstance(back, routes.RouteStatsResult) and back.domains == ["a", "b"]
    assert not back.to_frame().empty
    back.plot("a")


def _as_stats(r, k, dom, n):
    s = routes.RouteStats(r.head_mean.shape[1], r.head_mean.shape[2])
    s._index(dom)
    s.n[0] = n
    s.head_on[0] = r.head_freq[k].double() * n
    s.head_sum[0] = r.head_mean[k].double() * n
    s.ffn_on[0] = r.ffn_freq[k].double() * n
    s.ffn_sum[0] = r.ffn_mean[k].double() * n
    s.n_updates = n
    return s


# ----------------------------------------------------------------------------- top-down mode and edits
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("tau,renorm", [(0.04, True), (0.02, False)])
def test_top_down_route_equals_full_graph_route(tiny, family, tau, renorm):
    probe = tiny(family)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
    for pos in (-1, 5):
        full = routes.run(probe, ids, config=Config(tau=tau, renormalize=renorm, position=pos))
        top = routes.run(probe, ids, config=Config(tau=tau, renormalize=renorm, position=pos, mode="route"))
        a, b = full.route(), top.route()
        assert set(a.edges()) == set(b.edges()) and a.number_of_edges() > 0
        for u, v in a.edges():
            assert a[u][v]["weight"] == pytest.approx(b[u][v]["weight"], abs=1e-6)
        torch.testing.assert_close(full.head_importance(), top.head_importance())
        # computed rows are exactly the full result's rows; only the visited rows are kept
        m = top.computed
        assert m is not None and 0 < int(m.sum()) < m.numel() and bool(m[-1, top.position])
        assert top.rows.tolist() == sorted(set(torch.nonzero(m)[:, 1].tolist()))
        mr = m[:, top.rows]
        torch.testing.assert_close(top.attn[mr], full.attn[:, top.rows][mr])
        torch.testing.assert_close(top.attn_resid[m], full.attn_resid[m])


def test_top_down_embedded_and_partial_guard(embedded):
    text = "The Eiffel Tower is located in the city of Paris, which is the capital of"
    full = routes.run(embedded, text)
    top = routes.run(embedded, text, config=Config(mode="route"))
    assert set(full.route().edges()) == set(top.route().edges())
    assert int(top.computed.sum()) < top.computed.numel() // 2  # the route touches a minority of rows
    with pytest.raises(ConfigError, match="mode='all'"):
        top.route(position=3)
    with pytest.raises(ConfigError, match="mode='all'"):
        top.route(tau=0.01)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_compiled_kernel_matches_eager(tiny, p):
    """The fused (torch.compile) proximity kernel gives the eager numbers and the same route."""
    probe = tiny("llama")
    ids = torch.tensor([[1] + list(range(40, 63))])
    eager = routes.run(probe, ids, config=Config(kernel="eager", p=p, level="neuron"))
    fused = routes.run(probe, ids, config=Config(kernel="compiled", p=p, level="neuron"))
    assert not routes._COMPILE_FAILED, routes._COMPILE_FAILED
    torch.testing.assert_close(fused.attn, eager.attn, atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(fused.neurons, eager.neurons, atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(fused.attn_resid, eager.attn_resid, atol=2e-5, rtol=1e-3)
    assert set(fused.route().edges()) == set(eager.route().edges())
    assert routes.resolve_kernel("auto", 30, 512, 32, 4096) == "compiled" and routes.resolve_kernel("auto", 2, 8, 4, 64) == "eager"


def test_route_with_ablated_head(tiny):
    from probes import Ablate, AddVector

    probe = tiny("llama")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    base = routes.run(probe, ids)
    abl = routes.run(probe, ids, edits=[Ablate("blocks.1.attn.hook_z", heads=[2])])
    eps_share = abl.attn[1, :, :, 2].max().item()
    assert eps_share < 1e-4 < base.attn[1, :, :, 2].max().item()  # the ablated head carries nothing
    assert abl.edits == ("Ablate blocks.1.attn.hook_z heads=[2]",)
    # the decomposition stays exact under the edit: every row still sums to 1
    rows = abl.attn[1].sum((1, 2)) + abl.attn_resid[1]
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
    # a residual edit would break parts == whole: refused with one message
    with pytest.raises(ConfigError, match="cannot decompose"):
        routes.run(probe, ids, edits=[AddVector("blocks.0.hook_resid_mid", vector=torch.ones(64))])


def test_dataset_mode_top_down_equals_full(tiny):
    from analyses.core.io import Record

    probe = tiny("gpt2")
    recs = [Record(text=t, domain=d) for t, d in [("abc def", "a"), ("ghi jk", "b"), ("jkl mno p", "a")]]
    top = routes.run_dataset(probe, recs, config=DatasetConfig())
    full = routes.run_dataset(probe, recs, config=DatasetConfig(mode="all"))
    torch.testing.assert_close(top.head_mean, full.head_mean)
    torch.testing.assert_close(top.ffn_freq, full.ffn_freq)


# ----------------------------------------------------------------------------- CLI and page
def test_cli(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "res"
    main(["run", "routes", "--prompt", "Paris is the capital of", "--out", str(out), "--graphml", str(tmp_path / "g.graphml"), "--json", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out)
    assert got["result"] == str(out) and got["route_edges"] > 0 and (tmp_path / "g.graphml").is_file()
    from analyses.core import store

    assert got["stored_bytes"] == store.stored_bytes(out) > 0  # the size of what was saved
    main(["run", "routes", "--prompt", "Paris is the capital of", "--out", str(tmp_path / "res2"), "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"saved {tmp_path / 'res2'} ({store.readable_bytes(store.stored_bytes(tmp_path / 'res2'))})", last
    assert re.fullmatch(r"saved .* \([\d.]+ (kB|MB)\)", last)
    data = tmp_path / "p.jsonl"
    data.write_text('{"text": "Paris is in", "domain": "geo"}\n{"text": "2 + 2 =", "domain": "math"}\n')
    main(["run", "routes", "--input", str(data), "--out", str(tmp_path / "ds"), "--json", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out)
    assert got["prompts"] == 2 and got["domains"] == "geo, math"
    with pytest.raises(SystemExit) as e:
        main(["run", "routes", "--prompt", "hi", "--tau", "2", "--device", "cpu"])
    assert e.value.code == 2 and "tau=2.0 is not allowed; use a number in (0, 1)" in capsys.readouterr().err


def test_dashboard_page():
    from streamlit.testing.v1 import AppTest

    sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "dashboard/views/routes.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Information flow"
    assert any("Route to position" in m.value for m in at.markdown)
    at.slider(key="routes_tau").set_value(0.08).run()
    assert not at.exception
    at.selectbox(key="routes_position").set_value(at.selectbox(key="routes_position").options[2]).run()
    assert not at.exception and not at.error
