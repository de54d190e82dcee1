"""Critical tokens: the tokens of a failed reasoning trace that decide its outcome.

Lin et al., "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning
Capability" (arXiv 2411.19943, ICML 2025; method page ``shared/methods/critical.md``).

**Rollout search (ground truth).** For an incorrect trajectory ``y = (y_1..y_L)`` of question ``x``,
the prefix score of prefix length ``k`` is the success rate of ``N`` sampled completions of
``x ⊕ y_{<=k}``::

    score(k) = #{n : checker(y_{<=k} ⊕ c_n) } / N,   c_n ~ p_θ(· | x ⊕ y_{<=k})

A token ``y_j`` (0-based index ``j``) is critical where its inclusion drops the score to ~0:
``score(j) > 0`` and ``score(j+1) ≈ 0`` (the released ``analyse`` rule: the first prefix with score
``<= zero_tol``, unless a later prefix "recovers" with score ``> recover_frac``, default 3/64).
Prefixes are scanned at every token (``granularity="token"``), at step boundaries (``"step"``:
newlines and sentence ends) or only at the ends (``"bisect"``); inside the segment where the score
falls to zero a bisection finds the token (``bisect=True``). All ``N`` rollouts of a prefix share
one prefill: the prefix KV cache is computed once and repeated along the batch.

**Counterfactual.** At the critical position, alternative tokens are drawn from the model's
next-token distribution with the original token's probability zeroed (``alternatives="sample"``,
the paper's check) or taken as the top-k by probability (``"topk"``) and rolled out; pass@k with and
without the critical token uses the unbiased estimator ``1 − C(n−c,k)/C(n,k)``.

**Contrastive estimation (CE).** With LoRA adapters θ_p (trained on correct trajectories) and θ_n
(incorrect ones), each response token gets ``p_ce(t) = softmax_v[(1+β) z_p(v) − β z_n(v)][y_t]``
(β = 1) and the cDPO weight ``w_t = 1 − p_ce(t)``; we also report the log-ratio
``s_t = log p_p(y_t) − log p_n(y_t)`` (zero when θ_p = θ_n; low ⇒ favoured by the negative model ⇒
likely critical). :func:`compare_contrastive` ranks tokens by CE and by the rollout drop
``score(j) − score(j+1)`` (Spearman, precision@k).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence

import pandas as pd
import torch

from probes.errors import ConfigError, InputError
from probes.generation import Rollouts, sample_many

from .core.base import Config as _BaseConfig
from .core.base import Result, Timer, option, register_result, stored
from .core.progress import ProgressFn, phase
from .core import planner, registry
from .core.store import hash_inputs
from .tasks import ANSWER_STOP, Checker, CallableChecker, Problem, format_prompt, make_checker

__all__ = [
    "Config", "CriticalResult", "run", "result_key", "search", "search_key", "sample_trajectories", "rollout_success", "sequential_rollouts", "sequential_rollouts_many", "pass_at_k",
    "find_critical", "step_cuts", "Trajectory",
    "ce_token_scores", "estimate_rollouts", "vllm_engine", "clopper_pearson", "SPRT",
    "token_decision",
]


@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Critical-token search settings (defaults: method page, "Workbench" section)."""

    n_samples: int = option(16, ge=1)  # trajectories sampled per problem to find an incorrect one
    n_rollouts: int = option(32, ge=1)  # N rollouts per prefix (method page: 16-32 coarse pass; paper 64)
    temperature: float = option(0.7, gt=0, hint="Rollouts are sampled; use e.g. 0.7.")  # method page analyzer API default
    top_p: float = option(1.0, gt=0, le=1)  # plain temperature sampling, as the paper's vLLM rollouts
    max_new_tokens: int = option(512, ge=1)  # method page: cap new tokens (e.g. 512)
    granularity: Literal["token", "step", "bisect"] = "step"  # method page: coarse pass at step boundaries
    bisect: bool = True          # fine pass: bisect inside the segment where the score falls to 0
    max_steps: int = option(30, ge=1)  # at most this many step cut points (method page: ~10-30)
    zero_tol: float = option(0.0, ge=0, lt=1)  # score <= zero_tol counts as "all wrong" (released analyse: score 0)
    recover_frac: float = option(3 / 64, ge=0, lt=1)  # a later prefix above this discards the mark (released: >3/64)
    sequential: bool = True      # SPRT: roll a prefix out in chunks and stop once its state is decided
    chunk: int = option(8, ge=1)  # sequential: rollouts decoded together, the test read as each ends (budget stays n_rollouts)
    p_alive: float = 0.25        # SPRT: "alive" level of the success rate (the "dead" level is recover_frac)
    alpha: float = 0.05          # SPRT error rates (both kinds) and 1 − confidence of the Clopper-Pearson intervals
    alternatives: Literal["sample", "topk", "none"] = "sample"  # counterfactual check (method page step 4)
    n_alternatives: int = option(32, ge=0)  # K alternative tokens (method page: K=16-64)
    alt_rollouts: int = option(1, ge=1)  # rollouts per alternative (paper: one each)
    batch_size: int = option(64, ge=1)  # rollouts per generate call
    prefix_cache: bool = True    # share the prefix KV cache across a prefix's rollouts
    stop_at_answer: bool = True  # stop a rollout once its final answer is written
    max_rollouts: int = option(20_000, ge=1)  # budget: prefixes x rollouts beyond this is refused
    checker: Literal["auto", "numeric", "exact"] = "auto"  # auto: numeric when the reference answer is a number
    engine: Literal["hf", "vllm"] = "hf"  # rollouts through transformers' generate, or vLLM (GPU, prefix caching)
    tol: float = 1e-6            # numeric checker tolerance
    seed: int = 0

    def __post_init__(self) -> None:
        self.sprt()  # validates p_alive / alpha against recover_frac

    def sprt(self) -> "SPRT":
        """The prefix test: dead level ``recover_frac``, alive level ``p_alive``, error rates ``alpha``."""
        return SPRT(p_dead=max(self.recover_frac, 1e-6), p_alive=self.p_alive, alpha=self.alpha, beta=self.alpha)


# ====================================================================================== pure math
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k ``1 − C(n−c, k) / C(n, k)`` for ``c`` correct of ``n`` samples (k <= n)."""
    if k > n or n <= 0:
        return float("nan")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def clopper_pearson(n: int, c: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided ``1 − alpha`` Clopper–Pearson (exact binomial) interval for ``c`` successes in ``n``.

    ``(nan, nan)`` when ``n = 0``. Lower bound 0 when ``c = 0``, upper bound 1 when ``c = n``."""
    from scipy.stats import beta as _beta

    if n <= 0:
        return float("nan"), float("nan")
    lo = 0.0 if c <= 0 else float(_beta.ppf(alpha / 2, c, n - c + 1))
    hi = 1.0 if c >= n else float(_beta.ppf(1 - alpha / 2, c + 1, n - c))
    return lo, hi


@dataclass(frozen=True)
class SPRT:
    """Wald's sequential probability ratio test of a rollout success rate ``p``.

    ``H_dead: p = p_dead`` (the prefix is hopeless) against ``H_alive: p = p_alive`` (a correct answer
    is still reachable), with error rates ``alpha`` (call a dead prefix alive) and ``beta`` (call an
    alive prefix dead). After ``n`` rollouts with ``c`` successes the log likelihood ratio is
    ``llr = c·log(p_alive/p_dead) + (n−c)·log((1−p_alive)/(1−p_dead))``; the test says ``"alive"`` once
    ``llr ≥ log((1−beta)/alpha)``, ``"dead"`` once ``llr ≤ log(beta/(1−alpha))`` and ``"undecided"``
    between (Wald's bounds keep the error rates at most ``alpha/(1−beta)`` and ``beta/(1−alpha)``;
    stopping at a budget only lowers them). For ``p`` between the two levels either answer is acceptable.
    """

    p_dead: float = 3 / 64
    p_alive: float = 0.25
    alpha: float = 0.05
    beta: float = 0.05

    def __post_init__(self) -> None:
        if not (0 < self.p_dead < self.p_alive < 1):
            raise ConfigError(f"p_dead={self.p_dead}, p_alive={self.p_alive}: need 0 < p_dead < p_alive < 1.",
                              hint="Use e.g. p_dead=3/64 (the paper's recovery level) and p_alive=0.25.")
        if not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            raise ConfigError(f"alpha={self.alpha}, beta={self.beta}: error rates must lie in (0, 0.5).", hint="Use 0.05.")

    @property
    def upper(self) -> float:
        return math.log((1 - self.beta) / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(self.beta / (1 - self.alpha))

    def llr(self, n: int, c: int) -> float:
        return c * math.log(self.p_alive / self.p_dead) + (n - c) * math.log((1 - self.p_alive) / (1 - self.p_dead))

    def decide(self, n: int, c: int) -> str:
        """``"alive"``, ``"dead"`` or ``"undecided"`` after ``c`` successes in ``n`` rollouts."""
        v = self.llr(n, c)
        return "alive" if v >= self.upper - 1e-12 else ("dead" if v <= self.lower + 1e-12 else "undecided")

    def min_dead(self) -> int:
        """Rollouts needed to call a prefix dead when none succeeds."""
        return math.ceil(self.lower / math.log((1 - self.p_alive) / (1 - self.p_dead)) - 1e-12)

    def min_alive(self) -> int:
        """Rollouts needed to call a prefix alive when all succeed."""
        return math.ceil(self.upper / math.log(self.p_alive / self.p_dead) - 1e-12)

    def run(self, stream: Sequence[bool], budget: int | None = None) -> tuple[str, int, int]:
        """Feed Bernoulli outcomes one at a time up to ``budget``: ``(decision, n used, successes)``."""
        n = c = 0
        for x in stream[: budget if budget is not None else len(stream)]:
            n += 1
            c += bool(x)
            d = self.decide(n, c)
            if d != "undecided":
                return d, n, c
        return "undecided", n, c


def simulate_sprt(test: SPRT, p: float, *, sims: int = 4000, budget: int = 200, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo check of :class:`SPRT` on simulated Bernoulli(``p``) rollout streams, cut at ``budget``.

    Returns the fractions called ``alive`` / ``dead`` / ``undecided`` and the mean rollouts used."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = math.log(test.p_alive / test.p_dead), math.log((1 - test.p_alive) / (1 - test.p_dead))
    x = rng.random((sims, budget)) < p
    llr = np.cumsum(np.where(x, a, b), axis=1)
    up, lo = llr >= test.upper - 1e-12, llr <= test.lower + 1e-12
    hit_up = np.where(up.any(1), up.argmax(1), budget)
    hit_lo = np.where(lo.any(1), lo.argmax(1), budget)
    alive, dead = hit_up < hit_lo, hit_lo < hit_up
    used = np.minimum(np.minimum(hit_up, hit_lo) + 1, budget)
    return {"alive": float(alive.mean()), "dead": float(dead.mean()), "undecided": float((~alive & ~dead).mean()),
            "mean_rollouts": float(used.mean())}


def doc_example(probe) -> "CriticalResult":
    """The README's example: the forced wrong digit in ``3 + 4 = 8.`` on a word problem (embedded model)."""
    from .tasks import Problem, format_prompt, make_checker

    p = Problem("Tom has 3 apples and buys 4 more. How many apples does he have?", 7.0)
    cfg = Config(n_rollouts=32, granularity="token", max_new_tokens=4, alternatives="topk", n_alternatives=3, alt_rollouts=4)
    return search(probe, format_prompt(probe, p), "3 + 4 = 8.", make_checker(p), config=cfg)


def token_decision(before: str | None, after: str | None, later_alive: bool) -> str | None:
    """Decision for one token from the SPRT states of the prefixes before and after it.

    ``"critical"``: the prefix before it is alive, the one after it dead, and no later prefix is alive;
    ``"not critical"``: the prefix before it is already dead, the one after it is alive, or a later
    prefix recovers; ``"undecided"`` otherwise (the budget could not tell); ``None`` if not measured."""
    if before is None or after is None:
        return None
    if before == "dead" or after == "alive" or later_alive:
        return "not critical"
    if before == "alive" and after == "dead":
        return "critical"
    return "undecided"


def find_critical(scores: dict[int, float], *, zero_tol: float = 0.0, recover_frac: float = 3 / 64) -> int | None:
    """The marked prefix length ``k`` (critical token index ``k − 1``) by the released ``analyse`` rule.

    Args:
        scores: prefix length -> success rate, for the evaluated prefixes.
    Returns:
        the first prefix length whose score is ``<= zero_tol`` and after which no prefix scores
        ``> recover_frac``; ``None`` if the trace never becomes hopeless or is hopeless from the start.
    """
    mark = None
    for k in sorted(scores):
        s = scores[k]
        if mark is None and s <= zero_tol:
            mark = k
        elif mark is not None and s > recover_frac:
            mark = None
    if mark == min(scores, default=None):
        return None  # already hopeless with no response token: nothing in the trace decides it
    return mark


@torch.no_grad()
def ce_token_scores(logits_pos: torch.Tensor, logits_neg: torch.Tensor, targets: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Contrastive-estimation scores of each response token.

    Args:
        logits_pos, logits_neg: next-token logits ``[L, V]`` of θ_p and θ_n at the positions that
            predict the response tokens.
        targets: response token ids ``[L]``.
    Returns:
        ``p_ce`` ``[L]`` = softmax((1+β)z_p − βz_n)[y_t]; ``weight`` = 1 − p_ce; ``log_ratio`` =
        log p_p(y_t) − log p_n(y_t).
    """
    zp, zn = logits_pos.float(), logits_neg.float()
    lp_ce = torch.log_softmax((1 + beta) * zp - beta * zn, dim=-1)
    idx = targets[:, None].long()
    p_ce = lp_ce.gather(-1, idx)[:, 0].exp()
    lr = torch.log_softmax(zp, -1).gather(-1, idx)[:, 0] - torch.log_softmax(zn, -1).gather(-1, idx)[:, 0]
    return {"p_ce": p_ce, "weight": 1 - p_ce, "log_ratio": lr}


def step_cuts(token_strs: Sequence[str], max_steps: int = 30) -> list[int]:
    """Prefix lengths at step boundaries: after a token holding a newline or ending a sentence
    (``.!?;:`` followed by a token that starts with whitespace). Always includes 0 and ``L``."""
    L = len(token_strs)
    cuts = [0]
    for j, s in enumerate(token_strs):
        nxt = token_strs[j + 1] if j + 1 < L else " "
        if "\n" in s or (s.rstrip()[-1:] in (".", "!", "?", ";", ":") and (nxt[:1].isspace() or s != s.rstrip())):
            cuts.append(j + 1)
    inner = sorted(set(c for c in cuts if 0 < c < L))
    if len(inner) > max_steps:
        step = len(inner) / max_steps
        inner = [inner[int(i * step)] for i in range(max_steps)]
    return [0] + inner + [L]


def estimate_rollouts(L: int, cfg: Config, token_strs: Sequence[str] | None = None) -> tuple[int, int]:
    """``(n_prefixes, n_rollouts)`` the search plans for a response of ``L`` tokens (bisection and
    alternatives included)."""
    if cfg.granularity == "token":
        n = L + 1
    elif cfg.granularity == "step":
        n = len(step_cuts(token_strs or [""] * L, cfg.max_steps))
        if cfg.bisect:
            n += math.ceil(math.log2(max(2, L / max(1, n - 1))))
    else:
        n = 2 + math.ceil(math.log2(max(2, L)))
    alt = 0 if cfg.alternatives == "none" else cfg.n_alternatives * cfg.alt_rollouts
    return n, n * cfg.n_rollouts + alt


# ====================================================================================== rollouts
@dataclass(frozen=True)
class Trajectory:
    """One sampled response: token ids, text, extracted answer and grade."""

    problem: int
    sample: int
    response_ids: tuple[int, ...]
    text: str
    answer: str | None
    correct: bool


def _strip(ids: list[int], eos: set[int], pad: int | None) -> list[int]:
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    while out and pad is not None and out[-1] == pad and pad not in eos:
        out.pop()
    return out


def _eos_ids(probe) -> set[int]:
    return set(probe.eos_token_ids)


_TAIL = 48  # tokens of text the answer check reads: a written answer ("The answer is 12.") is far shorter


def _rollouts(probe, cfg: Config, prompt_ids: Sequence[int], prefix_resp: Sequence[int], n: int, seed: int, *,
              first: Sequence[int] | None = None,
              on_row: Callable[[int, list[int]], bool] | None = None) -> Rollouts:
    """One prefix's rows for :func:`_generate_many`: ``n`` continuations of ``prompt ⊕ prefix_resp`` (rows seeded by
    ``(seed, r)``, at most ``cfg.max_new_tokens`` and the context's room), stopped at a written answer when
    ``cfg.stop_at_answer``; ``on_row(r, ids) -> bool`` sees each row as it ends (EOS stripped), True stops this prefix."""
    T = len(prompt_ids) + len(prefix_resp) + (first is not None)
    room = probe.info.n_ctx - T
    if room < 1:
        raise InputError(f"prompt + response prefix is {T} tokens; the model takes at most {probe.info.n_ctx}.")
    eos, pad = _eos_ids(probe), _pad_id(probe)
    return Rollouts(list(prompt_ids) + list(prefix_resp), n, seed, first,
                    _answer_stop(probe.tokenizer, list(prefix_resp)) if cfg.stop_at_answer else None,
                    None if on_row is None else (lambda r, ids: on_row(r, _strip(ids, eos, pad))),
                    min(cfg.max_new_tokens, room))


def _pad_id(probe) -> int:
    tok = probe.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else next(iter(_eos_ids(probe)), 0)


@torch.no_grad()
def _generate(probe, prompt_ids: list[int], prefix_resp: list[int], n: int, cfg: Config, seed: int, *,
              first: Sequence[int] | None = None, batch_size: int | None = None,
              on_row: Callable[[int, list[int]], bool] | None = None) -> list[list[int] | None]:
    """``n`` sampled continuations (new token ids, EOS stripped) of ``prompt ⊕ prefix_resp``: :func:`_generate_many`
    for one prefix."""
    group = _rollouts(probe, cfg, prompt_ids, prefix_resp, n, seed, first=first, on_row=on_row)
    return _generate_many(probe, [group], cfg, batch_size=batch_size)[0]


@torch.no_grad()
def _generate_many(probe, groups: Sequence[Rollouts], cfg: Config, *, batch_size: int | None = None,
                   chunk: int | None = None) -> list[list[list[int] | None]]:
    """The continuations of several prefixes (:func:`_rollouts`; new token ids, EOS stripped), per prefix and row.

    One batched decode (:func:`probes.generation.sample_many`): each prefix's KV cache is computed once and copied
    into its rows; prefixes of different lengths share batches (left-padded, masked) of up to ``batch_size`` rows
    (default ``cfg.batch_size``), at most ``chunk`` rows of one prefix each. Row ``r`` of a prefix samples from its
    own stream seeded by ``(seed, r)``, so its continuation does not depend on the batching. A prefix's ``on_row``
    may stop it (its rows not ended yet come back as None)."""
    if cfg.engine == "vllm":
        out = []
        for g in groups:
            if g.first is not None:
                raise ConfigError("forced first tokens are not sent to vLLM.", hint="Roll each forced token out as its own prefix.")
            rows = _generate_vllm(probe, list(g.tokens), [], g.n, cfg, g.seed)
            if g.on_row is not None:
                for r, row in enumerate(rows):
                    if g.on_row(r, row):
                        rows = rows[: r + 1] + [None] * (g.n - r - 1)
                        break
            out.append(rows)
        return out
    eos, pad = _eos_ids(probe), _pad_id(probe)
    rows = sample_many(probe, groups, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       batch_size=batch_size or cfg.batch_size, chunk=chunk, eos=eos, pad=pad, prefix_cache=cfg.prefix_cache)
    return [[None if row is None else _strip(row, eos, pad) for row in g] for g in rows]


def _answer_stop(tok, prefix_resp: list[int]) -> Callable[[list[int]], bool]:
    """``stop(new_ids)``: the text (response prefix + new tokens) has a written answer. An answer already in the
    prefix stops a row after one token; a new one ends within the last token, so only the text's tail is read."""
    if ANSWER_STOP.search(tok.decode(prefix_resp, skip_special_tokens=True)) is not None:
        return lambda new: True

    def answered(new: list[int]) -> bool:
        tail = (prefix_resp + new)[-_TAIL:] if len(new) < _TAIL else new[-_TAIL:]
        return ANSWER_STOP.search(tok.decode(tail, skip_special_tokens=True)) is not None

    return answered


_VLLM: dict[str, Any] = {}


def vllm_engine(probe) -> Any:
    """A vLLM ``LLM`` over the probe's weights (one per model, prefix caching on), or one clear error.

    vLLM needs a CUDA GPU and the ``vllm`` package; it loads the model from the folder the probe was
    loaded from (the embedded model's safetensors cache, a local folder or an HF id), never via pickle.
    """
    key = probe.info.fingerprint
    if key in _VLLM:
        return _VLLM[key]
    try:
        import vllm
    except ImportError as e:
        raise ConfigError("engine='vllm' needs the vllm package, which is not installed.",
                          hint="pip install vllm on a CUDA machine, or use engine='hf' (--engine hf).") from e
    if not torch.cuda.is_available():
        raise ConfigError("engine='vllm' needs a CUDA GPU; none is visible.", hint="Use engine='hf' (--engine hf) on this machine.")
    src = probe.info.source
    if probe.info.name == "embedded":
        from probes.loading import embedded_model_dir

        src = str(embedded_model_dir())
    _VLLM[key] = vllm.LLM(model=src, tokenizer=src, enable_prefix_caching=True, seed=0, trust_remote_code=False,
                          dtype="auto", gpu_memory_utilization=0.6)
    return _VLLM[key]


def _generate_vllm(probe, prompt_ids: list[int], prefix_resp: list[int], n: int, cfg: Config, seed: int) -> list[list[int]]:
    """``n`` continuations through vLLM: one request with ``n`` samples, prefix blocks shared by its cache."""
    import vllm

    llm = vllm_engine(probe)
    eos = _eos_ids(probe)
    room = probe.info.n_ctx - len(prompt_ids) - len(prefix_resp)
    if room < 1:
        raise InputError(f"prompt + response prefix is {len(prompt_ids) + len(prefix_resp)} tokens; the model takes at most {probe.info.n_ctx}.")
    sp = vllm.SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=-1, seed=seed,
                             max_tokens=min(cfg.max_new_tokens, room), stop_token_ids=sorted(eos) or None)
    out = llm.generate([{"prompt_token_ids": list(prompt_ids) + list(prefix_resp)}], sp, use_tqdm=False)[0]
    return [_strip(list(c.token_ids), eos, None) for c in out.outputs]


def _seed_for(seed: int, *parts: int) -> int:
    h = seed
    for p in parts:
        h = (h * 1_000_003 + p + 7919) % (2**31 - 1)
    return h


def rollout_success(probe, prompt_ids: Sequence[int], response_ids: Sequence[int], k: int, checker: Callable[[str], bool],
                    n: int, cfg: Config, *, seed: int | None = None) -> tuple[int, list[str]]:
    """``(n_correct, texts)`` of ``n`` rollouts from ``prompt ⊕ response[:k]`` (graded on
    ``response[:k] ⊕ continuation``), in one batched decode over the prefix's shared KV cache."""
    prefix = list(response_ids[:k])
    s = _seed_for(cfg.seed if seed is None else seed, k)
    conts = _generate(probe, list(prompt_ids), prefix, n, cfg, s)
    texts = [probe.tokenizer.decode(prefix + c, skip_special_tokens=True) for c in conts]
    return sum(bool(checker(t)) for t in texts), texts


def sequential_rollouts(probe, prompt_ids: Sequence[int], response_ids: Sequence[int], k: int, checker: Callable[[str], bool],
                        cfg: Config, *, seed: int | None = None) -> tuple[list[bool], list[str]]:
    """The rollouts of prefix ``k`` the search counts: outcomes and texts of rows ``0..n-1`` in row order.

    All ``cfg.n_rollouts`` rows share the prefix's KV cache and decode in batches of ``cfg.chunk`` rows
    (``cfg.batch_size`` with ``sequential=False``). With ``cfg.sequential`` the SPRT reads the outcomes in row order
    as rows end, and the call stops as soon as rows ``0..n-1`` decide it: exactly the rows a test fed one rollout
    at a time would have drawn (rows after the deciding one are not counted, nor sampled further). Row ``r``'s
    rollout depends only on the seed and ``r``, so the first ``n`` outcomes equal those of a full-budget run, and
    the decision is the one the sequential rule takes on that run's outcomes. :func:`sequential_rollouts_many`
    rolls several prefixes out in shared batches."""
    return sequential_rollouts_many(probe, prompt_ids, response_ids, [k], checker, cfg, seed=seed)[k]


def sequential_rollouts_many(probe, prompt_ids: Sequence[int], response_ids: Sequence[int], ks: Sequence[int],
                             checker: Callable[[str], bool], cfg: Config, *, seed: int | None = None,
                             on_done: Callable[[int], None] | None = None) -> dict[int, tuple[list[bool], list[str]]]:
    """:func:`sequential_rollouts` of every prefix length in ``ks`` in one batched decode: up to ``cfg.chunk`` rows of
    each prefix per batch (all ``cfg.n_rollouts`` with ``sequential=False``), ``cfg.batch_size`` rows in all. Each
    prefix keeps its own test and stops on its own; its outcomes are those it gives alone. ``on_done(k)`` is called
    as each prefix is decided (or has all its rows)."""
    tok = probe.tokenizer
    test = cfg.sprt()
    ks = list(dict.fromkeys(ks))
    out: dict[int, tuple[list[bool], list[str]]] = {}
    groups = []
    for k in ks:
        prefix = list(response_ids[:k])
        outcome: dict[int, bool] = {}
        texts: dict[int, str] = {}
        state = {"n": 0, "c": 0, "done": False}

        def on_row(r: int, ids: list[int], prefix=prefix, outcome=outcome, texts=texts, state=state, k=k) -> bool:
            texts[r] = tok.decode(prefix + ids, skip_special_tokens=True)
            outcome[r] = bool(checker(texts[r]))
            while state["n"] in outcome and not state["done"]:  # feed the test in row order
                state["c"] += outcome[state["n"]]
                state["n"] += 1
                state["done"] = cfg.sequential and test.decide(state["n"], state["c"]) != "undecided"
            if state["done"] or state["n"] == cfg.n_rollouts:
                n = state["n"]
                out[k] = ([outcome[r] for r in range(n)], [texts[r] for r in range(n)])
                if on_done is not None:
                    on_done(k)
            return state["done"]

        groups.append(_rollouts(probe, cfg, prompt_ids, prefix, cfg.n_rollouts, _seed_for(cfg.seed if seed is None else seed, k),
                                on_row=on_row))
    chunk = min(cfg.chunk, cfg.batch_size) if cfg.sequential else cfg.batch_size
    _generate_many(probe, groups, cfg, chunk=chunk)
    return out


def sample_trajectories(probe, problems: Sequence[Problem], cfg: Config = Config(),
                        checkers: Sequence[Callable[[str], bool]] | None = None, *,
                        progress: ProgressFn | None = None) -> list[Trajectory]:
    """``cfg.n_samples`` sampled responses per problem (every problem's rows in shared batches), graded
    (``progress``: phase ``sampling``, in responses)."""
    from .tasks import extract_answer

    out = []
    bar = phase(progress, "sampling", len(problems) * cfg.n_samples, "responses")
    groups = [_rollouts(probe, cfg, probe.to_tokens(format_prompt(probe, p))[0].tolist(), [], cfg.n_samples,
                        _seed_for(cfg.seed, 10_000 + i), on_row=lambda r, ids: bool(bar.advance())) for i, p in enumerate(problems)]
    for i, (p, conts) in enumerate(zip(problems, _generate_many(probe, groups, cfg))):
        chk = checkers[i] if checkers is not None else make_checker(p, cfg.checker, cfg.tol)
        for j, c in enumerate(conts):
            text = probe.tokenizer.decode(c, skip_special_tokens=True)
            out.append(Trajectory(i, j, tuple(c), text, extract_answer(text), bool(chk(text))))
    return out


# ====================================================================================== search
@dataclass
class _Trace:
    trace: int
    problem: int
    question: str
    reference: str
    prompt_ids: list[int]
    response_ids: list[int]


def _search_ids(probe, prompt: str | Sequence[int], response: str | Sequence[int]) -> tuple[list[int], list[int]]:
    """The prompt's ids (tokenized with the tokenizer's defaults) and the response's ids (no special tokens)."""
    p_ids = probe.to_tokens(prompt)[0].tolist() if isinstance(prompt, str) else list(prompt)
    if isinstance(response, str):
        if not response.strip():
            raise InputError("the response is empty.", hint="Give the incorrect response text (or ids) to analyse.")
        r_ids = probe.tokenizer(response, add_special_tokens=False).input_ids
    else:
        r_ids = list(response)
    if not r_ids:
        raise InputError("the response has no tokens.", hint="Give the incorrect response text (or ids) to analyse.")
    return p_ids, r_ids


def _search_hash(p_ids: Sequence[int], r_ids: Sequence[int], reference: str) -> str:
    """The input hash of a search. The reference grades the rollouts, so it is part of the input (a search
    against another answer is another result)."""
    return hash_inputs(p_ids, r_ids, reference) if reference else hash_inputs(p_ids, r_ids)


def _prepare_search(probe, prompt: str | Sequence[int], response: str | Sequence[int], checker: Any = None, *,
                    config: Config, reference: str = "", **_: Any) -> registry.Inputs:
    """The trace's ids and the hash that names it (the checker does not enter it; the reference does)."""
    p_ids, r_ids = _search_ids(probe, prompt, response)
    label = f"trace of {len(r_ids)} tokens" + (f" (reference {reference!r})" if reference else "")
    return registry.Inputs(_search_hash(p_ids, r_ids, reference), (p_ids, r_ids), label)


def search(probe, prompt: str | Sequence[int], response: str | Sequence[int], checker: Callable[[str], bool] | Checker, *,
           config: Config = Config(), question: str = "", reference: str = "", progress: ProgressFn | None = None) -> "CriticalResult":
    """Rollout search on one given (incorrect) trace.

    Args:
        prompt: prompt text (tokenised with the tokenizer's defaults) or ids.
        response: the response text or ids (the trajectory ``y``).
        checker: ``fn(text) -> bool`` grading ``response prefix ⊕ continuation``.
        progress: :class:`~analyses.core.progress.Progress` events: phases ``rollouts`` (the coarse prefixes),
            ``bisection`` (at most ⌈log2 gap⌉ prefixes; it closes at the number it needed) and ``alternatives``.
    """
    inp = SPEC.entry_inputs(_prepare_search, probe, prompt, response, checker, config=config, reference=reference)
    p_ids, r_ids = inp.data
    chk = checker if callable(checker) else CallableChecker(checker)
    tr = _Trace(0, 0, question, reference, p_ids, r_ids)
    timer = Timer()
    frames = _search_trace(probe, tr, chk, config, timer, progress)
    return dataclasses.replace(_build_result(probe, config, [frames], pd.DataFrame(), timer, inp.hash), inputs=inp.label)


def run(probe, problems: Sequence[Problem] | None = None, *, config: Config = Config(),
        checkers: Sequence[Callable[[str], bool]] | None = None, n_traces: int | None = None,
        progress: ProgressFn | None = None) -> "CriticalResult":
    """Sample trajectories for each problem, take the first incorrect one per problem and search it.

    Args:
        problems: tasks with reference answers (default: one built-in arithmetic problem).
        checkers: one grader per problem (default: ``config.checker`` on the reference answer).
        n_traces: analyse at most this many incorrect traces (default: one per problem).
        progress: :class:`~analyses.core.progress.Progress` events: ``sampling`` (responses), then per searched
            trace ``trace i/n: rollouts`` (the coarse prefixes), ``trace i/n: bisection`` (at most
            ⌈log2 gap⌉ prefixes) and ``trace i/n: alternatives`` (alternative tokens), as :func:`search`.
    """
    inp = SPEC.inputs(probe, problems, config=config)
    problems = inp.data
    chks = list(checkers) if checkers is not None else [make_checker(p, config.checker, config.tol) for p in problems]
    if config.engine == "vllm":
        vllm_engine(probe)  # fail before any sampling when vLLM or a GPU is missing
    timer = Timer()
    with timer("sample"):
        trajs = sample_trajectories(probe, problems, config, chks, progress=progress)
    tdf = pd.DataFrame([dict(problem=t.problem, sample=t.sample, text=t.text, answer=t.answer, correct=t.correct,
                             n_tokens=len(t.response_ids)) for t in trajs])
    wrong: dict[int, Trajectory] = {}
    for t in trajs:
        if not t.correct and t.response_ids and t.problem not in wrong:
            wrong[t.problem] = t
    if not wrong:
        raise InputError(f"all {len(trajs)} sampled trajectories of {len(problems)} problem(s) are correct: nothing to analyse.",
                         hint="Sample more (n_samples / --samples), raise the temperature, or use harder problems (builtin-multistep).")
    traces = []
    picked = sorted(wrong.items())[: n_traces or len(wrong)]
    for ti, (pi, t) in enumerate(picked):
        p = problems[pi]
        prompt_ids = probe.to_tokens(format_prompt(probe, p))[0].tolist()
        traces.append(_search_trace(probe, _Trace(ti, pi, p.question, str(p.answer), prompt_ids, list(t.response_ids)),
                                    chks[pi], config, timer, progress, f"trace {ti + 1}/{len(picked)}: "))
    return dataclasses.replace(_build_result(probe, config, traces, tdf, timer, inp.hash), inputs=inp.label)


def _problems(problems: Sequence[Problem] | None, config: Config) -> list[Problem]:
    """The problems of a run (default: one built-in arithmetic problem drawn with ``config.seed``)."""
    from .tasks import builtin_arith

    problems = list(problems) if problems is not None else builtin_arith(1, seed=config.seed)
    if not problems:
        raise InputError("no problems were given.", hint="Pass at least one Problem (e.g. analyses.tasks.builtin_arith(1)).")
    return problems


def _run_hash(problems: Sequence[Problem]) -> str:
    """The input hash of a run: each problem's question and reference answer."""
    return hash_inputs([(p.question, str(p.answer)) for p in problems])


def _prepare(probe, problems: Sequence[Problem] | None = None, *, config: Config, **_: Any) -> registry.Inputs:
    """The problems and the hash of their questions and reference answers (checkers and ``n_traces`` do not
    enter it)."""
    if problems is not None and (isinstance(problems, (str, Problem)) or not hasattr(problems, "__iter__")):
        raise InputError(f"problems must be a list of Problem, got {type(problems).__name__}.",
                         hint="E.g. [Problem('2+3?', 5)] or analyses.tasks.builtin_arith(1).")
    problems = _problems(problems, config)
    bad = [type(p).__name__ for p in problems if not isinstance(p, Problem)]
    if bad:
        raise InputError(f"problems must be Problem objects, got {bad[0]}.", hint="E.g. [Problem('2+3?', 5)].")
    return registry.Inputs(_run_hash(problems), problems, f"{len(problems)} problem(s): {registry.text_label(problems[0].question, 60)!r}")


def _search_trace(probe, tr: _Trace, checker, cfg: Config, timer: Timer, progress: ProgressFn | None,
                  label: str = "") -> dict[str, Any]:
    tok = probe.tokenizer
    L = len(tr.response_ids)
    strs = probe.to_str_tokens(tr.response_ids)
    n_pref, n_roll = estimate_rollouts(L, cfg, strs)
    if n_roll > cfg.max_rollouts:
        cheaper = {g: estimate_rollouts(L, cfg.replace(granularity=g), strs) for g in ("step", "bisect")}
        raise ConfigError(
            f"granularity={cfg.granularity!r} on a {L}-token response needs ~{n_pref} prefixes x {cfg.n_rollouts} rollouts "
            f"= {n_roll} rollouts (up to {n_roll * cfg.max_new_tokens} generated tokens), over max_rollouts={cfg.max_rollouts}.",
            hint=f"Use granularity='step' (--granularity step, ~{cheaper['step'][1]} rollouts) or 'bisect' "
                 f"(~{cheaper['bisect'][1]} rollouts), fewer rollouts, or raise max_rollouts (--max-rollouts).")
    evals: dict[int, tuple[int, int, str]] = {}  # k -> (n, n_correct, stage)
    examples: dict[int, str] = {}
    test = cfg.sprt()

    def ev(ks: Sequence[int], stage: str) -> None:
        """Roll the prefixes ``ks`` not yet measured out together (each stops as soon as its SPRT decides)."""
        todo = [k for k in dict.fromkeys(ks) if k not in evals]
        if not todo:
            return
        with timer("rollouts"):
            got = sequential_rollouts_many(probe, tr.prompt_ids, tr.response_ids, todo, checker, cfg,
                                           seed=_seed_for(cfg.seed, tr.trace), on_done=lambda k: bar.advance())
        for k in todo:
            outs, texts = got[k]
            evals[k] = (len(outs), sum(outs), stage)
            examples[k] = texts[0] if texts else ""

    def score(k: int) -> float:
        n, c, _ = evals[k]
        return c / n

    cuts = list(range(L + 1)) if cfg.granularity == "token" else (
        step_cuts(strs, cfg.max_steps) if cfg.granularity == "step" else [0, L])
    bar = phase(progress, f"{label}rollouts", len(set(cuts)), "prefixes")
    ev(cuts, "coarse")
    scores = lambda: {k: c / n for k, (n, c, _) in evals.items()}  # noqa: E731
    mark = find_critical(scores(), zero_tol=cfg.zero_tol, recover_frac=cfg.recover_frac)
    if mark is not None and cfg.bisect and cfg.granularity != "token":
        lo = max(k for k in evals if k < mark)
        hi = mark
        bar = phase(progress, f"{label}bisection", math.ceil(math.log2(hi - lo)) if hi - lo > 1 else 0, "prefixes")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ev([mid], "bisect")
            if score(mid) <= cfg.zero_tol:
                hi = mid
            else:
                lo = mid
        bar.close()
        mark = find_critical(scores(), zero_tol=cfg.zero_tol, recover_frac=cfg.recover_frac)
    sc = scores()
    crit = None if mark is None else mark - 1
    exact = crit is not None and (crit in sc)  # the prefix just before the token was evaluated
    prev = None if crit is None else max(k for k in sc if k < mark)

    # counterfactual alternatives at the critical position
    alts: list[dict[str, Any]] = []
    if crit is not None and cfg.alternatives != "none" and cfg.n_alternatives > 0:
        with timer("alternatives"):
            alts = _alternatives(probe, tr, crit, checker, cfg, progress, label)

    state = {k: test.decide(n, c) for k, (n, c, _) in evals.items()}
    ci = {k: clopper_pearson(n, c, cfg.alpha) for k, (n, c, _) in evals.items()}
    alive_after = {k: any(state[q] == "alive" for q in state if q > k) for k in state}

    def decide(j: int) -> str | None:  # token j sits between prefixes j and j+1
        if j not in state or (j + 1) not in state:
            return None
        return token_decision(state[j], state[j + 1], alive_after[j + 1])

    rows = []
    for j, s in enumerate(strs):
        before, after = sc.get(j), sc.get(j + 1)
        d = decide(j)
        rows.append(dict(trace=tr.trace, pos=j, token=s, token_id=tr.response_ids[j],
                         score_before=before, score_after=after,
                         drop=(before - after) if before is not None and after is not None else None,
                         n_before=evals[j][0] if j in evals else None, n_after=evals[j + 1][0] if j + 1 in evals else None,
                         ci_after_lo=ci[j + 1][0] if j + 1 in ci else None, ci_after_hi=ci[j + 1][1] if j + 1 in ci else None,
                         candidate=(j == crit), decision=d, critical=(j == crit and d == "critical")))
    prefixes = pd.DataFrame([dict(trace=tr.trace, prefix_len=k, n=n, n_correct=c, score=c / n, ci_lo=ci[k][0], ci_hi=ci[k][1],
                                  state=state[k], stage=st, example=examples.get(k, "")) for k, (n, c, st) in sorted(evals.items())])
    # the candidate's decision: exact (both neighbouring prefixes measured) or over the bracketing segment
    decision = None
    if crit is not None:
        decision = decide(crit) if exact else token_decision(state[prev], state[mark], alive_after[mark])
    warning = ""
    if decision == "undecided":
        nb, cb = evals[prev][:2]
        na, ca = evals[mark][:2]
        warning = (f"undecided: {cb}/{nb} rollouts succeed before the candidate and {ca}/{na} after it; with "
                   f"{cfg.n_rollouts} rollouts per prefix the test cannot tell p <= {test.p_dead:.3g} from p >= {test.p_alive:.3g} "
                   f"at alpha={cfg.alpha} (a prefix with no success needs >= {test.min_dead()} rollouts): raise --rollouts")
    n_with = cfg.n_rollouts
    c_with = evals[mark][1] if mark is not None else 0
    n_wo = sum(a["n"] for a in alts)
    c_wo = sum(a["n_correct"] for a in alts)
    pk = []
    for k in range(1, max(n_with, n_wo) + 1):
        pk.append(dict(trace=tr.trace, k=k, with_token=pass_at_k(n_with, c_with, k) if crit is not None else None,
                       without_token=pass_at_k(n_wo, c_wo, k) if n_wo else None))
    summary = dict(trace=tr.trace, problem=tr.problem, question=tr.question, reference=tr.reference,
                   response=tok.decode(tr.response_ids, skip_special_tokens=True), n_tokens=L,
                   critical_pos=crit, critical_token=None if crit is None else strs[crit],
                   exact=exact, score_before=None if prev is None else sc[prev], score_after=None if mark is None else sc[mark],
                   drop=None if prev is None else sc[prev] - sc[mark], alt_success=(c_wo / n_wo) if n_wo else None,
                   decision=decision,
                   ci_before_lo=None if prev is None else ci[prev][0], ci_before_hi=None if prev is None else ci[prev][1],
                   ci_after_lo=None if mark is None else ci[mark][0], ci_after_hi=None if mark is None else ci[mark][1],
                   n_before=None if prev is None else evals[prev][0], n_after=None if mark is None else evals[mark][0],
                   warning=warning,
                   n_prefixes=len(evals), n_rollouts=sum(n for n, _, _ in evals.values()) + n_wo,
                   note=("" if crit is not None else ("already hopeless before the first response token" if sc.get(0, 1) <= cfg.zero_tol
                                                      else "the score never stays at zero (no critical token)")))
    return dict(summary=summary, tokens=pd.DataFrame(rows), prefixes=prefixes,
                alternatives=pd.DataFrame(alts), pass_at_k=pd.DataFrame(pk), prompt_ids=tr.prompt_ids, response_ids=tr.response_ids)


@torch.no_grad()
def _alternatives(probe, tr: _Trace, crit: int, checker, cfg: Config, progress: ProgressFn | None = None,
                  label: str = "") -> list[dict[str, Any]]:
    """Roll out alternative tokens at position ``crit`` (original token's probability zeroed)."""
    ids = torch.tensor([tr.prompt_ids + tr.response_ids[:crit]], device=probe.device)
    logits = probe.forward(ids)[0, -1].float() / cfg.temperature
    probs = torch.softmax(logits, -1)
    probs[tr.response_ids[crit]] = 0
    probs = probs / probs.sum()
    counts: dict[int, int] = {}
    if cfg.alternatives == "topk":
        for t in torch.topk(probs, min(cfg.n_alternatives, int((probs > 0).sum()))).indices.tolist():
            counts[t] = cfg.alt_rollouts
    else:
        g = torch.Generator(device="cpu").manual_seed(_seed_for(cfg.seed, tr.trace, 77))
        for t in torch.multinomial(probs.cpu(), cfg.n_alternatives, replacement=True, generator=g).tolist():
            counts[t] = counts.get(t, 0) + cfg.alt_rollouts
    out = []
    base = tr.response_ids[:crit]
    bar = phase(progress, f"{label}alternatives", len(counts), "tokens")
    tok = probe.tokenizer
    if cfg.engine == "vllm":  # one request per token (vLLM shares the prefix blocks itself)
        for t, n in counts.items():
            resp = base + [t]
            c, texts = rollout_success(probe, tr.prompt_ids, resp, len(resp), checker, n, cfg, seed=_seed_for(cfg.seed, tr.trace, t))
            out.append(dict(trace=tr.trace, pos=crit, token=tok.decode([t]), token_id=t, prob=float(probs[t]),
                            n=n, n_correct=c, success=c / n, example=texts[0] if texts else ""))
            bar.advance()
    else:  # every alternative in one batched decode: the prefix's KV cache once, each row forced to its token first
        first = [t for t, n in counts.items() for _ in range(n)]
        left = dict(counts)
        texts: dict[int, str] = {}

        def on_row(r: int, ids: list[int]) -> bool:
            texts[r] = tok.decode(base + ids, skip_special_tokens=True)
            left[first[r]] -= 1
            if not left[first[r]]:
                bar.advance()
            return False

        _generate(probe, tr.prompt_ids, base, len(first), cfg, _seed_for(cfg.seed, tr.trace, 78), first=first, on_row=on_row)
        r = 0
        for t, n in counts.items():
            rows = [texts[i] for i in range(r, r + n)]
            c = sum(bool(checker(x)) for x in rows)
            out.append(dict(trace=tr.trace, pos=crit, token=tok.decode([t]), token_id=t, prob=float(probs[t]),
                            n=n, n_correct=c, success=c / n, example=rows[0]))
            r += n
    out.sort(key=lambda a: (-a["success"], -a["prob"]))
    return out


# ====================================================================================== result
@register_result
@dataclass(frozen=True, kw_only=True)
class CriticalResult(Result):
    """Critical-token search over one or more incorrect traces.

    Tables: ``traces`` (one row per trace: critical position/token, scores, drop, alternative
    success), ``tokens`` (trace x position: score_before/score_after/drop, optional CE columns),
    ``prefixes`` (evaluated prefix lengths), ``alternatives``, ``pass_at_k``, ``trajectories``
    (all sampled responses, graded).
    """

    analysis: ClassVar[str] = "critical"

    saved_views: ClassVar = ()

    traces: pd.DataFrame = stored("table")
    tokens: pd.DataFrame = stored("table")
    prefixes: pd.DataFrame = stored("table")
    alternatives: pd.DataFrame = stored("table", default_factory=pd.DataFrame)
    pass_at_k: pd.DataFrame = stored("table", default_factory=pd.DataFrame)
    trajectories: pd.DataFrame = stored("table", default_factory=pd.DataFrame)
    # {"prompt": [[...]], "response": [[...]]} per trace
    ids: dict[str, Any] = stored("extra", default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (trace, pos) with ``value`` = success rate after the token."""
        df = self.tokens.copy()
        df.insert(0, "model", self.model.get("name", ""))
        df["value"] = df["score_after"]
        return df

    def curve(self, trace: int = 0) -> pd.DataFrame:
        """Evaluated prefix lengths and success rates of one trace."""
        return self.prefixes[self.prefixes.trace == trace].sort_values("prefix_len").reset_index(drop=True)

    def warnings(self) -> list[str]:
        """One line per trace whose candidate the rollout budget could not decide (empty if none)."""
        if "warning" not in self.traces:
            return []
        return [f"trace {r.trace}: {r.warning}" for r in self.traces.itertuples() if isinstance(r.warning, str) and r.warning]

    def top_critical_tokens(self, decided_only: bool = True) -> pd.DataFrame:
        """Critical tokens across traces, most frequent first (``token, count, mean_drop``).

        ``decided_only``: only candidates the test called ``"critical"`` (results saved before the
        test existed have no decision column and keep every candidate)."""
        d = self.traces.dropna(subset=["critical_token"])
        if decided_only and "decision" in d:
            d = d[d.decision == "critical"]
        if d.empty:
            return pd.DataFrame(columns=["token", "count", "mean_drop"])
        g = d.assign(token=d.critical_token.str.strip()).groupby("token").agg(count=("trace", "size"), mean_drop=("drop", "mean"))
        return g.sort_values(["count", "mean_drop"], ascending=False).reset_index()

    def plot(self, trace: int = 0):
        """Success rate vs prefix length (markers at evaluated prefixes), critical token marked."""
        import plotly.graph_objects as go

        c = self.curve(trace)
        toks = self.tokens[self.tokens.trace == trace]
        labels = ["(start)"] + toks.token.tolist()
        fig = go.Figure(go.Scatter(x=c.prefix_len, y=c.score, mode="lines+markers", name="success rate",
                                   text=[labels[k] if k < len(labels) else "" for k in c.prefix_len],
                                   hovertemplate="prefix %{x} (last token %{text})<br>success %{y:.2f}<extra></extra>"))
        row = self.traces[self.traces.trace == trace].iloc[0]
        if pd.notna(row.critical_pos):
            fig.add_vline(x=int(row.critical_pos) + 1, line_dash="dash", line_color="red",
                          annotation_text=f"critical: {row.critical_token!r}")
        fig.update_layout(xaxis_title="prefix length (response tokens)", yaxis_title="rollout success rate",
                          yaxis_range=[-0.05, 1.05], title=f"Critical-token search, trace {trace}")
        return fig


def _build_result(probe, cfg: Config, traces: list[dict[str, Any]], trajectories: pd.DataFrame, timer: Timer, ih: str) -> CriticalResult:
    cat = lambda key: pd.concat([t[key] for t in traces], ignore_index=True) if traces else pd.DataFrame()  # noqa: E731
    return CriticalResult(
        config=cfg, model=probe.info.to_dict(), input_hash=ih, timings=timer.seconds,
        traces=pd.DataFrame([t["summary"] for t in traces]), tokens=cat("tokens"), prefixes=cat("prefixes"),
        alternatives=cat("alternatives"), pass_at_k=cat("pass_at_k"), trajectories=trajectories,
        ids={"prompt": [t["prompt_ids"] for t in traces], "response": [t["response_ids"] for t in traces]},
    )


def _rows(c: Config) -> int:
    """Rows one batched decode of the search holds, at most ``batch_size``: the sampled responses of every problem
    (their count is not in the config, so a full batch), the rollouts of a trace's prefixes (``chunk`` rows of each in
    the sequential test) or every alternative's rollouts."""
    return c.batch_size


def _groups(c: Config) -> int:
    """Prefixes one batched decode holds at most (each keeps its one-row cache while its rows run)."""
    return max(1, c.batch_size // max(1, min(c.chunk, c.n_rollouts) if c.sequential else c.n_rollouts))


def _memory_parts(s: "planner.ModelShape", B: int, T: int, o: Any) -> dict[str, int]:
    """The rollout engine's memory (:func:`probes.generation.sample`) for prompts of ``T`` tokens and ``B`` rows.

    A row holds the prompt, a response prefix and a rollout, each of the last two at most ``new_tokens``
    (``max_new_tokens``) long: ``R = T + 2·new`` tokens (at most the context; rows of shorter prefixes are padded to
    the longest). ``kv_cache``: the batch's cache at its longest, ``2·L·B·K·h·R·a``; ``prefix_kv``: the one-row caches
    of the prefixes in the batch (``groups``, default 1), kept while their rows run; the
    transients (the largest counts): ``prefill`` (one row over ``T + new`` tokens, logits of the last position only)
    and ``step`` (one decode step: float32 logits, float64 probabilities and their cumulative sums ``[B, V]``, and the
    cache's copy of one layer's keys and values as it grows or drops an ended row). No ``[B, T]`` forward runs."""
    new = int(o["new_tokens"])
    R = T + 2 * new if s.n_ctx is None else min(s.n_ctx, T + 2 * new)
    P = R - new
    a, per_token = s.itemsize, 2 * s.n_kv_heads * s.d_head * s.itemsize  # one layer's keys and values, one token
    return {"kv_cache": s.n_layers * B * R * per_token, "prefix_kv": int(o.get("groups", 1)) * s.n_layers * P * per_token,
            "prefill": 3 * P * s.d_model * a + max(2 * P * (s.n_heads + 2 * s.n_kv_heads) * s.d_head * a, 3 * P * s.d_mlp * a)
                       + s.d_vocab * 4,
            "step": 20 * B * s.d_vocab + B * R * per_token}


MEMORY = planner.MemoryModel("critical", _memory_parts, persistent=("kv_cache", "prefix_kv"), forward=False,
                             sizes=lambda c: {"batch_size": _rows(c), "new_tokens": c.max_new_tokens, "groups": _groups(c)}, batch_field="batch_size")


SPEC = registry.register(registry.Analysis(
    name="critical", order=5, title="Critical tokens", summary="tokens of a failed reasoning trace whose replacement flips the outcome",
    config=Config, result=CriticalResult, run=run, prepare=_prepare, cli="critical", page="critical",
    memory=MEMORY,
))
result_key = SPEC.key  # the key run() gives these problems, from the same _prepare
search_key = SPEC.keyer(_prepare_search)  # the key search() gives this trace, from the same _prepare_search


_MOVED = {"cdpo": ("CDPOConfig", "TrainConfig", "cdpo_loss", "compare_contrastive", "contrastive_scores", "select_pairs",
                   "select_sft", "sequence_logps", "train_cdpo", "train_contrastive")}


def __getattr__(name: str):
    """cDPO training lives in its own module (:mod:`analyses.cdpo`); its names stay importable here."""
    for mod, names in _MOVED.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f"{__package__}.{mod}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
