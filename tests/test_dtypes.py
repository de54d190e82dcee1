"""Every analysis in bfloat16 (and the logit lens and sinks in float16) on the CPU, against float32.

A low-precision probe wraps the same random weights as its float32 twin, cast with ``model.to(dtype)``; both run
the same input. Continuous outputs must agree within the tolerances in :data:`TOL`, which were measured: ``python
tests/test_dtypes.py`` prints the largest difference of every quantity over the tiny families (where the
analysis supports them) and seeds 0-2, and each bound is about 3x that maximum, rounded up. Discrete outcomes
(top-1 ids, routes, sampled tokens, critical tokens) are compared only where their decision margin in float32
exceeds the measured numeric difference; a skipped comparison is not counted as a pass by luck.

Accumulations that must not follow the model's dtype are checked directly: the streaming reducers keep float64
sums, route importances are computed in float32 (``routes.Config.dtype``), Gumbel noise is drawn in float64 and
added in float32, fiber upcasts a bf16 matrix to float32 before any distance.
"""

from __future__ import annotations

import math
import sys
import tempfile

import pytest
import torch

import tiny_models
from probes import Mean, Moments, Sum, from_hf

BF16, FP16 = torch.bfloat16, torch.float16

#: bf16 vs fp32 on the tiny families, seeds 0-2 (``python tests/test_dtypes.py``): measured maximum -> bound (~3x,
#: rounded up); absolute unless named *_rel
TOL = {
    "logit_lens.top_probs": 1e-4,       # lens probabilities [L, T, k]            measured 2.7e-5
    "logit_lens.target": 3e-3,          # prob. of the final top-1 at each layer  measured 8.4e-4
    "routes.attn": 1.2e-2,              # ε-clipped importances [L, T, T, H]      measured 3.5e-3
    "routes.ffn": 2.5e-2,               # FFN / residual importances [L, T]       measured 8.1e-3
    "routes.neurons": 5e-3,             # neuron importances [L, T, F]            measured 1.7e-3
    "sinks.alpha_mean": 5e-5,           # α per head and key                      measured 1.8e-5
    "sinks.value_norm_rel": 1e-2,       # ‖v·W_O‖, relative                       measured 3.2e-3
    "sinks.resid_norm_rel": 5e-3,       # residual norms, relative                measured 1.7e-3
    "dormant.sink_mass": 5e-5,          #                                         measured 1.5e-5
    "dormant.delta_loss": 2e-3,         # Δ next-token loss, nats                 measured 6.2e-4
    "bigram.xent_rel": 1e-4,            # soft cross-entropy per step, relative   measured 2.2e-5
    "bigram.mask_logits": 6e-3,         # after 3 Adam steps of lr 1e-3           measured 1.9e-3; bound 2·lr·steps (a
                                        # near-zero gradient may flip sign: Adam moves each logit by ~lr either way)
    "counterfactual.logprob": 7e-3,     # log-prob of each factual token, nats    measured 2.3e-3
    "component.sink_mass": 7e-5,        #                                         measured 2.1e-5
    "fiber.radii_rel": 1.5e-2,          # radii of a bf16-rounded 400×8 matrix vs float32, relative; measured 4.8e-3
}
#: float16 (logit lens and sinks), same families and seeds
TOL16 = {"logit_lens.top_probs": 1.2e-5, "logit_lens.target": 1.2e-5,   # measured 3.5e-6, 3.5e-6
         "sinks.alpha_mean": 4e-6, "sinks.value_norm_rel": 1.5e-3, "sinks.resid_norm_rel": 6e-4}  # 1.3e-6, 4.9e-4, 2.0e-4
#: (α reaches 3.5e-6 in float16 on mistral, whose 8-token window sharpens attention; the float16 test runs llama and gpt2)
#: families with q/k norms: unit-RMS queries and keys give sharp attention even with random weights, so α moves more
#: under rounding than in the near-uniform attention of the other tiny models. Measured over olmo2 and qwen3, seeds 0-2:
#: bf16 9.1e-4, fp16 6.3e-5; every other quantity stays within TOL / TOL16.
QK_NORM = ("olmo2", "qwen3")
TOL_QK_NORM = {BF16: {"sinks.alpha_mean": 3e-3}, FP16: {"sinks.alpha_mean": 2e-4}}
#: the embedded SmolLM2-135M in bf16 vs fp32: maxima over two prompts (prose, code) and the prose sinks sample
TOL_EMBEDDED = {"logit_lens.top_probs": 0.2, "logit_lens.target": 0.2,   # measured 0.076, 0.067
                "sinks.alpha_mean": 0.045}                                # measured 0.014


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls on 2 shared cores run faster on one thread


def twins(family: str, dtype=BF16, seed: int = 0):
    """(float32 probe, ``dtype`` probe) around the same random weights."""
    m32, tok = tiny_models.build(family, seed)
    mlo, _ = tiny_models.build(family, seed)
    return from_hf(m32, tok, name=f"tiny-{family}"), from_hf(mlo.to(dtype), tok, name=f"tiny-{family}-{dtype}")


def _maxabs(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def _maxrel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())


# ----------------------------------------------------------------------------- measurements
def m_logit_lens(p32, plo) -> dict[str, float]:
    from analyses import logit_lens as ll

    a, b = ll.run(p32, "abc def gh ij", config=ll.Config(k=3)), ll.run(plo, "abc def gh ij", config=ll.Config(k=3))
    assert b.top_probs.dtype == torch.float32 and torch.isfinite(b.top_probs).all()
    out = {"logit_lens.top_probs": _maxabs(b.top_probs, a.top_probs), "logit_lens.target": _maxabs(b.target, a.target)}
    # top-1 ids where the float32 gap between the first two exceeds the numeric difference
    gap = a.top_probs[..., 0] - a.top_probs[..., 1]
    sure = gap > 2 * out["logit_lens.top_probs"]
    assert torch.equal(a.top_ids[..., 0][sure], b.top_ids[..., 0][sure])
    return out


def _route_weights(r) -> torch.Tensor:
    """Every weight the graph thresholds: head-summed attention edges, residual and FFN edges."""
    return torch.cat([r.attn.sum(-1).reshape(-1), r.attn_resid.reshape(-1), r.ffn.reshape(-1), r.ffn_resid.reshape(-1)]).double()


ROUTES_COMPARED: list[bool] = []  # whether each m_routes call could compare the route itself


def m_routes(p32, plo, level="head", mode="all") -> dict[str, float]:
    from analyses import routes

    cfg = routes.Config(kernel="eager", level=level, mode=mode, renormalize=False)
    a, b = routes.run(p32, "abc def gh", config=cfg), routes.run(plo, "abc def gh", config=cfg)
    assert b.attn.dtype == torch.float32  # importances in float32 whatever the model dtype
    out = {"routes.attn": _maxabs(b.attn, a.attn),
           "routes.ffn": max(_maxabs(b.ffn, a.ffn), _maxabs(b.attn_resid, a.attn_resid), _maxabs(b.ffn_resid, a.ffn_resid))}
    if level == "neuron":
        out["routes.neurons"] = _maxabs(b.neurons, a.neurons)
    # the route (edges above tau) only where no thresholded weight lies within the numeric difference of tau
    # (a whole-graph result can be thresholded anywhere: try a few tau; a top-down one only at its own)
    wa, wb = _route_weights(a), _route_weights(b)
    diff = float((wa - wb).abs().max())
    taus = (cfg.tau,)
    if mode == "all":  # also threshold in the middle of the three widest gaps between the fp32 weights
        w = torch.unique(wa.flatten().double())
        w = w[(w > 1e-3) & (w < 0.9)]
        if len(w) > 1:
            gaps = w[1:] - w[:-1]
            taus += tuple(float((w[i] + w[i + 1]) / 2) for i in gaps.argsort(descending=True)[:3].tolist())
    for tau in taus:
        sure = float((wa - tau).abs().min()) > 2 * diff
        ROUTES_COMPARED.append(sure)
        if sure:
            assert set(a.route(tau=tau).edges) == set(b.route(tau=tau).edges)
    return out


def m_sinks(p32, plo) -> dict[str, float]:
    from analyses import sinks

    toks = torch.randint(4, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = sinks.Config(T=32, n_samples=4, batch_size=2, mlp_ablation=False)
    a, b = sinks.run(p32, tokens=toks, config=cfg), sinks.run(plo, tokens=toks, config=cfg)
    assert b.alpha_mean.dtype == torch.float32 and torch.isfinite(b.alpha_mean).all()
    return {"sinks.alpha_mean": _maxabs(b.alpha_mean, a.alpha_mean), "sinks.value_norm_rel": _maxrel(b.value_norm, a.value_norm),
            "sinks.resid_norm_rel": _maxrel(b.resid_norm, a.resid_norm)}


def m_dormant(p32, plo) -> dict[str, float]:
    from analyses import dormant

    cfg = dormant.Config(T=32, n_samples=4, batch_size=4, heads=("L1H0", "L0H2"))
    a, b = dormant.run(p32, ["random", "repeat"], config=cfg), dormant.run(plo, ["random", "repeat"], config=cfg)
    ok = torch.isfinite(a.delta_loss)
    return {"dormant.sink_mass": _maxabs(b.sink_mass, a.sink_mass), "dormant.delta_loss": _maxabs(b.delta_loss[ok], a.delta_loss[ok])}


def m_bigram(p32, plo) -> dict[str, float]:
    from analyses import bigram as B

    ids = torch.randint(4, 40, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = B.Config(lam=1.0, lr=1e-3, steps=3, batch=2, seq_len=16, reuse=True, log_every=1, stop_undecided=None)
    table = B.BigramTable.from_ids(ids, 256)
    rows = ids[:3200].reshape(-1, 16)
    ma, ca, *_ = B.train_mask(p32, rows, table, cfg)
    mb, cb, *_ = B.train_mask(plo, rows, table, cfg)
    assert all(s.dtype == torch.float32 for s in mb.logits)  # mask logits stay float32 on a bf16 model
    return {"bigram.xent_rel": _maxrel(cb["xent"].to_numpy(), ca["xent"].to_numpy()),
            "bigram.mask_logits": max(_maxabs(x.detach(), y.detach()) for x, y in zip(mb.logits, ma.logits))}


def m_counterfactual(p32, plo) -> dict[str, float]:
    """Factual Gumbel-Max tokens agree step by step until the first step whose float32 decision margin is small."""
    from analyses import counterfactual as cf

    c = cf.Config(max_new_tokens=12, seed=3, temperature=1.0, stop_at_eos=False)
    ta, la = cf.generate(p32, "hello there", c)
    tb, lb = cf.generate(plo, "hello there", c)
    ids = torch.tensor([cf._prompt_ids(p32, "hello there", c.chat) + ta])
    with torch.no_grad():
        logits = p32.forward(ids)[0, -len(ta) - 1:-1].float()
    n_same, diff = 0, 0.0
    for i in range(len(ta)):
        z = cf.sampling_logprobs(logits[i], c.temperature) + cf.gumbel_noise(c.seed, i, logits.shape[-1])
        top2 = z.topk(2).values
        if ta[i] != tb[i]:
            break
        n_same += 1
        diff = max(diff, abs(la[i] - lb[i]))
        if float(top2[0] - top2[1]) < 2 * TOL["counterfactual.logprob"]:  # the next choice is within the numeric noise
            break
    else:
        assert ta == tb
    if n_same < len(ta):  # diverged: only allowed right after a step whose float32 margin is within tolerance
        z = cf.sampling_logprobs(logits[n_same], c.temperature) + cf.gumbel_noise(c.seed, n_same, logits.shape[-1])
        top2 = z.topk(2).values
        assert ta[n_same] == tb[n_same] or float(top2[0] - top2[1]) < 2 * TOL["counterfactual.logprob"], (ta, tb)
    return {"counterfactual.logprob": diff}


def m_component(p32, plo) -> dict[str, float]:
    from analyses import component as CP

    cfg = CP.Config(domains=("random", "repeat"), n_samples=2, T=8, k=3)
    a = CP.profile(p32, "L1H2", config=cfg, root=tempfile.mkdtemp())
    b = CP.profile(plo, "L1H2", config=cfg, root=tempfile.mkdtemp())
    return {"component.sink_mass": _maxabs(b.sink["sink_mass"].to_numpy(), a.sink["sink_mass"].to_numpy())}


# ----------------------------------------------------------------------------- bf16 tests
def _check(measured: dict[str, float], tol: dict[str, float] = TOL) -> None:
    for k, v in measured.items():
        assert math.isfinite(v) and v <= tol[k], f"{k}: {v:.3g} > {tol[k]:.3g}"


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_logit_lens_and_sinks_bf16(family):
    p32, p16 = twins(family)
    tol = TOL | TOL_QK_NORM[BF16] if family in QK_NORM else TOL
    _check(m_logit_lens(p32, p16), tol)
    _check(m_sinks(p32, p16), tol)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_routes_bf16(family):
    p32, p16 = twins(family)
    ROUTES_COMPARED.clear()
    _check(m_routes(p32, p16))
    _check(m_routes(p32, p16, mode="route"))
    _check(m_routes(p32, p16, level="neuron"))
    assert any(ROUTES_COMPARED)  # the route itself was compared, not only the importances (deterministic per family)


def test_dormant_bigram_counterfactual_component_bf16():
    p32, p16 = twins("llama")
    _check(m_dormant(p32, p16))
    _check(m_bigram(p32, p16))
    _check(m_counterfactual(p32, p16))
    _check(m_component(p32, p16))


def test_critical_bf16_finds_the_forced_token():
    """Rollout success is ~1 before "Z" and exactly 0 after it: a margin no bf16 difference can cross."""
    from analyses import critical as C
    from analyses.tasks import CallableChecker

    _, p16 = twins("llama")
    cfg = C.Config(n_rollouts=6, max_new_tokens=3, stop_at_answer=False, alternatives="topk", n_alternatives=2, alt_rollouts=2)
    r = C.search(p16, [1] + list(b"Q: 2+3=? A:"), list(b"ab cd Z ef gh"), CallableChecker(lambda t: "Z" not in t), config=cfg)
    t = r.traces.iloc[0]
    assert t.critical_pos == 6 and t.critical_token == "Z" and t.score_after == 0.0


def test_fiber_on_a_bf16_matrix():
    from analyses import fiber as F

    X = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    cfg = F.Config(vol_min=10, vol_max=60, keep_curves="all")
    lo = F.run(embeddings=X.to(BF16), config=cfg)
    up = F.run(embeddings=X.to(BF16).float(), config=cfg)
    full = F.run(embeddings=X, config=cfg)
    # a bf16 matrix is upcast before any distance: the same numbers as its float32 copy, exactly
    torch.testing.assert_close(lo.p_manifold, up.p_manifold, rtol=0, atol=0)
    torch.testing.assert_close(lo.radii, up.radii, rtol=0, atol=0)
    _check({"fiber.radii_rel": _maxrel(lo.radii[:, 10:], full.radii[:, 10:])})


def test_other_entry_points_run_in_bf16():
    """Entry points not compared above run on a bf16 model without dtype errors and give finite numbers."""
    from analyses import bigram as B
    from analyses import counterfactual as cf
    from analyses import critical as C
    from analyses import dormant
    from analyses import fiber as F
    from analyses import routes
    from analyses import sinks
    from analyses.tasks import Problem

    _, p = twins("llama")
    ids = torch.randint(4, 40, (4000,), generator=torch.Generator().manual_seed(0))
    b = B.run(p, ids, config=B.Config(lr=0.05, steps=4, batch=2, seq_len=16, eval_rows=4, reuse=True, log_every=2))
    assert all(m.dtype == torch.bool for m in b.masks.values())
    f = F.run(p, config=F.Config(vol_min=10, vol_max=60))
    assert torch.isfinite(f.p_manifold).all()
    s = sinks.run(p, tokens=torch.randint(4, 250, (4, 32), generator=torch.Generator().manual_seed(2)),
                  config=sinks.Config(T=32, n_samples=4, mlp_ablation=True, ablation_layers=2, ablation_samples=2))
    assert len(s.ablation) > 0
    d = dormant.run(p, ["prose"], config=dormant.Config(T=32, n_samples=4, batch_size=4, heads=("L1H0",), intervention="zero"))
    assert torch.isfinite(d.delta_loss[0, 1, 0])
    assert len(cf.branches(p, "hello there", 2, k=2, config=cf.Config(max_new_tokens=5, stop_at_eos=False))) == 2
    cf.run(p, "hello there", "ablate:L1H0", config=cf.Config(max_new_tokens=5, stop_at_eos=False, n_samples=2))
    cf.run(p, "hello there Lyra", "prompt:Lyra->Maeve", config=cf.Config(max_new_tokens=5))
    C.run(p, [Problem("2+3?", 5.0)], config=C.Config(n_samples=3, max_new_tokens=2, stop_at_answer=False, n_rollouts=2,
                                                alt_rollouts=1, n_alternatives=1), checkers=[lambda t: all(ord(ch) < 128 for ch in t)])
    r = routes.run(p, "abc def", config=routes.Config(kernel="eager", keep_residuals=True))
    assert r.residuals["resid_post"].dtype == torch.float32 and r.logit_lens(p, ["I1_2"])


# ----------------------------------------------------------------------------- float16
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_and_sinks_fp16(family):
    p32, p16 = twins(family, FP16)
    m = {**m_logit_lens(p32, p16), **m_sinks(p32, p16)}
    _check({k: v for k, v in m.items() if k in TOL16}, TOL16)


# ----------------------------------------------------------------------------- exact accumulations
def test_reducers_accumulate_in_float64_whatever_the_input():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).to(BF16)
    s, m, mo = Sum(dims=(0,)), Mean(dims=(0,)), Moments(dims=(0,))
    for _ in range(3):
        for r in (s, m, mo):
            r.update(x)
    assert s.total.dtype == m.total.dtype == mo.mean.dtype == mo.m2.dtype == torch.float64
    ref = x.double()
    torch.testing.assert_close(s.finalize(), 3 * ref.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mo.finalize()["var"], ref.var(0, unbiased=False), rtol=1e-10, atol=1e-12)


def test_gumbel_noise_and_route_proximities_ignore_the_model_dtype():
    from analyses import counterfactual as cf
    from analyses import routes

    g = cf.gumbel_noise(5, 3, 100)
    assert g.dtype == torch.float32 and torch.equal(g, cf.gumbel_noise(5, 3, 100))
    logp = torch.log_softmax(torch.randn(2, 100), -1)
    assert cf.gumbel_max(logp.to(BF16), g.expand(2, -1)).dtype == torch.int64
    _, p16 = twins("llama")
    r = routes.run(p16, "abc de", config=routes.Config(kernel="eager"))
    assert r.attn.dtype == r.ffn.dtype == torch.float32
    torch.testing.assert_close(r.attn.sum((2, 3)) + r.attn_resid, torch.ones_like(r.attn_resid), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_bf16_on_cuda_within_the_cpu_bounds(family):
    """bf16 on CUDA vs float32 on the CPU (the CPU bounds; GPU kernels sum in other orders)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    p32, p16 = twins(family)
    p16.hf_model.to("cuda")
    _check(m_logit_lens(p32, p16))
    _check(m_sinks(p32, p16))
    if family != "qwen2":
        _check(m_routes(p32, p16))
        _check(m_routes(p32, p16, mode="route"))


# ----------------------------------------------------------------------------- the embedded model
def test_embedded_bf16_logit_lens_and_sinks(embedded):
    from analyses import logit_lens as ll
    from analyses import sinks
    from probes import load_model

    e16 = load_model("embedded", backend="nnsight", device="cpu", dtype="bfloat16")
    assert e16.info.dtype == "bfloat16"
    a = ll.run(embedded, "The Eiffel Tower is in the city of", config=ll.Config(k=3))
    b = ll.run(e16, "The Eiffel Tower is in the city of", config=ll.Config(k=3))
    _check({"logit_lens.top_probs": _maxabs(b.top_probs, a.top_probs), "logit_lens.target": _maxabs(b.target, a.target)},
           TOL_EMBEDDED)
    sure = (a.next_probs[:, 0] - a.next_probs[:, 1]) > 2 * TOL_EMBEDDED["logit_lens.top_probs"]
    assert torch.equal(a.next_ids[sure, 0], b.next_ids[sure, 0]) and sure.any()
    cfg = sinks.Config(n_samples=2, batch_size=2, T=64, mlp_ablation=False)
    sa, sb = sinks.run(embedded, domain="prose", config=cfg), sinks.run(e16, domain="prose", config=cfg)
    _check({"sinks.alpha_mean": _maxabs(sb.alpha_mean, sa.alpha_mean)}, TOL_EMBEDDED)


# ----------------------------------------------------------------------------- measuring the tolerances
def measure(dtype=BF16, seeds=(0, 1, 2), families=tiny_models.FAMILIES) -> dict[str, float]:
    """Largest difference of every quantity over the families and seeds (the basis of :data:`TOL`)."""
    worst: dict[str, float] = {}

    def keep(m):
        for k, v in m.items():
            worst[k] = max(worst.get(k, 0.0), v)

    for seed in seeds:
        for fam in families:
            p32, plo = twins(fam, dtype, seed)
            keep(m_logit_lens(p32, plo))
            keep(m_sinks(p32, plo))
            if dtype is BF16 and fam not in ("gemma2", "olmo2"):  # routes need pre-LN blocks
                for kw in ({}, {"mode": "route"}, {"level": "neuron"}):
                    keep(m_routes(p32, plo, **kw))
        if dtype is BF16 and "llama" in families:
            p32, plo = twins("llama", dtype, seed)
            for f in (m_dormant, m_bigram, m_counterfactual, m_component):
                keep(f(p32, plo))
    return worst


if __name__ == "__main__":
    torch.set_num_threads(1)
    plain = tuple(f for f in tiny_models.FAMILIES if f not in QK_NORM)
    for dt in (BF16, FP16):
        for fams, extra in ((plain, {}), (QK_NORM, TOL_QK_NORM[dt])):
            bounds = (TOL if dt is BF16 else TOL16) | extra
            for k, v in sorted(measure(dt, families=fams).items()):
                print(f"{str(dt):15} {'/'.join(fams) if extra else 'others':12} {k:28} max {v:.3g}   "
                      f"bound {bounds.get(k, float('nan')):.3g}")
    sys.exit(0)
