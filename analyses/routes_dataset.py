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
           "result_from_state"]


@dataclass(frozen=True, kw_only=True)
class DatasetConfig(Config):
    """Dataset mode: route statistics of the prediction at ``position`` of every prompt."""

    max_tokens: int = option(128, ge=2, help="Dataset mode: cut prompts to this many tokens (memory stays bounded).")
    # only the prediction's route is counted: compute it top-down
    mode: Literal["all", "route"] = option("route", help="all (graph of every position) or route (top-down: only the route to --position).")
    checkpoint_every: int = option(16, ge=1, help="Prompts between checkpoints.")


# ============================================================================ dataset mode
class RouteStats(Reducer):
    """Streaming per-domain route statistics (mergeable across shards, checkpointable).

    For each domain: n prompts; head_on [L, H] prompts whose route uses the head; head_sum [L, H]
    summed head importance in the route; ffn_on [L] prompts whose route passes an FFN node of layer l;
    ffn_sum [L] summed FFN edge weight on the route.
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

    def _index(self, domain: str) -> int:
        if domain not in self.domains:
            self.domains = list(self.domains) + [domain]
            self.n = torch.cat([self.n, torch.zeros(1, dtype=torch.float64)])
            self.head_on = torch.cat([self.head_on, torch.zeros(1, self.n_layers, self.n_heads, dtype=torch.float64)])
            self.head_sum = torch.cat([self.head_sum, torch.zeros(1, self.n_layers, self.n_heads, dtype=torch.float64)])
            self.ffn_on = torch.cat([self.ffn_on, torch.zeros(1, self.n_layers, dtype=torch.float64)])
            self.ffn_sum = torch.cat([self.ffn_sum, torch.zeros(1, self.n_layers, dtype=torch.float64)])
        return self.domains.index(domain)

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
            self.n[k] += other.n[j]
            self.head_on[k] += other.head_on[j]
            self.head_sum[k] += other.head_sum[j]
            self.ffn_on[k] += other.ffn_on[j]
            self.ffn_sum[k] += other.ffn_sum[j]

    def _state(self):
        return {"domains": list(self.domains), "n": self.n, "head_on": self.head_on, "head_sum": self.head_sum,
                "ffn_on": self.ffn_on, "ffn_sum": self.ffn_sum}

    def load_state(self, st):
        super().load_state(st)
        self.domains = list(self.domains)
        for k in ("n", "head_on", "head_sum", "ffn_on", "ffn_sum"):
            setattr(self, k, getattr(self, k).to(torch.float64))

    def finalize(self) -> dict[str, Any]:
        n = self.n.clamp_min(1)
        return {"domains": list(self.domains), "n": self.n.clone(), "head_freq": self.head_on / n[:, None, None],
                "head_mean": self.head_sum / n[:, None, None], "ffn_freq": self.ffn_on / n[:, None], "ffn_mean": self.ffn_sum / n[:, None]}


@register_result
@dataclass(frozen=True, kw_only=True)
class RouteStatsResult(Result):
    """Dataset-mode statistics per domain D: head_freq/head_mean [D, L, H], ffn_freq/ffn_mean [D, L], n [D]."""

    analysis: ClassVar[str] = "routes.dataset"
    config_class: ClassVar[type] = DatasetConfig

    saved_views: ClassVar = (("table", "components", lambda r: r.to_frame()),)

    domains: list[str] = stored("extra")
    n: torch.Tensor = stored("array")
    head_freq: torch.Tensor = stored("array")
    head_mean: torch.Tensor = stored("array")
    ffn_freq: torch.Tensor = stored("array")
    ffn_mean: torch.Tensor = stored("array")
    n_skipped: int = stored("extra", default=0)

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
                            ffn_freq=f["ffn_freq"].float(), ffn_mean=f["ffn_mean"].float(), n_skipped=n_skipped)


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
