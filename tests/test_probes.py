"""Backend conformance: nnsight (SDPA + recomputed patterns) and TransformerLens (eager) agree on
every site, every architecture, with and without edits; reads never change the logits."""

import pytest
import torch

import tiny_models
from probes import (Ablate, AddVector, AttendTo, Collect, ConfigError, InputError, Mean, Patch, UnknownSiteError,
                    UnsupportedModelError, ZeroAttention, all_sites, from_hf)


def pair(family):
    m1, tok = tiny_models.build(family)
    m2, _ = tiny_models.build(family)
    return from_hf(m1, tok, backend="nnsight"), from_hf(m2, tok, backend="transformer_lens")


def sites_for(p):
    out = [s for s in all_sites(p.info.n_layers) if p.supports("resid_mid") or s.kind != "resid_mid"]
    if p.info.family == "gpt_neox":  # TL's NeoX adapter has no post-rotary q/k hook
        out = [s for s in out if s.kind not in ("q", "k")]
    return out


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_backends_agree_on_every_site(family):
    a, b = pair(family)
    toks = a.to_tokens(["hello world, again", "a second row!!!!!!"], prepend_bos=True)
    sites = sites_for(a)
    ca, cb = a.cache(toks, sites), b.cache(toks, sites)
    for s in sites:
        assert ca[s.name].shape == cb[s.name].shape, s.name
        torch.testing.assert_close(ca[s.name], cb[s.name], atol=2e-5, rtol=1e-4, msg=s.name)
    # reading sites does not change the model's output, and the output is the plain HF output
    ref = a.hf_model(input_ids=toks).logits
    torch.testing.assert_close(a.run(toks, reads={s: Mean() for s in sites}), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_recomputed_pattern_equals_eager_attention(family):
    """The nnsight backend's ``hook_pattern`` (recomputed from the q/k that reach SDPA: after q/k norms, rotary,
    GQA, soft-capping, sliding windows) equals the model's own eager ``output_attentions``, on a left-padded
    batch longer than the tiny sliding windows (8 for mistral, 16 for gemma2)."""
    from transformers import AutoModelForCausalLM

    p = tiny_models.probe(family)
    eager = AutoModelForCausalLM.from_config(tiny_models.config(family), attn_implementation="eager", dtype=torch.float32).eval()
    eager.load_state_dict(p.hf_model.state_dict(), strict=True)
    toks = p.to_tokens(["a short one", "a prompt that runs past every sliding window"], prepend_bos=True,
                       padding_side="left")
    mask = (toks != p.tokenizer.pad_token_id).long()
    reads = {f"blocks.{L}.attn.hook_pattern": Collect() for L in range(p.info.n_layers)}
    p.run(toks, reads=reads, attention_mask=mask)
    with torch.no_grad():
        ref = eager(input_ids=toks, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()[:, :, None] & mask.bool()[:, None, :]  # rows of pad queries are undefined in eager attention
    for L, red in enumerate(reads.values()):
        got, want = red.finalize(), ref[L]
        assert got.shape == want.shape
        torch.testing.assert_close(got * real[:, None], want * real[:, None], atol=1e-6, rtol=1e-5, msg=f"layer {L}")
    window = getattr(p.hf_model.config, "sliding_window", None)
    if family == "mistral":  # the window is in force: nothing older than 8 tokens is attended
        T = toks.shape[1]
        old = torch.arange(T)[:, None] - torch.arange(T)[None, :] >= window
        assert T > 2 * window and torch.all(got[..., old] == 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "olmo2"])
def test_site_identities(family):
    a, _ = pair(family)
    toks = a.to_tokens("identities hold", prepend_bos=True)
    L = 1
    names = [f"blocks.{L}.hook_resid_pre", f"blocks.{L}.hook_resid_mid", f"blocks.{L}.hook_resid_post",
             f"blocks.{L}.hook_attn_out", f"blocks.{L}.hook_mlp_out", f"blocks.{L}.attn.hook_z",
             f"blocks.{L}.attn.hook_result", f"blocks.{L}.attn.hook_pattern", "blocks.0.hook_resid_post"]
    c = a.cache(toks, names)
    assert torch.allclose(c[f"blocks.{L}.hook_resid_pre"], c["blocks.0.hook_resid_post"])
    assert torch.allclose(c[f"blocks.{L}.hook_resid_mid"], c[f"blocks.{L}.hook_resid_pre"] + c[f"blocks.{L}.hook_attn_out"], atol=1e-5)
    assert torch.allclose(c[f"blocks.{L}.hook_resid_post"], c[f"blocks.{L}.hook_resid_mid"] + c[f"blocks.{L}.hook_mlp_out"], atol=1e-5)
    pat = c[f"blocks.{L}.attn.hook_pattern"]
    assert torch.allclose(pat.sum(-1), torch.ones_like(pat.sum(-1)), atol=1e-5)
    assert torch.all(pat.triu(1) == 0)
    if family == "llama":  # per-head results add up to the attention output (no output bias)
        assert torch.allclose(c[f"blocks.{L}.attn.hook_result"].sum(2), c[f"blocks.{L}.hook_attn_out"], atol=1e-5)


def test_gqa_values_have_kv_heads(tiny):
    p = tiny("llama")
    c = p.cache(p.to_tokens("gqa", prepend_bos=True), ["blocks.0.attn.hook_v", "blocks.0.attn.hook_q"])
    assert c["blocks.0.attn.hook_v"].shape[2] == p.info.n_kv_heads == 2
    assert c["blocks.0.attn.hook_q"].shape[2] == p.info.n_heads == 4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "olmo2", "qwen3", "mistral"])
def test_edits_agree_across_backends(family):
    a, b = pair(family)
    toks = a.to_tokens("edit me please", prepend_bos=True)
    vec = torch.randn(a.info.d_model)
    donor = a.cache(a.to_tokens("other text here", prepend_bos=True), ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    cases = [
        [Ablate("blocks.1.attn.hook_z", heads=[0, 2])],
        [Ablate("blocks.0.mlp.hook_post", neurons=[1, 5, 7])],
        [Ablate("blocks.0.hook_resid_post", positions=[2])],
        [AddVector("blocks.0.hook_resid_post", vector=vec, scale=2.0)],
        [Patch("blocks.0.hook_resid_post", value=donor[:, :3], positions=[0, 1, 2])],
        [AttendTo(layer=1, heads=[1], key=0)],
        [ZeroAttention(layer=0, heads=[3])],
    ]
    plain = a.forward(toks)
    for edits in cases:
        la, lb = a.run(toks, edits=edits), b.run(toks, edits=edits)
        torch.testing.assert_close(la, lb, atol=3e-5, rtol=1e-4, msg=repr(edits))
        assert not torch.allclose(la, plain), f"{edits} changed nothing"


def test_mean_ablation_with_zero_mean_equals_zero_ablation(tiny):
    p = tiny("llama")
    toks = p.to_tokens("mean ablation", prepend_bos=True)
    z = Ablate("blocks.1.attn.hook_z", heads=[1])
    m = Ablate("blocks.1.attn.hook_z", heads=[1], mode="mean", value=torch.zeros(4, 16))
    torch.testing.assert_close(p.run(toks, edits=[z]), p.run(toks, edits=[m]))


def test_attend_to_sink_matches_manual_computation(tiny):
    """Moving a head's attention to key 0 makes its z equal v[0] at every position."""
    p = tiny("llama")
    toks = p.to_tokens("sink test", prepend_bos=True)
    c = p.cache(toks, ["blocks.1.attn.hook_z", "blocks.1.attn.hook_v"], edits=[AttendTo(layer=1, heads=[3], key=0)])
    z, v = c["blocks.1.attn.hook_z"], c["blocks.1.attn.hook_v"]
    kv = 3 // (p.info.n_heads // p.info.n_kv_heads)
    assert torch.allclose(z[0, :, 3], v[0, 0, kv].expand_as(z[0, :, 3]), atol=1e-6)


def test_embedded_backends_agree(embedded, embedded_tl):
    toks = embedded.to_tokens("The capital of France is", prepend_bos=True)
    names = ["blocks.0.hook_resid_pre", "blocks.7.attn.hook_pattern", "blocks.7.attn.hook_q", "blocks.7.attn.hook_v",
             "blocks.12.hook_resid_mid", "blocks.29.hook_resid_post", "blocks.20.mlp.hook_post", "ln_final.hook_normalized"]
    a, b = embedded.cache(toks, names), embedded_tl.cache(toks, names)
    for n in names:
        torch.testing.assert_close(a[n], b[n], atol=2e-4, rtol=1e-3, msg=n)
    la = embedded.forward(toks)
    assert embedded.tokenizer.decode(la[0, -1].argmax()).strip() == "Paris"


def test_bad_input_messages(tiny):
    p = tiny("llama")
    with pytest.raises(InputError, match="empty"):
        p.to_tokens("   ")
    with pytest.raises(InputError, match="at most 128"):
        p.to_tokens("x" * 300)
    assert torch.equal(p.run("raw text"), p.run(p.to_tokens("raw text")))  # a text is tokenized as to_tokens does
    with pytest.raises(InputError, match="token ids or a text"):
        p.run(b"raw bytes")
    with pytest.raises(UnknownSiteError, match="unknown hook name"):
        p.run(p.to_tokens("a"), reads={"blocks.0.resid": Mean()})
    with pytest.raises(ConfigError, match="Reducer"):
        p.run(p.to_tokens("a"), reads={"blocks.0.hook_resid_pre": "mean"})
    neox = tiny("gpt_neox")
    with pytest.raises(UnknownSiteError, match="parallel"):
        neox.run(neox.to_tokens("a"), reads={"blocks.0.hook_resid_mid": Mean()})
    tl = tiny("gpt_neox", backend="transformer_lens")
    with pytest.raises(UnsupportedModelError, match="nnsight"):
        tl.run(tl.to_tokens("a"), reads={"blocks.0.attn.hook_q": Mean()})
    with pytest.raises(ConfigError, match="positions"):
        p.run(p.to_tokens("abc"), edits=[Ablate("blocks.0.hook_resid_pre", positions=[10])])


def test_padded_batch_matches_unpadded(tiny):
    p = tiny("llama")
    short = p.to_tokens("hi", prepend_bos=True)
    both = p.to_tokens(["hi", "a longer one"], prepend_bos=True, padding_side="left")
    mask = (both != p.tokenizer.pad_token_id).long()
    c1 = Collect()
    p.run(short, reads={"blocks.1.attn.hook_pattern": c1})
    c2 = Collect()
    p.run(both, reads={"blocks.1.attn.hook_pattern": c2}, attention_mask=mask)
    a, b = c1.finalize()[0], c2.finalize()[0]
    n = short.shape[1]
    torch.testing.assert_close(b[:, -n:, -n:], a, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- incremental decoding
DECODE_TOL = dict(atol=2e-6, rtol=1e-5)  # cached vs full-forward logits, fp32 tiny models: measured max |diff| 2.4e-7


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_matches_full_forward_every_step(tiny, family, backend):
    p = tiny(family, backend=backend)
    toks = p.to_tokens(["decode me", "and me too"], prepend_bos=True)
    dec = p.decoder()
    logits = dec.feed(toks)
    seq = toks
    for _ in range(5):
        torch.testing.assert_close(logits, p.forward(seq)[:, -1], **DECODE_TOL)
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = dec.feed(nxt)
    torch.testing.assert_close(logits, p.forward(seq)[:, -1], **DECODE_TOL)
    assert dec.length == seq.shape[1] and torch.equal(dec.tokens, seq)
    # a fork continues the first n tokens of every row, each row twice
    n = toks.shape[1] + 2
    branch = dec.fork(n, batch=2)
    if backend == "transformer_lens":  # the bridge leaves the HF cache empty: nothing to fork, the decoder re-runs
        assert branch is None
        return
    nxt = torch.tensor([7, 9, 11, 13])
    want = p.forward(torch.cat([seq[:, :n].repeat_interleave(2, 0), nxt[:, None]], dim=1))[:, -1]
    torch.testing.assert_close(branch.feed(nxt), want, **DECODE_TOL)
    assert dec.fork(0) is None and dec.fork(seq.shape[1] + 1) is None


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_edits_on_chosen_rows_equal_a_full_run(tiny, family, backend):
    p = tiny(family, backend=backend)
    edits = [Ablate("blocks.1.attn.hook_z", heads=[0, 2]), Ablate("blocks.0.mlp.hook_post", neurons=[1, 5, 7]),
             AddVector("blocks.0.hook_resid_post", vector=torch.randn(p.info.d_model))]
    toks = p.to_tokens("edit while decoding", prepend_bos=True).repeat(2, 1)
    dec = p.decoder(edits, rows=[True, False])
    logits, seq = dec.feed(toks), toks
    for t in (5, 17, 33):
        edited, plain = p.run(seq, edits=edits)[0, -1], p.forward(seq)[1, -1]
        torch.testing.assert_close(logits[0], edited, **DECODE_TOL)
        torch.testing.assert_close(logits[1], plain, **DECODE_TOL)
        assert (edited - plain).abs().max() > 1e-3  # the edits change the logits
        seq = torch.cat([seq, torch.tensor([[t], [t]])], dim=1)
        logits = dec.feed(torch.tensor([t, t]))


def test_decoder_bad_input(tiny):
    p = tiny("llama")
    with pytest.raises(ConfigError, match="cannot be edited while decoding"):
        p.decoder([ZeroAttention(layer=0, heads=[1])])
    with pytest.raises(ConfigError, match="positions"):
        p.decoder([Ablate("blocks.0.hook_resid_pre", positions=[1])])
    dec = p.decoder([Ablate("blocks.0.attn.hook_z", heads=[1])], rows=[True])
    with pytest.raises(ConfigError, match="one boolean per row"):
        dec.feed(torch.tensor([[1, 5], [1, 6]]))
    with pytest.raises(InputError, match=r"\[B, s\]"):
        p.decoder().feed(torch.zeros(1, 0, dtype=torch.long))


def test_supports_names_the_legal_features(tiny):
    p = tiny("llama")
    assert p.supports("generate") and p.supports("gqa") and not p.supports("remote")
    with pytest.raises(ConfigError, match="Did you mean 'generate'.*resid_mid, pattern"):
        p.supports("generat")


def test_read_functions_see_the_site_tensor(tiny):
    p = tiny("gpt2")
    toks = p.to_tokens("read me", prepend_bos=True)
    seen = []
    p.run(toks, reads={"blocks.1.attn.hook_result": seen.append, "blocks.0.hook_resid_post": [seen.append, Mean()]},
          return_logits=False)
    want = p.cache(toks, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_result"])
    torch.testing.assert_close(seen[0], want["blocks.0.hook_resid_post"])
    torch.testing.assert_close(seen[1], want["blocks.1.attn.hook_result"])


def test_sample_is_seeded_and_stops(tiny):
    p = tiny("llama")
    assert p.eos_token_ids == (2,)
    prefix = p.to_tokens("roll", prepend_bos=True)[0].tolist()
    a = p.sample(prefix, 5, max_new_tokens=6, seed=3, batch_size=2)
    b = p.sample(prefix, 5, max_new_tokens=6, seed=3, batch_size=2, prefix_cache=False)
    assert a == b and len(a) == 5 and all(len(r) <= 6 for r in a)
    assert p.sample(prefix, 5, max_new_tokens=6, seed=4, batch_size=2) != a
    short = p.sample(prefix, 3, max_new_tokens=6, seed=3, stop=lambda new: len(new) >= 2)
    assert all(len(r) == 2 for r in short)
