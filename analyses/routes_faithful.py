"""Is a route faithful? Ablation checks of the route to a prediction.

The route's components are the heads with a part on one of its attention edges (head importance > 0) and
the FFNs whose node ``M{l}_t`` it contains, each taken as a whole (every position). For the prediction's
target token (the model's own top token at ``config.position`` unless given) it reports p(target):

* ``clean``: no ablation;
* ``off_route``: every head and FFN *not* in the route ablated (a faithful route keeps p(target));
* ``route``: only the route's components ablated (a faithful route's removal collapses p(target));
* ``random_keep`` / ``random``: the same two checks for random component sets of the route's size (as many
  heads and as many FFNs, drawn uniformly with a fixed seed), one row per draw; their median and spread
  are the baseline the route is compared with.

Each check runs under zero ablation (heads' ``hook_z`` and ``hook_mlp_out`` set to 0) and mean ablation (set
to their mean over a reference corpus, per layer and head, averaged over positions); the result names the
corpus (default the built-in ``prose`` domain of :mod:`analyses.core.domains`).

Example::

    f = routes.faithfulness(probe, "The Eiffel Tower is in the city of", n_random=10)
    f.summary()          # one row per ablation mode
    f.frame              # one row per forward pass
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from probes.edits import Ablate
from probes.errors import ConfigError
from probes.labels import head_label
from probes.sites import Site

__all__ = ["Faithfulness", "faithfulness", "route_components", "reference_means"]

KINDS = ("clean", "off_route", "route", "random_keep", "random")


@dataclass(frozen=True)
class Faithfulness:
    """Ablation checks of one route (see the module docstring).

    Attributes:
        frame: one row per forward pass: ``ablation`` (none|zero|mean), ``kind`` (clean|off_route|route|random_keep|
            random), ``seed`` (random draws; <NA> otherwise), ``n_heads`` and ``n_ffns`` ablated, ``p_target``.
        heads: the route's heads (``L1H0``); ffns: the layers of its FFNs.
        reference: the corpus the means come from.
    """

    frame: pd.DataFrame
    target: int
    target_token: str
    position: int
    p_clean: float
    heads: tuple[str, ...]
    ffns: tuple[int, ...]
    n_heads_total: int
    n_ffns_total: int
    reference: str
    tau: float
    seed: int

    def summary(self) -> pd.DataFrame:
        """One row per ablation mode: p_clean, p_off_route, p_route, and the random draws' median and
        spread (interquartile range) for ``random_keep`` and ``random``."""
        rows = []
        for ab in ("zero", "mean"):
            f = self.frame[self.frame.ablation == ab]
            if f.empty:
                continue
            row: dict[str, Any] = {"ablation": ab, "p_clean": self.p_clean}
            for k in ("off_route", "route"):
                row[f"p_{k}"] = float(f[f.kind == k].p_target.iloc[0])
            for k in ("random_keep", "random"):
                v = f[f.kind == k].p_target.to_numpy()
                q1, med, q3 = (np.quantile(v, [0.25, 0.5, 0.75]) if v.size else (np.nan,) * 3)
                row[f"p_{k}_median"], row[f"p_{k}_iqr"] = float(med), float(q3 - q1)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the target, the route's components, the reference corpus and the summary rows."""
        return {"target": self.target, "target_token": self.target_token, "position": self.position,
                "p_clean": self.p_clean, "heads": list(self.heads), "ffns": list(self.ffns),
                "n_heads_total": self.n_heads_total, "n_ffns_total": self.n_ffns_total, "reference": self.reference,
                "tau": self.tau, "seed": self.seed, "n_random": int((self.frame.kind == "random").sum() // 2),
                "summary": self.summary().to_dict("records")}


def route_components(result, position: int | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """The heads ``[(layer, head)]`` and FFN layers of the route of ``result`` (a :class:`RoutesResult`)."""
    r = result.route(position)
    hi = result.head_importance(route=r)
    heads = [(int(l), int(h)) for l, h in torch.nonzero(hi > 0).tolist()]
    ffns = sorted({int(n[1:].split("_")[0]) for n in r.nodes if n.startswith("M")})
    return heads, ffns


@torch.no_grad()
def reference_means(probe, reference: str = "prose", *, n: int = 16, T: int = 32, seed: int = 0,
                    prepend_bos: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """Mean of every head's ``hook_z`` ``[H, h]`` and every ``hook_mlp_out`` ``[d]`` per layer over a reference
    corpus (a domain of :mod:`analyses.core.domains`, ``n`` texts of ``T`` tokens); returns (z means, mlp means,
    description of the corpus)."""
    from .core.domains import domain_tokens

    batch = domain_tokens(probe, reference, n=n, T=T, seed=seed, prepend_bos=prepend_bos)
    toks = batch.tokens
    if toks.shape[0] == 0:
        raise ConfigError(f"the reference corpus {reference!r} has no text of {T} tokens.",
                          hint="Use another reference domain or fewer reference tokens.")
    L = probe.info.n_layers
    sums: dict[str, torch.Tensor] = {}

    def add(name):
        return lambda x: sums.__setitem__(name, sums.get(name, 0) + x.double().sum((0, 1)).cpu())

    reads = {}
    for l in range(L):
        reads[Site("z", l).name] = add(f"z{l}")
        reads[Site("mlp_out", l).name] = add(f"m{l}")
    for i in range(0, toks.shape[0], 8):
        probe.run(toks[i:i + 8], reads=reads, return_logits=False)
    count = toks.shape[0] * toks.shape[1]
    desc = f"{reference} ({toks.shape[0]} texts x {toks.shape[1]} tokens, seed {seed})"
    return [sums[f"z{l}"] / count for l in range(L)], [sums[f"m{l}"] / count for l in range(L)], desc


def _edits(heads: Sequence[tuple[int, int]], ffns: Sequence[int], mode: str, means) -> list:
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    out = []
    for l, hs in sorted(by_layer.items()):
        out.append(Ablate(Site("z", l).name, heads=sorted(hs), mode=mode, value=None if mode == "zero" else means[0][l].float()))
    for l in sorted(ffns):
        out.append(Ablate(Site("mlp_out", l).name, mode=mode, value=None if mode == "zero" else means[1][l].float()))
    return out


@torch.no_grad()
def faithfulness(probe, prompt, *, config=None, n_random: int = 10, seed: int = 0, target: int | None = None,
                 reference: str = "prose", n_reference: int = 16, reference_tokens: int = 32,
                 ablations: Sequence[str] = ("zero", "mean"), result=None, means=None) -> Faithfulness:
    """Ablation checks of the route to the prediction at ``config.position`` (module docstring).

    Args:
        probe, prompt, config: as :func:`analyses.routes.run` (the route uses ``config.tau`` etc.).
        n_random: random component sets per ablation mode (each gives a ``random_keep`` and a ``random`` row).
        seed: seed of the random draws (and of the reference corpus).
        target: token id whose probability is read (default: the model's top token at the position).
        reference, n_reference, reference_tokens: the corpus of the mean ablation (a domain name).
        ablations: "zero", "mean" or both.
        result: a :class:`RoutesResult` of the same prompt and config, to reuse.
        means: :func:`reference_means` already computed (dataset mode reads the corpus once), to reuse.
    """
    from .routes import Config, _resolve_position, _tokens, run

    cfg = config or Config()
    bad = [a for a in ablations if a not in ("zero", "mean")]
    if bad or not ablations:
        raise ConfigError(f"ablations={list(ablations)!r}; use 'zero', 'mean' or both.")
    if n_random < 0:
        raise ConfigError(f"n_random={n_random}; use 0 or more random sets.")
    tokens = _tokens(probe, prompt, cfg)
    pos = _resolve_position(cfg.position, tokens.shape[-1])
    res = result if result is not None else run(probe, tokens, config=cfg)
    heads, ffns = route_components(res, pos)
    i = probe.info
    all_heads = [(l, h) for l in range(i.n_layers) for h in range(i.n_heads)]
    all_ffns = list(range(i.n_layers))
    route_h, route_f = set(heads), set(ffns)

    def p_target(edits) -> torch.Tensor:
        logits = probe.run(tokens, edits=edits)
        return torch.softmax(logits[0, pos].double(), -1).cpu()

    clean = p_target([])
    tgt = int(clean.argmax()) if target is None else int(target)
    if not 0 <= tgt < clean.numel():
        raise ConfigError(f"target={tgt} is not a token id of this model (vocabulary {clean.numel()}).")
    if "mean" not in ablations:
        means = None
    elif means is None:
        means = reference_means(probe, reference, n=n_reference, T=reference_tokens, seed=seed)
    rng = np.random.default_rng(seed)
    draws = [(sorted(map(tuple, rng.permutation(np.array(all_heads))[: len(heads)].tolist())) if heads else [],
              sorted(rng.permutation(all_ffns)[: len(ffns)].tolist())) for _ in range(n_random)]
    rows = [{"ablation": "none", "kind": "clean", "seed": None, "n_heads": 0, "n_ffns": 0, "p_target": float(clean[tgt])}]
    for mode in ablations:
        sets = [("off_route", None, [x for x in all_heads if x not in route_h], [x for x in all_ffns if x not in route_f]),
                ("route", None, heads, ffns)]
        for s, (dh, df) in enumerate(draws):
            sets.append(("random_keep", seed + s, [x for x in all_heads if x not in set(dh)], [x for x in all_ffns if x not in set(df)]))
            sets.append(("random", seed + s, dh, df))
        for kind, sd, hs, fs in sets:
            p = p_target(_edits(hs, fs, mode, means))
            rows.append({"ablation": mode, "kind": kind, "seed": sd, "n_heads": len(hs), "n_ffns": len(fs), "p_target": float(p[tgt])})
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return Faithfulness(frame=frame, target=tgt, target_token=probe.to_str_tokens([tgt])[0], position=pos,
                        p_clean=float(clean[tgt]), heads=tuple(head_label(l, h) for l, h in heads), ffns=tuple(ffns),
                        n_heads_total=len(all_heads), n_ffns_total=len(all_ffns),
                        reference=means[2] if means else "none (zero ablation only)", tau=res.config.tau, seed=seed)
