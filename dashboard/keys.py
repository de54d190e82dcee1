"""Content keys of the results the dashboard shows, known before anything is computed.

A result's key (``Result.key``: the analysis name, model fingerprint, config and input hash) is what the CLI,
notebooks and the dashboard share in the results store. Pages look a result up by its key before computing it.
Each analysis computes its own key (``analyses.<method>.result_key`` and friends, which build the input hash with
the very function their ``run`` uses); the functions here only keep the pages' call shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

from probes import Probe

__all__ = ["logit_lens", "routes", "sinks", "dormant", "counterfactual", "bias_sweep", "fiber", "critical_search", "critical_run", "bigram"]


def logit_lens(probe: Probe, prompt: str, config) -> str:
    """Key of ``analyses.logit_lens.run(probe, prompt, config=config)``."""
    from analyses import logit_lens as m

    return m.result_key(probe, prompt, config=config)


def routes(probe: Probe, ids: Sequence[int], config, edits: Sequence = ()) -> str:
    """Key of ``analyses.routes.run(probe, ids, config=config, edits=edits)`` (the edits are part of the input)."""
    import torch

    from analyses import routes as m

    return m.result_key(probe, torch.tensor(list(ids), dtype=torch.long), config=config, edits=edits)


def sinks(probe: Probe, domain: str, config) -> str:
    """Key of ``analyses.sinks.run(probe, domain=domain, config=config)`` (the domain's sampled tokens)."""
    from analyses import sinks as m

    return m.result_key(probe, domain=domain, config=config)


def dormant(probe: Probe, domains: Sequence[str], config) -> str:
    """Key of ``analyses.dormant.run(probe, domains, config=config)``."""
    from analyses import dormant as m

    return m.result_key(probe, tuple(domains), config=config)


def counterfactual(probe: Probe, prompt: str, intervention: Any, config, observed: str | None = None) -> str:
    """Key of ``analyses.counterfactual.run(probe, prompt, intervention, config=config, observed=observed)``."""
    from analyses import counterfactual as m

    return m.result_key(probe, prompt, intervention, config=config, observed=observed)


def bias_sweep(probe: Probe, config) -> str:
    """Key of ``analyses.counterfactual.bias_sweep(probe, config)``."""
    from analyses import counterfactual as m

    return m.bias_sweep_key(probe, config)


def fiber(probe: Probe, config) -> str:
    """Key of ``analyses.fiber.run(probe, config=config)``."""
    from analyses import fiber as m

    return m.result_key(probe, config=config)


def critical_search(probe: Probe, prompt: str, response: str, config, reference: str = "") -> str:
    """Key of ``analyses.critical.search(probe, prompt, response, checker, config, reference=reference)``."""
    from analyses import critical as m

    return m.search_key(probe, prompt, response, config, reference=reference)


def critical_run(probe: Probe, problems: Sequence, config) -> str:
    """Key of ``analyses.critical.run(probe, problems, config)``."""
    from analyses import critical as m

    return m.result_key(probe, problems, config)


def bigram(probe: Probe, corpus: str, config) -> str:
    """Key of ``analyses.bigram.run(probe, corpus, config)``."""
    from analyses import bigram as m

    return m.result_key(probe, corpus, config)
