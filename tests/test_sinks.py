"""Sink metric (Gu et al. 2024): synthetic fidelity cases, streaming/merging, parity, real models, CLI, page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tiny_models
from analyses import sinks
from analyses.sinks import Config, SinkAlpha, alpha_from_pattern, head_value_norms, sink_percentage
from probes import Collect, ConfigError, InputError, reducer_from_state
from docs_numbers import numbers

ROOT = Path(__file__).resolve().parents[1]
T = 64


def _causal_uniform(T):
    A = torch.tril(torch.ones(T, T))
    return A / A.sum(-1, keepdim=True)


# ---------------------------------------------------------------- synthetic fidelity (sinks.md check 1)
def test_all_mass_on_first_key():
    A = torch.zeros(T, T)
    A[:, 0] = 1
    a = alpha_from_pattern(A)
    assert a[0] == pytest.approx(1.0)
    for eps in (0.05, 0.3, 0.99):
        assert sink_percentage(a[None, None, None], eps) == 100.0


def test_uniform_causal():
    a = alpha_from_pattern(_causal_uniform(T))
    expected = sum(1 / t for t in range(1, T + 1)) / T
    assert a[0].item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.074, abs=1e-3)
    assert sink_percentage(a[None, None, None], 0.3) == 0.0


def test_identity():
    a = alpha_from_pattern(torch.eye(T))
    assert torch.allclose(a, 1 / torch.arange(T, 0, -1).float())


def test_reducer_eps_monotone_and_shard_merge():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 3, 16, 16, generator=g) * 3
    scores[..., 0] += torch.linspace(-2, 4, 12).view(12, 1, 1)
    mask = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    A = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1)
    one = SinkAlpha((0, 1))
    one.update(A)
    a, b = SinkAlpha((0, 1)), SinkAlpha((0, 1))
    a.update(A[:5]); b.update(A[5:9])
    c = SinkAlpha((0, 1))
    c.update(A[9:])
    c = reducer_from_state(c.state(), SinkAlpha((0, 1)))  # moved between "processes"
    a.merge(b).merge(c)
    fo, fa = one.finalize(), a.finalize()
    assert fa["n"] == fo["n"] == 12
    assert torch.equal(fa["exceed"], fo["exceed"])
    assert torch.allclose(fa["alpha_mean"], fo["alpha_mean"], atol=1e-7)
    ex = fo["exceed"]  # [E, H, K], eps grid ascending -> counts non-increasing
    assert (ex[1:] <= ex[:-1]).all()
    direct = alpha_from_pattern(A)
    assert torch.allclose(fo["alpha_mean"], direct.mean(0), atol=1e-6)


def test_value_norms_gqa_matches_loop():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 5, 2, 4, generator=g)  # 2 KV heads
    W_O = torch.randn(4, 4, 8, generator=g)  # 4 query heads
    got = head_value_norms(v, W_O)
    for h in range(4):
        ref = (v[:, :, h // 2] @ W_O[h]).norm(dim=-1)
        assert torch.allclose(got[:, :, h], ref, atol=1e-5)


# ---------------------------------------------------------------- repeated tokens (sinks.md check 2)
def test_repeat_no_bos_rope_has_no_sink(tiny):
    p = tiny("llama")
    cfg = Config(T=32, n_samples=4, mlp_ablation=False)
    r = sinks.run(p, tokens=torch.full((4, 32), 70), config=cfg)
    assert r.sink_pct() == 0.0
    # identical hidden states: every residual position has the same norm
    assert torch.allclose(r.resid_norm, r.resid_norm[:, :1].expand_as(r.resid_norm), rtol=1e-4)


def test_repeat_no_bos_learned_positions_can_sink(tiny):
    """GPT-2's learned position 0 makes position 0 distinguishable; a head whose query looks for it sinks.

    (A random tiny GPT-2 is near-uniform; we set layer 0's query bias toward position 0's key, which no
    weight setting can do for a RoPE model on identical inputs.)"""
    p = tiny("gpt2")
    m = p.hf_model
    d = m.config.n_embd
    with torch.no_grad():
        m.transformer.wpe.weight[0] = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 3
        blk = m.transformer.h[0]
        x0 = m.transformer.wte.weight[70] + m.transformer.wpe.weight[0]
        k0 = blk.ln_1(x0) @ blk.attn.c_attn.weight[:, d:2 * d] + blk.attn.c_attn.bias[d:2 * d]
        blk.attn.c_attn.weight[:, :d] = 0
        k0h = k0.view(4, -1)  # per head: score on position 0 = 40 / sqrt(d_head) = 10
        blk.attn.c_attn.bias[:d] = (40 * k0h / k0h.pow(2).sum(-1, keepdim=True)).reshape(-1)
    r = sinks.run(p, tokens=torch.full((4, 32), 70), config=Config(T=32, n_samples=4, mlp_ablation=False))
    assert r.sink_pct() > 0
    assert r.sink_pct(layers=[0]) == 100.0


# ---------------------------------------------------------------- eager vs recomputed (sinks.md check 4)
def test_recomputed_matches_eager(tiny):
    ids = torch.randint(4, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    cfg = Config(T=24, n_samples=3, mlp_ablation=False)
    pa, pb = tiny("llama"), tiny("llama", backend="transformer_lens")
    a = sinks.run(pa, tokens=ids, config=cfg)
    b = sinks.run(pb, tokens=ids, config=cfg)
    assert torch.allclose(a.alpha_mean, b.alpha_mean, atol=1e-5)
    assert torch.allclose(a.value_norm, b.value_norm, rtol=1e-4, atol=1e-5)
    # exceedance counts threshold each sample's α_k: compare them only in the (ε, layer, head) cells where no sample's
    # α_k lies within the backends' measured α difference of ε (a count there could flip on rounding)
    per_sample = []
    for p in (pa, pb):
        reads = {f"blocks.{l}.attn.hook_pattern": Collect() for l in range(p.info.n_layers)}
        p.run(ids, reads=reads)
        per_sample.append(torch.stack([alpha_from_pattern(reads[f"blocks.{l}.attn.hook_pattern"].finalize())[..., 0]
                                       for l in range(p.info.n_layers)]))  # [L, S, H]
    tol = 10 * 2 * (per_sample[0] - per_sample[1]).abs().max().item() + 1e-7
    eps = torch.tensor(a.eps_grid, dtype=per_sample[0].dtype).view(-1, 1, 1, 1)  # [E, 1, 1, 1]
    safe = ((per_sample[0].unsqueeze(0) - eps).abs() > tol).all(dim=2)  # [E, L, H]
    assert torch.equal((per_sample[0].unsqueeze(0) > eps).sum(dim=2), a.exceed[..., 0])  # the recomputation is a's count
    assert safe.float().mean() > 0.9, (safe.float().mean(), tol)  # measured: almost every cell is far from every ε
    assert torch.equal(a.exceed[..., 0][safe], b.exceed[..., 0][safe])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,word", [(dict(eps=0.0), "eps"), (dict(eps=1.5), "eps"), (dict(positions=()), "no sink position"),
                                     (dict(positions=(70,)), "positions"), (dict(T=1), "T=")])
def test_config_errors(kw, word):
    with pytest.raises(ConfigError, match=word):
        Config(**kw)


def test_short_texts_skipped_and_counted(tiny):
    p = tiny("llama")
    cfg = Config(T=32, n_samples=8, mlp_ablation=False)
    r = sinks.run(p, ["short", "x" * 40, "y" * 50], config=cfg)
    assert r.n_samples == 2 and r.n_skipped == 1
    with pytest.raises(InputError, match="shorter than T"):
        sinks.run(p, ["short", "tiny"], config=cfg)


def test_unknown_domain(tiny):
    with pytest.raises(ConfigError, match="unknown domain 'poetry'"):
        sinks.run(tiny("llama"), domain="poetry", config=Config(T=16, n_samples=2))


# ---------------------------------------------------------------- embedded model (measured figure)
@pytest.fixture(scope="module")
def emb_result(embedded):
    return sinks.run(embedded, domain="prose", config=Config(n_samples=4, batch_size=4, ablation_layers=2, ablation_samples=2))


def test_embedded_sinks_past_first_layers(emb_result, results_dir):
    r = emb_result
    L = r.alpha_mean.shape[0]
    assert r.n_samples == 4
    early = r.sink_pct(layers=[0, 1])
    late = r.sink_pct(layers=range(2, L))
    # measured on 16 prose samples: 77.0% past layer 1, 0% in layers 0-1, 71.9% overall (docs/readme/sinks.md, docs/readme_numbers.py)
    assert late > 60 and early < 10, (early, late)
    # ε-monotonicity (sinks.md check 3)
    assert r.sink_pct(eps=0.2) >= r.sink_pct(eps=0.3) >= r.sink_pct(eps=0.4)
    # residual peak at position 0, written by an early MLP
    assert float(sinks.peak_ratio(r.resid_norm, 0).max()) > 20
    abl = r.ablation.set_index("ablated")
    assert abl.loc["L0 MLP", "ratio"] < 0.5 * abl.loc["none", "ratio"]
    back = sinks.SinksResult.load(r.save(results_dir / "s"))
    assert torch.equal(back.exceed, r.exceed) and back.sink_pct() == r.sink_pct()
    assert len(r.to_frame()) == L * 9 * 64
    for kind in ("heads", "layers", "values", "resid", "eps"):
        r.plot(kind)


def test_cli_sinks(results_dir, capsys):
    from conftest import run_cli

    for argv, want in ((["--eps", "1.2"], "eps=1.2"), (["--domain", "poetry"], "unknown domain"),
                       (["--positions", ""], "no sink position")):
        code, _, err = run_cli(["run", "sinks", *argv], capsys)
        assert code == 2 and want in err
    code, out, err = run_cli(["run", "sinks", "--domain", "arithmetic", "--n-samples", "2", "--T", "16", "--no-ablation",
                              "--device", "cpu", "--json", "--out", str(results_dir / "cli")], capsys)
    assert code == 0 and "Sink_1" in out
    assert "planner:" not in err  # it fits: the memory planner speaks only when it lowers a setting (tests/test_planner.py)
    assert (results_dir / "cli" / "manifest.json").is_file()


def test_analyses_do_not_import_streamlit():
    files = sorted((ROOT / "analyses").rglob("*.py"))
    assert len(files) > 20
    for f in files:
        assert "import streamlit" not in f.read_text() and "from streamlit" not in f.read_text(), f


def test_page_smoke():
    from streamlit.testing.v1 import AppTest

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "dashboard" / "views" / "sinks.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert any("Sink" in m.value for m in at.markdown) or len(at.metric) > 0


# ---------------------------------------------------------------- against an independent eager forward
def _eager_model(hf_model, config):
    """A plain transformers copy of ``hf_model`` with eager attention (same weights, no Sonde hooks)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    m.load_state_dict(hf_model.state_dict(), strict=True)
    return m


@torch.no_grad()
def _eager_reference(model, ids: torch.Tensor):
    """Per sample α ``[S, L, H, T]`` from ``output_attentions`` and mean key / value norms ``[L, K, T]`` from the
    k_proj / v_proj outputs (rotary is a rotation, so post-rotary key norms equal k_proj norms on Llama)."""
    n_kv, d_h = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    d_h = getattr(model.config, "head_dim", None) or d_h
    kn, vn, hs = [], [], []
    for layer in model.model.layers:
        hs.append(layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: kn.append(o.unflatten(-1, (n_kv, d_h)).norm(dim=-1))))
        hs.append(layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: vn.append(o.unflatten(-1, (n_kv, d_h)).norm(dim=-1))))
    try:
        out = model(input_ids=ids, output_attentions=True)
    finally:
        for h in hs:
            h.remove()
    A = torch.stack(out.attentions, dim=1).double()  # [S, L, H, T, T]
    T = A.shape[-1]
    alpha = torch.stack([A[..., k:, k].mean(dim=-1) for k in range(T)], dim=-1)  # mean over the queries that see k
    key = torch.stack(kn).mean(dim=1).transpose(1, 2)  # [L, S, T, K] -> [L, K, T]
    val = torch.stack(vn).mean(dim=1).transpose(1, 2)
    return alpha, key, val


def _check_against_eager(r, alpha, key, val, *, a_tol, n_tol):
    """α, Sink_k^ε at ε 0.3 / 0.5 and the norms of ``r`` against the eager reference (tolerances measured)."""
    S, L, H, T = alpha.shape
    a_err = float((r.alpha_mean.double() - alpha.mean(0)).abs().max())
    assert a_err < a_tol, a_err
    for eps in (0.3, 0.5):
        for i, k in enumerate(r.config.positions):
            ref = alpha[..., k] > eps  # [S, L, H]
            close = ((alpha[..., k] - eps).abs() <= a_tol).sum(0)  # decisions the numeric error could flip
            got = r.exceed[r._eps_index(eps), :, :, i]
            assert ((got - ref.sum(0)).abs() <= close).all(), (eps, k)
            if int(close.sum()) == 0:  # every margin exceeds the error: the percentages agree exactly
                assert r.sink_pct(eps=eps, position=k) == pytest.approx(float(ref.double().mean() * 100), abs=1e-9)
    for name, ref in (("key_norm", key), ("value_state_norm", val)):
        got = getattr(r, name)
        assert got.shape == ref.shape
        assert torch.allclose(got.double(), ref.double(), rtol=n_tol, atol=n_tol), (name, float((got - ref).abs().max()))
        per_head = r.per_head(name)  # query head h reads KV head h // (H / K)
        for h in range(H):
            assert torch.equal(per_head[:, h], got[:, h // (H // got.shape[1])])
    frame = r.norms_frame()
    assert frame["key_norm"].notna().all() and (frame["kv_head"] == frame["head"] // (H // key.shape[1])).all()


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_sink_metric_and_kv_norms_match_eager_tiny(backend):
    """Tiny GQA llama (4 query / 2 KV heads) with sharpened attention (q, k × 15) and T = 10, so α_1 spreads across
    ε = 0.3 and 0.5 (measured: 44 % / 3 % of (sample, layer, head) above; smallest margin to ε 1e-3)."""
    from probes import from_hf

    model, tok = tiny_models.build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(15)
            layer.self_attn.k_proj.weight.mul_(15)
    ref_model = _eager_model(model, tiny_models.config("llama"))  # copied before a backend wraps the model
    p = from_hf(model, tok, backend=backend, name="tiny-llama")
    ids = torch.randint(4, 256, (16, 10), generator=torch.Generator().manual_seed(0))
    r = sinks.run(p, tokens=ids, config=Config(T=10, n_samples=16, positions=(0, 1), batch_size=5, mlp_ablation=False))
    alpha, key, val = _eager_reference(ref_model, ids)
    # the test can fail: the sink indicators are not all equal at either ε
    for eps in (0.3, 0.5):
        assert 0 < float((alpha[..., 0] > eps).double().mean()) < 1
    # measured max |Δα| 5e-8 (nnsight, recomputed from q/k) and 2e-8 (transformer_lens, eager); norms 1.1e-7 relative
    _check_against_eager(r, alpha, key, val, a_tol=1e-5, n_tol=1e-5)


def test_sink_metric_and_kv_norms_match_eager_embedded(embedded):
    from transformers import AutoConfig

    from analyses.core import domains
    from probes.loading import embedded_model_dir

    ids = domains.domain_tokens(embedded, "prose", n=4, T=T, seed=0).tokens
    r = sinks.run(embedded, tokens=ids, config=Config(n_samples=4, batch_size=4, positions=(0, 1), mlp_ablation=False))
    alpha, key, val = _eager_reference(_eager_model(embedded.hf_model, AutoConfig.from_pretrained(embedded_model_dir())), ids)
    assert 0 < r.sink_pct(eps=0.3) < 100 and 0 < r.sink_pct(eps=0.5) < 100
    # measured max |Δα| 4.3e-7, norms 5.6e-7 relative (fp32); smallest margin of α_1 to ε: 6e-4 (0.3), 3e-4 (0.5),
    # so the sink percentages (72.2 % / 43.5 %) are compared exactly
    _check_against_eager(r, alpha, key, val, a_tol=1e-5, n_tol=1e-5)
    # the companion-script pattern: the sink token's keys and values are small (Gu et al. 2024, Fig. 5)
    assert r.summary()["raw value norm at pos 0 / mean of others"] < 1


def test_notebook_02_text_matches_its_code():
    """The numbers the notebook's text states are the code's defaults or are asserted by its cells."""
    import json

    from analyses import dormant

    nb = json.loads((ROOT / "notebooks" / "02_sinks_dormant.ipynb").read_text(encoding="utf-8"))
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "Sink_1^0.3 on built-in prose (T = 64)" in md and Config().T == 64 and Config().eps == 0.3
    assert "(Sink_1 = 0)" in md and "assert rep.sink_pct() == 0.0" in code
    assert "θ = 0.9" in md and dormant.Config().theta == 0.9


@pytest.mark.slow
def test_readme_sinks_figures_are_reproduced(embedded):
    """Every figure of docs/readme/sinks.md's "Measured" bullets comes from docs/readme_numbers.py (about a minute)."""
    text = (ROOT / "docs" / "readme" / "sinks.md").read_text(encoding="utf-8")
    assert numbers().sinks_measured(embedded) in text
