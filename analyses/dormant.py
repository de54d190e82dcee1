"""Active vs dormant attention heads per domain (Guo et al. 2024, arXiv 2410.13835, §2–3).

A head is **dormant** on a domain when its attention collapses onto the sink token s (position 0,
BOS by default): the mean attention on s over the queries that see it,

    m_s^{l,h}(domain) = mean_samples α_s^{l,h}   (α as in Gu et al. 2024, eq. for α_k; see analyses.sinks)

exceeds θ (default 0.9, dormant.md; Sandoval-Segura et al. calibrate 0.78–0.93 on Llama-3.1-8B).
It is **active** otherwise. Because the sink's value state is drained (‖v_s W_O,h‖ ≈ 0), a dormant
head writes ≈ nothing, which a causal check confirms: per tested head, the change in next-token
loss per domain when its attention rows are moved to the sink ("move_attn_to_bos", ``AttendTo``) or
zeroed ("zero_out_attn", ``ZeroAttention``). Heads whose status differs between domains are the
key output (Llama-2-7B L16H25: dormant on Wikipedia, active on GitHub).

The sink need not be the first token. With ``sink="auto"`` it is found from the attention statistics
(dormant.md: Guo et al. track BOS and a delimiter such as "."): per sample, the key with the largest
mean α over all layers and heads among the keys that at least half of the queries see (``k < T/2``, so
late keys with few queries cannot win by noise). If most samples peak at position 0, the sink is the
first token (BOS when present); otherwise it is the token id most of the samples peak on (e.g. "\n" or
"."), located per sample at its first occurrence (samples without it fall back to position 0 and are
counted). ``sink_token="\n"`` names the token instead. The mass and the dormant criterion are then
taken at each sample's own sink position: ``m_s = mean_samples α_{s_b}`` over the queries that see it,
and "move attention to the sink" moves the rows of those queries (``t ≥ s_b``) only.

Statistics stream through reducers (:func:`analyses.sinks.collect_stats`); interventions cost one
pass per (tested head, domain), so only a head subset is tested (``heads`` or the ``max_heads``
with the largest spread of sink mass across domains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import pandas as pd
import torch

from probes import AttendTo, Edit, ZeroAttention, head_label, layer_label, parse_head
from probes.errors import ConfigError, InputError
from probes.sites import site as _site

from .core import base, domains as _domains, registry
from .core.base import option, stored
from .core.progress import ProgressFn, phase
from .core import planner
from .sinks import _memory as _sinks_memory
from .sinks import bos_flag, collect_stats, next_token_loss
from .core.store import hash_inputs

__all__ = ["Config", "DormantResult", "run", "result_key", "dormant_map", "status_flips", "detect_sink", "sink_mass_at", "AttendToPositions"]


@dataclass(frozen=True, kw_only=True)
class Config(base.Config):
    """Dormant-head settings (defaults from shared/methods/dormant.md)."""

    # defaults: shared/methods/dormant.md
    T: int = option(64, ge=2, help="Sequence length (dormant.md: max_len=64).")
    theta: float = option(0.9, gt=0, lt=1, help="Dormant threshold θ: dormant ⇔ mean_t A[t, s] > θ.",
                          hint="Use e.g. --theta 0.9 (the default).")
    sink_pos: int = option(0, ge=0, help="Sink position s (0 = BOS / the first token).")
    sink: Literal["position", "auto"] = option("position", help="position (sink_pos) or auto (found from the attention statistics).")
    sink_token: str | None = option(None, help="Or name the sink token (e.g. '\\n', '.'): its first occurrence per sample.")
    n_samples: int = option(32, ge=1, help="Samples per domain.")
    bos: Literal["tokenizer", "always", "never"] = option("always", help="BOS policy (the sink is BOS, Guo et al.).")
    intervention: Literal["none", "attn_to_sink", "zero"] = option("attn_to_sink", help="Causal check: move attention to the sink, zero it, or none.")
    heads: tuple[str, ...] | None = option(None, help="Heads to test, e.g. L5H3 (default: the top max_heads by spread).")
    max_heads: int = option(6, ge=0, help="Heads tested when heads is not given (0 = no causal check).")
    delta: float | None = option(None, gt=0, help="Optional causal rule: dormant also needs |Δloss| < delta on the domain.")
    batch_size: int = option(8, ge=1, help="Sequences per forward pass.")
    seed: int = option(0, help="Seed of the sample order.")

    def __post_init__(self):
        if self.sink_pos >= self.T:
            raise ConfigError(f"sink_pos={self.sink_pos!r}; use a position in 0..T-1 (0 = the first token/BOS).")
        if self.sink_token == "":
            raise ConfigError(f"sink_token={self.sink_token!r}; give the token's text (e.g. '\\n' or '.') or None.")
        if self.heads is not None:
            for h in self.heads:
                parse_head(h)


# ----------------------------------------------------------------------------- math
@torch.no_grad()
def dormant_map(sink_mass: torch.Tensor, theta: float) -> torch.Tensor:
    """``bool [D, L, H]``: sink mass ``[D, L, H]`` above θ."""
    return sink_mass > theta


@torch.no_grad()
def detect_sink(alpha: torch.Tensor, tokens: torch.Tensor) -> tuple[int | None, torch.Tensor]:
    """The model's sink from per-sample α.

    Args:
        alpha: ``[S, L, H, T]`` per-sample mean attention each key receives (see :func:`analyses.sinks.alpha_from_pattern`).
        tokens: ids ``[S, T]``.
    Returns:
        ``(token_id, peaks)``: ``token_id`` is None when most samples peak at position 0 (the sink is the first
        token), else the id most samples peak on; ``peaks [S]`` the per-sample argmax over ``k < max(1, T // 2)``
        of α averaged over layers and heads.
    """
    S, L, H, T = alpha.shape
    score = alpha.double().mean(dim=(1, 2))[:, : max(1, T // 2)]  # [S, T/2]
    peaks = score.argmax(dim=-1)
    if int((peaks == 0).sum()) * 2 >= S:
        return None, peaks
    ids = tokens[torch.arange(S), peaks.to(tokens.device)].cpu()
    ids = ids[peaks.cpu() != 0]
    vals, counts = ids.unique(return_counts=True)
    return int(vals[counts.argmax()]), peaks


def sink_positions(tokens: torch.Tensor, token_id: int | None, default: int = 0) -> tuple[torch.Tensor, int]:
    """Per sample the first position of ``token_id`` in ``tokens [S, T]`` (``default`` where absent, or for None).

    Returns ``(positions [S], n_absent)``.
    """
    S = tokens.shape[0]
    if token_id is None:
        return torch.full((S,), default, dtype=torch.long), 0
    hit = tokens.cpu() == token_id
    has = hit.any(dim=1)
    pos = torch.where(has, hit.float().argmax(dim=1), torch.full((S,), default))
    return pos.long(), int((~has).sum())


@torch.no_grad()
def sink_mass_at(alpha: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean α at each sample's sink and the largest mean α of any other key.

    Args:
        alpha: ``[S, L, H, T]``; positions: ``[S]`` sink position per sample.
    Returns:
        ``sink_mass [L, H]`` (mean over samples of ``α_{s_b}``) and ``max_other [L, H]`` (max over keys of the mean
        over the samples where that key is not the sink).
    """
    S, L, H, T = alpha.shape
    idx = positions.view(S, 1, 1, 1).expand(S, L, H, 1).to(alpha.device)
    mass = alpha.gather(-1, idx).squeeze(-1).double().mean(0)
    other = alpha.double().scatter(-1, idx, float("nan"))
    max_other = other.nanmean(0).nan_to_num(nan=float("-inf")).max(dim=-1).values
    return mass.float(), max_other.float()


@dataclass(frozen=True)
class AttendToPositions(Edit):
    """Move the attention rows of ``heads`` in ``layer`` to one key per batch row (``keys[b]``), for the queries
    that can see it (``t ≥ keys[b]``); earlier queries keep their rows ("move_attn_to_bos" with a delimiter sink)."""

    site: str = ""
    layer: int = 0
    heads: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "site", _site("pattern", self.layer).name)

    def apply(self, x):
        B, _, T, _ = x.shape
        if len(self.keys) != B:
            raise ConfigError(f"AttendToPositions has {len(self.keys)} keys for a batch of {B} rows.")
        out = x.clone()
        h = list(self.heads)
        for b, k in enumerate(self.keys):
            rows = out[b, h, k:]  # [h, T - k, T]
            rows.zero_()
            rows[..., k] = 1.0
            out[b, h, k:] = rows
        return out


def status_flips(dormant: torch.Tensor, domains: Sequence[str]) -> pd.DataFrame:
    """Heads dormant on some domains and active on others.

    Args:
        dormant: ``bool [D, L, H]``.
    Returns:
        frame ``head, layer, head_index, dormant_on, active_on``.
    """
    D, L, H = dormant.shape
    rows = []
    any_d, all_d = dormant.any(dim=0), dormant.all(dim=0)
    for l, h in (any_d & ~all_d).nonzero().tolist():
        rows.append({"head": head_label(l, h), "layer": l, "head_index": h,
                     "dormant_on": ",".join(d for i, d in enumerate(domains) if dormant[i, l, h]),
                     "active_on": ",".join(d for i, d in enumerate(domains) if not dormant[i, l, h])})
    return pd.DataFrame(rows, columns=["head", "layer", "head_index", "dormant_on", "active_on"])


# ----------------------------------------------------------------------------- result
@base.register_result
@dataclass(frozen=True, kw_only=True)
class DormantResult(base.Result):
    """Per-domain head map.

    Arrays (D domains, L layers, H heads, T positions): ``sink_mass [D, L, H]`` (mean α at the sink),
    ``max_other_mass [D, L, H]`` (largest mean α of any other key), ``value_norm [D, L, H, T]``,
    ``resid_norm [D, L+1, T]``, ``loss [D]`` (mean next-token CE), ``delta_loss [D, L, H]`` (loss change
    under the intervention; NaN for heads not tested), ``dormant bool [D, L, H]``.
    """

    analysis: ClassVar[str] = "dormant"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()), ("table", "flips", lambda r: r.flips),
                             ("table", "causal", lambda r: r.causal_frame()), ("extra", "summary", lambda r: r.summary()))

    domains: tuple[str, ...] = stored("extra")
    sink_mass: torch.Tensor = stored("array")
    max_other_mass: torch.Tensor = stored("array")
    value_norm: torch.Tensor = stored("array")
    resid_norm: torch.Tensor = stored("array")
    loss: torch.Tensor = stored("array")
    delta_loss: torch.Tensor = stored("array")
    dormant: torch.Tensor = stored("array", save=lambda r: r.dormant.to(torch.uint8), load=lambda a: a.bool())
    tested: tuple[str, ...] = stored("extra", default=())
    n_samples: tuple[int, ...] = stored("extra", default=())
    n_skipped: tuple[int, ...] = stored("extra", default=())
    sink_token: str = stored("extra", default="position 0")  # "position p" or the sink token's text (repr) with its id
    sink_token_id: int | None = stored("extra", default=None)  # None: a fixed position (config.sink_pos)
    sink_positions: tuple[tuple[int, ...], ...] = stored("extra", default=())  # per domain, per sample
    # per domain: share of samples whose α peak (k < T/2) is at their sink
    sink_agreement: tuple[float, ...] = stored("extra", default=())
    # per domain: samples without the sink token (position sink_pos used)
    n_fallback: tuple[int, ...] = stored("extra", default=())

    @property
    def flips(self) -> pd.DataFrame:
        """Heads whose status differs between domains (see :func:`status_flips`)."""
        return status_flips(self.dormant, self.domains)

    def summary(self) -> dict[str, Any]:
        D, L, H = self.dormant.shape
        out = {"sink": self.sink_token}
        if self.sink_agreement:
            out["samples peaking at the sink"] = {d: round(a, 3) for d, a in zip(self.domains, self.sink_agreement)}
        if self.sink_token_id is not None:
            out["samples without the sink token"] = dict(zip(self.domains, self.n_fallback))
        out.update({f"dormant heads on {d}": f"{int(self.dormant[i].sum())}/{L * H}" for i, d in enumerate(self.domains)})
        out["heads that flip between domains"] = len(self.flips)
        out["tested heads"] = ", ".join(self.tested) or "none"
        out.update({f"loss on {d}": round(float(self.loss[i]), 3) for i, d in enumerate(self.domains)})
        out["skipped (shorter than T)"] = dict(zip(self.domains, self.n_skipped))
        return out

    def causal_frame(self) -> pd.DataFrame:
        """``head, domain, sink_mass, dormant, delta_loss`` for the tested heads."""
        rows = []
        for lab in self.tested:
            l, h = parse_head(lab)
            for i, d in enumerate(self.domains):
                rows.append({"head": lab, "domain": d, "sink_mass": float(self.sink_mass[i, l, h]),
                             "dormant": bool(self.dormant[i, l, h]), "delta_loss": float(self.delta_loss[i, l, h])})
        return pd.DataFrame(rows, columns=["head", "domain", "sink_mass", "dormant", "delta_loss"])

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``model, domain, layer, head, sink_mass, max_other_mass, dormant, delta_loss``."""
        D, L, H = self.sink_mass.shape
        idx = pd.MultiIndex.from_product([range(D), range(L), range(H)], names=["d", "layer", "head"]).to_frame(index=False)
        df = pd.DataFrame({"model": self.model.get("name", ""), "domain": [self.domains[i] for i in idx["d"]],
                           "layer": idx["layer"], "head": idx["head"],
                           "sink_mass": self.sink_mass.reshape(-1).numpy(), "max_other_mass": self.max_other_mass.reshape(-1).numpy(),
                           "dormant": self.dormant.reshape(-1).numpy(), "delta_loss": self.delta_loss.reshape(-1).numpy()})
        return df

    def plot(self, kind: Literal["map", "diff", "delta"] = "map", domain: str | None = None, other: str | None = None):
        """``map``: sink mass [layer × head] on ``domain``; ``diff``: ``domain − other``; ``delta``: Δloss of tested heads."""
        import plotly.graph_objects as go

        D, L, H = self.sink_mass.shape
        di = self.domains.index(domain) if domain in self.domains else 0
        x, y = [f"H{h}" for h in range(H)], [layer_label(l) for l in range(L)]
        if kind == "map":
            fig = go.Figure(go.Heatmap(z=self.sink_mass[di].numpy(), x=x, y=y, zmin=0, zmax=1, colorscale="Viridis",
                                       colorbar={"title": "sink mass"}))
            fig.update_layout(title=f"Sink mass on {self.domains[di]} (dormant if > {self.config.theta})", yaxis_autorange="reversed")
        elif kind == "diff":
            oi = self.domains.index(other) if other in self.domains else (1 if D > 1 else 0)
            z = (self.sink_mass[di] - self.sink_mass[oi]).numpy()
            fig = go.Figure(go.Heatmap(z=z, x=x, y=y, zmid=0, colorscale="RdBu", colorbar={"title": "Δ mass"}))
            fig.update_layout(title=f"Sink mass: {self.domains[di]} − {self.domains[oi]}", yaxis_autorange="reversed")
        elif kind == "delta":
            df = self.causal_frame()
            fig = go.Figure()
            for d in self.domains:
                s = df[df.domain == d]
                fig.add_trace(go.Bar(x=s["head"], y=s["delta_loss"], name=d))
            fig.update_layout(title=f"Δ loss when the head's attention is {'moved to the sink' if self.config.intervention == 'attn_to_sink' else 'zeroed'}",
                              barmode="group", yaxis_title="Δ loss (nats)")
        else:
            raise ConfigError(f"plot kind={kind!r}; use map, diff or delta.")
        return fig


# ----------------------------------------------------------------------------- entry point
def _pick_heads(config: Config, sink_mass: torch.Tensor, dormant: torch.Tensor, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    if config.intervention == "none":
        return []
    if config.heads is not None:
        out = [parse_head(h) for h in config.heads]
        bad = [head_label(l, h) for l, h in out if not (0 <= l < n_layers and 0 <= h < n_heads)]
        if bad:
            raise ConfigError(f"head {bad[0]} does not exist.", hint=f"Layers 0..{n_layers - 1}, heads 0..{n_heads - 1}.")
        return out
    # heads whose status flips first, then by spread of sink mass across domains, then by mass
    spread = sink_mass.max(dim=0).values - sink_mass.min(dim=0).values
    flip = (dormant.any(0) & ~dormant.all(0)).float()
    score = flip * 10 + spread + 1e-3 * sink_mass.mean(0)
    idx = score.reshape(-1).argsort(descending=True)[: config.max_heads]
    return [(int(i) // n_heads, int(i) % n_heads) for i in idx]


def _batches(probe, domains: Sequence[str] | Mapping[str, Sequence[str]], config: Config) -> list:
    """The domains' sampled token batches (:func:`analyses.core.domains.resolve`), one per domain."""
    return _domains.resolve(probe, domains, n=config.n_samples, T=config.T, seed=config.seed, prepend_bos=bos_flag(config.bos))


def _input_hash(batches: Sequence) -> str:
    """The input hash of a dormant run: every domain's tokens and its name."""
    return hash_inputs([b.tokens for b in batches], [b.name for b in batches])


def _prepare(probe, domains: Sequence[str] | Mapping[str, Sequence[str]] = ("prose", "code", "arithmetic"), *,
             config: Config) -> registry.Inputs:
    """The domains' sampled batches and their hash (shared by :func:`run` and :data:`result_key`)."""
    if isinstance(domains, str):
        raise InputError(f"domains must be a list of domain names or a {{name: texts}} mapping, got the string {domains!r}.",
                         hint=f"Pass a list: dormant.run(probe, [{domains!r}]).")
    if not isinstance(domains, (list, tuple, Mapping)):
        raise InputError(f"domains must be a list of domain names or a {{name: texts}} mapping, got {type(domains).__name__}.",
                         hint="E.g. ('prose', 'code') or analyses.core.domains.load_jsonl(path).")
    batches = _batches(probe, domains, config)
    label = ", ".join(f"{b.name} ({b.tokens.shape[0]} rows)" for b in batches)
    return registry.Inputs(_input_hash(batches), batches, label)


def run(probe, domains: Sequence[str] | Mapping[str, Sequence[str]] = ("prose", "code", "arithmetic"), *,
        config: Config = Config(), progress: ProgressFn | None = None) -> DormantResult:
    """Sink mass, value drains, residual peaks and the dormant map per domain, plus the causal check.

    Args:
        probe: a loaded probe.
        domains: built-in domain names, or ``{name: texts}`` (e.g. :func:`analyses.core.domains.load_jsonl`).
        config: :class:`Config`.
        progress: :class:`~analyses.core.progress.Progress` events: phase ``measuring <domain>`` (samples) per
            domain, then ``causal check`` (one unit per head, domain and batch).
    """
    timer = base.Timer()
    with timer("tokenize"):
        inp = SPEC.inputs(probe, domains, config=config)
    batches = inp.data
    for b in batches:
        if b.tokens.shape[0] == 0:
            raise InputError(f"domain {b.name!r}: all {b.n_skipped} texts are shorter than T={config.T} tokens.",
                             hint="Give longer texts or a smaller T (--T).")
    names = tuple(b.name for b in batches)
    L, H = probe.info.n_layers, probe.info.n_heads
    s = config.sink_pos
    follow = config.sink == "auto" or config.sink_token is not None  # the sink position varies per sample
    stats = []
    with timer("stats"):
        for b in batches:
            stats.append(collect_stats(probe, b.tokens, positions=(s,), eps_grid=(config.theta,), batch_size=config.batch_size,
                                       loss=True, per_sample=follow, progress=progress,
                                       what=f"measuring {b.name}"))
    token_id, agreement, label = None, (), f"position {s}"
    if config.sink_token is not None:
        ids = probe.tokenizer(config.sink_token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(f"sink_token={config.sink_token!r} is {len(ids)} tokens for this tokenizer; it must be one.",
                              hint="Give a single token's text, e.g. '\\n' or '.', or use sink='auto'.")
        token_id = ids[0]
    elif config.sink == "auto":
        token_id, _ = detect_sink(torch.cat([st["alpha"] for st in stats]), torch.cat([b.tokens for b in batches]))
        if token_id is None:
            s = 0  # most samples peak on the first token
            label = "position 0"
    positions, fallback = [], []
    for b in batches:
        pos, n_abs = sink_positions(b.tokens, token_id, default=s)
        positions.append(pos)
        fallback.append(n_abs)
    if token_id is not None:
        label = f"token {probe.tokenizer.decode([token_id])!r} (id {token_id})"
    if follow:
        masses = [sink_mass_at(st["alpha"], pos) for st, pos in zip(stats, positions)]
        sink_mass = torch.stack([m for m, _ in masses])
        max_other = torch.stack([o for _, o in masses])
        T = stats[0]["alpha"].shape[-1]
        agreement = tuple(float((st["alpha"].double().mean(dim=(1, 2))[:, : max(1, T // 2)].argmax(-1) == pos).double().mean())
                          for st, pos in zip(stats, positions))
    else:
        alpha = torch.stack([st["alpha_mean"] for st in stats])  # [D, L, H, T]
        sink_mass = alpha[..., s]
        others = torch.cat([alpha[..., :s], alpha[..., s + 1:]], dim=-1)
        max_other = others.max(dim=-1).values
    dormant = dormant_map(sink_mass, config.theta)
    loss = torch.tensor([st["loss"] for st in stats])
    delta = torch.full((len(batches), L, H), float("nan"))
    heads = _pick_heads(config, sink_mass, dormant, L, H)
    with timer("interventions"):
        n_batches = sum(-(-b.tokens.shape[0] // config.batch_size) for b in batches)
        bar = phase(progress, "causal check", len(heads) * n_batches, "batches")
        for l, h in heads:
            for i, b in enumerate(batches):
                losses = []
                for j in range(0, b.tokens.shape[0], config.batch_size):
                    t = b.tokens[j:j + config.batch_size]
                    if config.intervention == "zero":
                        edit = ZeroAttention(layer=l, heads=[h])
                    elif follow:
                        edit = AttendToPositions(layer=l, heads=(h,), keys=tuple(int(k) for k in positions[i][j:j + config.batch_size]))
                    else:
                        edit = AttendTo(layer=l, heads=[h], key=s)
                    losses.append(next_token_loss(probe.run(t, edits=[edit]), t).cpu())
                    bar.advance(head=head_label(l, h))
                delta[i, l, h] = float(torch.cat(losses).mean()) - float(loss[i])
    if config.delta is not None:
        tested = ~torch.isnan(delta)
        dormant = dormant & ~(tested & (delta.abs() >= config.delta))
    return DormantResult(
        config=config, model=probe.info.to_dict(), input_hash=inp.hash, inputs=inp.label,
        timings=timer.seconds, domains=names, sink_mass=sink_mass, max_other_mass=max_other,
        value_norm=torch.stack([st["value_norm"] for st in stats]), resid_norm=torch.stack([st["resid_norm"] for st in stats]),
        loss=loss, delta_loss=delta, dormant=dormant, tested=tuple(head_label(l, h) for l, h in heads),
        n_samples=tuple(int(b.tokens.shape[0]) for b in batches), n_skipped=tuple(b.n_skipped for b in batches),
        sink_token=label, sink_token_id=token_id, sink_positions=tuple(tuple(int(x) for x in p) for p in positions),
        sink_agreement=agreement, n_fallback=tuple(fallback),
    )


def _memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """Sinks' terms (:data:`analyses.sinks.MEMORY`: the float32 patterns recomputed from q/k and the value norms), and
    the next-token loss every batch computes (:func:`analyses.sinks.next_token_loss`, for the domain's loss and each
    causal check): the ``[B, T, V]`` logits beside their float32 log-softmax."""
    return {**_sinks_memory(s, B, T, o), "logits": B * T * s.d_vocab * (s.itemsize + 4)}


MEMORY = planner.MemoryModel("dormant", _memory, sizes=lambda c: {"seq_len": c.T, "batch_size": c.batch_size},
                             batch_field="batch_size", seq_option="--T")


SPEC = registry.register(registry.Analysis(
    name="dormant", order=2, doc="sinks", title="Active and dormant heads", summary="which heads park their attention on the sink, per domain",
    config=Config, result=DormantResult, run=run, prepare=_prepare, cli="dormant", page="sinks", memory=MEMORY,
))
result_key = SPEC.key  # the key run() gives these inputs, from the same _prepare
