"""Each analysis knows its result's content key before computing it: ``module.result_key(...)`` (and
``counterfactual.bias_sweep_key``, ``critical.search_key``) equals the key of the result ``run`` returns, for the
inputs each entry point accepts (text, ids, edits, domains, files, arrays). The dashboard finds saved results by
these keys, so a mismatch would make it silently recompute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tiny_models


@pytest.fixture(scope="module")
def llama(one_thread):
    return tiny_models.probe("llama")


def test_logit_lens(llama):
    from analyses import logit_lens as m

    cfg = m.Config(k=2, layers=(1,))
    for prompt in ("abc de", [1, 70, 71, 72], torch.tensor([[1, 70, 71]])):
        assert m.result_key(llama, prompt, config=cfg) == m.run(llama, prompt, config=cfg).key
    assert m.result_key(llama, "abc", config=cfg) != m.result_key(llama, "abc", config=cfg.replace(k=3))


def test_routes(llama):
    from analyses import routes as m
    from probes import Ablate

    cfg = m.Config(level="head")
    edits = [Ablate("blocks.1.attn.hook_z", heads=[1])]
    for prompt, e in (("abc d", ()), ([1, 70, 71, 72], ()), ("abc d", edits)):
        assert m.result_key(llama, prompt, config=cfg, edits=e) == m.run(llama, prompt, config=cfg, edits=e).key
    assert m.result_key(llama, "abc d", config=cfg) != m.result_key(llama, "abc d", config=cfg, edits=edits)


def test_sinks(llama):
    from analyses import sinks as m

    cfg = m.Config(T=8, n_samples=2, batch_size=2, mlp_ablation=False)
    for kw in ({"domain": "prose"}, {}, {"tokens": torch.full((2, 8), 70)}):
        assert m.result_key(llama, config=cfg, **kw) == m.run(llama, config=cfg, **kw).key
    texts = ["x" * 12, "y" * 20]
    assert m.result_key(llama, texts, config=cfg) == m.run(llama, texts, config=cfg).key


def test_dormant(llama):
    from analyses import dormant as m

    cfg = m.Config(T=8, n_samples=2, batch_size=2, max_heads=0, intervention="none")
    for domains in (("prose", "code"), {"mine": ["a" * 12, "b" * 12]}):
        assert m.result_key(llama, domains, config=cfg) == m.run(llama, domains, config=cfg).key


def test_counterfactual_and_bias_sweep(llama):
    from analyses import counterfactual as m

    cfg = m.Config(max_new_tokens=2, n_samples=1, seed=1)
    for iv, observed in (("none", None), ("token:1=id:100", None), ("none", "xy")):
        assert (m.result_key(llama, "hello there", iv, config=cfg, observed=observed)
                == m.run(llama, "hello there", iv, config=cfg, observed=observed).key)
    bcfg = m.BiasConfig(n_samples=2, max_new_tokens=1, n_boot=100)
    assert m.bias_sweep_key(llama, config=bcfg) == m.bias_sweep(llama, config=bcfg).key


def test_fiber(llama, tmp_path):
    from analyses import fiber as m

    small = dict(vol_min=10, vol_max=60, keep_curves="none")
    for cfg in (m.Config(matrix="input", tokens=(0, 5, 9), **small), m.Config(matrix="output", tokens=(3,), **small)):
        assert m.result_key(llama, config=cfg) == m.run(llama, config=cfg).key
    X = np.random.default_rng(0).standard_normal((120, 6)).astype(np.float32)
    for cfg in (m.Config(tokens=(0, 1), **small), m.Config(tokens=(0, 1), mode="parity", **small)):
        assert m.result_key(embeddings=X, config=cfg) == m.run(embeddings=X, config=cfg).key
    np.save(tmp_path / "e.npy", X)
    cfg = m.Config(matrix=str(tmp_path / "e.npy"), tokens=(2,), **small)
    for probe in (None, llama):  # with a probe, the file's matrix enters the model fingerprint
        assert m.result_key(probe, config=cfg) == m.run(probe, config=cfg).key


def test_critical_search_and_run(llama):
    from analyses import critical as m
    from analyses.tasks import Problem, builtin_arith

    cfg = m.Config(n_rollouts=2, max_new_tokens=2, stop_at_answer=False, granularity="token", alternatives="none")
    prompt, resp = [1] + list(b"Q: 2+3=? A:"), list(b"ab Z")
    no_z = lambda t: "Z" not in t  # noqa: E731
    for p, r, ref in ((prompt, resp, ""), (prompt, resp, "5"), ("Q: 2+3=? A:", "ab Z", "")):
        assert m.search_key(llama, p, r, config=cfg, reference=ref) == m.search(llama, p, r, no_z, config=cfg, reference=ref).key
    rcfg = cfg.replace(n_samples=1, max_new_tokens=3)
    problems = [Problem("What is 2 + 3?", "5")]
    assert m.result_key(llama, problems, config=rcfg) == m.run(llama, problems, config=rcfg, checkers=[lambda t: False]).key
    assert m.result_key(llama, None, config=rcfg) == m.result_key(llama, builtin_arith(1, seed=rcfg.seed), config=rcfg)


def test_bigram(llama):
    from analyses import bigram as m

    cfg = m.Config(lam=math.inf, seq_len=16, eval_rows=4)
    ids = torch.randint(4, 200, (16 * 12,), generator=torch.Generator().manual_seed(0))
    for corpus in (ids, ids.tolist()):
        assert m.result_key(llama, corpus, config=cfg) == m.run(llama, corpus, config=cfg, evaluate=False).key


def test_result_key_is_the_stored_key(llama, results_dir):
    """The key a saved result is filed under (its manifest and folder) is the one computed before the run."""
    from analyses import logit_lens as m
    from analyses.core import store

    key = m.result_key(llama, "abc", config=m.Config(k=2))
    folder = m.run(llama, "abc", config=m.Config(k=2)).save()
    assert folder.name == key and store.find_result(key, results_dir) == folder
