"""One component across analyses: a head ``L5H3`` or an MLP neuron ``L2N17`` seen by every method.

A :class:`ComponentProfile` gathers, for one component,

* **sink mass per domain** m_s^{l,h}(domain) and the **active/dormant status** (Guo et al. 2024, §2; see
  :mod:`analyses.dormant`): from a saved ``dormant`` result of the same model when the results store holds
  one, else from a small fresh run (``n_samples`` texts of ``T`` tokens per built-in domain);
* **route frequency**: the fraction of a dataset's prediction routes the head lies on (Ferrando & Voita 2024;
  :class:`analyses.routes.RouteStatsResult`, saved by ``sonde run routes --dataset``), else the head's
  importance on the current prompt's route (:meth:`analyses.routes.RoutesResult.head_importance`);
* **bigram-mask membership**: the kept fraction of the head's (or neuron's) weights in a saved bigram
  subnetwork mask (Chang & Bergen 2025; :class:`analyses.bigram.BigramResult`);
* **top logit-lens tokens of the output direction**: what the component writes, read through the
  unembedding. A head writes in the row space of W_O,h ``[d_head, d_model]``; its principal direction is
  the first right singular vector u₁ (basis-independent, unlike single rows), and the sign of the value
  depends on the input, so both ends are listed: tokens promoted along +u₁ and along −u₁. A neuron writes
  along its row of W_out ``[d_mlp, d_model]`` (positive activations promote the "+" tokens). Directions go
  through the final norm and the unembedding with the norm's bias removed: score(v) = U(v) − U(0).

Only the math here touches tensors; saved results are read through :mod:`analyses.core.store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import pandas as pd
import torch

from probes.errors import ConfigError, SondeError
from probes.labels import format_label, parse_label
from probes.sites import Site

from .core import base, planner, registry, store
from .dormant import _memory as dormant_memory
from .core.base import option, stored
from .core.domains import BUILTIN

__all__ = ["Config", "ComponentProfile", "parse_component", "principal_direction", "direction_tokens",
           "saved_result", "sink_maps", "profile", "output_lens"]

Kind = Literal["head", "neuron"]


@dataclass(frozen=True, kw_only=True)
class Config(base.Config):
    """Settings of a component profile (small defaults: a profile answers in seconds on a CPU)."""

    domains: tuple[str, ...] = BUILTIN  # the built-in domains of analyses.core.domains
    n_samples: int = option(2, ge=1, help="Texts per domain for a fresh sink map (dormant.md uses 32; 2 keeps it interactive).")
    T: int = option(32, ge=2, help="Tokens per text (dormant.md: 64).")
    theta: float = option(0.9, gt=0, lt=1, help="Dormant ⇔ sink mass > θ (dormant.md).", hint="Use e.g. 0.9 (the default).")
    k: int = option(8, ge=1, le=100, help="Logit-lens tokens per side.")
    tau: float = option(0.04, gt=0, lt=1, help="Route threshold when the current prompt's route is used (LLM-TT default).",
                        hint="Use a threshold such as 0.04.")
    use_saved: bool = True  # read dormant / routes.dataset / bigram results from the store when present

    def __post_init__(self) -> None:
        if not self.domains:
            raise ConfigError("domains=() is empty.", hint=f"Use some of {', '.join(BUILTIN)} (the default is all).")


# ----------------------------------------------------------------------------- labels
def parse_component(label: str, info=None) -> tuple[Kind, int, int]:
    """``"L5H3"`` -> ("head", 5, 3); ``"L2N17"`` -> ("neuron", 2, 17); checked against ``info`` when given.

    The grammar and its errors (:class:`probes.LabelError`, an :class:`InputError`) are :func:`probes.parse_label`'s.
    """
    return tuple(parse_label(label, ("head", "neuron"), info))


def _label(kind: Kind, layer: int, idx: int) -> str:
    return format_label(kind, layer, idx)


# ----------------------------------------------------------------------------- math
@torch.no_grad()
def principal_direction(W: torch.Tensor) -> torch.Tensor:
    """[r, d] write matrix (a head's W_O,h) -> [d] unit first right singular vector (sign: largest |entry| > 0)."""
    W = W.detach().float().cpu()
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)
    u = Vh[0]
    return u if u[u.abs().argmax()] > 0 else -u


@torch.no_grad()
def direction_tokens(scores: torch.Tensor, decode, k: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """[V] logit scores of one direction -> (top-k promoted, top-k suppressed) as ``(token, score)``."""
    s = scores.detach().float().cpu()
    top = s.topk(k)
    bot = (-s).topk(k)
    return ([(decode(int(i)), float(v)) for v, i in zip(top.values, top.indices)],
            [(decode(int(i)), float(-v)) for v, i in zip(bot.values, bot.indices)])


def _direction_scores(probe, u: torch.Tensor) -> torch.Tensor:
    """[d] direction -> [V] scores U(u) − U(0): the final norm's bias (LayerNorm β) and lm_head bias cancel."""
    x = torch.stack([u, torch.zeros_like(u)])
    logits = probe.unembed(x).float().cpu()
    return logits[0] - logits[1]


@torch.no_grad()
def output_lens(probe, tokens: torch.Tensor, part: str, position: int, *, k: int = 8,
                edits: Sequence = ()) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """What one block part writes into the residual stream at ``position``, read through the unembedding.

    ``part`` is a head (``"L5H3"``: its output z_h W_O,h) or a block's FFN (``"L5FFN"``: hook_mlp_out). The vector is
    scored bias-free, U(x) − U(0), as the output directions of :func:`profile`. Returns (promoted, suppressed) top-k
    tokens with their logit scores.
    """
    kind, layer, h = parse_label(part, ("head", "ffn"), probe.info)
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if not 0 <= position < tokens.shape[-1]:
        raise ConfigError(f"position={position} is outside the prompt of {tokens.shape[-1]} tokens.")
    if kind == "head":
        site = Site("z", layer).name
        z = probe.cache(tokens[:, : position + 1], [site], edits=edits)[site][0, position, h]
        W = probe.W_O(layer)[h].detach().float().cpu()
        vec = z.float().cpu() @ W
    else:
        site = Site("mlp_out", layer).name
        vec = probe.cache(tokens[:, : position + 1], [site], edits=edits)[site][0, position].float().cpu()
    scores = _direction_scores(probe, vec)
    return direction_tokens(scores, lambda i: probe.tokenizer.decode([i]), k)


# ----------------------------------------------------------------------------- store look-ups
def saved_result(analysis: str, fingerprint: str, root: str | Path | None = None) -> Path | None:
    """The newest saved result of ``analysis`` for the model with this fingerprint, if any."""
    df = store.list_results(root)
    if df.empty:
        return None
    df = df[df["analysis"] == analysis].sort_values("created_at")
    for p in reversed(df["path"].tolist()):
        try:
            fp = store.read_manifest(p).get("model", {}).get("fingerprint")
        except Exception:  # noqa: BLE001 - a broken folder is skipped, not fatal
            continue
        if fp == fingerprint:
            return Path(p)
    return None


def bigram_masks(fingerprint: str, root: str | Path | None = None) -> list[tuple[str, int, str]]:
    """The bigram masks of the model with this fingerprint, best first: ``(source, steps_done, created_at)`` with
    ``source`` a saved result's folder or ``"shipped"`` (the mask shipped with Sonde, when it was trained on this very
    model). Best = most training steps, then newest: a short test run saved to the store never replaces a longer
    trained mask as the default (the component panel and the Bigram page both show the first)."""
    from .bigram import DEFAULT_RESULT

    out: list[tuple[str, int, str]] = []
    df = store.list_results(root)
    for p in ([] if df.empty else df[df["analysis"] == "bigram"]["path"].tolist()):
        try:
            man = store.read_manifest(p)
        except Exception:  # noqa: BLE001 - a broken folder is skipped, not fatal
            continue
        if man.get("model", {}).get("fingerprint") == fingerprint:
            out.append((str(p), int(man.get("extra", {}).get("steps_done") or 0), str(man.get("created_at", ""))))
    try:
        man = store.read_manifest(DEFAULT_RESULT)
        if man["model"]["fingerprint"] == fingerprint:
            out.append(("shipped", int(man["extra"].get("steps_done") or 0), ""))
    except (SondeError, OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return sorted(out, key=lambda r: (r[1], r[2]), reverse=True)


def sink_maps(probe, config: Config = Config(), *, root: str | Path | None = None):
    """The per-domain sink map of every head: a saved ``dormant`` result of this model, else a small fresh run.

    Returns ``(DormantResult, source)`` where source is the result folder or ``"computed"``.
    """
    from . import dormant

    if config.use_saved:
        p = saved_result("dormant", probe.info.fingerprint, root)
        if p is not None:
            return dormant.DormantResult.load(p), str(p)
    cfg = dormant.Config(T=config.T, theta=config.theta, n_samples=config.n_samples, batch_size=config.n_samples,
                         intervention="none", max_heads=0)
    return dormant.run(probe, tuple(config.domains), config=cfg), "computed"


# ----------------------------------------------------------------------------- result
def _read_tokens(stored: store.StoredResult, side: str) -> tuple[tuple[str, float], ...]:
    """``(token, score)`` pairs of one side (``promoted`` / ``suppressed``) of the saved tokens table."""
    tok = stored.tables.get("tokens", pd.DataFrame(columns=["promoted", "promoted_score", "suppressed", "suppressed_score"]))
    return tuple(zip(tok[side], tok[f"{side}_score"].astype(float)))


@base.register_result
@dataclass(frozen=True, kw_only=True)
class ComponentProfile(base.Result):
    """Everything Sonde knows about one head or neuron.

    Attributes:
        component: the label (``L5H3`` or ``L2N17``); ``kind``, ``layer``, ``index`` parse it.
        sink: per domain ``domain, sink_mass, dormant`` (heads; empty for neurons).
        status: ``active`` | ``dormant`` | ``mixed`` (dormant on some domains) | ``n/a`` (neurons).
        route: ``domain, freq, mean_importance`` per domain of a saved routes dataset, or one row
            ``domain="prompt"`` (freq 1 if on the current route else 0; importance Σ over its edges).
        bigram_kept: kept fraction of the component's masked weights (None: no bigram result saved or layer unmasked).
        top_tokens / bottom_tokens: ``(token, score)`` promoted along +u / −u (scores: logits per unit direction).
        sources: where each part came from (a result folder, ``computed``, ``prompt`` or a reason it is missing).
    """

    analysis: ClassVar[str] = "component"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()), ("table", "tokens", lambda r: r.tokens_frame()),
                             ("extra", "summary", lambda r: r.summary()))

    component: str = stored("extra")
    kind: Kind = stored("extra")
    layer: int = stored("extra")
    index: int = stored("extra")
    sink: pd.DataFrame = stored("table")
    status: str = stored("extra")
    route: pd.DataFrame = stored("table")
    bigram_kept: float | None = stored("extra", default=None)
    # both from the saved tokens table
    top_tokens: tuple[tuple[str, float], ...] = stored(None, read=lambda s: _read_tokens(s, "promoted"))
    bottom_tokens: tuple[tuple[str, float], ...] = stored(None, read=lambda s: _read_tokens(s, "suppressed"))
    sources: dict[str, str] = stored("extra", default_factory=dict, load=dict)

    @property
    def route_frequency(self) -> float | None:
        """Route frequency pooled over domains (weighted by nothing: the mean of the per-domain rows)."""
        return None if self.route.empty else float(self.route["freq"].mean())

    @property
    def bigram_member(self) -> bool | None:
        return None if self.bigram_kept is None else self.bigram_kept > 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"component": self.component, "status": self.status}
        if not self.sink.empty:
            out["sink mass"] = {r.domain: round(float(r.sink_mass), 3) for r in self.sink.itertuples()}
        out["route frequency"] = None if self.route_frequency is None else round(self.route_frequency, 3)
        out["bigram mask"] = (self.sources.get("bigram", "no bigram result saved") if self.bigram_kept is None
                              else f"{'member' if self.bigram_member else 'not in the mask'} (kept {self.bigram_kept:.3%})")
        out["promotes"] = [t for t, _ in self.top_tokens[:5]]
        out["suppresses"] = [t for t, _ in self.bottom_tokens[:5]]
        return out

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``model, component, domain, sink_mass, dormant, route_freq, route_importance``."""
        doms = list(dict.fromkeys(list(self.sink["domain"]) + list(self.route["domain"])))
        s = self.sink.set_index("domain") if not self.sink.empty else pd.DataFrame()
        r = self.route.set_index("domain") if not self.route.empty else pd.DataFrame()
        rows = []
        for d in doms:
            rows.append({"model": self.model.get("name", ""), "component": self.component, "domain": d,
                         "sink_mass": float(s.loc[d, "sink_mass"]) if d in s.index else float("nan"),
                         "dormant": bool(s.loc[d, "dormant"]) if d in s.index else None,
                         "route_freq": float(r.loc[d, "freq"]) if d in r.index else float("nan"),
                         "route_importance": float(r.loc[d, "mean_importance"]) if d in r.index else float("nan")})
        return pd.DataFrame(rows, columns=["model", "component", "domain", "sink_mass", "dormant", "route_freq", "route_importance"])

    def tokens_frame(self) -> pd.DataFrame:
        """``rank, promoted, promoted_score, suppressed, suppressed_score``."""
        return pd.DataFrame([{"rank": i, "promoted": a[0], "promoted_score": a[1], "suppressed": b[0], "suppressed_score": b[1]}
                             for i, (a, b) in enumerate(zip(self.top_tokens, self.bottom_tokens))])

    def plot(self, **kwargs):
        """Bar chart: sink mass per domain (θ marked) for heads; the promoted-token scores for neurons."""
        import plotly.graph_objects as go

        if not self.sink.empty:
            theta = getattr(self.config, "theta", 0.9)
            colors = ["#6c757d" if d else "#1f77b4" for d in self.sink["dormant"]]
            fig = go.Figure(go.Bar(x=self.sink["domain"], y=self.sink["sink_mass"], marker_color=colors,
                                   hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
            fig.add_hline(y=theta, line_dash="dash", annotation_text=f"θ = {theta} (dormant above)")
            fig.update_layout(title=f"{self.component}: sink mass per domain ({self.status})", yaxis_range=[0, 1],
                              yaxis_title="mean attention on the sink", height=320, margin=dict(t=50, b=40))
        else:
            fig = go.Figure(go.Bar(x=[t for t, _ in self.top_tokens], y=[s for _, s in self.top_tokens]))
            fig.update_layout(title=f"{self.component}: tokens its output direction promotes", height=320)
        return fig

# ----------------------------------------------------------------------------- entry point
def _status(dormant_flags: Sequence[bool]) -> str:
    if all(dormant_flags):
        return "dormant"
    return "mixed" if any(dormant_flags) else "active"


def profile(probe, component: str, *, config: Config = Config(), sinks=None, routes_result=None, position: int | None = None,
            root: str | Path | None = None) -> ComponentProfile:
    """Profile one head (``"L5H3"``) or neuron (``"L2N17"``).

    Args:
        probe: a loaded probe.
        component: the label.
        config: :class:`Config`.
        sinks: a :class:`analyses.dormant.DormantResult` to reuse (e.g. one map for many heads); None = the
            store's newest of this model, else a small fresh run (:func:`sink_maps`).
        routes_result: the current prompt's :class:`analyses.routes.RoutesResult`, used when no routes dataset is saved.
        position: prediction position of that route (None = the result's own).
        root: results folder (default :func:`analyses.core.store.results_root`).
    """
    kind, layer, idx = parse_component(component, probe.info)
    label = _label(kind, layer, idx)
    timer = base.Timer()
    sources: dict[str, str] = {}
    fp = probe.info.fingerprint

    # sink mass per domain / status (heads only: a neuron has no attention)
    if kind == "head":
        with timer("sinks"):
            if sinks is None:
                sinks, sources["sinks"] = sink_maps(probe, config, root=root)
            else:
                sources["sinks"] = "given"
        sm = sinks.sink_mass[:, layer, idx]
        dm = sinks.dormant[:, layer, idx]
        sink = pd.DataFrame({"domain": list(sinks.domains), "sink_mass": sm.float().numpy(), "dormant": dm.bool().numpy()})
        status = _status(sink["dormant"].tolist())
    else:
        sink = pd.DataFrame(columns=["domain", "sink_mass", "dormant"])
        status = "n/a"
        sources["sinks"] = "sink mass applies to attention heads"

    # route frequency
    route = pd.DataFrame(columns=["domain", "freq", "mean_importance"])
    with timer("routes"):
        p = saved_result("routes.dataset", fp, root) if config.use_saved else None
        if p is not None:
            from .routes import RouteStatsResult

            rs = RouteStatsResult.load(p)
            if kind == "head":
                f, m = rs.head_freq[:, layer, idx], rs.head_mean[:, layer, idx]
            else:  # dataset statistics are per FFN block; a neuron inherits its block's
                f, m = rs.ffn_freq[:, layer], rs.ffn_mean[:, layer]
            route = pd.DataFrame({"domain": list(rs.domains), "freq": f.float().numpy(), "mean_importance": m.float().numpy()})
            sources["route"] = str(p) + ("" if kind == "head" else " (FFN block of this neuron)")
        elif routes_result is not None and kind == "head":
            imp = float(routes_result.head_importance(position, tau=config.tau)[layer, idx])
            route = pd.DataFrame({"domain": ["prompt"], "freq": [1.0 if imp > 0 else 0.0], "mean_importance": [imp]})
            sources["route"] = "prompt"
        else:
            sources["route"] = "no routes dataset saved" + ("" if kind == "head" else " (neurons need a saved dataset)")

    # bigram-mask membership
    bigram_kept = None
    with timer("bigram"):
        best = bigram_masks(fp, root)[:1] if config.use_saved else []
        b = p = None
        if best and best[0][0] != "shipped":
            from .bigram import BigramResult

            p = best[0][0]
            b = BigramResult.load(p)
        elif best:  # the mask shipped with Sonde (trained on this very model)
            from .bigram import DEFAULT_RESULT, default_result

            try:
                b, p = default_result(), f"the shipped mask ({DEFAULT_RESULT.name})"
            except SondeError:
                b = None
        if b is None:
            sources["bigram"] = "no bigram result saved"
        else:
            arr = b.head_kept if kind == "head" else b.neuron_kept
            v = float(arr[layer, idx]) if layer < arr.shape[0] and idx < arr.shape[1] else float("nan")
            if v != v:
                sources["bigram"] = f"{p} (layer {layer} was not masked)"
            else:
                bigram_kept = v
                sources["bigram"] = str(p)

    # logit lens of the output direction
    with timer("logit_lens"):
        if kind == "head":
            u = principal_direction(probe.W_O(layer)[idx])
        else:  # the neuron's own write direction, sign kept: positive activations promote the "+" tokens
            w = probe.W_out(layer)[idx].detach().float().cpu()
            u = w / w.norm().clamp_min(1e-12)
        dec = lambda i: probe.tokenizer.decode([i])  # noqa: E731
        top, bot = direction_tokens(_direction_scores(probe, u), dec, config.k)

    return ComponentProfile(config=config, model=probe.info.to_dict(), input_hash=store.hash_inputs(label, sources),
                            timings=timer.seconds, component=label, kind=kind, layer=layer, index=idx, sink=sink,
                            status=status, route=route, bigram_kept=bigram_kept, top_tokens=tuple(top),
                            bottom_tokens=tuple(bot), sources=sources)


SPEC = registry.register(registry.Analysis(
    name="component", order=7, doc="overview", title="One component as every analysis sees it",
    summary="a head or neuron's sink mass, route share, bigram membership and output tokens",
    config=Config, result=ComponentProfile, run=profile, page="component",
    # a fresh sink map is a dormant run of n_samples rows per domain (its loss included); the lens reads one position
    memory=planner.MemoryModel("component", dormant_memory, sizes=lambda c: {"seq_len": c.T, "batch_size": c.n_samples}),
))
