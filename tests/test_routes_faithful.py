"""Faithfulness of routes (analyses.routes_faithful): a tiny GPT-2 with a planted previous-token copying
head; the route finds the head, keeping only the route keeps p(target), ablating it collapses p(target),
and random sets of the same size do neither."""

from __future__ import annotations

import json

import pytest
import torch

from analyses import routes
from analyses.routes_faithful import route_components
from probes import ConfigError

D, H, DH, V, NPOS = 256, 4, 64, 256, 64
TOK, POS, COPY = slice(0, 64), slice(64, 128), slice(128, 192)  # residual subspaces


def planted_probe(backend: str = "nnsight"):
    """Two-layer GPT-2 whose head L1H0 attends to the previous position and copies that token's identity into a
    subspace the unembedding reads; every other head and FFN writes almost nothing (outputs scaled by 1e-3)."""
    import transformers as T
    from transformers import GPT2LMHeadModel

    import tiny_models
    from probes import from_hf

    cfg = T.GPT2Config(n_embd=D, n_layer=2, n_head=H, n_positions=NPOS, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    E = torch.randn(V, 64, generator=g)
    E = E / E.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        tr = model.transformer
        tr.wte.weight.zero_()
        tr.wte.weight[:, TOK] = E
        tr.wpe.weight.zero_()
        tr.wpe.weight[:, POS] = torch.eye(NPOS)
        for blk in tr.h:
            blk.attn.c_proj.weight.mul_(1e-3)
            blk.attn.c_proj.bias.zero_()
            blk.mlp.c_proj.weight.mul_(1e-3)
            blk.mlp.c_proj.bias.zero_()
        a = tr.h[1].attn
        W = a.c_attn.weight  # Conv1D [in, 3 * out]: q | k | v, head 0 = the first DH columns of each
        W[:, 0:DH] = 0
        W[:, D:D + DH] = 0
        W[:, 2 * D:2 * D + DH] = 0
        a.c_attn.bias.zero_()
        for i in range(NPOS):
            W[64 + i, i] = 1.0  # q: one-hot of the query position
            if i + 1 < NPOS:
                W[64 + i, D + i + 1] = 1.0  # k: one-hot of key position + 1, so q_p . k_j peaks at j = p - 1
        for i in range(64):
            W[i, 2 * D + i] = 1.0  # v: the token identity
        a.c_proj.weight[0:DH] = 0
        for i in range(64):
            a.c_proj.weight[i, 128 + i] = 1.0  # W_O of head 0: into the copy subspace
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, COPY] = 2.0 * E  # read the copied identity
    return from_hf(model, tiny_models.tokenizer(), backend=backend, name="planted-copy")


@pytest.fixture(scope="module")
def planted():
    return planted_probe()


def _ids(T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(V - 8, generator=g)[:T] + 8)[None]  # distinct ids, no special tokens


def test_planted_head_copies(planted):
    ids = _ids()
    p = torch.softmax(planted.run(ids)[0].double(), -1)
    assert (p[1:].argmax(-1) == ids[0, :-1]).all()  # every position predicts the previous token
    assert p[-1, ids[0, -2]] > 0.9


def test_route_finds_planted_head_and_is_faithful(planted):
    ids = _ids()
    res = routes.run(planted, ids)
    heads, ffns = route_components(res)
    assert heads == [(1, 0)] and ffns == []
    assert res.head_importance()[1, 0] == res.head_importance().max()
    f = routes.faithfulness(planted, ids, n_random=6, seed=0, result=res, n_reference=8, reference_tokens=16)
    assert f.heads == ("L1H0",) and f.target == int(ids[0, -2]) and f.p_clean > 0.9
    assert "prose" in f.reference and f.tau == 0.04
    s = f.summary().set_index("ablation")
    for mode in ("zero", "mean"):
        r = s.loc[mode]
        assert abs(r.p_off_route - f.p_clean) < 0.05, r  # the route alone keeps the prediction
        assert r.p_route < 0.1 * f.p_clean, r  # removing the route collapses it
        assert r.p_random_median > 0.5 * f.p_clean, r  # a random head of the same count mostly does not
    fr = f.frame
    assert set(fr.kind) == {"clean", "off_route", "route", "random_keep", "random"}
    assert (fr[fr.kind == "random"].n_heads == 1).all() and (fr[fr.kind == "off_route"].n_heads == 2 * H - 1).all()
    assert len(fr) == 1 + 2 * (2 + 2 * 6)
    json.dumps(f.to_dict())
    from analyses.routes_plots import plot_faithfulness

    fig = plot_faithfulness(f)  # one bar group per ablation on a log axis: p(target) spans decades
    assert fig.layout.yaxis.type == "log" and [t.name for t in fig.data] == ["zero ablation", "mean ablation"]
    assert fig.data[0].y[0] == f.p_clean and fig.data[0].y[2] == s.loc["zero"].p_route


def test_faithfulness_same_on_tl(tiny):
    ids = _ids(8, seed=1)
    a = routes.faithfulness(planted_probe("nnsight"), ids, n_random=2, ablations=("zero",))
    b = routes.faithfulness(planted_probe("transformer_lens"), ids, n_random=2, ablations=("zero",))
    assert a.heads == b.heads == ("L1H0",)
    torch.testing.assert_close(torch.tensor(a.frame.p_target.to_numpy()), torch.tensor(b.frame.p_target.to_numpy()), atol=1e-4, rtol=1e-3)


def test_bad_options(planted):
    with pytest.raises(ConfigError):
        routes.faithfulness(planted, _ids(), ablations=("resample",))
    with pytest.raises(ConfigError):
        routes.faithfulness(planted, _ids(), n_random=-1)


def test_cli_faithfulness(tmp_path, capsys):
    from conftest import run_cli

    code, out, err = run_cli(["run", "routes", "--model", "embedded", "--prompt", "Paris is the capital of", "--mode", "route",
                              "--faithfulness", "--n-random", "1", "--json", "--device", "cpu", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    f = json.loads(out)["faithfulness"]
    assert f["heads"] and f["reference"].startswith("prose") and f["n_random"] == 1
    assert {r["ablation"] for r in f["summary"]} == {"zero", "mean"}
    assert all(0 <= r["p_route"] <= 1 and 0 <= r["p_off_route"] <= 1 for r in f["summary"])


def test_dataset_mode_keeps_faithfulness_distributions_per_domain(tiny):
    """Dataset mode folds each prompt's faithfulness figures into per-domain sums and log10 histograms: the means are
    the per-prompt figures' means, every histogram counts every prompt, and two shards merge into the one-pass result."""
    from analyses.core.io import Record
    from analyses.routes_dataset import FAITH_FIGURES, accumulate, faith_figures, merge_states, result_from_state
    from analyses.routes_faithful import reference_means

    probe = tiny("llama")
    recs = [Record(text=t, domain=d) for t, d in (("abc def gh", "x"), ("hello world", "x"), ("xyz uvw rs", "x"),
                                                   ("12 + 34 =", "y"), ("5 * 6 = 30", "y"))]
    cfg = routes.DatasetConfig(faithfulness=True, n_random=2, seed=3)
    res = routes.run_dataset(probe, recs, config=cfg)
    assert res.domains == ["x", "y"] and res.faith_n.tolist() == [3, 2]
    assert (res.faith_hist.sum(-1) == res.faith_n[:, None]).all()  # every figure of every prompt in one bin
    means = reference_means(probe, seed=3)
    for k, dom in enumerate(res.domains):
        figs = torch.stack([faith_figures(routes.faithfulness(probe, r.text, config=cfg, n_random=2, seed=3, means=means))
                            for r in recs if r.domain == dom])
        torch.testing.assert_close(res.faith_mean[k].double(), figs.mean(0), atol=1e-9, rtol=1e-6)
    fr = res.faithfulness_frame()
    assert len(fr) == 2 * len(FAITH_FIGURES) and set(fr.figure) == set(FAITH_FIGURES)
    assert ((fr["p10"] <= fr["median"] + 1e-12) & (fr["median"] <= fr["p90"] + 1e-12)).all()
    info = probe.info.to_dict()
    state = merge_states(accumulate(probe, recs[:2], cfg), accumulate(probe, recs[2:], cfg), cfg, info)
    merged = result_from_state(probe, state, cfg)
    torch.testing.assert_close(merged.faith_hist, res.faith_hist)
    torch.testing.assert_close(merged.faith_mean, res.faith_mean)
    plain = routes.run_dataset(probe, recs[:2])
    assert plain.faith_n is None and plain.faithfulness_frame().empty


def test_cli_dataset_faithfulness_json(tmp_path, capsys, tiny_dir, results_dir):
    from conftest import run_cli

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "domain": d}) for t, d in (("abc def", "a"), ("ghi jkl", "b"))))
    code, out, err = run_cli(["run", "routes", "--model", str(tiny_dir), "--input", str(f), "--faithfulness", "--n-random", "1",
                              "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)["faithfulness"]
    assert set(d) == {"a", "b"} and d["a"]["p_clean"]["n"] == 1 and 0 < d["a"]["p_clean"]["mean"] <= 1
