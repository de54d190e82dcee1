"""Content keys of the results the dashboard shows, known before anything is computed.

A result's key (``Result.key`` = :func:`analyses.core.store.result_key` of the analysis name, model fingerprint,
config and input hash) is what the CLI, notebooks and the dashboard share in the results store. Pages look a result
up by its key before computing it, so each function here builds the input hash exactly as its analysis does (from
the same tokens, texts, edits and matrices, through the analysis's own tokenizing helpers); tests check each one
against the key of a result computed with the Python API.
"""

from __future__ import annotations

from typing import Any, Sequence

from analyses.core.store import hash_inputs
from probes import Probe

from dashboard.state import content_key

__all__ = ["logit_lens", "routes", "sinks", "dormant", "counterfactual", "bias_sweep", "fiber", "critical_search", "critical_run", "bigram"]


def _cls(module: str, name: str) -> str:
    """The analysis name a result class writes into its key."""
    import importlib

    return getattr(importlib.import_module(f"analyses.{module}"), name).analysis


def logit_lens(probe: Probe, prompt: str, config) -> str:
    """Key of ``analyses.logit_lens.run(probe, prompt, config=config)``."""
    tokens = probe.to_tokens(prompt, prepend_bos=config.prepend_bos)
    return content_key(_cls("logit_lens", "LogitLensResult"), probe, config, hash_inputs(tokens[0].cpu()))


def routes(probe: Probe, ids: Sequence[int], config, edits: Sequence = ()) -> str:
    """Key of ``analyses.routes.run(probe, ids, config=config, edits=edits)`` (the edits are part of the input)."""
    import torch

    from analyses.routes import describe_edit

    tokens = torch.tensor([list(ids)], dtype=torch.long)
    described = tuple(describe_edit(e) for e in edits)
    return content_key(_cls("routes", "RoutesResult"), probe, config, hash_inputs(tokens, *described) if described else hash_inputs(tokens))


def sinks(probe: Probe, domain: str, config) -> str:
    """Key of ``analyses.sinks.run(probe, domain=domain, config=config)`` (the domain's sampled tokens)."""
    from analyses import sinks as S

    toks = S._tokens_for(probe, config, None, None, domain)[0]
    return content_key(_cls("sinks", "SinksResult"), probe, config, hash_inputs(toks))


def dormant(probe: Probe, domains: Sequence[str], config) -> str:
    """Key of ``analyses.dormant.run(probe, domains, config=config)``."""
    from analyses.core import domains as D
    from analyses.sinks import bos_flag

    batches = D.resolve(probe, tuple(domains), n=config.n_samples, T=config.T, seed=config.seed, prepend_bos=bos_flag(config.bos))
    return content_key(_cls("dormant", "DormantResult"), probe, config, hash_inputs([b.tokens for b in batches], [b.name for b in batches]))


def counterfactual(probe: Probe, prompt: str, intervention: Any, config, observed: str | None = None) -> str:
    """Key of ``analyses.counterfactual.run(probe, prompt, intervention, config=config, observed=observed)``."""
    from analyses import counterfactual as cf

    iv = cf.parse_intervention(intervention, probe)
    fp = probe.info.to_dict()["fingerprint"]
    return content_key(_cls("counterfactual", "CounterfactualResult"), probe, config,
                       hash_inputs("counterfactual", fp, {"iv": iv.label()}, prompt + "\x00" + str(observed or "")))


def bias_sweep(probe: Probe, config) -> str:
    """Key of ``analyses.counterfactual.bias_sweep(probe, config)``."""
    fp = probe.info.to_dict()["fingerprint"]
    return content_key(_cls("counterfactual", "BiasSweepResult"), probe, config,
                       hash_inputs("counterfactual.bias", fp, config.to_dict(), ""))


def fiber(probe: Probe, config) -> str:
    """Key of ``analyses.fiber.run(probe, config=config)`` on the model's own matrix (``matrix="input"|"output"``)."""
    import torch

    source = {"input": "input (W_E)", "output": "output (W_U.T)"}[config.matrix]
    q = torch.arange(probe.info.d_vocab) if config.tokens is None else torch.tensor(config.tokens, dtype=torch.long)
    return content_key(_cls("fiber", "FiberResult"), probe, config, hash_inputs(source, q))


def critical_search(probe: Probe, prompt: str, response: str, config, reference: str = "") -> str:
    """Key of ``analyses.critical.search(probe, prompt, response, checker, config, reference=reference)``."""
    p_ids = probe.to_tokens(prompt)[0].tolist()
    r_ids = probe.tokenizer(response, add_special_tokens=False).input_ids
    ih = hash_inputs(p_ids, r_ids, reference) if reference else hash_inputs(p_ids, r_ids)
    return content_key(_cls("critical", "CriticalResult"), probe, config, ih)


def critical_run(probe: Probe, problems: Sequence, config) -> str:
    """Key of ``analyses.critical.run(probe, problems, config)``."""
    return content_key(_cls("critical", "CriticalResult"), probe, config,
                       hash_inputs([(p.question, str(p.answer)) for p in problems]))


def bigram(probe: Probe, corpus: str, config) -> str:
    """Key of ``analyses.bigram.run(probe, corpus, config)``."""
    from analyses import bigram as B

    return content_key(_cls("bigram", "BigramResult"), probe, config, hash_inputs(B._corpus_label(corpus), B.load_corpus_ids(probe, corpus)))
