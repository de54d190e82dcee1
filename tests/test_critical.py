"""Critical tokens (Lin et al. 2024): tasks, rollout search, contrastive estimation, CLI, page."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses import critical as C
from analyses.tasks import (CallableChecker, ExactChecker, NumericChecker, Problem, builtin_arith, extract_answer,
                            load_task, make_checker, read_gsm8k)
from probes import ConfigError, InputError
from docs_numbers import numbers
from peaks import measure, needs_proc

ROOT = Path(__file__).resolve().parents[1]

# Constructed task on a tiny random byte-level model: the response is correct unless it contains
# "Z", so forcing the wrong token "Z" (index 6) makes every continuation wrong, while continuations
# of earlier prefixes almost never emit "Z" (success ~1).
PROMPT = [1] + list(b"Q: 2+3=? A:")
RESP = list(b"ab cd Z ef gh")
NO_Z = CallableChecker(lambda t: "Z" not in t)
FAST = C.Config(n_rollouts=6, max_new_tokens=3, stop_at_answer=False, alternatives="topk", n_alternatives=2, alt_rollouts=2)


@pytest.fixture(scope="module")
def tiny_llama():
    import tiny_models

    return tiny_models.probe("llama")


# ------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("text,want", [
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("We get 12 then 15.\n#### 1,200", "1200"),
    ("so \\boxed{42} is it", "42"),
    ("The answer: $3.50 total", "3.50"),
    ("first 3 then 9", "9"),
    ("The answer is 3. Actually the answer is 5.", "3"),  # first marked answer (rollouts stop there)
    ("no digits here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_checkers_hand_cases():
    assert NumericChecker(7.0)("The answer is 7.")
    assert not NumericChecker(7.0)("The answer is 8.")
    assert NumericChecker(3.5, tol=0.01)("answer is 3.505")
    assert not NumericChecker(1.0)("nothing")
    assert ExactChecker("Paris")("The answer is paris".replace("paris", "12")) is False
    assert ExactChecker("12")("the answer is 12")
    assert ExactChecker("Paris", extract=False)("  paris ")
    assert CallableChecker(lambda t: "ok" in t)("ok!")
    assert make_checker(Problem("q", 5.0))("#### 5")
    with pytest.raises(InputError, match="not a number"):
        make_checker(Problem("q", "five"))


def test_builtin_tasks_seeded_and_exact():
    a, b = builtin_arith(5, seed=3), builtin_arith(5, seed=3)
    assert a == b and a != builtin_arith(5, seed=4)
    for p in a + builtin_arith(5, seed=1, kind="multistep"):
        nums = [int(x) for x in __import__("re").findall(r"\d+", p.question)]
        assert p.answer in {nums[0] + nums[1], nums[0] - nums[1], nums[0] * nums[1]} | (
            {nums[0] * nums[1] - nums[2]} if len(nums) > 2 else set())


def test_read_gsm8k_and_bad_lines(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n" +
                 json.dumps({"question": "big?", "answer": "#### 1,000"}) + "\n")
    ps = read_gsm8k(f)
    assert [p.answer for p in ps] == [2.0, 1000.0] and ps[1].line == 2
    assert load_task(str(f), 1)[0].question == "1+1?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(InputError, match="line 1 has no answer"):
        read_gsm8k(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "#### many"}) + "\n")
    with pytest.raises(InputError, match="line 1 has an answer the extractor cannot parse"):
        read_gsm8k(bad)
    with pytest.raises(InputError, match="neither a built-in task"):
        load_task("nonsense-task")


def test_math_style_and_auto_checker(tmp_path):
    from analyses.tasks import extract_boxed, make_checker

    f = tmp_path / "math.jsonl"
    f.write_text(json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n" +
                 json.dumps({"problem": "2+3?", "solution": "2+3=\\boxed{5}"}) + "\n" +
                 json.dumps({"problem": "no box", "solution": "it is 4"}) + "\n")
    with pytest.warns(UserWarning, match="line 3 has a solution without a"):
        ps = read_gsm8k(f, on_error="skip")
    assert [p.answer for p in ps] == ["\\frac{1}{2}", 5.0]
    assert extract_boxed("x \\boxed{a{b}c} y") == "a{b}c"
    frac, five = make_checker(ps[0], "auto"), make_checker(ps[1], "auto")
    assert frac("so the answer is $\\boxed{\\frac{1}{2}}$") and not frac("\\boxed{\\frac{1}{3}}")
    assert five("The answer is 5.") and not five("The answer is 6.")
    with pytest.raises(InputError, match="line 3 has a solution without"):
        read_gsm8k(f)


def test_hf_datasets_task(tmp_path, monkeypatch):
    """hf: specs go through `datasets` (a local dataset folder here; the hub is unreachable offline)."""
    pytest.importorskip("datasets")
    d = tmp_path / "gsm"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(5)))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ps = load_task(f"hf:{d}:test", 3)
    assert [p.answer for p in ps] == [1.0, 2.0, 3.0] and ps[0].source.startswith("hf:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot stream hf:no-such/dataset:main:test: offline"):
        load_task("hf:no-such/dataset:main:test", 2)


def test_vllm_engine_says_what_it_needs(tiny_llama):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present: the engine would start")
    with pytest.raises(ConfigError, match="engine='vllm' needs"):
        C.run(tiny_llama, builtin_arith(1), config=C.Config(engine="vllm", n_samples=1))


# ------------------------------------------------------------------------------ pure math
def test_pass_at_k_matches_brute_force():
    for n, c in [(5, 0), (5, 2), (6, 3), (4, 4)]:
        items = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subs = list(itertools.combinations(items, k))
            brute = sum(any(s) for s in subs) / len(subs)
            assert C.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_find_critical_released_rule():
    assert C.find_critical({0: .5, 3: .4, 5: 0., 8: 0.}) == 5
    assert C.find_critical({0: .5, 3: 0., 5: .2, 8: 0.}) == 8      # recovery (> 3/64) discards the first mark
    assert C.find_critical({0: .5, 3: 0., 5: 1 / 64, 8: 0.}) == 3  # 1/64 is not a recovery
    assert C.find_critical({0: .5, 8: .1}) is None                  # never hopeless
    assert C.find_critical({0: 0., 8: 0.}) is None                  # hopeless from the start


def test_ce_identical_models_give_plain_softmax():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 50, generator=g)
    y = torch.randint(0, 50, (7,), generator=g)
    s = C.ce_token_scores(z, z, y, beta=1.0)
    assert torch.all(s["log_ratio"] == 0)
    torch.testing.assert_close(s["p_ce"], torch.softmax(z, -1)[torch.arange(7), y])
    s2 = C.ce_token_scores(z, torch.randn(7, 50, generator=g), y)
    assert torch.all((s2["p_ce"] >= 0) & (s2["p_ce"] <= 1))
    torch.testing.assert_close(s2["weight"], 1 - s2["p_ce"])


def test_step_cuts():
    toks = ["Tom", " has", " 3", ".", " So", " 3", "+", "4", "=", "7", ".\n", "The", " answer"]
    assert C.step_cuts(toks) == [0, 4, 11, 13]


# ------------------------------------------------------------------------------ recovery decision (statistics)
def test_clopper_pearson_hand_values():
    lo, hi = C.clopper_pearson(8, 0, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 8), abs=1e-12)   # closed form for c = 0
    lo, hi = C.clopper_pearson(8, 8, 0.05)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 8), abs=1e-12)
    lo, hi = C.clopper_pearson(20, 5, 0.05)
    assert (lo, hi) == pytest.approx((0.0866, 0.4910), abs=1e-4)                 # tabulated exact interval
    assert all(math.isnan(x) for x in C.clopper_pearson(0, 0))


def test_one_of_eight_then_zero_of_eight_is_undecided_not_critical():
    t = C.Config().sprt()
    before, after = t.decide(8, 1), t.decide(8, 0)
    assert (before, after) == ("undecided", "undecided")
    assert C.token_decision(before, after, False) == "undecided"
    # a clear drop is critical, a later recovery or a dead "before" is not
    assert C.token_decision(t.decide(8, 8), t.decide(32, 0), False) == "critical"
    assert C.token_decision(t.decide(8, 8), t.decide(32, 0), True) == "not critical"
    assert C.token_decision(t.decide(32, 1), t.decide(32, 0), False) == "not critical"
    assert t.min_dead() == 13 and t.min_alive() == 2


def test_sprt_error_rates_on_simulated_bernoulli_streams():
    """Thousands of simulated prefixes: at p = p_dead the test calls "alive" at most ~alpha of the time,
    at p = p_alive it calls "dead" at most ~beta; between, it mostly decides within the budget."""
    t = C.SPRT(p_dead=3 / 64, p_alive=0.25, alpha=0.05, beta=0.05)
    sims = 4000
    se = math.sqrt(0.05 * 0.95 / sims)
    at_dead = C.simulate_sprt(t, t.p_dead, sims=sims, budget=200, seed=0)
    assert at_dead["alive"] <= t.alpha / (1 - t.beta) + 4 * se and at_dead["dead"] > 0.9
    at_alive = C.simulate_sprt(t, t.p_alive, sims=sims, budget=200, seed=1)
    assert at_alive["dead"] <= t.beta / (1 - t.alpha) + 4 * se and at_alive["alive"] > 0.9
    assert at_dead["mean_rollouts"] < 40 and at_alive["mean_rollouts"] < 40   # far fewer than a fixed 64
    # a truncated budget only adds "undecided", never errors beyond the bounds
    short = C.simulate_sprt(t, t.p_dead, sims=sims, budget=8, seed=2)
    assert short["alive"] <= at_dead["alive"] + 4 * se and short["undecided"] > 0.5
    # the simulation agrees with a direct loop over SPRT.run on the same draws
    import numpy as np

    x = np.random.default_rng(3).random((300, 60)) < 0.12
    runs = [t.run(list(row)) for row in x]
    sim = C.simulate_sprt(t, 0.12, sims=300, budget=60, seed=3)
    assert sim["alive"] == pytest.approx(sum(r[0] == "alive" for r in runs) / 300, abs=1e-12)
    assert sim["mean_rollouts"] == pytest.approx(sum(r[1] for r in runs) / 300, abs=1e-12)
    # the simulated test and SPRT.run agree on a stream
    stream = [False] * 12 + [True] + [False] * 30
    assert t.run(stream) == ("dead", 21, 1)  # 12 failures stop just short (-2.88 > -2.94); after the success, 8 more
    assert t.run(stream, budget=8) == ("undecided", 8, 0)


def test_search_reports_interval_decision_and_warning(tiny_llama):
    # 6 rollouts per prefix cannot call "all wrong" dead (needs 13): the candidate is undecided, with a warning
    r = C.search(tiny_llama, PROMPT, RESP, NO_Z, config=FAST.replace(granularity="token", alternatives="none"))
    t = r.traces.iloc[0]
    assert t.critical_pos == 6 and t.decision == "undecided" and "raise --rollouts" in t.warning
    assert t.ci_after_lo == 0 and t.ci_after_hi == pytest.approx(1 - 0.025 ** (1 / 6))
    assert r.warnings() and not r.tokens.critical.any() and r.tokens.candidate.sum() == 1
    assert r.top_critical_tokens().empty
    # a budget of 16, spent sequentially: every prefix stops once decided, and the drop is critical
    r = C.search(tiny_llama, PROMPT, RESP, NO_Z, config=FAST.replace(granularity="token", alternatives="none", n_rollouts=16, chunk=4))
    t = r.traces.iloc[0]
    assert t.decision == "critical" and t.warning == "" and not r.warnings()
    # each prefix stops at the rollout that decides it: 2 successes call "alive", 13 failures "dead" (of 16)
    assert t.n_after == C.Config().sprt().min_dead() == 13 and t.n_before == C.Config().sprt().min_alive() == 2
    pre = r.prefixes.set_index("prefix_len")
    assert (pre.loc[:6, "state"] == "alive").all() and (pre.loc[7:, "state"] == "dead").all()
    assert r.tokens.set_index("pos").decision[6] == "critical" and r.tokens.critical.sum() == 1
    assert r.top_critical_tokens().token.tolist() == ["Z"]


# ------------------------------------------------------------------------------ rollouts
def test_rollout_rate_equals_direct_monte_carlo(tiny_llama):
    """Shared-prefix-cache batched rollouts = each row sampled alone from the full sequence (no cache), from the same
    row stream: the cache, the batching and rows leaving the batch change nothing."""
    from probes.generation import draw, row_seed, warp

    cfg = C.Config(n_rollouts=16, max_new_tokens=4, stop_at_answer=False, batch_size=16, temperature=1.0)
    chk = lambda t: t.replace(" ", "")[-1:] < "\x80"  # noqa: E731 - continuation ends in an ASCII byte
    k = 5
    c, texts = C.rollout_success(tiny_llama, PROMPT, RESP, k, chk, 16, cfg, seed=11)
    m = tiny_llama.hf_model
    direct = []
    for r in range(16):
        u = torch.rand(4, generator=torch.Generator().manual_seed(row_seed(C._seed_for(11, k), r)))
        seq, new = PROMPT + RESP[:k], []
        for t in range(4):
            tok = int(draw(warp(m(input_ids=torch.tensor([seq])).logits[:, -1].float(), 1.0), u[t:t + 1])[0])
            new, seq = new + [tok], seq + [tok]
            if tok == 2:
                break
        direct.append(tiny_llama.tokenizer.decode(RESP[:k] + C._strip(new, {2}, 3), skip_special_tokens=True))
    assert texts == direct
    assert c == sum(chk(t) for t in direct)
    assert 0 < c < 16  # a non-trivial rate
    # other batch sizes and the no-cache engine give the same rollouts (a row's stream is its own)
    for kw in (dict(prefix_cache=False, batch_size=5), dict(batch_size=3)):
        assert C.rollout_success(tiny_llama, PROMPT, RESP, k, chk, 16, cfg.replace(**kw), seed=11) == (c, texts)


def _draw_margin(logits: torch.Tensor, u: float) -> float:
    """How far the uniform ``u`` lies from the nearest edge of the drawn token's interval of the cumulative
    distribution (probability units): a logit change of at most ``d`` moves each edge by at most ``e^(2d) - 1``."""
    from probes.generation import warp

    cdf = torch.softmax(warp(logits[None].float()).double(), -1)[0].cumsum(0)
    x = u * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64), right=True)[0])
    lo = float(cdf[i - 1]) if i > 0 else 0.0
    return min(x - lo, float(cdf[min(i, len(cdf) - 1)]) - x)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_prefixes_of_different_lengths_share_a_batch(family):
    """sample_many: rows of prefixes of different lengths (left-padded in one cache, masked, each row at its own
    positions) are the rows each prefix gives alone, compared draw by draw while the draw's margin exceeds what the
    padding's measured logit difference could move; one group's on_row stops that group only. gemma2's sliding
    layers cannot be padded: its groups run one per batch and equal the lone runs exactly."""
    import math

    import tiny_models
    from probes.generation import Rollouts, row_seed, sample, sample_many

    p = tiny_models.probe(family)
    m = p.hf_model
    prefs = [PROMPT[:4], PROMPT + RESP[:7], PROMPT[:9], PROMPT + RESP]
    N = 6
    alone = [sample(p, q, 3, max_new_tokens=N, seed=20 + g, eos=()) for g, q in enumerate(prefs)]
    stopped: list[int] = []
    groups = [Rollouts(q, 3, 20 + g, on_row=(lambda r, ids: stopped.append(r) or True) if g == 2 else None)
              for g, q in enumerate(prefs)]
    many = sample_many(p, groups, max_new_tokens=N, eos=(), batch_size=64, chunk=2)
    assert stopped == [0] and many[2][1:] == [None, None]  # group 2 stopped at its first row; its others never ran
    # the padding's numeric effect: last-position logits of the prefixes left-padded in one batch vs each alone
    S = max(len(q) for q in prefs)
    ids = torch.tensor([[0] * (S - len(q)) + q for q in prefs])
    mask = (torch.arange(S)[None] >= torch.tensor([S - len(q) for q in prefs])[:, None]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        lone = torch.stack([m(input_ids=torch.tensor([q])).logits[0, -1].float() for q in prefs])
    d = float((padded - lone).abs().max())
    tol = max(10 * (math.exp(2 * d) - 1), 1e-6)
    compared = 0
    for g, q in enumerate(prefs):
        for r in range(3):
            if many[g][r] is None:
                continue
            u = torch.rand(N, generator=torch.Generator().manual_seed(row_seed(20 + g, r)))
            seq = list(q)
            for t, tok in enumerate(alone[g][r]):
                with torch.no_grad():
                    logits = m(input_ids=torch.tensor([seq])).logits[0, -1]
                if not _draw_margin(logits, float(u[t])) > tol:
                    break
                assert many[g][r][t] == tok, (family, g, r, t)
                compared += 1
                seq.append(tok)
    assert compared >= 0.9 * (3 * 3 + 1) * N, compared  # nearly every draw was safely decided
    if family == "gemma2":
        assert many[:2] == alone[:2] and many[3] == alone[3]


def test_sampler_draws_each_token_with_its_probability():
    """Inverse-CDF draws: over a fine grid of uniforms each token takes a share equal to its probability (the
    transformers warpers decide the support)."""
    from probes.generation import draw, warp

    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, -30.0, float("-inf")]])
    p = torch.softmax(logits.double(), -1)[0]
    N = 200_000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    got = torch.bincount(draw(logits.expand(N, -1), u), minlength=6).double() / N
    torch.testing.assert_close(got, p, atol=1.5 / N, rtol=0)
    assert got[5] == 0
    # top-k keeps the k largest, top-p the smallest set reaching p (at least one token), as transformers does
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(warp(x, 0.7, top_k=5), TopKLogitsWarper(5)(None, x / 0.7))
    torch.testing.assert_close(warp(x, 1.0, top_p=0.8), TopPLogitsWarper(0.8)(None, x))


def test_sequential_stop_gives_the_full_budget_decision(tiny_llama):
    """Stopping a prefix early counts exactly the rows the sequential rule reads: the first n outcomes of a
    full-budget run, and the decision SPRT.run takes on that run."""
    chk = lambda t: t.replace(" ", "")[-1:] < "\x80"  # noqa: E731
    cfg = C.Config(n_rollouts=24, max_new_tokens=3, stop_at_answer=False, chunk=5, p_alive=0.5, recover_frac=0.2)
    test = cfg.sprt()
    seen = set()
    for k, grade in [(0, NO_Z), (len(RESP), NO_Z), (3, chk), (5, chk), (9, chk)]:
        full, ftexts = C.sequential_rollouts(tiny_llama, PROMPT, RESP, k, grade, cfg.replace(sequential=False), seed=4)
        seq, stexts = C.sequential_rollouts(tiny_llama, PROMPT, RESP, k, grade, cfg, seed=4)
        assert len(full) == 24 and seq == full[:len(seq)] and stexts == ftexts[:len(seq)]
        d, n, c = test.run(full)
        assert (len(seq), sum(seq)) == (n, c) and test.decide(n, c) == d
        seen.add(d)
    assert {"alive", "dead"} <= seen  # both early decisions were exercised


@pytest.mark.parametrize("granularity", ["token", "bisect"])
def test_forced_token_is_found(tiny_llama, granularity):
    r = C.search(tiny_llama, PROMPT, RESP, NO_Z, config=FAST.replace(granularity=granularity))
    t = r.traces.iloc[0]
    assert t.critical_pos == 6 and t.critical_token == "Z" and t.exact
    assert t.score_before == 1.0 and t.score_after == 0.0 and t["drop"] == 1.0
    # method-page check (1): the full response scores 0, the critical prefix scores 0 < score(i-1)
    curve = r.curve(0).set_index("prefix_len").score
    assert curve[len(RESP)] == 0 and curve[7] == 0 < curve[6]
    # the counterfactual: replacing "Z" restores success
    assert (r.alternatives.token_id != ord("Z")).all() and r.traces.alt_success[0] == 1.0
    pk = r.pass_at_k
    assert (pk.with_token == 0).all() and (pk.dropna().without_token == 1).all()
    if granularity == "bisect":
        assert r.traces.n_prefixes[0] <= 2 + math.ceil(math.log2(len(RESP)))
    assert r.top_critical_tokens(decided_only=False).token.tolist() == ["Z"]


def test_reproducible_and_save_load(tiny_llama, tmp_path):
    cfg = FAST.replace(granularity="token", alternatives="sample", n_alternatives=4, alt_rollouts=1, seed=5)
    chk = lambda t: t.replace(" ", "")[-1:] < "\x80"  # noqa: E731
    a = C.search(tiny_llama, PROMPT, RESP[:4], chk, config=cfg)
    b = C.search(tiny_llama, PROMPT, RESP[:4], chk, config=cfg)
    pd.testing.assert_frame_equal(a.prefixes, b.prefixes)
    pd.testing.assert_frame_equal(a.alternatives, b.alternatives)
    p = a.save(tmp_path / "r")
    back = C.CriticalResult.load(p)
    pd.testing.assert_frame_equal(back.prefixes.reset_index(drop=True), a.prefixes, check_dtype=False)
    assert back.ids["response"] == [RESP[:4]]
    assert {"model", "trace", "pos", "token", "value"} <= set(a.to_frame().columns)
    assert a.plot().data


def test_budget_message(tiny_llama):
    with pytest.raises(ConfigError, match="granularity='step'.*'bisect'"):
        C.search(tiny_llama, PROMPT, RESP, NO_Z, config=FAST.replace(granularity="token", n_rollouts=64, max_rollouts=100))


def test_all_correct_says_nothing_to_analyse(tiny_llama):
    cfg = C.Config(n_samples=3, max_new_tokens=2, stop_at_answer=False)
    with pytest.raises(InputError, match="nothing to analyse"):
        C.run(tiny_llama, [Problem("2+3?", 5.0)], config=cfg, checkers=[lambda t: True])


def test_run_samples_and_searches(tiny_llama):
    cfg = FAST.replace(n_samples=3, granularity="bisect", alternatives="none")
    # grade: wrong iff the sample contains a byte >= 128 (the random model emits many)
    r = C.run(tiny_llama, [Problem("2+3?", 5.0)], config=cfg, checkers=[lambda t: all(ord(ch) < 128 for ch in t)])
    assert len(r.trajectories) == 3 and (~r.trajectories.correct).any()
    assert len(r.traces) == 1 and r.traces.problem[0] == 0


@pytest.mark.parametrize("kw,match", [
    (dict(n_rollouts=0), "n_rollouts=0"), (dict(granularity="word"), "granularity='word'"),
    (dict(temperature=0.0), "temperature=0.0"), (dict(alternatives="all"), "alternatives='all'"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        C.Config(**kw)


def test_search_empty_response(tiny_llama):
    with pytest.raises(InputError, match="response is empty"):
        C.search(tiny_llama, PROMPT, "  ", NO_Z)


# ------------------------------------------------------------------------------ contrastive estimation
def test_identical_adapters_give_zero_scores(tiny_llama, tmp_path):
    data = [(PROMPT, RESP)]
    out = C.train_contrastive(tiny_llama, data, data, tmp_path / "ad", C.TrainConfig(r=2, seed=0))
    assert (out / "pos" / "adapter_config.json").is_file() and (out / "neg" / "adapter_config.json").is_file()
    ce = C.contrastive_scores(tiny_llama, out, PROMPT, RESP)
    assert len(ce) == len(RESP) and (ce.log_ratio == 0).all()
    base = torch.softmax(tiny_llama.forward(torch.tensor([PROMPT + RESP]))[0, len(PROMPT) - 1:-1].float(), -1)
    trained = ce.p_ce.to_numpy()
    assert not torch.allclose(torch.tensor(trained), base[torch.arange(len(RESP)), torch.tensor(RESP)], atol=1e-6)  # adapters trained
    # the probe's own model is untouched by LoRA training
    assert not any("lora" in n for n, _ in tiny_llama.hf_model.named_modules())
    # different data -> non-zero scores, compared with the rollout ground truth
    out2 = C.train_contrastive(tiny_llama, data, [(PROMPT, list(b"ab cd Z Z Z"))], tmp_path / "ad2", C.TrainConfig(r=2, lr=1e-2))
    ce2 = C.contrastive_scores(tiny_llama, out2, PROMPT, RESP)
    assert (ce2.log_ratio != 0).any()
    r = C.search(tiny_llama, PROMPT, RESP, NO_Z, config=FAST.replace(granularity="token", alternatives="none"))
    cmp = C.compare_contrastive(r, ce2, k=1)
    assert cmp["n"] == len(RESP) and -1 <= cmp["spearman"] <= 1 and cmp["precision_at_k"] in (0.0, 1.0)
    with pytest.raises(InputError, match="not a LoRA adapter folder"):
        C.contrastive_scores(tiny_llama, tmp_path, PROMPT, RESP)
    with pytest.raises(InputError, match="needs correct and incorrect"):
        C.train_contrastive(tiny_llama, data, [], tmp_path / "x")


# ------------------------------------------------------------------------------ embedded model
def test_embedded_wrong_digit(embedded):
    """Real model: in '3 + 4 = 8.' the forced wrong digit '8' is the critical token (the model writes 7 otherwise)."""
    from analyses.tasks import format_prompt

    p = Problem("Tom has 3 apples and buys 4 more. How many apples does he have?", 7.0)
    cfg = C.Config(n_rollouts=2, max_new_tokens=2, granularity="token", alternatives="none", seed=0)
    r = C.search(embedded, format_prompt(embedded, p), "3 + 4 = 8.", make_checker(p), config=cfg)
    t = r.traces.iloc[0]
    curve = r.curve(0).set_index("prefix_len").score
    assert curve.iloc[-1] == 0.0
    assert t.critical_token.strip() == "8" and t.score_before > 0 and t.score_after == 0


def test_readme_figures_are_todays(embedded):
    """Every figure the README's critical-token section states comes from today's code."""
    text = " ".join((ROOT / "docs" / "readme" / "critical.md").read_text().split())
    figs = numbers().critical_figures(C.doc_example(embedded))
    for name, value in figs.items():
        assert value in text, (name, value)


# ------------------------------------------------------------------------------ CLI and page
def test_cli_bad_input_and_budget(tmp_path, capsys):
    from analyses.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["run", "critical", "--task", str(bad)])
    assert e.value.code == 2 and "line 1 has no answer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "critical", "--granularity", "words"])
    assert e.value.code == 2 and "granularity='words'" in capsys.readouterr().err


def test_cli_runs(tmp_path, results_dir, capsys):
    from analyses.cli import main

    main(["run", "critical", "--device", "cpu", "--samples", "2", "--rollouts", "1", "--max-new-tokens", "8",
          "--granularity", "bisect", "--alternatives", "none", "--temperature", "1.0", "--out", str(tmp_path / "res"), "--json"])
    out = json.loads(capsys.readouterr().out)
    r = C.CriticalResult.load(out["result"])
    assert len(r.traces) == 1 and len(r.trajectories) == 2


def test_dashboard_page_smoke(run_page):
    at = run_page("critical.py", timeout=180)
    assert not at.exception, at.exception
    assert any("Critical" in t.value for t in at.title)
    assert len(at.get("plotly_chart")) >= 1


# ------------------------------------------------------------------------------ cDPO
def test_cdpo_loss_matches_hand_computation():
    pc = torch.tensor([[-1.0, -2.0, -0.5]])
    rc = torch.tensor([[-1.5, -2.0, -1.0]])
    pr = torch.tensor([[-3.0, -1.0]])
    rr = torch.tensor([[-2.0, -1.5]])
    w = torch.tensor([[0.9, 0.2]])
    # sequence form by hand: chosen margin (0.5 + 0 + 0.5) = 1.0; rejected 0.9·(−1) + 0.2·(0.5) = −0.8
    want = math.log1p(math.exp(-0.1 * (1.0 - (-0.8))))
    got = C.cdpo_loss(pc, pr, rc, rr, w, beta=0.1)
    assert float(got) == pytest.approx(want, abs=1e-7)
    # position-wise form (released trainer): pad to 3, d = [0.5 − (−0.9), 0 − 0.1, 0.5 − 0], mean of −log σ(β d)
    d = [1.4, -0.1, 0.5]
    want_pw = sum(math.log1p(math.exp(-0.1 * x)) for x in d) / 3
    assert float(C.cdpo_loss(pc, pr, rc, rr, w, beta=0.1, form="positionwise")) == pytest.approx(want_pw, abs=1e-7)
    # padding: a masked-out rejected token changes nothing
    pr2, rr2, w2 = torch.cat([pr, torch.tensor([[-9.0]])], 1), torch.cat([rr, torch.tensor([[-1.0]])], 1), torch.cat([w, torch.tensor([[1.0]])], 1)
    m2 = torch.tensor([[1.0, 1.0, 0.0]])
    assert float(C.cdpo_loss(pc, pr2, rc, rr2, w2, rejected_mask=m2, beta=0.1)) == pytest.approx(want, abs=1e-7)


def test_cdpo_with_unit_weights_is_dpo():
    g = torch.Generator().manual_seed(0)
    pc, rc, pr, rr = (torch.randn(4, 7, generator=g) - 2 for _ in range(4))
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc).sum(1) - (pr - rr).sum(1))).mean()
    torch.testing.assert_close(C.cdpo_loss(pc, pr, rc, rr, torch.ones(4, 7), beta=0.1), dpo, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="form='tokens'"):
        C.cdpo_loss(pc, pr, rc, rr, torch.ones(4, 7), form="tokens")


def test_select_pairs_and_sft_follow_the_method_page():
    T = C.Trajectory
    trajs = [T(0, 0, (1,), "a", "7", True), T(0, 1, (2,), "b", "8", False), T(0, 2, (3,), "c", "7", True),
             T(0, 3, (4,), "d", "9", False), T(0, 4, (5,), "e", "8", False), T(0, 5, (6,), "f", "6", False),
             T(1, 0, (7,), "g", "1", True)]
    pairs = C.select_pairs(trajs)
    assert [(c.sample, r.sample) for c, r in pairs] == [(0, 1)]   # problem 1 has no wrong answer
    pos, neg = C.select_sft(trajs)
    assert [(t.problem, t.sample) for t in pos] == [(0, 0), (1, 0)]
    assert [t.sample for t in neg] == [1, 4]                       # answer "8" covers 2 of 4 wrong samples (half)


def test_cdpo_training_lowers_the_loss_and_saves_safetensors(tiny_llama, tmp_path):
    chosen, rejected = list(b" ab cd"), list(b" Zq rs")
    w = [1.0, 0.2, 0.2, 0.2, 0.2, 0.2]
    pairs = [dict(prompt_ids=PROMPT, chosen_ids=chosen, rejected_ids=rejected, weights=w)]
    cfg = C.CDPOConfig(r=4, alpha=8, lr=2e-3, epochs=12, warmup=0.0, beta=0.5, seed=0)
    res = C.train_cdpo(tiny_llama, pairs, tmp_path / "pol", cfg)
    losses = res["losses"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)        # LoRA starts at zero: policy = reference
    assert losses[-1] < losses[0] - 0.05, losses
    files = {p.name for p in res["path"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "cdpo.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pickle")) for f in files)
    meta = json.loads((res["path"] / "cdpo.json").read_text())
    assert meta["losses"] == losses and meta["n_pairs"] == 1
    # the probe's own model is untouched
    assert not any("lora" in n for n, _ in tiny_llama.hf_model.named_parameters())
    with pytest.raises(InputError, match="not empty"):
        C.train_cdpo(tiny_llama, pairs, tmp_path / "pol", cfg)
    with pytest.raises(InputError, match="one weight per rejected token"):
        C.train_cdpo(tiny_llama, [dict(pairs[0], weights=[1.0])], tmp_path / "pol2", cfg)


def test_cdpo_cli_bad_input(tmp_path, capsys):
    from analyses.cli import main

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    for args, msg in ((["--out", str(tmp_path / "busy")], "non-empty folder"), (["--out", str(tmp_path / "n"), "--form", "tokens"], "form='tokens'"),
                      (["--out", str(tmp_path / "n"), "--lr", "0"], "lr=0.0")):
        with pytest.raises(SystemExit) as e:
            main(["run", "cdpo", *args])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x" and not (tmp_path / "n").exists()


# ------------------------------------------------------------------------------ memory plan
_PEAK = r"""
for B in (8, 32):
    ids = torch.randint(10, 30000, (320 + 32,)).tolist()  # a 320-token prompt and a 32-token response prefix
    out[f"critical {B}x320"] = peak(lambda: probe.sample(ids, B, max_new_tokens=32, eos=(), batch_size=B))
"""


@needs_proc
def test_memory_estimate_is_within_25_percent_of_the_measured_peak():
    """The planner's critical model against the rollout engine's measured peak resident memory (tests/peaks.py) at
    8 and 32 rows: 320-token prompts, a 32-token response prefix and 32-token rollouts (EOS off, so every row runs
    to its end). The batch's KV cache dominates (141 MiB and 566 MiB)."""
    from analyses.core import planner

    measured = measure(_PEAK, threads=2, timeout=900)
    shape = planner.shape_of("embedded")
    ratios = {k: planner.estimate("critical", shape, seq_len=320, batch_size=int(k.split()[1].split("x")[0]),
                                  new_tokens=32).activations / v for k, v in measured.items()}
    assert all(0.75 <= r <= 1.25 for r in ratios.values()), (ratios, measured)
