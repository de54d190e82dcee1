"""Active vs dormant heads (Guo et al. 2024): map, flips, causal check, domains, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from analyses.core import domains
from analyses import dormant
from analyses.dormant import Config, dormant_map, status_flips
from probes import ConfigError, InputError


def test_map_and_flips_by_hand():
    m = torch.tensor([[[0.95, 0.2], [0.91, 0.5]], [[0.97, 0.95], [0.3, 0.4]]])  # [D=2, L=2, H=2]
    d = dormant_map(m, 0.9)
    assert d.tolist() == [[[True, False], [True, False]], [[True, True], [False, False]]]
    f = status_flips(d, ["prose", "code"])
    assert set(f["head"]) == {"L0H1", "L1H0"}
    row = f.set_index("head").loc["L1H0"]
    assert row.dormant_on == "prose" and row.active_on == "code"


def test_builtin_domains_are_fixed_and_long_enough(tiny):
    p = tiny("llama")
    for name in domains.BUILTIN:
        a = domains.domain_tokens(p, name, n=3, T=32, seed=0)
        b = domains.domain_tokens(p, name, n=3, T=32, seed=0)
        assert a.tokens.shape == (3, 32) and torch.equal(a.tokens, b.tokens)
    rep = domains.domain_tokens(p, "repeat", n=2, T=16, prepend_bos=True).tokens
    assert (rep[:, 0] == 1).all() and (rep[:, 1:] == rep[:, 1:2]).all()


def test_user_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "a b c", "domain": "x"}, {"text": "d e", "domain": "y"}, {"text": "f"}]))
    assert domains.load_jsonl(f) == {"x": ["a b c"], "y": ["d e"], "user": ["f"]}


@pytest.mark.parametrize("kw,word", [(dict(theta=1.0), "theta"), (dict(theta=0), "theta"), (dict(sink_pos=70), "sink_pos"),
                                     (dict(heads=("H3",)), "L<layer>H<head>"), (dict(intervention="nope"), "intervention")])
def test_config_errors(kw, word):
    with pytest.raises(ConfigError, match=word):
        Config(**kw)


def test_unknown_domain_and_short_texts(tiny):
    p = tiny("llama")
    with pytest.raises(ConfigError, match="unknown domain 'wiki'"):
        dormant.run(p, ["prose", "wiki"], config=Config(T=16, n_samples=2))
    with pytest.raises(InputError, match="shorter than T"):
        dormant.run(p, {"mine": ["too short"]}, config=Config(T=32, n_samples=2))
    with pytest.raises(ConfigError, match="does not exist"):
        dormant.run(p, ["prose"], config=Config(T=16, n_samples=2, heads=("L9H0",)))


def test_run_tiny_with_causal_check(tiny, results_dir):
    p = tiny("llama")
    cfg = Config(T=32, n_samples=4, batch_size=4, heads=("L1H2",), theta=0.5)
    r = dormant.run(p, ["prose", "code", "random"], config=cfg)
    assert r.sink_mass.shape == (3, 2, 4) and r.value_norm.shape == (3, 2, 4, 32) and r.resid_norm.shape == (3, 3, 32)
    assert r.tested == ("L1H2",)
    assert torch.isfinite(r.delta_loss[:, 1, 2]).all() and torch.isnan(r.delta_loss[:, 0, 0]).all()
    back = dormant.DormantResult.load(r.save(results_dir / "d"))
    assert torch.equal(back.dormant, r.dormant) and back.domains == r.domains
    for k in ("map", "diff", "delta"):
        r.plot(k)


def test_zero_attention_intervention(tiny):
    p = tiny("llama")
    r = dormant.run(p, ["prose"], config=Config(T=32, n_samples=4, batch_size=4, heads=("L1H0",), intervention="zero"))
    assert torch.isfinite(r.delta_loss[0, 1, 0]) and abs(float(r.delta_loss[0, 1, 0])) > 0


@pytest.mark.slow
def test_embedded_dormant_head_is_causally_silent(embedded):
    """dormant.md check 3 on the embedded model: L20H6 measured dormant on code (sink mass 0.90, Δloss +0.003)
    and active on arithmetic (0.52, Δloss +0.062) with 8 samples per domain."""
    r = dormant.run(embedded, ["code", "arithmetic"], config=Config(n_samples=8, heads=("L20H6",)))
    dc, da = float(r.delta_loss[0, 20, 6]), float(r.delta_loss[1, 20, 6])
    assert r.sink_mass[0, 20, 6] > r.sink_mass[1, 20, 6]
    assert abs(dc) < abs(da)


def test_cli_dormant(results_dir, capsys):
    from conftest import run_cli

    for argv, want in ((["--theta", "1.5"], "theta"), (["--domains", "prose,wiki"], "unknown domain 'wiki'")):
        code, _, err = run_cli(["run", "dormant", *argv], capsys)
        assert code == 2 and want in err


# ----------------------------------------------------------------------------- the criterion, recomputed independently
NL = 10  # "\n" in the tiny byte vocabulary


def _eager_copy(model, family):
    import tiny_models
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(tiny_models.config(family), attn_implementation="eager", dtype=torch.float32).eval()
    m.load_state_dict(model.state_dict(), strict=True)
    return m


@torch.no_grad()
def _reference_mass(model, ids, sink_id=None):
    """dormant.md, independently: per sample the sink s_b (position 0, or the first ``sink_id``), the mean over the
    queries that see it of A[t, s_b] (eager ``output_attentions``), averaged over samples -> ``[L, H]``."""
    A = torch.stack(model(input_ids=ids, output_attentions=True).attentions, dim=1).double()  # [S, L, H, T, T]
    out = []
    for b in range(ids.shape[0]):
        s = 0 if sink_id is None else int((ids[b] == sink_id).nonzero()[0])
        out.append(A[b, :, :, s:, s].mean(dim=-1))
    return torch.stack(out).mean(0)


def _newline_sink_gpt2():
    """Tiny GPT-2 whose layer-0 heads all attend to "\\n": every query is 5u (W_q = 0, b_q = 5u) and the key of a
    token is (d·LN(x)) u, where only "\\n"'s embedding has a component along d (removed from every other token and
    position embedding). Scores: 10 on "\\n" (1/√16 · 5 · 8), 0 elsewhere."""
    import tiny_models

    model, tok = tiny_models.build("gpt2")
    d, nh = model.config.n_embd, model.config.n_head
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        dvec = torch.randn(d, generator=g)
        dvec = (dvec - dvec.mean()) / (dvec - dvec.mean()).norm()  # zero mean: LayerNorm's centring keeps it out
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte -= torch.outer(wte @ dvec, dvec)
        wpe -= torch.outer(wpe @ dvec, dvec)
        wte[NL] += 4 * dvec
        u = torch.randn(d // nh, generator=g)
        u /= u.norm()
        W, bias = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.bias  # Conv1D: x @ W
        W[:, :d] = 0
        bias[:d] = (5 * u).repeat(nh)
        W[:, d:2 * d] = torch.outer(dvec, u.repeat(nh))
        bias[d:2 * d] = 0
    return model, tok


def _texts():
    base = "the quick brown fox jumps over the lazy dog and then some more words"
    return [f"a{chr(98 + i)}{'x' * i}\n{base[i:]}" for i in range(6)]  # "\n" at a different position per sample


def test_dormant_follows_a_delimiter_sink():
    """The sink is "\\n" (not BOS at position 0): detection finds it from the attention statistics, the mass and the
    criterion follow each sample's "\\n", and they equal an independent eager recomputation."""
    from probes import from_hf

    model, tok = _newline_sink_gpt2()
    ref_model = _eager_copy(model, "gpt2")
    p = from_hf(model, tok, name="tiny-gpt2-newline")
    cfg = Config(T=32, n_samples=6, batch_size=4, theta=0.8, sink="auto", heads=("L0H1", "L1H2"))
    r = dormant.run(p, {"nl": _texts()}, config=cfg)
    assert r.sink_token_id == NL and "'\\n'" in r.sink_token and r.summary()["sink"] == r.sink_token
    assert r.sink_positions == ((3, 4, 5, 6, 7, 8),)  # BOS + "a?" + i × "x" precede it
    assert r.sink_agreement == (1.0,) and r.n_fallback == (0,)
    ids = dormant._domains.resolve(p, {"nl": _texts()}, n=6, T=32, seed=0, prepend_bos=True)[0].tokens
    ref = _reference_mass(ref_model, ids, sink_id=NL)
    assert torch.allclose(r.sink_mass[0].double(), ref, atol=1e-5), float((r.sink_mass[0] - ref).abs().max())
    assert ((ref - cfg.theta).abs() > 1e-3).all()  # every decision has margin, so the map must match exactly
    assert torch.equal(r.dormant[0], ref > cfg.theta)
    assert r.dormant[0, 0].all() and not r.dormant[0, 1].any()  # the test can fail: a mixed map
    # moving a dormant head's attention to its sink changes nothing; an active head's does
    assert abs(float(r.delta_loss[0, 0, 1])) < 1e-4 < abs(float(r.delta_loss[0, 1, 2]))
    # at the fixed position 0 (BOS) the same heads look active: the criterion must follow the sink token
    r0 = dormant.run(p, {"nl": _texts()}, config=cfg.replace(sink="position", heads=None, max_heads=0))
    assert r0.sink_token == "position 0" and not r0.dormant.any()
    assert torch.allclose(r0.sink_mass[0].double(), _reference_mass(ref_model, ids), atol=1e-5)
    # naming the token gives the same map; save / load keeps the sink
    rn = dormant.run(p, {"nl": _texts()}, config=cfg.replace(sink="position", sink_token="\n", heads=None, max_heads=0))
    assert rn.sink_positions == r.sink_positions and torch.equal(rn.dormant, r.dormant)


def test_dormant_criterion_matches_independent_recomputation(tmp_path):
    """Position-0 sink on a tiny llama with sharpened attention: sink mass = mean over samples and seeing queries of
    A[t, 0] (eager), dormant ⇔ mass > θ (strict), and with δ a tested head stays dormant only if |Δloss| < δ."""
    import tiny_models
    from probes import from_hf

    model, tok = tiny_models.build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(15)
            layer.self_attn.k_proj.weight.mul_(15)
    ref_model = _eager_copy(model, "llama")
    p = from_hf(model, tok, name="tiny-llama")
    texts = [("lorem ipsum dolor sit amet " * 3)[i:] for i in range(8)]
    ids = dormant._domains.resolve(p, {"t": texts}, n=8, T=12, seed=0, prepend_bos=True)[0].tokens
    ref = _reference_mass(ref_model, ids)
    theta = float(ref.flatten().sort().values[3:5].mean())  # between the 4th and 5th largest-from-bottom masses: mixed map
    r = dormant.run(p, {"t": texts}, config=Config(T=12, n_samples=8, theta=theta, max_heads=0, intervention="none"))
    assert torch.allclose(r.sink_mass[0].double(), ref, atol=1e-5)
    margin = (ref - theta).abs().min()
    assert margin > 1e-5
    assert torch.equal(r.dormant[0], ref > theta) and 0 < int(r.dormant.sum()) < ref.numel()
    # causal rule: a tested dormant head with |Δloss| ≥ δ is not dormant
    l, h = (int(x) for x in (ref > theta).nonzero()[0])
    rd = dormant.run(p, {"t": texts}, config=Config(T=12, n_samples=8, theta=theta, heads=(f"L{l}H{h}",)))
    dl = float(rd.delta_loss[0, l, h])
    assert torch.isfinite(rd.delta_loss[0, l, h])
    tight = dormant.run(p, {"t": texts}, config=Config(T=12, n_samples=8, theta=theta, heads=(f"L{l}H{h}",), delta=abs(dl) / 2))
    loose = dormant.run(p, {"t": texts}, config=Config(T=12, n_samples=8, theta=theta, heads=(f"L{l}H{h}",), delta=abs(dl) * 2))
    assert not tight.dormant[0, l, h] and loose.dormant[0, l, h]
    expected = r.dormant[0].clone()
    expected[l, h] = False  # untested heads keep the mass criterion
    assert torch.equal(tight.dormant[0], expected)


def test_sink_config_errors():
    with pytest.raises(ConfigError, match="sink="):
        Config(sink="bos")
    with pytest.raises(ConfigError, match="sink_token"):
        Config(sink_token="")
