"""Route statistics over a dataset (Ferrando & Voita 2024, §5 at corpus scale): for every prompt the route to the
prediction at ``position``, folded into per-domain frequencies and mean importances of each head and FFN.

Memory is independent of the number of prompts: each prompt's route is computed top-down
(:func:`analyses.routes.run` with ``mode="route"``) and only the :class:`RouteStats` reducer is kept. The records
stream through :func:`run_dataset` (only an 8-byte digest of each is kept, which names the input in the key), a
checkpoint makes a run resumable, and the shard protocol (:func:`accumulate`, :func:`merge_states`,
:func:`result_from_state`) lets :mod:`analyses.core.cluster` run it on Ray workers with the one-pass result and key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import pandas as pd
import torch

from probes.errors import ConfigError, InputError
from probes.labels import ffn_label, head_label
from probes.reducers import Reducer

from .core import registry
from .core.base import Result, Timer, option, register_result, stored
from .core.progress import ProgressFn, phase
from .routes import MEMORY, Config, RoutesResult, _check_supported, _compute

__all__ = ["DatasetConfig", "RouteStats", "RouteStatsResult", "run_dataset", "dataset_key", "accumulate", "merge_states",
           "result_from_state", "FAITH_FIGURES", "faith_figures"]


@dataclass(frozen=True, kw_only=True)
class DatasetConfig(Config):
    """Dataset mode: route statistics of the prediction at ``position`` of every prompt."""

    max_tokens: int = option(128, ge=2, help="Dataset mode: cut prompts to this many tokens (memory stays bounded).")
    # only the prediction's route is counted: compute it top-down
    mode: Literal["all", "route"] = option("route", help="all (graph of every position) or route (top-down: only the route to --position).")
    checkpoint_every: int = option(16, ge=1, help="Prompts between checkpoints.")
    faithfulness: bool = option(False, help="Also run each route's ablation checks (routes.faithfulness) and keep their distributions per domain.")
    n_random: int = option(4, ge=0, help="With faithfulness: random component sets per prompt and ablation mode.")
    seed: int = option(0, help="With faithfulness: seed of the random sets and of the reference corpus.")


# the faithfulness figures kept per prompt (p of the target; the random sets' median over draws)
FAITH_FIGURES = ("p_clean",) + tuple(f"p_{k}_{ab}" for ab in ("zero", "mean") for k in ("off_route", "route", "random_keep", "random"))
FAITH_BINS = torch.linspace(-8, 0, 33, dtype=torch.float64)  # log10 p; 0.25-decade bins, p < 1e-8 counted in the first


def faith_figures(f) -> torch.Tensor:
    """One prompt's :data:`FAITH_FIGURES` from a :class:`analyses.routes_faithful.Faithfulness` ([F], float64)."""
    s = f.summary().set_index("ablation")
    vals = [f.p_clean]
    for ab in ("zero", "mean"):
        for k in ("off_route", "route", "random_keep", "random"):
            col = f"p_{k}" if k in ("off_route", "route") else f"p_{k}_median"
            vals.append(float(s.loc[ab, col]) if ab in s.index else float("nan"))
    return torch.tensor(vals, dtype=torch.float64)


# ============================================================================ dataset mode
class RouteStats(Reducer):
    """Streaming per-domain route statistics (mergeable across shards, checkpointable).

    For each domain: n prompts; head_on [L, H] prompts whose route uses the head; head_sum [L, H]
    summed head importance in the route; ffn_on [L] prompts whose route passes an FFN node of layer l;
    ffn_sum [L] summed FFN edge weight on the route. With faithfulness checks: faith_n prompts checked,
    faith_sum [F] the sums of the :data:`FAITH_FIGURES` and faith_hist [F, B] their counts in the log10 bins
    :data:`FAITH_BINS` (a distribution that merges by adding).
    """

    kind = "route_stats"

    def __init__(self, n_layers: int, n_heads: int):
        super().__init__(dims=None)
        self.n_layers, self.n_heads = n_layers, n_heads
        self._reset()

    def _settings(self):
        return super()._settings() + ("n_layers", "n_heads")

    def _reset(self):
        super()._reset()
        self.domains: list[str] = []
        self.n = torch.zeros(0, dtype=torch.float64)
        self.head_on = torch.zeros(0, self.n_layers, self.n_heads, dtype=torch.float64)
        self.head_sum = torch.zeros(0, self.n_layers, self.n_heads, dtype=torch.float64)
        self.ffn_on = torch.zeros(0, self.n_layers, dtype=torch.float64)
        self.ffn_sum = torch.zeros(0, self.n_layers, dtype=torch.float64)
        F, B = len(FAITH_FIGURES), len(FAITH_BINS) - 1
        self.faith_n = torch.zeros(0, dtype=torch.float64)
        self.faith_sum = torch.zeros(0, F, dtype=torch.float64)
        self.faith_hist = torch.zeros(0, F, B, dtype=torch.float64)

    _PER_DOMAIN = ("n", "head_on", "head_sum", "ffn_on", "ffn_sum", "faith_n", "faith_sum", "faith_hist")

    def _index(self, domain: str) -> int:
        if domain not in self.domains:
            self.domains = list(self.domains) + [domain]
            for k in self._PER_DOMAIN:
                t = getattr(self, k)
                setattr(self, k, torch.cat([t, t.new_zeros(1, *t.shape[1:])]))
        return self.domains.index(domain)

    def add_faithfulness(self, domain: str, figures: torch.Tensor) -> None:
        """Fold one prompt's faithfulness figures ([F], :func:`faith_figures`; NaN where an ablation was not run)."""
        k = self._index(domain)
        self.faith_n[k] += 1
        ok = ~torch.isnan(figures)
        self.faith_sum[k] += torch.where(ok, figures, torch.zeros_like(figures))
        b = (torch.bucketize(torch.log10(figures.clamp_min(1e-300)), FAITH_BINS[1:-1], right=True)).clamp(0, len(FAITH_BINS) - 2)
        self.faith_hist[k, torch.arange(len(figures))[ok], b[ok]] += 1

    def add(self, domain: str, head_imp: torch.Tensor, ffn_imp: torch.Tensor) -> None:
        """Fold one prompt: head_imp [L, H] head importance in its route, ffn_imp [L] FFN weight on its route."""
        k = self._index(domain)
        self.n[k] += 1
        self.head_on[k] += (head_imp > 0).double()
        self.head_sum[k] += head_imp.double()
        self.ffn_on[k] += (ffn_imp > 0).double()
        self.ffn_sum[k] += ffn_imp.double()
        self.n_updates += 1

    def _update(self, x):  # pragma: no cover - fed through add()
        raise ConfigError("RouteStats is fed with add(domain, head_imp, ffn_imp), not through a hook.")

    def _merge(self, other: "RouteStats") -> None:
        for j, dom in enumerate(other.domains):
            k = self._index(dom)
            for name in self._PER_DOMAIN:
                getattr(self, name)[k] += getattr(other, name)[j]

    def _state(self):
        return {"domains": list(self.domains), **{k: getattr(self, k) for k in self._PER_DOMAIN}}

    def load_state(self, st):
        fresh = self.empty_like()  # a state saved without faithfulness arrays keeps empty ones
        super().load_state(st)
        self.domains = list(self.domains)
        for k in self._PER_DOMAIN:
            t = getattr(self, k, None)
            if t is None or t.shape[0] != len(self.domains):
                base = getattr(fresh, k)
                t = base.new_zeros(len(self.domains), *base.shape[1:])
            setattr(self, k, t.to(torch.float64))

    def finalize(self) -> dict[str, Any]:
        n = self.n.clamp_min(1)
        out = {"domains": list(self.domains), "n": self.n.clone(), "head_freq": self.head_on / n[:, None, None],
               "head_mean": self.head_sum / n[:, None, None], "ffn_freq": self.ffn_on / n[:, None], "ffn_mean": self.ffn_sum / n[:, None]}
        if float(self.faith_n.sum()) > 0:
            out.update(faith_n=self.faith_n.clone(), faith_hist=self.faith_hist.clone(),
                       faith_mean=self.faith_sum / self.faith_n.clamp_min(1)[:, None])
        return out


@register_result
@dataclass(frozen=True, kw_only=True)
class RouteStatsResult(Result):
    """Dataset-mode statistics per domain D: head_freq/head_mean [D, L, H], ffn_freq/ffn_mean [D, L], n [D]."""

    analysis: ClassVar[str] = "routes.dataset"
    config_class: ClassVar[type] = DatasetConfig

    saved_views: ClassVar = (("table", "components", lambda r: r.to_frame()),
                             ("table", "faithfulness", lambda r: r.faithfulness_frame()))

    domains: list[str] = stored("extra")
    n: torch.Tensor = stored("array")
    head_freq: torch.Tensor = stored("array")
    head_mean: torch.Tensor = stored("array")
    ffn_freq: torch.Tensor = stored("array")
    ffn_mean: torch.Tensor = stored("array")
    n_skipped: int = stored("extra", default=0)
    # faithfulness checks (DatasetConfig.faithfulness): prompts checked [D], mean [D, F] and log10 histogram [D, F, B]
    # of the FAITH_FIGURES
    faith_n: torch.Tensor | None = stored("array", default=None)
    faith_mean: torch.Tensor | None = stored("array", default=None)
    faith_hist: torch.Tensor | None = stored("array", default=None)

    def faithfulness_frame(self) -> pd.DataFrame:
        """The faithfulness distributions per domain: domain, figure, n, mean, and the 10th, 25th, 50th, 75th and
        90th percentiles (read from the log10 histogram: within a quarter decade). Empty without faithfulness checks."""
        cols = ["domain", "figure", "n", "mean", "p10", "p25", "median", "p75", "p90"]
        if self.faith_hist is None:
            return pd.DataFrame(columns=cols)
        rows = []
        edges = FAITH_BINS.double()
        for k, dom in enumerate(self.domains):
            for f, name in enumerate(FAITH_FIGURES):
                h = self.faith_hist[k, f].double()
                qs = [_hist_quantile(h, edges, q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)]
                rows.append([dom, name, int(h.sum()), float(self.faith_mean[k, f]), *qs])
        return pd.DataFrame(rows, columns=cols)

    def faithfulness_summary(self) -> dict[str, Any]:
        """JSON-ready: {domain: {figure: {n, mean, median, p25, p75}}} (empty without faithfulness checks)."""
        out: dict[str, Any] = {}
        for r in self.faithfulness_frame().itertuples():
            out.setdefault(r.domain, {})[r.figure] = {"n": r.n, "mean": r.mean, "median": r.median, "p25": r.p25, "p75": r.p75}
        return out

    def to_frame(self) -> pd.DataFrame:
        """Columns: model, domain, layer, head (None for FFN rows), component, freq, mean_importance, n."""
        D, L, H = self.head_freq.shape
        rows = []
        model = self.model.get("name", "")
        for k, dom in enumerate(self.domains):
            for l in range(L):
                for h in range(H):
                    rows.append((model, dom, l, h, head_label(l, h), float(self.head_freq[k, l, h]), float(self.head_mean[k, l, h]), int(self.n[k])))
                rows.append((model, dom, l, None, ffn_label(l), float(self.ffn_freq[k, l]), float(self.ffn_mean[k, l]), int(self.n[k])))
        df = pd.DataFrame(rows, columns=["model", "domain", "layer", "head", "component", "freq", "mean_importance", "n"])
        df["head"] = df["head"].astype("Int64")
        return df

    def plot(self, domain: str | None = None, value: Literal["freq", "mean"] = "mean"):
        """Layer × head heat map for one domain (default: all prompts pooled)."""
        import plotly.express as px

        arr = self.head_freq if value == "freq" else self.head_mean
        if domain is None:
            w = self.n / self.n.sum().clamp_min(1)
            m = (arr * w[:, None, None]).sum(0)
            title = "all domains"
        else:
            if domain not in self.domains:
                raise ConfigError(f"domain {domain!r} is not in this result.", hint=f"Domains: {', '.join(self.domains)}.")
            m = arr[self.domains.index(domain)]
            title = domain
        fig = px.imshow(m.numpy(), origin="lower", aspect="auto", color_continuous_scale="Blues",
                        labels=dict(x="head", y="layer", color=value), title=f"Head {value} on routes: {title}")
        return fig


def _hist_quantile(h: torch.Tensor, edges: torch.Tensor, q: float) -> float:
    """The q-quantile of p from a histogram ``h`` over log10 bins ``edges`` (linear within a bin); NaN when empty."""
    n = float(h.sum())
    if n == 0:
        return float("nan")
    c = torch.cumsum(h, 0)
    i = int(torch.searchsorted(c, torch.tensor(q * n, dtype=c.dtype)))
    i = min(i, len(h) - 1)
    before = float(c[i - 1]) if i else 0.0
    frac = (q * n - before) / max(float(h[i]), 1e-300)
    return float(10 ** (float(edges[i]) + min(max(frac, 0.0), 1.0) * float(edges[i + 1] - edges[i])))


def _ffn_on_route(route, n_layers: int) -> torch.Tensor:
    out = torch.zeros(n_layers, dtype=torch.float64)
    for u, v, d in route.edges(data=True):
        if d["kind"] == "ffn" and u.startswith("M"):
            out[d["layer"]] += d["weight"]
    return out


def _text_domain(rec) -> tuple[str, str]:
    """``(text, domain)`` of a record (a string, or an :class:`analyses.core.io.Record`; domain "all" when absent)."""
    if isinstance(rec, str):
        return rec, "all"
    text = getattr(rec, "text", None)
    if not isinstance(text, str):
        raise InputError(f"a dataset item must be a string or a record with a 'text', got {type(rec).__name__}.",
                         hint="Pass strings, or analyses.core.io.Record(text=..., domain=...).")
    return text, getattr(rec, "domain", None) or "all"


def _fold(probe, records: Sequence, config: DatasetConfig, stats: RouteStats, *, checkpoint=None,
          on_prompt: Callable[[int], None] | None = None) -> int:
    """Fold ``records`` into ``stats`` (resuming after ``checkpoint``'s last save); returns the prompts skipped.
    ``on_prompt(n)`` after each prompt, with the number of prompts done (resumed ones included)."""
    _check_supported(probe)
    from .routes_faithful import faithfulness, reference_means

    means = None
    done = checkpoint.restore({"stats": stats}) if checkpoint is not None else 0
    skipped = int(getattr(checkpoint, "extra", {}).get("skipped", 0)) if done else 0
    for n_seen, rec in enumerate(records, start=1):
        if n_seen <= done:
            continue
        text, domain = _text_domain(rec)
        toks = probe.to_tokens(text, prepend_bos=config.prepend_bos, max_length=config.max_tokens, truncate=True)
        T = toks.shape[-1]
        if not -T <= config.position < T:
            skipped += 1
        else:
            dec = _compute(probe, toks, config)
            r = RoutesResult(config=config, model={}, tokens=toks[0].cpu(), str_tokens=[""] * T, **dec.fields())
            route = r.route()
            stats.add(domain, r.head_importance(route=route), _ffn_on_route(route, probe.info.n_layers))
            if config.faithfulness:
                if means is None:  # the reference corpus of the mean ablation: once per run
                    means = reference_means(probe, seed=config.seed, prepend_bos=config.prepend_bos)
                f = faithfulness(probe, toks, config=config, n_random=config.n_random, seed=config.seed, result=r, means=means)
                stats.add_faithfulness(domain, faith_figures(f))
        if checkpoint is not None and n_seen % config.checkpoint_every == 0:
            checkpoint.save(n_seen, {"stats": stats}, extra={"skipped": skipped})
        if on_prompt is not None:
            on_prompt(n_seen)
    return skipped


def _check_records(records: Any) -> None:
    if isinstance(records, (str, bytes)) or records is None or not hasattr(records, "__iter__"):
        raise InputError(f"run_dataset takes a list of prompts (strings or records), got {type(records).__name__}.",
                         hint="For one prompt use routes.run(probe, text).")


def _prepare_dataset(probe, records: Iterable, *, config: DatasetConfig, **_: Any) -> registry.Inputs:
    """The hash of the records' ordered ``(text, domain)`` digests: the hash :func:`run_dataset` derives while it
    streams them, and a sharded sweep from its merged state."""
    _check_records(records)
    return registry.Inputs(registry.digests_hash(_digests(list(records))))


def _digests(records: Sequence) -> torch.Tensor:
    return registry.digests([_text_domain(r) for r in records])


def accumulate(probe, items: Sequence, config: DatasetConfig) -> dict[str, Any]:
    """One shard of a dataset sweep (the shard protocol): the shard's :class:`RouteStats` state, its skipped
    prompts and the digests of its records ``[n, 8]`` (uint8), which name the input in the key."""
    registry.check_config(config, DatasetConfig, "routes dataset mode")
    stats = RouteStats(probe.info.n_layers, probe.info.n_heads)
    skipped = _fold(probe, items, config, stats)
    return {"stats": stats.state(), "n_skipped": int(skipped), "digests": _digests(items)}


def _route_stats(st: Mapping[str, Any], info: Mapping[str, Any]) -> RouteStats:
    r = RouteStats(int(info["n_layers"]), int(info["n_heads"]))
    r.load_state(st)
    return r


def merge_states(a: Mapping[str, Any] | None, b: Mapping[str, Any], config: DatasetConfig, info: Mapping[str, Any]) -> dict[str, Any]:
    """Fold the states of two consecutive shards (``a`` first; ``None``: empty)."""
    if a is None:
        return dict(b)
    r = _route_stats(a["stats"], info)
    r.merge(_route_stats(b["stats"], info))
    return {"stats": r.state(), "n_skipped": a["n_skipped"] + b["n_skipped"],
            "digests": torch.cat([a["digests"], b["digests"]])}


def result_from_state(probe_or_info, state: Mapping[str, Any], config: DatasetConfig, *,
                      timings: Mapping[str, float] | None = None, source: str = "") -> "RouteStatsResult":
    """The result of a (merged) sweep state; its key names the records by their digests."""
    info = getattr(probe_or_info, "info", probe_or_info)
    info = info.to_dict() if hasattr(info, "to_dict") else dict(info)
    return _stats_result(info, _route_stats(state["stats"], info), config=config, n_skipped=int(state["n_skipped"]),
                         input_hash=registry.digests_hash(state["digests"]), timings=timings,
                         n_records=int(state["digests"].shape[0]))


def _stats_result(model: Mapping[str, Any], stats: RouteStats, *, config: DatasetConfig, n_skipped: int, input_hash: str,
                  timings: Mapping[str, float] | None = None, n_records: int | None = None) -> RouteStatsResult:
    if stats.n_updates == 0 and float(stats.n.sum()) == 0:
        raise InputError("no prompt could be used (the input is empty or every prompt is shorter than the position).",
                         hint="Check the file, or use --position -1.")
    f = stats.finalize()
    label = f"{n_records} records (digest {input_hash[:8]})" if n_records is not None else ""
    return RouteStatsResult(config=config, model=dict(model), input_hash=input_hash, timings=dict(timings or {}), inputs=label,
                            domains=f["domains"], n=f["n"], head_freq=f["head_freq"].float(), head_mean=f["head_mean"].float(),
                            ffn_freq=f["ffn_freq"].float(), ffn_mean=f["ffn_mean"].float(), n_skipped=n_skipped,
                            faith_n=f.get("faith_n"), faith_mean=f.get("faith_mean"), faith_hist=f.get("faith_hist"))


def run_dataset(probe, records: Iterable, *, config: DatasetConfig = DatasetConfig(), checkpoint=None,
                progress: ProgressFn | None = None, partial: Callable[["RouteStatsResult"], None] | None = None,
                partial_every: int = 8) -> RouteStatsResult:
    """Route statistics over many prompts (memory independent of their number).

    Args:
        records: :class:`analyses.core.io.Record` items (or plain strings); ``domain`` groups the statistics
            ("all" when absent). The result's key comes from the records themselves (text and domain, in order).
        checkpoint: an :class:`analyses.core.io.Checkpoint`; a re-run with the same one resumes after the last save.
        progress: :class:`~analyses.core.progress.Progress` events: phase ``routes``, in prompts (the total is
            known when ``records`` has a length).
        partial: called with the statistics so far every ``partial_every`` prompts (a live view).
    """
    registry.check_probe(probe, "routes.run_dataset")
    registry.check_config(config, DatasetConfig, "routes.run_dataset")
    _check_records(records)
    timer = Timer()
    stats = RouteStats(probe.info.n_layers, probe.info.n_heads)
    done, digests = [0], []

    def digested(items):  # the records stream through; only their 8-byte digests are kept (the key)
        for rec in items:
            digests.append(_digests([rec]))
            yield rec

    bar = phase(progress, "routes", len(records) if hasattr(records, "__len__") else None, "prompts")

    def step(n: int) -> None:
        done[0] = n
        bar.set(n)
        if partial is not None and done[0] % partial_every == 0 and float(stats.n.sum()) > 0:
            partial(_stats_result(probe.info.to_dict(), stats, config=config, n_skipped=0, input_hash=""))

    with timer("routes"):
        skipped = _fold(probe, digested(records), config, stats, checkpoint=checkpoint, on_prompt=step)
    input_hash = registry.digests_hash(torch.cat(digests) if digests else torch.zeros(0, 8, dtype=torch.uint8))
    return _stats_result(probe.info.to_dict(), stats, config=config, n_skipped=skipped, input_hash=input_hash,
                         timings=timer.seconds, n_records=len(digests))


def _sweep_run(probe, config: DatasetConfig, *, texts=None, domain: str = "prose", n_prompts: int = 16, **_: Any):
    if texts is None:
        from .core import domains as _domains

        _domains.check_domains([domain])
        batch = _domains.domain_tokens(probe, domain, n=n_prompts, T=config.max_tokens, prepend_bos=None)
        texts = [probe.to_string(t) for t in batch.tokens]
    return run_dataset(probe, list(texts), config=config)


def _sweep_rows(result: RouteStatsResult) -> list[dict]:
    """Head and FFN frequency and mean importance on the routes, the domains pooled by prompt count."""
    from .core.checkpoints import metric_rows

    w = result.n.float() / result.n.float().sum().clamp_min(1)
    return (metric_rows("head_freq", torch.einsum("d,dlh->lh", w, result.head_freq.float()))
            + metric_rows("head_mean", torch.einsum("d,dlh->lh", w, result.head_mean.float()))
            + metric_rows("ffn_freq", torch.einsum("d,dl->l", w, result.ffn_freq.float()))
            + metric_rows("ffn_mean", torch.einsum("d,dl->l", w, result.ffn_mean.float())))


SPEC_DATASET = registry.register(registry.Analysis(
    name="routes.dataset", order=1, doc="routes", title="Route statistics over a dataset", summary="how often each head and FFN is on the route",
    config=DatasetConfig, result=RouteStatsResult, run=run_dataset, prepare=_prepare_dataset, page="routes", memory=MEMORY,
    shard=registry.ShardProtocol(accumulate=accumulate, merge=merge_states, finish=result_from_state, name="routes",
                                 count=lambda st: st["stats"]["__n_updates__"] + st["n_skipped"]),
    sweep=registry.Sweep(run=_sweep_run, rows=_sweep_rows),
))
dataset_key = SPEC_DATASET.key  # the key run_dataset() gives these records
