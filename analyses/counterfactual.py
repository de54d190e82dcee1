"""Counterfactual token generation with a Gumbel-Max structural causal model.

Chatzi, Corvelo Benz, Straitouri, Tsirtsis, Gomez-Rodriguez (2024), "Counterfactual Token Generation in
Large Language Models", arXiv 2409.17027 (CLeaR 2025). Sampling step ``t`` is the SCM (their §3)::

    y_t = argmax_v [ log softmax(z_t / tau)_v + G_{t,v} ],      G_{t,v} iid Gumbel(0, 1)

which is exact sampling from ``softmax(z_t / tau)`` (Gumbel-Max trick) and *counterfactually stable*
(Oberst & Sontag 2019). Top-k / top-p restrict the argmax to the current top set while the noise stays
indexed by **token id** (the "top-p token" SCM of the reference code), so it follows tokens when the set
changes. ``tau = 0`` is greedy decoding (noise unused).

Noise is not stored: ``G_t`` is drawn from a counter-based key ``(seed, step, stream)`` (the method page's
workbench recommendation instead of saved RNG states), so any step of any run can be replayed alone.
A counterfactual (abduction - action - prediction):

1. keeps the factual tokens before the intervention (their KV cache is copied, not recomputed);
2. applies the intervention: a token edit inside the response, a prompt edit, or a model edit (heads /
   neurons zeroed by :class:`probes.Ablate` on ``hook_z`` / ``mlp.hook_post`` at decode time, only for the
   counterfactual rows of the batch, so factual and counterfactual decode together: ``probe.decoder``);
3. continues sampling with the *factual* noise: the k-th token after the edit point uses the noise of the
   k-th factual step after it (alignment by step count, as in the reference code, also when a
   replacement spans several tokens). The *interventional* baseline uses the same edited prefix with
   fresh noise (streams 1..S).

For text the sampler did not produce (``observed=``), noise is inferred: per step, given the
sampling log-probs ``l`` and the observed token ``k``, ``M ~ Gumbel(logsumexp l)``, ``g_k = M - l_k`` and,
for the other tokens of the set, ``x = -log(e^-M + e^-y)`` with ``y ~ Gumbel(l_v)`` (a Gumbel truncated
below ``M``), ``g_v = x - l_v``; tokens outside the top set keep prior noise (method page, "Posterior").
``n_samples`` posterior draws give a distribution of counterfactuals.

Divergence: first differing response position, token-level Levenshtein distance after the edit point
normalised by the longer length (paper §4.2 uses normalised Levenshtein), and the fraction of positions
unchanged. :func:`bias_sweep` runs templated prompts whose protagonist attribute is swapped with the
same noise (paper §4.3) and reports the shift of an extracted attribute with Wilson / bootstrap intervals.

Axis order: token arrays are ``[row, step]`` (row = counterfactual / interventional sample), noise is
``[row, V]`` per step. Response positions count generated tokens from 0.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence

import pandas as pd
import torch

from probes import Ablate, ConfigError, Edit, InputError, Probe, head_label, neuron_label, parse_label, site
from probes.generation import Decoder

from .core import planner, registry, store
from .core.base import Config as _BaseConfig
from .core.base import Result, Timer, option, register_result, stored

__all__ = [
    "Config", "CounterfactualResult", "TokenEdit", "PromptEdit", "ModelEdit",
    "NoEdit", "parse_intervention", "run", "result_key", "generate", "decision_scores", "branches", "gumbel_noise", "sampling_logprobs",
    "gumbel_max", "posterior_gumbel", "levenshtein", "divergence", "wilson", "starts_word",
    "encode_piece",
]

_EPS = 1e-20  # reference sampler: G = -log(-log(U + eps) + eps)
_POSTERIOR_STREAM = 1_000_000  # noise streams: 0 factual, 1..S interventional, 1e6+s posterior draws


# ============================================================================ configs
@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Counterfactual generation settings.

    Attributes:
        max_new_tokens: generated tokens of the factual text (short by default so CPU runs take ~1 s).
        temperature: tau; 0 = greedy. Default 0.8, the paper's bias experiment (§4.3); §4.2 sweeps 0-1.
        top_k: keep the k most likely tokens (§4.2 sweeps 2-100 at tau 0.6); None = full vocabulary.
        top_p: nucleus: keep tokens whose preceding cumulative probability is <= p (§4.2 sweeps .75-.999).
        seed: noise key; step t of stream s uses Gumbel noise drawn from (seed, t, s).
        noise: ``replay`` reuses the recorded factual noise (the authors' setting); ``posterior`` infers
            noise from the factual text (truncated-Gumbel posterior; the extension on the method page).
        n_samples: posterior noise draws (and interventional samples); 1 for replay.
        interventional: also generate the interventional baseline (same edit, fresh noise).
        prefix_reuse: copy the KV cache of the unchanged prefix instead of recomputing it.
        multi_token: a token-edit replacement that tokenizes to several tokens is forced as a span
            (``span``, noted in the result) or refused (``error``).
        chat: wrap the prompt in the model's chat template.
        stop_at_eos: stop a row at the end-of-sequence token.
    """

    max_new_tokens: int = option(40, ge=1, le=4096, help="Generated tokens of the factual text.")
    temperature: float = option(0.8, ge=0, le=10, help="Sampling temperature tau; 0 = greedy (paper §4.3: 0.8).")
    top_k: int | None = option(None, ge=1, help="Keep the k most likely tokens (default: the full vocabulary).")
    top_p: float | None = option(None, gt=0, le=1, help="Nucleus: keep tokens whose preceding cumulative probability is <= p.")
    seed: int = option(0, ge=0, help="Noise key: step t of stream s uses Gumbel noise drawn from (seed, t, s).")
    noise: Literal["replay", "posterior"] = option("replay", help="replay (recorded factual noise) or posterior (inferred from the text).")
    n_samples: int = option(1, ge=1, le=256, help="Posterior noise draws (and interventional samples).")
    interventional: bool = option(True, help="Also generate the interventional baseline (same edit, fresh noise).")
    prefix_reuse: bool = option(True, help="Copy the KV cache of the unchanged prefix instead of recomputing it.")
    multi_token: Literal["span", "error"] = option("span", help="A replacement of several tokens is forced as a span, or an error.")
    chat: bool = option(False, help="Wrap the prompt in the model's chat template.")
    stop_at_eos: bool = option(True, help="Stop a row at the end-of-sequence token.")


# Default attribute extractor for the bias sweep: occupation categories -> regex (user-editable).


# ============================================================================ interventions
@dataclass(frozen=True)
class NoEdit:
    """No intervention: the counterfactual must reproduce the factual text."""

    def label(self) -> str:
        return "none"


@dataclass(frozen=True)
class TokenEdit:
    """Replace response token ``pos`` by ``new`` (text, or token ids).

    Word boundary: a text replacement takes the replaced token's place in the word structure. When the replaced
    token starts a word (its vocabulary string starts with a space or the tokenizer's word-boundary marker,
    ``Ġ`` in byte-level BPE, ``▁`` in SentencePiece) and ``new`` does not start with whitespace, a leading space
    is added; otherwise ``new`` is used as given. ``verbatim=True`` (``token:5="Maeve"`` in a spec string) uses
    ``new`` exactly as written: ``token:5=" Maeve"`` forces a space, ``token:5="Maeve"`` forbids one.
    """

    pos: int
    new: str | tuple[int, ...]
    verbatim: bool = False

    def label(self) -> str:
        if not isinstance(self.new, str):
            return f"token:{self.pos}=id:{','.join(map(str, self.new))}"
        return f"token:{self.pos}=" + (f'"{self.new}"' if self.verbatim else self.new)


@dataclass(frozen=True)
class PromptEdit:
    """Replace every occurrence of ``old`` in the prompt by ``new``."""

    old: str
    new: str

    def label(self) -> str:
        return f"prompt:{self.old}->{self.new}"


@dataclass(frozen=True)
class ModelEdit:
    """Zero heads (their slice of the o_proj input) and MLP neurons (their down-projection input)."""

    heads: tuple[tuple[int, int], ...] = ()
    neurons: tuple[tuple[int, int], ...] = ()

    def label(self) -> str:
        return "ablate:" + ",".join([head_label(l, h) for l, h in self.heads] + [neuron_label(l, n) for l, n in self.neurons])


Intervention = NoEdit | TokenEdit | PromptEdit | ModelEdit
_SPEC_HELP = ("Use 'token:12=Maeve' (or 'token:12=\" Maeve\"' quoted, exactly as written), 'token:12=id:4312', "
              "'prompt:Lyra->Maeve', 'ablate:L5H3' (or 'ablate:L5H3,L2N17'), or 'none'.")


def parse_intervention(spec: str | Intervention, probe: Probe | None = None) -> Intervention:
    """``"token:12=Maeve"`` / ``"prompt:Lyra->Maeve"`` / ``"ablate:L5H3,L2N17"`` / ``"none"`` -> an intervention.

    With ``probe``, head and neuron labels are checked against the model's sizes.
    """
    if isinstance(spec, (NoEdit, TokenEdit, PromptEdit, ModelEdit)):
        iv = spec
    elif not isinstance(spec, str):
        raise ConfigError(f"intervention {spec!r} is not a string.", hint=_SPEC_HELP)
    else:
        s = spec.strip()
        kind, _, body = s.partition(":")
        kind = kind.strip().lower()
        if kind == "none" and not body:
            iv = NoEdit()
        elif kind == "token":
            m = re.fullmatch(r"\s*(\d+)\s*=(.*)", body, flags=re.S)
            if not m or m.group(2) == "":
                raise ConfigError(f"token edit {spec!r} is not of the form token:<position>=<text>.", hint=_SPEC_HELP)
            new: str | tuple[int, ...] = m.group(2)
            verbatim = len(new) >= 3 and new[0] == new[-1] and new[0] in "\"'"  # quoted: exactly as written
            idm = re.fullmatch(r"id:([\d,\s]+)", new.strip())
            if verbatim:
                new = new[1:-1]
            elif idm:
                new = tuple(int(x) for x in idm.group(1).split(",") if x.strip())
            iv = TokenEdit(int(m.group(1)), new, verbatim)
        elif kind == "prompt":
            if "->" not in body:
                raise ConfigError(f"prompt edit {spec!r} has no '->'.", hint=_SPEC_HELP)
            old, new_t = body.split("->", 1)
            if not old:
                raise ConfigError(f"prompt edit {spec!r} has nothing to replace.", hint=_SPEC_HELP)
            iv = PromptEdit(old, new_t)
        elif kind == "ablate":
            heads, neurons = [], []
            for lab in [x.strip() for x in body.split(",") if x.strip()]:
                kind, layer, idx = parse_label(lab, ("head", "neuron"), where=f" in {spec!r}")
                (heads if kind == "head" else neurons).append((layer, idx))
            if not heads and not neurons:
                raise ConfigError(f"model edit {spec!r} names no head or neuron.", hint=_SPEC_HELP)
            iv = ModelEdit(tuple(heads), tuple(neurons))
        else:
            raise ConfigError(f"unknown intervention {spec!r}.", hint=_SPEC_HELP)
    if probe is not None and isinstance(iv, ModelEdit):
        i = probe.info
        for l, h in iv.heads:
            if not (0 <= l < i.n_layers and 0 <= h < i.n_heads):
                raise ConfigError(f"unknown head L{l}H{h}: this model has layers 0-{i.n_layers - 1} and heads 0-{i.n_heads - 1}.",
                                  hint="Pick a head inside those ranges.")
        for l, n in iv.neurons:
            if not (0 <= l < i.n_layers and 0 <= n < i.d_mlp):
                raise ConfigError(f"unknown neuron L{l}N{n}: this model has layers 0-{i.n_layers - 1} and neurons 0-{i.d_mlp - 1}.",
                                  hint="Pick a neuron inside those ranges.")
    if isinstance(iv, TokenEdit) and iv.pos < 0:
        raise ConfigError(f"token edit position {iv.pos} is negative.", hint="Positions count generated tokens from 0.")
    return iv


# ============================================================================ math (pure tensor functions)
def _mix64(*xs: int) -> int:
    """splitmix64 over the integers -> a 63-bit seed (counter-based key, independent per (seed, step, stream))."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        z = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h & 0x7FFFFFFFFFFFFFFF


def _uniform(seed: int, step: int, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(_mix64(seed, step, stream))
    return torch.rand(shape, generator=g, dtype=torch.float64)


def gumbel_noise(seed: int, step: int, vocab: int, *, stream: int = 0) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[V]`` (float32, CPU) of one sampling step, indexed by token id.

    Drawn on the CPU from the key ``(seed, step, stream)`` alone, so it does not depend on the device,
    the batch, or anything sampled before.
    """
    u = _uniform(seed, step, stream, (vocab,))
    return (-torch.log(-torch.log(u + _EPS) + _EPS)).float()


@torch.no_grad()
def sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Log-probs ``[..., V]`` of the sampling distribution: softmax(z / tau), top-k, then top-p, renormalised.

    Tokens outside the kept set get ``-inf``. Top-p keeps a token when the probability mass of the tokens
    ranked before it is <= p (reference code: ``probs_sum - probs_sort > p`` is masked). ``tau = 0`` returns
    the tau = 1 log-probs (greedy ignores them except for the argmax).
    """
    z = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    if top_p is not None and top_p < 1:
        p_sorted, idx = torch.sort(logp.exp(), dim=-1, descending=True)
        drop_sorted = (torch.cumsum(p_sorted, dim=-1) - p_sorted) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


@torch.no_grad()
def gumbel_max(logp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel-Max: ``argmax_v (logp_v + G_v)`` over the kept set. ``logp [B, V]``, ``noise [B, V]`` -> ids ``[B]``."""
    return torch.argmax(logp + noise.to(logp.device, logp.dtype), dim=-1)


@torch.no_grad()
def posterior_gumbel(logp: torch.Tensor, observed: int, prior: torch.Tensor, u_max: torch.Tensor, u_rest: torch.Tensor) -> torch.Tensor:
    """Posterior Gumbel noise given that ``observed`` was sampled (truncated-Gumbel construction).

    Args:
        logp: sampling log-probs ``[V]`` (-inf outside the top set).
        observed: the observed token id (must lie in the set).
        prior: prior noise ``[S, V]`` kept for tokens outside the set.
        u_max: uniforms ``[S]`` for the maximum ``M``; u_rest: uniforms ``[S, V]`` for the other tokens.

    Returns:
        noise ``[S, V]`` with ``argmax(logp + noise) == observed`` in every row.
    """
    logp = logp.double().cpu()
    keep = torch.isfinite(logp)
    gum = lambda u: -torch.log(-torch.log(u + _EPS) + _EPS)  # noqa: E731
    M = torch.logsumexp(logp[keep], dim=0) + gum(u_max.double())  # [S]
    y = logp[None] + gum(u_rest.double())  # Gumbel(l_v)  [S, V]
    x = -torch.logaddexp(-M[:, None], -y)  # truncated below M
    g = x - logp[None]
    g[:, observed] = M - logp[observed]
    out = torch.where(keep[None], g, prior.double())
    return out.float()


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance between two token sequences (insert / delete / substitute cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def divergence(factual: Sequence[int], other: Sequence[int], start: int = 0) -> dict[str, Any]:
    """First differing position (None if identical), normalised edit distance and fraction unchanged after ``start``."""
    f, o = list(factual), list(other)
    first = next((i for i in range(min(len(f), len(o))) if f[i] != o[i]), None)
    if first is None and len(f) != len(o):
        first = min(len(f), len(o))
    fa, oa = f[start:], o[start:]
    n = max(len(fa), len(oa))
    dist = levenshtein(fa, oa) / n if n else 0.0
    same = sum(1 for i in range(min(len(fa), len(oa))) if fa[i] == oa[i])
    return {"first_diff": first, "edit_distance": dist, "frac_unchanged": same / n if n else 1.0}


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


# ============================================================================ decoding engine
class _Noise:
    """Noise of one row: explicit steps ``table [T, V]`` (posterior) else the key ``(seed, step, stream)``."""

    def __init__(self, seed: int, stream: int = 0, table: torch.Tensor | None = None):
        self.seed, self.stream, self.table = seed, stream, table

    def at(self, step: int, vocab: int) -> torch.Tensor:
        if self.table is not None and step < self.table.shape[0]:
            return self.table[step]
        return gumbel_noise(self.seed, step, vocab, stream=self.stream)


@dataclass
class _Gen:
    tokens: list[list[int]]  # per row, stopped at EOS (inclusive)
    logprob: list[list[float]]  # model log-prob (tau = 1) of each token
    top: torch.Tensor | None  # [n, 5] top ids of row 0 per step
    step_logp: list[torch.Tensor] = field(default_factory=list)  # forced mode: sampling log-probs per step [V]
    decoder: Decoder | None = None  # kept (keep_cache) so later rows can fork the prefix's KV cache


def _ablations(edit: ModelEdit) -> list[Edit]:
    """The probe edits of a model edit: per layer, one head ablation on ``hook_z`` and one neuron ablation on ``mlp.hook_post``."""
    heads: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    for l, h in edit.heads:
        heads.setdefault(l, []).append(h)
    for l, n in edit.neurons:
        neurons.setdefault(l, []).append(n)
    return ([Ablate(site("z", l).name, heads=hs) for l, hs in sorted(heads.items())]
            + [Ablate(site("mlp_post", l).name, neurons=ns) for l, ns in sorted(neurons.items())])


def _vocab_limit(probe: Probe) -> int:
    return min(probe.info.d_vocab, len(probe.tokenizer))


@torch.no_grad()
def _decode(probe: Probe, suffix: torch.Tensor, *, prefix: Decoder | None, noises: Sequence[_Noise], step0: int, n_steps: int,
            temperature: float, top_k: int | None, top_p: float | None, stop_at_eos: bool = True,
            edit: ModelEdit | None = None, edit_rows: torch.Tensor | None = None, forced: Sequence[int] | None = None,
            keep_cache: bool = False) -> _Gen:
    """Feed ``suffix [B, s]`` on top of ``prefix`` (a decoder holding the prefix's KV cache, or None to start
    afresh) then sample ``n_steps`` tokens per row with Gumbel-Max; ``edit`` ablates on the rows ``edit_rows``.

    Row b's step ``i`` uses ``noises[b].at(step0 + i)``. ``forced`` (one row) takes the given tokens instead of
    sampling and records the sampling log-probs of each step (for noise inference).
    """
    B = suffix.shape[0]
    eos = probe.tokenizer.eos_token_id if stop_at_eos else None
    Vt = _vocab_limit(probe)
    toks: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    tops, step_logp = [], []
    # a prefix decoder was forked from an unedited run (edited prefixes are recomputed, as their KV differs)
    dec = prefix or probe.decoder(_ablations(edit) if edit is not None else (), rows=edit_rows if edit is not None else None)
    last = dec.feed(suffix)
    for i in range(n_steps):
        logits = last.float()
        if Vt < logits.shape[-1]:
            logits[:, Vt:] = float("-inf")
        lp1 = torch.log_softmax(logits, dim=-1)
        tops.append(torch.topk(lp1[0], min(5, Vt)).indices.cpu())
        if forced is not None:
            logp = sampling_logprobs(logits, temperature, top_k, top_p)
            step_logp.append(logp[0].cpu())
            nxt = torch.tensor([forced[i]] * B, device=logits.device)
        elif temperature == 0:
            nxt = torch.argmax(logits, dim=-1)
        else:
            logp = sampling_logprobs(logits, temperature, top_k, top_p)
            noise = torch.stack([nz.at(step0 + i, logits.shape[-1]) for nz in noises])
            nxt = gumbel_max(logp, noise)
        nxt_c = nxt.cpu()
        for b in range(B):
            if not done[b]:
                toks[b].append(int(nxt_c[b]))
                lps[b].append(float(lp1[b, nxt_c[b]]))
                if eos is not None and int(nxt_c[b]) == eos:
                    done[b] = True
        if bool(done.all()) or i == n_steps - 1:
            break
        last = dec.feed(nxt)
    return _Gen(toks, lps, torch.stack(tops) if tops else None, step_logp, dec if keep_cache else None)


def _fork(gen: _Gen | None, length: int, batch: int) -> Decoder | None:
    """A copy of ``gen``'s KV cache cut to its first ``length`` tokens, ``batch`` rows (None: recompute the prefix)."""
    return gen.decoder.fork(length, batch) if gen is not None and gen.decoder is not None else None


# ============================================================================ result
@register_result
@dataclass(frozen=True, kw_only=True)
class CounterfactualResult(Result):
    """Factual text and its counterfactual (and interventional) continuations.

    ``rows`` hold whole responses (forced prefix + edit + continuation), aligned by response position with
    ``factual``; ``kinds[i]`` is ``counterfactual`` or ``interventional``; ``str_rows`` the token strings.
    """

    analysis: ClassVar[str] = "counterfactual"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()), ("table", "divergence", lambda r: r.divergence_frame()))

    prompt: str = stored("extra")
    cf_prompt: str = stored("extra")
    intervention: str = stored("extra")
    edit_pos: int = stored("extra")  # first response position the intervention can change (0 for prompt / model edits)
    # the token rows are saved in the main table (one row per world, sample and position)
    factual: tuple[int, ...] = stored(None, read=lambda s: _read_worlds(s)[0])
    factual_str: tuple[str, ...] = stored(None, read=lambda s: _read_worlds(s)[1])
    factual_logprob: torch.Tensor = stored("array", save=lambda r: r.factual_logprob.float())  # [T]
    # [T, 5] most likely ids under the factual distribution at each step
    alternatives: torch.Tensor = stored("array", save=lambda r: r.alternatives.long())
    rows: tuple[tuple[int, ...], ...] = stored(None, read=lambda s: _read_worlds(s)[2])
    str_rows: tuple[tuple[str, ...], ...] = stored(None, read=lambda s: _read_worlds(s)[3])
    kinds: tuple[str, ...] = stored("extra")
    notes: tuple[str, ...] = stored("extra", default=())
    # token edit: the ids forced at edit_pos (replacing factual[edit_pos]); () otherwise
    forced: tuple[int, ...] = stored("extra", default=())
    forced_str: tuple[str, ...] = stored("extra", default=())  # their token strings

    @property
    def factual_text(self) -> str:
        return "".join(self.factual_str)

    def texts(self, kind: str = "counterfactual") -> list[str]:
        return ["".join(s) for s, k in zip(self.str_rows, self.kinds) if k == kind]

    @property
    def counterfactual_text(self) -> str:
        t = self.texts("counterfactual")
        return t[0] if t else ""

    def counterfactual_tokens(self, i: int = 0) -> tuple[int, ...]:
        return [r for r, k in zip(self.rows, self.kinds) if k == "counterfactual"][i]

    def divergence_frame(self) -> pd.DataFrame:
        """One row per sample: kind, sample, first_diff (response position, NA if identical), edit_distance, frac_unchanged."""
        recs, count = [], {}
        for r, k in zip(self.rows, self.kinds):
            s = count[k] = count.get(k, -1) + 1
            recs.append({"kind": k, "sample": s, **divergence(self.factual, r, self.edit_pos)})
        df = pd.DataFrame(recs, columns=["kind", "sample", "first_diff", "edit_distance", "frac_unchanged"])
        df["first_diff"] = df["first_diff"].astype("Int64")
        return df

    def to_frame(self) -> pd.DataFrame:
        """Tidy tokens: model, world (factual/counterfactual/interventional), sample, pos, token_id, token, same (as factual)."""
        recs = [{"world": "factual", "sample": 0, "pos": p, "token_id": t, "token": s, "same": True}
                for p, (t, s) in enumerate(zip(self.factual, self.factual_str))]
        count = {}
        for r, ss, k in zip(self.rows, self.str_rows, self.kinds):
            n = count[k] = count.get(k, -1) + 1
            for p, (t, s) in enumerate(zip(r, ss)):
                recs.append({"world": k, "sample": n, "pos": p, "token_id": t, "token": s,
                             "same": p < len(self.factual) and self.factual[p] == t})
        df = pd.DataFrame(recs, columns=["world", "sample", "pos", "token_id", "token", "same"])
        df.insert(0, "model", self.model.get("name", ""))
        return df

    def plot(self, *, max_rows: int = 6, width: int = 28):
        """Token grid: one column per world (factual first, then up to ``max_rows`` counterfactual / interventional
        samples), one row per response position (the first ``width`` in view, pan down for more); tokens changed vs
        the factual coloured. Columns this wide show every token whole (a row of positions cut them at 1280 px)."""
        import html

        import plotly.graph_objects as go

        names = ["factual"] + [f"{k[:14]} {i}" for i, k in enumerate(self.kinds)][:max_rows]
        seqs = [self.factual_str] + list(self.str_rows[:max_rows])
        ids = [self.factual] + list(self.rows[:max_rows])
        T = max(len(s) for s in seqs) if seqs else 0
        z, text = [], []  # [position][world]
        for p in range(T):
            zr, tr = [], []
            for r, (ss, ii) in enumerate(zip(seqs, ids)):
                if p >= len(ss):
                    zr.append(None), tr.append("")
                    continue
                same = r == 0 or (p < len(self.factual) and self.factual[p] == ii[p])
                zr.append(0.0 if same else 1.0)
                tok = ss[p].replace("\n", "⏎").replace("\t", "⇥")
                tr.append(html.escape(tok.replace(" ", "␣") if not tok.strip() else tok))  # "<|im_end|>" is text, not a tag
            z.append(zr), text.append(tr)
        shown = min(T, width)
        fig = go.Figure(go.Heatmap(z=z, x=names, y=list(range(T)), text=text, customdata=text, texttemplate="%{text}",
                                   textfont=dict(size=13), showscale=False, colorscale=[[0, "#eef2f7"], [1, "#f4a261"]], zmin=0,
                                   zmax=1, xgap=2, ygap=1, hovertemplate="%{x} · position %{y}: %{customdata}<extra></extra>"))
        fig.add_hline(y=self.edit_pos - 0.5, line_dash="dash", line_color="#c0392b")
        fig.update_xaxes(side="top")
        fig.update_yaxes(autorange=False, range=[shown - 0.5, -0.5], title_text="response position", dtick=5 if shown > 12 else 1)
        fig.update_layout(title=f"{self.intervention}: tokens changed vs factual in orange (dashed line: edit point)",
                          height=130 + 24 * shown, margin=dict(l=10, r=10, t=90, b=10))
        return fig


def _read_worlds(stored: store.StoredResult) -> tuple[tuple[int, ...], tuple[str, ...], tuple, tuple]:
    """``(factual, factual_str, rows, str_rows)`` back from the saved main table."""
    df, kinds = stored.tables["main"], stored.extra["kinds"]
    f = df[df.world == "factual"].sort_values("pos")
    rows, strs = [], []
    count: dict[str, int] = {}
    for k in kinds:
        n = count[k] = count.get(k, -1) + 1
        d = df[(df.world == k) & (df["sample"] == n)].sort_values("pos")
        rows.append(tuple(int(x) for x in d.token_id))
        strs.append(tuple(str(x) for x in d.token))
    return tuple(int(x) for x in f.token_id), tuple(str(x) for x in f.token), tuple(rows), tuple(strs)


# ============================================================================ entry points
def _prompt_ids(probe: Probe, prompt: str, chat: bool) -> list[int]:
    text = probe.chat(prompt) if chat else prompt
    return probe.to_tokens(text)[0].tolist()


def _strs(probe: Probe, ids: Sequence[int]) -> tuple[str, ...]:
    return tuple(probe.to_str_tokens(list(ids))) if ids else ()


def generate(probe: Probe, prompt: str, config: Config = Config(), *, stream: int = 0) -> tuple[list[int], list[float]]:
    """Factual Gumbel-Max generation: ``(response ids, model log-probs)`` for noise stream ``stream``."""
    ids = _prompt_ids(probe, prompt, config.chat)
    g = _decode(probe, torch.tensor([ids]), prefix=None, noises=[_Noise(config.seed, stream)], step0=0,
                n_steps=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                stop_at_eos=config.stop_at_eos)
    return g.tokens[0], g.logprob[0]


@torch.no_grad()
def decision_scores(probe: Probe, prompt: str, tokens: Sequence[int], config: Config = Config(), *, stream: int = 0) -> torch.Tensor:
    """The scores each sampling step compared when ``tokens`` were generated after ``prompt``: ``[len(tokens), V]``.

    Step ``t`` teacher-forces ``prompt + tokens[:t]`` (one forward) and returns the Gumbel-perturbed sampling
    log-probs ``logp_t + G(seed, t, stream)`` (``tau = 0``: the logits) whose argmax picks token ``t``. The gap
    between a step's two best scores is its decision margin: a numeric change smaller than half of it cannot
    change the token (used to compare sampled tokens across backends, threads or machines).
    """
    ids = _prompt_ids(probe, prompt, config.chat)
    tokens = [int(t) for t in tokens]
    if not tokens:
        return torch.zeros(0, probe.info.d_vocab)
    logits = probe.forward(torch.tensor([ids + tokens[:-1]]))[0, len(ids) - 1:].float().cpu()
    Vt = _vocab_limit(probe)
    if Vt < logits.shape[-1]:
        logits[:, Vt:] = float("-inf")
    if config.temperature == 0:
        return logits
    logp = sampling_logprobs(logits, config.temperature, config.top_k, config.top_p)
    return logp + torch.stack([gumbel_noise(config.seed, t, logits.shape[-1], stream=stream) for t in range(len(tokens))])


def _replacement(probe: Probe, iv: TokenEdit, factual: list[int], config: Config, notes: list[str]) -> list[int]:
    if isinstance(iv.new, tuple):
        bad = [t for t in iv.new if not 0 <= t < probe.info.d_vocab]
        if not iv.new or bad:
            raise ConfigError(f"replacement ids {list(iv.new)} are not all in 0..{probe.info.d_vocab - 1}.", hint="Give valid token ids.")
        return list(iv.new)
    text = iv.new
    tok = probe.tokenizer
    old_id = factual[iv.pos]
    old_piece = tok.convert_ids_to_tokens([old_id])[0]
    if not iv.verbatim and starts_word(old_piece, tok.decode([old_id])) and not text[:1].isspace():
        text = " " + text  # the replaced token starts a word: keep the word boundary
        notes.append(f"a leading space was added to {iv.new!r} because the replaced token {old_piece!r} starts a word "
                     "(quote the replacement to force it exactly as written)")
    new = encode_piece(tok, text)
    if not new:
        raise InputError(f"the replacement {iv.new!r} tokenizes to nothing.", hint="Give a non-empty replacement.")
    if len(new) > 1:
        pieces = [probe.tokenizer.decode([t]) for t in new]
        if config.multi_token == "error":
            raise InputError(f"the replacement {text!r} tokenizes to {len(new)} tokens {pieces}, and multi_token='error'.",
                             hint="Give a single-token replacement (e.g. 'token:12=id:<id>'), or set multi_token='span' to force all of them.")
        notes.append(f"the replacement {text!r} is {len(new)} tokens {pieces}: all are forced at position {iv.pos}, and the factual "
                     f"noise continues from step {iv.pos + 1} (alignment by step count)")
    return new


_WORD_MARKERS = (" ", "Ġ", "▁")  # a leading space: plain, byte-level BPE (GPT-2, Llama 3), SentencePiece (Llama 2)


def starts_word(piece: str, text: str = "") -> bool:
    """Whether a token begins a word: its vocabulary string ``piece`` starts with a space or a word-boundary marker,
    or its decoded ``text`` starts with whitespace."""
    return (piece or "").startswith(_WORD_MARKERS) or (text or "")[:1].isspace()


def encode_piece(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` as it reads mid-sentence: with its leading space as a word boundary, without one glued
    to the previous token. A tokenizer that prepends a boundary to every text (SentencePiece's dummy prefix) is
    given ``text`` after an anchor character whose ids are then dropped, so no boundary is invented."""
    ids = tok(text, add_special_tokens=False).input_ids
    if not ids or text[:1].isspace():
        return ids
    pieces = tok.convert_ids_to_tokens(ids)
    if not starts_word(pieces[0]):
        return ids
    anchor = tok("a", add_special_tokens=False).input_ids
    both = tok("a" + text, add_special_tokens=False).input_ids
    if both[: len(anchor)] == anchor and len(both) > len(anchor):
        return both[len(anchor):]
    return ids


def _input_hash(info: Mapping[str, Any], iv: Intervention, prompt: str, observed: str | Sequence[int] | None) -> str:
    """The input hash of a counterfactual: the model, the parsed intervention, the prompt and the observed text."""
    return store.hash_inputs("counterfactual", info["fingerprint"], {"iv": iv.label()}, prompt + "\x00" + str(observed or ""))


def _prepare(probe: Probe, prompt: str, intervention: str | Intervention = "none", *, config: Config,
             observed: str | Sequence[int] | None = None) -> registry.Inputs:
    """The parsed intervention and the hash of prompt, intervention and observed text (shared by :func:`run` and
    :data:`result_key`)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty." if isinstance(prompt, str) else f"the prompt must be text, got {type(prompt).__name__}.",
                         hint="Type a prompt with at least one word.")
    iv = parse_intervention(intervention, probe)
    label = f"{registry.text_label(prompt, 60)!r} under {iv.label()}" + (" (observed text)" if observed is not None else "")
    return registry.Inputs(_input_hash(probe.info.to_dict(), iv, prompt, observed), iv, label)


def run(probe: Probe, prompt: str, intervention: str | Intervention = "none", *, config: Config = Config(),
        observed: str | Sequence[int] | None = None) -> CounterfactualResult:
    """Factual generation (or an observed text) and its counterfactual under ``intervention``.

    Args:
        probe: a loaded model.
        prompt: prompt text (wrapped in the chat template if ``config.chat``).
        intervention: ``"token:12=Maeve"``, ``"prompt:Lyra->Maeve"``, ``"ablate:L5H3"``, ``"none"`` or an object.
        config: sampling and noise settings.
        observed: a response (text or token ids) to explain instead of sampling one; its noise is inferred
            (implies ``noise="posterior"``) and the counterfactual runs for as many steps as it has tokens.

    Returns:
        :class:`CounterfactualResult` with ``n_samples`` counterfactual rows (1 for replay) and as many
        interventional rows if ``config.interventional``.
    """
    inp = SPEC.inputs(probe, prompt, intervention, config=config, observed=observed)
    iv = inp.data
    c = config
    timer = Timer()
    notes: list[str] = []
    prompt_ids = _prompt_ids(probe, prompt, c.chat)
    P = len(prompt_ids)
    posterior = c.noise == "posterior" or observed is not None
    S = c.n_samples if posterior else 1
    n_int = c.n_samples if c.interventional else 0
    samp = dict(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, stop_at_eos=c.stop_at_eos)
    int_noises = [_Noise(c.seed, 1 + s) for s in range(n_int)]
    joint = isinstance(iv, ModelEdit) and not posterior  # factual and counterfactual rows in one batch
    rows_out: list[list[int]] = []
    if observed is not None:
        if isinstance(observed, str):
            factual = probe.tokenizer(observed, add_special_tokens=False).input_ids
        else:
            factual = [int(t) for t in observed]
            if any(not 0 <= t < probe.info.d_vocab for t in factual):
                raise InputError(f"observed ids must lie in 0..{probe.info.d_vocab - 1}.", hint="Pass the response's token ids or its text.")
        if not factual:
            raise InputError("the observed text is empty.", hint="Give the response text to explain.")
        if P + len(factual) > probe.info.n_ctx:
            raise InputError(f"prompt + observed text is {P + len(factual)} tokens; this model takes at most {probe.info.n_ctx}.")
        notes.append(f"noise inferred from the observed text ({len(factual)} tokens, {S} posterior draws)")
        fgen = None
    elif joint:
        with timer("generate"):
            B = 1 + S + n_int
            mask = torch.tensor([False] + [True] * (B - 1))
            g = _decode(probe, torch.tensor([prompt_ids] * B), prefix=None, noises=[_Noise(c.seed, 0)] * (1 + S) + int_noises,
                        step0=0, n_steps=c.max_new_tokens, edit=iv, edit_rows=mask, **samp)
        factual, flp, top = g.tokens[0], g.logprob[0], g.top
        rows_out = g.tokens[1:]
        fgen = g
    else:
        with timer("generate"):
            fgen = _decode(probe, torch.tensor([prompt_ids]), prefix=None, noises=[_Noise(c.seed, 0)], step0=0,
                           n_steps=c.max_new_tokens, keep_cache=c.prefix_reuse, **samp)
        factual, flp, top = fgen.tokens[0], fgen.logprob[0], fgen.top

    # ---- abduction: posterior noise tables [S][T, V]
    tables: list[torch.Tensor | None] = [None] * S
    if posterior:
        with timer("abduction"):
            fg = _decode(probe, torch.tensor([prompt_ids]), prefix=None, noises=[_Noise(c.seed, 0)], step0=0, n_steps=len(factual),
                         forced=factual, keep_cache=c.prefix_reuse, **{**samp, "stop_at_eos": False})
            flp, top = fg.logprob[0], fg.top
            if fgen is None:
                fgen = fg
            steps = []
            for t, lp in enumerate(fg.step_logp):
                k = factual[t]
                prior = torch.stack([gumbel_noise(c.seed, t, lp.shape[-1], stream=_POSTERIOR_STREAM + s) for s in range(S)])
                if c.temperature == 0:
                    steps.append(prior)
                    continue
                if not torch.isfinite(lp[k]):
                    raise InputError(f"observed token {t} ({probe.tokenizer.decode([k])!r}) is outside the top-k/top-p set at that step, "
                                     "so no noise can produce this text.", hint="Loosen top_k / top_p (or use None) to explain this text.")
                u = _uniform(c.seed, t, 2 * _POSTERIOR_STREAM, (S, 1 + lp.shape[-1]))
                steps.append(posterior_gumbel(lp, k, prior, u[:, 0], u[:, 1:]))
            stacked = torch.stack(steps, 1) if steps else torch.zeros(S, 0, probe.info.d_vocab)  # [S, T, V]
            tables = [stacked[s] for s in range(S)]
    cf_noises = [_Noise(c.seed, 0, tables[s]) for s in range(S)]
    horizon = len(factual) if observed is not None else c.max_new_tokens  # counterfactual steps counted like the factual

    # ---- counterfactual (and interventional) rows
    cf_prompt = prompt
    edit_pos = 0
    forced: list[int] = []
    B = S + n_int
    if not (joint and not posterior):
        with timer("counterfactual"):
            if isinstance(iv, TokenEdit):
                if iv.pos >= len(factual):
                    raise InputError(f"token edit position {iv.pos} is beyond the generated text ({len(factual)} tokens, positions 0-{len(factual) - 1}).",
                                     hint="Pick a position inside the factual response.")
                new = _replacement(probe, iv, factual, c, notes)
                forced = list(new)
                edit_pos = iv.pos
                prefix = prompt_ids + factual[: iv.pos]
                cache = _fork(fgen, len(prefix), B) if c.prefix_reuse else None
                suffix = new if cache is not None else prefix + new
                if cache is not None:
                    notes.append(f"KV cache of the first {len(prefix)} tokens (prompt + response before position {iv.pos}) reused")
                n_steps = horizon - iv.pos - 1
                if n_steps > 0:
                    g = _decode(probe, torch.tensor([suffix] * B), prefix=cache, noises=cf_noises + int_noises, step0=iv.pos + 1,
                                n_steps=n_steps, **samp)
                    conts = g.tokens
                else:
                    conts = [[] for _ in range(B)]
                eos = probe.tokenizer.eos_token_id
                stop = c.stop_at_eos and eos is not None and eos in new
                rows_out = [factual[: iv.pos] + new + ([] if stop else t) for t in conts]
            else:
                edited = isinstance(iv, ModelEdit)
                if isinstance(iv, PromptEdit):
                    if iv.old not in prompt:
                        raise InputError(f"the prompt does not contain {iv.old!r}.", hint=f"Use prompt:<text in the prompt>-><replacement>; the prompt is {prompt[:80]!r}.")
                    cf_prompt = prompt.replace(iv.old, iv.new)
                    if not cf_prompt.strip():
                        raise InputError("the edited prompt is empty.", hint="Give a non-empty replacement.")
                new_ids = _prompt_ids(probe, cf_prompt, c.chat)
                common = 0
                while common < min(len(new_ids), P) and new_ids[common] == prompt_ids[common]:
                    common += 1
                common = min(common, len(new_ids) - 1)
                cache = _fork(fgen, common, B) if (c.prefix_reuse and not edited) else None
                suffix = new_ids[common:] if cache is not None else new_ids
                g = _decode(probe, torch.tensor([suffix] * B), prefix=cache, noises=cf_noises + int_noises, step0=0,
                            n_steps=horizon, edit=iv if edited else None,
                            edit_rows=torch.ones(B, dtype=torch.bool) if edited else None, **samp)
                rows_out = g.tokens
                if cache is not None:
                    notes.append(f"KV cache of the first {common} prompt tokens reused")
    kinds = ("counterfactual",) * S + ("interventional",) * n_int
    info = probe.info.to_dict()
    return CounterfactualResult(
        config=c, model=info, input_hash=inp.hash, inputs=inp.label,
        timings=timer.seconds, prompt=prompt, cf_prompt=cf_prompt, intervention=iv.label(), edit_pos=edit_pos,
        factual=tuple(factual), factual_str=_strs(probe, factual), factual_logprob=torch.tensor(flp, dtype=torch.float32),
        alternatives=top[: len(factual)].long() if top is not None else torch.zeros(0, 5, dtype=torch.long),
        rows=tuple(tuple(r) for r in rows_out), str_rows=tuple(_strs(probe, r) for r in rows_out), kinds=kinds, notes=tuple(notes),
        forced=tuple(forced), forced_str=_strs(probe, forced),
    )


def branches(probe: Probe, prompt: str, pos: int, *, k: int = 3, config: Config = Config()) -> list[CounterfactualResult]:
    """A tree of alternatives: counterfactuals replacing response token ``pos`` by each of the model's next
    ``k`` most likely tokens there (excluding the factual one), all with the factual noise."""
    c = config.replace(interventional=False, noise="replay", n_samples=1)
    base = run(probe, prompt, "none", config=c)
    if not 0 <= pos < len(base.factual):
        raise InputError(f"position {pos} is beyond the generated text ({len(base.factual)} tokens).", hint="Pick a position inside the response.")
    alts = [int(t) for t in base.alternatives[pos].tolist() if int(t) != base.factual[pos]][:k]
    return [run(probe, prompt, TokenEdit(pos, (t,)), config=c) for t in alts]


def sampling_memory(s, B: int, T: int, o: Mapping[str, Any], *, extra_rows: int = 0) -> dict[str, int]:
    """The planner's terms of Gumbel-Max generation (:func:`_decode`) of ``B`` rows of ``T`` prompt tokens plus
    ``new_tokens``: the KV cache of every row alive (``extra_rows`` beside the ``B`` sampled ones: a run keeps the
    factual text's cache for the prefix reuse and decodes the counterfactual row beside the interventional ones), and
    per step six ``[B, V]`` float32 tensors (the logits' copy, their log-softmax, the tempered log-probs, the Gumbel noise
    drawn per row and stacked, the perturbed scores). The prompt's forward pass is short, so the constant share is
    small: 2 MiB (measured with the bias sweep and counterfactual runs at two sizes each, ``tests/test_planner_peaks.py``)."""
    rows = B + extra_rows
    return {"kv_cache": 2 * s.n_layers * rows * s.n_kv_heads * s.d_head * (T + o["new_tokens"]) * s.itemsize,
            "logits": 6 * B * s.d_vocab * 4, "overhead": 2 * 2**20}


SPEC = registry.register(registry.Analysis(
    name="counterfactual", order=6, title="Counterfactual token generation",
    summary="what the model would have written under an intervention, with the same Gumbel noise",
    config=Config, result=CounterfactualResult, run=run, prepare=_prepare, cli="counterfactual", page="counterfactual",
    memory=planner.MemoryModel("counterfactual", functools.partial(sampling_memory, extra_rows=2), persistent=("kv_cache",),
                               sizes=lambda c: {"new_tokens": c.max_new_tokens, "batch_size": c.n_samples}, option="--samples"),
))
result_key = SPEC.key  # the key run() gives these inputs, from the same _prepare


_MOVED = {"counterfactual_bias": ("DEFAULT_CATEGORIES", "BiasConfig", "BiasSweepResult", "bias_sweep", "bias_sweep_key",
                                  "extract_category")}


def __getattr__(name: str):
    """The bias sweep is an analysis of its own (:mod:`analyses.counterfactual_bias`); its names stay importable here."""
    for mod, names in _MOVED.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f"{__package__}.{mod}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
