"""Counterfactual token generation (Gumbel-Max SCM): fidelity, replay, noise inference, cache reuse, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import margins
import tiny_models
from analyses import counterfactual as cf
from probes import Ablate, ConfigError, InputError
from docs_numbers import numbers

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "hello there"

SAMPLERS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_k": dict(temperature=0.9, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.3),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription (60x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama():
    return tiny_models.probe("llama")


# ----------------------------------------------------------------------------- pure math
def test_gumbel_noise_is_keyed_and_gumbel():
    a = cf.gumbel_noise(7, 3, 50_000)
    assert torch.equal(a, cf.gumbel_noise(7, 3, 50_000))  # counter-based: same key, same noise
    assert not torch.equal(a, cf.gumbel_noise(7, 4, 50_000))
    assert not torch.equal(a, cf.gumbel_noise(7, 3, 50_000, stream=1))
    assert abs(a.double().mean().item() - 0.5772) < 0.03  # Euler-Mascheroni: mean of Gumbel(0, 1)
    assert abs(a.double().var().item() - math.pi ** 2 / 6) < 0.08


def test_sampling_logprobs_truncation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = cf.sampling_logprobs(logits, 1.0, top_p=0.6)  # mass before: 0, .5, .8 -> keep first two
    assert torch.isfinite(lp).tolist() == [[True, True, False, False]]
    assert torch.allclose(lp.exp()[0, :2], torch.tensor([0.625, 0.375]))
    lp = cf.sampling_logprobs(logits, 1.0, top_k=3)
    assert torch.isfinite(lp).sum() == 3
    lp = cf.sampling_logprobs(logits, 0.5)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(lp.exp()[0], p / p.sum(), atol=1e-6)


def test_gumbel_max_marginal_matches_softmax():
    """Method-page check (3): Gumbel-Max marginals equal softmax (TV < 0.01 with 1e5 draws)."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03])
    n = 100_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    noise = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    ids = cf.gumbel_max(torch.log(p)[None].double().expand(n, 5), noise)
    freq = torch.bincount(ids, minlength=5).double() / n
    assert 0.5 * (freq - p.double()).abs().sum() < 0.01


def test_posterior_noise_reproduces_and_is_gumbel_marginally():
    """Posterior noise always regenerates the observed token; averaged over observations it is Gumbel(0, 1)."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    lp = torch.log(p)
    g = torch.Generator().manual_seed(1)
    n = 40_000
    ks = torch.multinomial(p, n, replacement=True, generator=g)
    out = []
    for k in range(4):
        m = int((ks == k).sum())
        u = torch.rand(m, 5, generator=g, dtype=torch.float64)
        prior = torch.zeros(m, 4)
        post = cf.posterior_gumbel(lp, k, prior, u[:, 0], u[:, 1:])
        assert (torch.argmax(lp[None] + post, -1) == k).all()
        out.append(post)
    allg = torch.cat(out).double()
    assert abs(allg.mean().item() - 0.5772) < 0.02
    assert abs(allg.var().item() - math.pi ** 2 / 6) < 0.06


def test_posterior_keeps_prior_outside_set():
    lp = cf.sampling_logprobs(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), 1.0, top_k=2)[0]
    prior = torch.full((3, 3), 9.0)
    u = torch.rand(3, 4, dtype=torch.float64)
    post = cf.posterior_gumbel(lp, 1, prior, u[:, 0], u[:, 1:])
    assert (post[:, 2] == 9.0).all() and (torch.argmax(lp[None] + post, -1) == 1).all()


def test_divergence_and_wilson_hand_cases():
    d = cf.divergence([1, 2, 3, 4], [1, 2, 9, 4, 5], start=2)
    assert d["first_diff"] == 2 and d["edit_distance"] == pytest.approx(2 / 3) and d["frac_unchanged"] == pytest.approx(1 / 3)
    assert cf.divergence([1, 2], [1, 2])["first_diff"] is None
    assert cf.levenshtein("kitten", "sitting") == 3
    lo, hi = cf.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)


# ----------------------------------------------------------------------------- tiny model generation
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_no_intervention_reproduces_factual(llama, sampler):
    c = cf.Config(max_new_tokens=16, seed=5, stop_at_eos=False, **SAMPLERS[sampler])
    r = cf.run(llama, PROMPT, "none", config=c)
    assert len(r.factual) == 16
    assert r.rows[0] == r.factual  # token for token
    assert r.divergence_frame().loc[0, "frac_unchanged"] == 1.0
    if sampler == "greedy":  # tau = 0: counterfactual = interventional = greedy
        assert r.rows[1] == r.factual


def test_factual_frequencies_match_softmax_chi_square(llama):
    """The factual sampler's first-token frequencies match softmax(z / tau) (chi-square, tiny model)."""
    from scipy.stats import chisquare

    ids = llama.to_tokens(PROMPT)
    tau, n = 0.7, 3000
    logits = llama.forward(ids)[0, -1].float()
    p = torch.softmax(logits / tau, -1).double()
    g = cf._decode(llama, ids.expand(n, -1), prefix=None, noises=[cf._Noise(11, s) for s in range(n)], step0=0, n_steps=1,
                   temperature=tau, top_k=None, top_p=None, stop_at_eos=False)
    counts = torch.bincount(torch.tensor([t[0] for t in g.tokens]), minlength=p.numel()).double()
    exp = p * n
    big = exp >= 5  # pool rare tokens into one cell
    obs, ex = counts[big], exp[big]
    if exp[~big].sum() > 0:
        obs, ex = torch.cat([obs, counts[~big].sum()[None]]), torch.cat([ex, exp[~big].sum()[None]])
    ex = ex * obs.sum() / ex.sum()
    assert chisquare(obs.numpy(), ex.numpy()).pvalue > 0.001
    # top-k: never outside the set
    g = cf._decode(llama, ids.expand(500, -1), prefix=None, noises=[cf._Noise(3, s) for s in range(500)], step0=0, n_steps=1,
                   temperature=1.0, top_k=3, top_p=None)
    assert {t[0] for t in g.tokens} <= set(torch.topk(logits, 3).indices.tolist())


@pytest.mark.parametrize("sampler", ["temperature", "top_k", "top_p"])
def test_posterior_noise_regenerates_observed_text(llama, sampler):
    c = cf.Config(max_new_tokens=12, seed=2, **SAMPLERS[sampler])
    ids = cf.generate(llama, PROMPT, c.replace(seed=99, stop_at_eos=False))[0]  # text of another sampling run
    r = cf.run(llama, PROMPT, "none", config=c.replace(n_samples=4, interventional=False), observed=ids)
    assert r.factual == tuple(ids) and len(r.rows[0]) == 12
    assert len(r.rows) == 4 and all(row == r.factual for row in r.rows)


def test_posterior_distribution_of_counterfactuals(embedded):
    """Posterior noise (no recorded key used) gives a distribution of counterfactuals, all sharing the prefix."""
    c = cf.Config(max_new_tokens=10, seed=4, temperature=1.0, noise="posterior", n_samples=4, stop_at_eos=False,
                  interventional=False)
    r = cf.run(embedded, "Once upon a time, Lyra", "token:2=id:100", config=c)
    assert len(r.rows) == 4 and all(row[:3] == r.factual[:2] + (100,) for row in r.rows)
    assert len(set(r.rows)) > 1  # a distribution, not one text


def test_token_edit_keeps_prefix_and_matches_recomputation(llama):
    c = cf.Config(max_new_tokens=16, seed=8, temperature=1.0, n_samples=2, stop_at_eos=False)
    a = cf.run(llama, PROMPT, "token:6=id:120", config=c)
    b = cf.run(llama, PROMPT, "token:6=id:120", config=c.replace(prefix_reuse=False))
    for row in a.rows:
        assert row[:6] == a.factual[:6] and row[6] == 120
    assert a.rows == b.rows  # KV-cache reuse = full recomputation
    assert any("reused" in n for n in a.notes) and not any("reused" in n for n in b.notes)
    assert (a.divergence_frame().first_diff == 6).all()


def test_prompt_edit_cache_reuse_matches_recomputation(llama):
    c = cf.Config(max_new_tokens=12, seed=3, temperature=1.0)
    a = cf.run(llama, "hello there Lyra", "prompt:Lyra->Maeve", config=c)
    b = cf.run(llama, "hello there Lyra", "prompt:Lyra->Maeve", config=c.replace(prefix_reuse=False))
    assert a.rows == b.rows and a.cf_prompt == "hello there Maeve"
    assert any("reused" in n for n in a.notes)


def test_reproducible_from_seed(llama):
    c = cf.Config(max_new_tokens=12, seed=21, temperature=1.0)
    a, b = cf.run(llama, PROMPT, "token:2=id:70", config=c), cf.run(llama, PROMPT, "token:2=id:70", config=c)
    assert a.factual == b.factual and a.rows == b.rows
    assert cf.run(llama, PROMPT, "none", config=c.replace(seed=22)).factual != a.factual


def test_model_edit_decodes_like_probe_ablation(llama):
    """A model edit decodes with probe Ablate edits on hook_z / mlp.hook_post, on the counterfactual rows only."""
    iv = cf.ModelEdit(heads=((1, 2),), neurons=((0, 5),))
    assert cf._ablations(iv) == [Ablate("blocks.1.attn.hook_z", heads=[2]), Ablate("blocks.0.mlp.hook_post", neurons=[5])]
    ids = llama.to_tokens(PROMPT)
    c = cf.Config(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    g = cf._decode(llama, ids.expand(2, -1), prefix=None, noises=[cf._Noise(0)] * 2, step0=0, n_steps=6, temperature=0.0,
                   top_k=None, top_p=None, stop_at_eos=False, edit=iv, edit_rows=torch.tensor([False, True]))
    seq = torch.cat([ids[0], torch.tensor(g.tokens[1][:-1])])[None]
    want = llama.run(seq, edits=cf._ablations(iv))[0, ids.shape[1] - 1:].argmax(-1).tolist()
    assert g.tokens[1] == want and g.tokens[0] == cf.generate(llama, PROMPT, c)[0]
    r = cf.run(llama, PROMPT, "ablate:L1H2,L0N5", config=cf.Config(max_new_tokens=10, temperature=1.0))
    assert r.intervention == "ablate:L1H2,L0N5" and len(r.rows) == 2


def test_transformer_lens_backend_same_tokens(tiny):
    """Both backends sample the same tokens wherever the Gumbel decision margin exceeds their numeric difference.

    The TransformerLens bridge leaves the HF KV cache empty; decoding must notice (it re-runs the sequence),
    else every token after the first is sampled from wrong logits (this test then fails at step 1 or 5).
    """
    c = cf.Config(max_new_tokens=10, seed=1, temperature=1.0)
    pa, pb = tiny("gpt2"), tiny("gpt2", backend="transformer_lens")
    a = cf.run(pa, PROMPT, "token:3=id:90", config=c)
    b = cf.run(pb, PROMPT, "token:3=id:90", config=c)
    n, tol = margins.compare_steps(cf.decision_scores(pa, PROMPT, a.factual, c), cf.decision_scores(pb, PROMPT, a.factual, c),
                                   a.factual, b.factual)
    assert tol < 1e-3 and n >= 8, (n, tol)  # seed 1: every margin >= 0.079 against a difference ~1e-6 (measured)
    row_a, row_b = a.rows[0], b.rows[0]
    assert row_a[:4] == row_b[:4] == a.factual[:3] + (90,)
    n, tol = margins.compare_steps(cf.decision_scores(pa, PROMPT, row_a, c), cf.decision_scores(pb, PROMPT, row_a, c),
                                   row_a, row_b, start=4)
    assert n >= 4, (n, tol)


def test_save_load_roundtrip(llama, tmp_path):
    r = cf.run(llama, PROMPT, "token:3=id:90", config=cf.Config(max_new_tokens=8, temperature=1.0))
    back = cf.CounterfactualResult.load(r.save(tmp_path / "r"))
    assert back.rows == r.rows and back.factual == r.factual and back.config == r.config and back.kinds == r.kinds
    assert r.plot().data and set(r.to_frame().world) == {"factual", "counterfactual", "interventional"}


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(llama):
    c = cf.Config(max_new_tokens=6, temperature=1.0, stop_at_eos=False)
    with pytest.raises(InputError, match="beyond the generated text"):
        cf.run(llama, PROMPT, "token:6=id:40", config=c)
    with pytest.raises(ConfigError, match="unknown head or neuron label 'L5X3' in 'ablate:L5X3'"):
        cf.run(llama, PROMPT, "ablate:L5X3", config=c)
    with pytest.raises(ConfigError, match="unknown head L5H3: this model has layers 0-1"):
        cf.run(llama, PROMPT, "ablate:L5H3", config=c)
    with pytest.raises(ConfigError, match="unknown intervention"):
        cf.parse_intervention("swap:1")
    with pytest.raises(InputError, match="does not contain 'Lyra'"):
        cf.run(llama, PROMPT, "prompt:Lyra->Maeve", config=c)
    with pytest.raises(ConfigError, match="no \\{group\\} slot"):
        cf.BiasConfig(template="A person works as a")
    with pytest.raises(ConfigError, match="top_p"):
        cf.Config(top_p=1.5)


def test_multi_token_replacement_is_span_or_error(llama):
    c = cf.Config(max_new_tokens=10, temperature=1.0, stop_at_eos=False)
    r = cf.run(llama, PROMPT, "token:2=abc", config=c)  # byte vocabulary: 3 tokens
    note = next(n for n in r.notes if "tokens [" in n)
    assert r.rows[0][2:5] == tuple(b"abc") and "is 3 tokens" in note and "step 3" in note
    with pytest.raises(InputError, match="tokenizes to 3 tokens"):
        cf.run(llama, PROMPT, "token:2=abc", config=c.replace(multi_token="error"))


# ----------------------------------------------------------------------------- embedded model
def test_embedded_counterfactual_and_bias_sweep(embedded):
    c = cf.Config(max_new_tokens=12, seed=3, temperature=0.8, top_p=0.9)
    r = cf.run(embedded, "Once upon a time, Lyra", "none", config=c)
    assert r.rows[0] == r.factual
    r = cf.run(embedded, "Once upon a time, Lyra", "prompt:Lyra->Maeve", config=c)
    assert r.cf_prompt == "Once upon a time, Maeve" and r.rows[0]
    b = cf.bias_sweep(embedded, config=cf.BiasConfig(n_samples=4, max_new_tokens=6))
    s = b.summary
    assert set(s["group"]) == {"man", "woman"} and (s.p_lo <= s.p).all() and (s.p <= s.p_hi).all()
    assert (s[s["group"] == "man"]["shift"] == 0).all() and (s[s["group"] == "man"].unchanged == 1).all()
    assert b.plot().data


def test_cli_counterfactual_and_bias_sweep(results_dir, capsys):
    from analyses.cli import main

    main(["run", "counterfactual", "--prompt", "Once upon a time, Lyra", "--intervene", "token:3=Maeve",
          "--max-new-tokens", "8", "--seed", "1", "--json"])
    out = capsys.readouterr().out
    assert '"first_diff": 3' in out and "result" in out
    main(["run", "bias-sweep", "--samples", "3", "--max-new-tokens", "4", "--json"])
    assert "woman" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["run", "counterfactual", "--prompt", "Hi", "--intervene", "ablate:L99H0", "--max-new-tokens", "4"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["run", "bias-sweep", "--template", "no slot here"])
    assert e.value.code == 2


def test_dashboard_page_smoke(run_page):
    at = run_page("counterfactual.py", timeout=120)
    assert not at.exception, at.exception
    assert any("Counterfactual" in t.value for t in at.title)
    assert len(at.get("plotly_chart")) >= 1


def test_analyses_do_not_import_streamlit():
    assert "streamlit" not in (ROOT / "analyses" / "counterfactual.py").read_text()


# ----------------------------------------------------------------------------- token edits keep the word boundary
def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace "▁" marker, dummy prefix; decoding one token drops its marker)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.":
        vocab[c] = len(vocab)
    merges = [("▁", "M"), ("▁M", "a"), ("e", "v"), ("ev", "e"), ("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_word_boundary_rule_and_quoting():
    sp = _metaspace_tokenizer()
    ma = sp.convert_tokens_to_ids("▁Ma")
    assert sp.decode([ma]) == "Ma"  # decoding alone loses the marker: the vocabulary string must be read
    assert cf.starts_word("▁Ma", "Ma") and cf.starts_word("ĠMa") and cf.starts_word(" Ma") and not cf.starts_word("Ma", "Ma")
    assert sp.convert_ids_to_tokens(cf.encode_piece(sp, " Maeve")) == ["▁Ma", "eve"]
    assert sp.convert_ids_to_tokens(cf.encode_piece(sp, "Maeve")) == ["M", "a", "eve"]  # no invented boundary
    assert cf.parse_intervention('token:5="Maeve"') == cf.TokenEdit(5, "Maeve", True)
    assert cf.parse_intervention("token:5=' Maeve'") == cf.TokenEdit(5, " Maeve", True)
    assert cf.parse_intervention("token:5=Maeve") == cf.TokenEdit(5, "Maeve", False)
    assert cf.parse_intervention('token:5="Maeve"').label() == 'token:5="Maeve"'
    assert cf.parse_intervention('token:5="').new == '"'  # a lone quote is text, not quoting


def test_token_edit_word_boundary_sentencepiece_model():
    """A tiny llama behind the SentencePiece-style tokenizer: replacing a word-initial token ("▁…") adds the
    boundary, replacing a mid-word token does not, and a quoted replacement is forced exactly as written."""
    from probes import from_hf

    model, _ = tiny_models.build("llama")
    sp = _metaspace_tokenizer()
    p = from_hf(model, sp, name="tiny-llama-sp")
    c = cf.Config(max_new_tokens=16, seed=0, temperature=1.0, stop_at_eos=False, interventional=False)
    base = cf.run(p, "the", "none", config=c)
    pieces = sp.convert_ids_to_tokens(list(base.factual))
    word = next(i for i, t in enumerate(pieces) if t.startswith("▁"))
    inner = next(i for i, t in enumerate(pieces) if not t.startswith("▁") and i > 0)
    r = cf.run(p, "the", f"token:{word}=Maeve", config=c)
    assert sp.convert_ids_to_tokens(list(r.forced)) == ["▁Ma", "eve"] and r.rows[0][word:word + 2] == r.forced
    assert r.forced_str == tuple(sp.decode([t]) for t in r.forced) and any("leading space" in n for n in r.notes)
    r = cf.run(p, "the", f"token:{inner}=Maeve", config=c)
    assert sp.convert_ids_to_tokens(list(r.forced)) == ["M", "a", "eve"]
    r = cf.run(p, "the", f'token:{word}="Maeve"', config=c)  # quoted: no boundary even at a word start
    assert sp.convert_ids_to_tokens(list(r.forced)) == ["M", "a", "eve"] and not any("leading space" in n for n in r.notes)


def test_token_edit_word_boundary_embedded(embedded, tmp_path):
    """Byte-level BPE (Ġ marker). Seed 3's response starts "'s brother, Alanna,": position 1 is " brother" (starts a
    word: the replacement gets a space), position 5 is "," (glued to "Alanna": the replacement is used as given,
    unless quoted with a space). The result records the forced tokens."""
    c = cf.Config(max_new_tokens=8, seed=3, interventional=False)
    r = cf.run(embedded, "Once upon a time, Lyra", "token:1=sister", config=c)
    assert r.factual_str[:2] == ("'s", " brother") and r.factual_str[5] == ","
    assert r.forced_str == (" sister",) and r.counterfactual_text.startswith("'s sister")
    r = cf.run(embedded, "Once upon a time, Lyra", "token:5=Maeve", config=c)
    assert "".join(r.forced_str) == "Maeve" and "AlannaMaeve" in r.counterfactual_text
    r = cf.run(embedded, "Once upon a time, Lyra", 'token:5=" Maeve"', config=c)
    assert "".join(r.forced_str) == " Maeve" and "Alanna Maeve" in r.counterfactual_text
    back = cf.CounterfactualResult.load(r.save(tmp_path / "r"))
    assert back.forced == r.forced and back.forced_str == r.forced_str


# ----------------------------------------------------------------------------- sampler and posterior, model-free
def _tv_bound(n: int, k: int, delta: float = 1e-6) -> float:
    """Total-variation radius that an empirical distribution of ``n`` draws over ``k`` categories exceeds with
    probability at most ``delta`` (Bretagnolle-Huber-Carol: P(Σ|p̂ - p| ≥ λ) ≤ 2^k exp(-nλ²/2))."""
    return 0.5 * math.sqrt(2 * (k * math.log(2) + math.log(1 / delta)) / n)


TRUNCATIONS = {
    "top_k": dict(temperature=0.7, top_k=4),
    "top_p": dict(temperature=1.0, top_p=0.6),
    "top_k+top_p": dict(temperature=1.3, top_k=6, top_p=0.8),
}


@pytest.mark.parametrize("name", list(TRUNCATIONS))
def test_keyed_gumbel_max_frequencies_match_truncated_softmax(name):
    """The sampler as used in generation (keyed noise per stream, sampling_logprobs, gumbel_max): frequencies over
    n draws are within the 1e-6-failure TV radius of softmax(z/τ) restricted to the top-k / top-p set and
    renormalised, and outside that radius of the untruncated softmax (so ignoring the truncation fails)."""
    kw = TRUNCATIONS[name]
    z = torch.tensor([2.0, 1.6, 1.3, 1.1, 0.9, 0.4, 0.2, 0.0, -0.5, -1.0, -1.5, -2.0])
    V, n = z.numel(), 20_000
    tau = kw["temperature"]
    # the target, computed directly: sort, keep top k, then the tokens whose preceding mass is <= p
    p = torch.softmax(z.double() / tau, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if kw.get("top_k") is not None and rank >= kw["top_k"]:
            break
        keep[i] = True  # kept while the mass before it is <= p (of the top-k renormalised distribution)
        mass += float(p[i])
    if kw.get("top_p") is not None:
        q = torch.where(keep, p, torch.zeros_like(p))
        q = q / q.sum()
        keep2 = torch.zeros(V, dtype=torch.bool)
        before = 0.0
        for i in q.argsort(descending=True).tolist():
            if q[i] == 0 or before > kw["top_p"]:
                break
            keep2[i] = True
            before += float(q[i])
        keep = keep2
    target = torch.where(keep, p, torch.zeros_like(p))
    target /= target.sum()
    logp = cf.sampling_logprobs(z[None], tau, kw.get("top_k"), kw.get("top_p"))
    noise = torch.stack([cf.gumbel_noise(11, 0, V, stream=s) for s in range(n)])
    ids = cf.gumbel_max(logp.expand(n, V), noise)
    freq = torch.bincount(ids, minlength=V).double() / n
    assert set(ids.unique().tolist()) <= set(keep.nonzero().flatten().tolist())  # never outside the set
    bound = _tv_bound(n, V)  # 0.0235 for n = 20000, V = 12
    tv = 0.5 * float((freq - target).abs().sum())
    assert tv < bound, (tv, bound)  # measured TV 0.002 / 0.003 / 0.004 (top_k / top_p / both)
    assert 0.5 * float((p - target).abs().sum()) > 2 * bound  # the untruncated softmax is far outside (0.18-0.40)


def _gumbel_cdf(x, loc):
    return torch.exp(-torch.exp(-(x - loc)))


def test_posterior_noise_conditionals_are_truncated_gumbel():
    """Posterior noise given observed token k (method page): the observed token is the argmax in every draw; the
    maximum M = l_k + g_k is Gumbel(logsumexp l); given M, every other l_v + g_v is Gumbel(l_v) truncated below M
    (one-sample KS, fixed seed); and the whole vector matches prior noise conditioned on argmax = k by rejection
    (two-sample KS). Thresholds: KS critical values at 1e-6 failure probability."""
    from scipy.stats import ks_2samp, kstest

    lp = torch.log_softmax(torch.tensor([1.5, 0.7, 0.2, -0.4, -1.0], dtype=torch.float64), -1)
    V, k, n = lp.numel(), 2, 20_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, V + 1, generator=g, dtype=torch.float64)
    post = cf.posterior_gumbel(lp, k, torch.zeros(n, V), u[:, 0], u[:, 1:]).double()
    x = lp[None] + post
    assert (x.argmax(-1) == k).all()  # every draw regenerates the observed token
    crit1 = math.sqrt(math.log(2 / 1e-6) / 2) / math.sqrt(n)  # one-sample KS at 1e-6
    M = x[:, k]
    lse = float(torch.logsumexp(lp, 0))
    assert kstest(M.numpy(), lambda t: _gumbel_cdf(torch.as_tensor(t), lse).numpy()).statistic < crit1
    # given M fixed (a low maximum, so the truncation bites): x_v ~ Gumbel(l_v) truncated to (-inf, M)
    u2 = torch.rand(n, V + 1, generator=g, dtype=torch.float64)
    u2[:, 0] = 0.02
    m0 = lse - math.log(-math.log(0.02 + 1e-20) + 1e-20)
    xs = lp[None] + cf.posterior_gumbel(lp, k, torch.zeros(n, V), u2[:, 0], u2[:, 1:]).double()
    assert torch.allclose(xs[:, k], torch.full((n,), m0, dtype=torch.float64), atol=1e-5)  # float32 noise
    for v in range(V):
        if v == k:
            continue
        F = lambda t, v=v: (_gumbel_cdf(torch.as_tensor(t), lp[v]) / _gumbel_cdf(torch.tensor(m0), lp[v])).clamp(max=1).numpy()
        st = kstest(xs[:, v].numpy(), F).statistic
        assert st < crit1, (v, st)  # measured 0.005-0.008 vs 0.019 (M itself: 0.007)
        # the untruncated Gumbel(l_v) is rejected (the check can fail)
        assert kstest(xs[:, v].numpy(), lambda t, v=v: _gumbel_cdf(torch.as_tensor(t), lp[v]).numpy()).statistic > crit1
    # the joint law: prior Gumbel vectors kept when their argmax is k (rejection sampling)
    prior = -torch.log(-torch.log(torch.rand(6 * n, V, generator=g, dtype=torch.float64)))
    acc = prior[(lp[None] + prior).argmax(-1) == k]
    crit2 = math.sqrt(math.log(2 / 1e-6) / 2) * math.sqrt((len(acc) + n) / (len(acc) * n))
    for v in range(V):
        assert ks_2samp(acc[:, v].numpy(), post[:, v].numpy()).statistic < crit2, v  # measured 0.005-0.010 vs 0.028
    # ... and the unconditioned prior differs from the posterior at the observed coordinate (the check can fail)
    assert ks_2samp(prior[:n, k].numpy(), post[:, k].numpy()).statistic > crit2


def test_posterior_noise_replays_observed_text_model_free():
    """A toy autoregressive sampler (logits a fixed function of the previous token): noise inferred from a text
    sampled with other noise regenerates that text exactly under every draw, with and without truncation."""
    V, T, S = 9, 30, 16
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4)) * 2

    def sample(noises, kw, start=0):
        out, prev = [], start
        for t in range(T):
            lp = cf.sampling_logprobs(table[prev][None], kw["temperature"], kw.get("top_k"), kw.get("top_p"))[0]
            prev = int(cf.gumbel_max(lp[None], noises[t][None])[0])
            out.append(prev)
        return out

    for kw in TRUNCATIONS.values():
        observed = sample([cf.gumbel_noise(99, t, V) for t in range(T)], kw)
        post = []
        prev = 0
        for t, y in enumerate(observed):
            lp = cf.sampling_logprobs(table[prev][None], kw["temperature"], kw.get("top_k"), kw.get("top_p"))[0]
            prior = torch.stack([cf.gumbel_noise(1, t, V, stream=5 + s) for s in range(S)])
            u = cf._uniform(1, t, 7, (S, V + 1))
            post.append(cf.posterior_gumbel(lp, y, prior, u[:, 0], u[:, 1:]))
            prev = y
        for s in range(S):
            assert sample([post[t][s] for t in range(T)], kw) == observed
        # fresh noise does not reproduce it (the replay is not vacuous)
        assert sample([cf.gumbel_noise(1, t, V, stream=3) for t in range(T)], kw) != observed


# ----------------------------------------------------------------------------- README figures
def test_readme_counterfactual_figures_are_reproduced(embedded):
    """Every figure of docs/readme/counterfactual.md's worked example comes from docs/readme_numbers.py, and the
    stated defaults are the code's."""
    import typer

    from analyses.cli import app as cli_app

    text = (ROOT / "docs" / "readme" / "counterfactual.md").read_text(encoding="utf-8")
    assert numbers().counterfactual_example(embedded) in text
    assert "`temperature 0.8`" in text and cf.Config().temperature == 0.8
    assert "40 new tokens (CLI) / 20 (page)" in text
    cmd = typer.main.get_command(cli_app).commands["run"].commands["counterfactual"]  # the CLI default is the config's
    assert {p.name: p.default for p in cmd.params}["max_new_tokens"] == cf.Config().max_new_tokens == 40
    assert 'param("max_new_tokens", 20,' in (ROOT / "dashboard" / "views" / "counterfactual.py").read_text()


def test_notebook_06_text_matches_its_code():
    """The numbers the notebook's text states are the ones its code uses (model-free: reads the notebook)."""
    import json

    nb = json.loads((ROOT / "notebooks" / "06_counterfactual.ipynb").read_text(encoding="utf-8"))
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    pairs = [("kept short (20 tokens)", "cf.Config(max_new_tokens=20,"), ("replace response token 1", "'token:1=sister'"),
             ("(8 draws, 6 tokens)", "cf.BiasConfig(n_samples=8, max_new_tokens=6)"), ("token 1 is `' brother'`", "factual_str[1] == ' brother'")]
    for said, done in pairs:
        assert said in md and done in code, (said, done)


def test_grid_shows_every_token_whole():
    """One column per world, one row per position: a long token is shown whole (not "recogniz…"), a special token
    as text (not swallowed as an HTML tag), a whitespace token visibly; changed tokens are marked."""
    from analyses import counterfactual as cf

    r = cf.CounterfactualResult.__new__(cf.CounterfactualResult)
    object.__setattr__(r, "factual_str", (" recognizable", " cat", "<|im_end|>"))
    object.__setattr__(r, "str_rows", ((" recognizable", " dog", " "),))
    object.__setattr__(r, "factual", (1, 2, 5))
    object.__setattr__(r, "rows", ((1, 3, 4),))
    object.__setattr__(r, "kinds", ("counterfactual",))
    object.__setattr__(r, "edit_pos", 1)
    object.__setattr__(r, "intervention", "token:1=dog")
    fig = r.plot()
    t = fig.data[0]
    assert list(t.x) == ["factual", "counterfactual 0"] and list(t.y) == [0, 1, 2]
    assert [list(row) for row in t.text] == [[" recognizable", " recognizable"], [" cat", " dog"], ["&lt;|im_end|&gt;", "␣"]]
    assert [list(row) for row in t.z] == [[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert t.textfont.size >= 11  # a fixed size: plotly would otherwise shrink the text to the cell (5 px at 1280)
