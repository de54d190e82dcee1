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

import copy
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import pandas as pd
import torch

from probes.errors import ConfigError, InputError

from .base import Config as _BaseConfig
from .base import Result, Timer, register_result
from .store import hash_inputs
from .tasks import ANSWER_STOP, Checker, CallableChecker, Problem, format_prompt, make_checker

__all__ = [
    "Config", "CriticalResult", "run", "search", "sample_trajectories", "rollout_success", "pass_at_k",
    "find_critical", "step_cuts", "Trajectory", "TrainConfig", "train_contrastive", "contrastive_scores",
    "ce_token_scores", "compare_contrastive", "estimate_rollouts", "vllm_engine",
]


@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Critical-token search settings (defaults: method page, "Workbench" section)."""

    n_samples: int = 16          # trajectories sampled per problem to find an incorrect one
    n_rollouts: int = 32         # N rollouts per prefix (method page: 16-32 coarse pass; paper 64)
    temperature: float = 0.7     # method page analyzer API default
    top_p: float = 1.0           # plain temperature sampling, as the paper's vLLM rollouts
    max_new_tokens: int = 512    # method page: cap new tokens (e.g. 512)
    granularity: Literal["token", "step", "bisect"] = "step"  # method page: coarse pass at step boundaries
    bisect: bool = True          # fine pass: bisect inside the segment where the score falls to 0
    max_steps: int = 30          # at most this many step cut points (method page: ~10-30)
    zero_tol: float = 0.0        # score <= zero_tol counts as "all wrong" (released analyse: score 0)
    recover_frac: float = 3 / 64  # a later prefix above this discards the mark (released: >3/64)
    alternatives: Literal["sample", "topk", "none"] = "sample"  # counterfactual check (method page step 4)
    n_alternatives: int = 32     # K alternative tokens (method page: K=16-64)
    alt_rollouts: int = 1        # rollouts per alternative (paper: one each)
    batch_size: int = 64         # rollouts per generate call
    prefix_cache: bool = True    # share the prefix KV cache across a prefix's rollouts
    stop_at_answer: bool = True  # stop a rollout once its final answer is written
    max_rollouts: int = 20_000   # budget: prefixes x rollouts beyond this is refused
    checker: Literal["auto", "numeric", "exact"] = "auto"  # auto: numeric when the reference answer is a number
    engine: Literal["hf", "vllm"] = "hf"  # rollouts through transformers' generate, or vLLM (GPU, prefix caching)
    tol: float = 1e-6            # numeric checker tolerance
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_samples", "n_rollouts", "max_new_tokens", "batch_size", "max_rollouts", "max_steps", "alt_rollouts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer.", hint=f"Pass {name}=1 or more.")
        if self.n_alternatives < 0:
            raise ConfigError(f"n_alternatives={self.n_alternatives} must be >= 0.")
        if not (self.temperature > 0):
            raise ConfigError(f"temperature={self.temperature} must be > 0 (rollouts are sampled).", hint="Use e.g. 0.7.")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1].")
        if self.granularity not in ("token", "step", "bisect"):
            raise ConfigError(f"granularity={self.granularity!r} is not known.", hint="Use 'token', 'step' or 'bisect'.")
        if self.alternatives not in ("sample", "topk", "none"):
            raise ConfigError(f"alternatives={self.alternatives!r} is not known.", hint="Use 'sample', 'topk' or 'none'.")
        if self.checker not in ("auto", "numeric", "exact"):
            raise ConfigError(f"checker={self.checker!r} is not known.", hint="Use 'auto', 'numeric' or 'exact' (or pass a callable to run()).")
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"engine={self.engine!r} is not known.", hint="Use 'hf' (transformers generate) or 'vllm'.")
        if not (0 <= self.zero_tol < 1) or not (0 <= self.recover_frac < 1):
            raise ConfigError(f"zero_tol={self.zero_tol}, recover_frac={self.recover_frac} must lie in [0, 1).")


# ====================================================================================== pure math
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k ``1 − C(n−c, k) / C(n, k)`` for ``c`` correct of ``n`` samples (k <= n)."""
    if k > n or n <= 0:
        return float("nan")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


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


class _AnswerStop:
    """Per-row stopping criterion: the text (response prefix + new tokens) has a written answer."""

    def __init__(self, tokenizer, prefix_resp: list[int], start: int):
        self.tok, self.prefix, self.start = tokenizer, prefix_resp, start

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kw) -> torch.Tensor:
        out = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(input_ids.tolist()):
            text = self.tok.decode(self.prefix + row[self.start:], skip_special_tokens=True)
            out[i] = ANSWER_STOP.search(text) is not None
        return out


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
    e = probe.hf_model.generation_config.eos_token_id
    if e is None:
        e = probe.tokenizer.eos_token_id
    return set(e if isinstance(e, (list, tuple)) else [e]) - {None}


@torch.no_grad()
def _generate(probe, prompt_ids: list[int], prefix_resp: list[int], n: int, cfg: Config, seed: int) -> list[list[int]]:
    """``n`` sampled continuations (new token ids, EOS stripped) of ``prompt ⊕ prefix_resp``.

    One prefill of the prefix (all tokens but the last) is computed once and its KV cache repeated
    for each batch of rollouts (``cfg.prefix_cache``); sampling uses ``seed`` for the first batch and
    ``seed + b`` for batch ``b`` (in a forked RNG, so the global RNG is untouched).
    """
    if cfg.engine == "vllm":
        return _generate_vllm(probe, prompt_ids, prefix_resp, n, cfg, seed)
    from transformers import DynamicCache, StoppingCriteriaList

    model, tok = probe.hf_model, probe.tokenizer
    # the KV-cache keyword: ``cache`` in current transformers, ``past_key_values`` before
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt_ids + prefix_resp], device=probe.device)
    T = ids.shape[1]
    room = probe.info.n_ctx - T
    if room < 1:
        raise InputError(f"prompt + response prefix is {T} tokens; the model takes at most {probe.info.n_ctx}.")
    max_new = min(cfg.max_new_tokens, room)
    eos = _eos_ids(probe)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    base = None
    if cfg.prefix_cache and T > 1:
        base = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], use_cache=True, **{cache_kw: base})
    out: list[list[int]] = []
    devices = [probe.device] if probe.device.type == "cuda" else []
    for b, start in enumerate(range(0, n, cfg.batch_size)):
        m = min(cfg.batch_size, n - start)
        kw: dict[str, Any] = {}
        if base is not None:
            c = copy.deepcopy(base)
            c.batch_repeat_interleave(m)
            kw[cache_kw] = c
        if cfg.stop_at_answer:
            kw["stopping_criteria"] = StoppingCriteriaList([_AnswerStop(tok, prefix_resp, T)])
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + b)
            gen = model.generate(input_ids=ids.expand(m, -1), attention_mask=torch.ones(m, T, dtype=torch.long, device=ids.device),
                                 do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                 max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(eos) or None, **kw)
        for row in gen[:, T:].tolist():
            out.append(_strip(row, eos, pad))
    return out


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
    ``response[:k] ⊕ continuation``)."""
    prefix = list(response_ids[:k])
    s = _seed_for(cfg.seed if seed is None else seed, k)
    conts = _generate(probe, list(prompt_ids), prefix, n, cfg, s)
    texts = [probe.tokenizer.decode(prefix + c, skip_special_tokens=True) for c in conts]
    return sum(bool(checker(t)) for t in texts), texts


def sample_trajectories(probe, problems: Sequence[Problem], cfg: Config = Config(),
                        checkers: Sequence[Callable[[str], bool]] | None = None) -> list[Trajectory]:
    """``cfg.n_samples`` sampled responses per problem (one batched generate each), graded."""
    out = []
    for i, p in enumerate(problems):
        chk = checkers[i] if checkers is not None else make_checker(p, cfg.checker, cfg.tol)
        prompt_ids = probe.to_tokens(format_prompt(probe, p))[0].tolist()
        conts = _generate(probe, prompt_ids, [], cfg.n_samples, cfg, _seed_for(cfg.seed, 10_000 + i))
        for j, c in enumerate(conts):
            text = probe.tokenizer.decode(c, skip_special_tokens=True)
            from .tasks import extract_answer

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


def search(probe, prompt: str | Sequence[int], response: str | Sequence[int], checker: Callable[[str], bool] | Checker,
           config: Config = Config(), *, question: str = "", reference: str = "", progress: Callable[[int], None] | None = None) -> "CriticalResult":
    """Rollout search on one given (incorrect) trace.

    Args:
        prompt: prompt text (tokenised with the tokenizer's defaults) or ids.
        response: the response text or ids (the trajectory ``y``).
        checker: ``fn(text) -> bool`` grading ``response prefix ⊕ continuation``.
    """
    p_ids = probe.to_tokens(prompt)[0].tolist() if isinstance(prompt, str) else list(prompt)
    if isinstance(response, str):
        if not response.strip():
            raise InputError("the response is empty.", hint="Give the incorrect response text (or ids) to analyse.")
        r_ids = probe.tokenizer(response, add_special_tokens=False).input_ids
    else:
        r_ids = list(response)
    if not r_ids:
        raise InputError("the response has no tokens.", hint="Give the incorrect response text (or ids) to analyse.")
    chk = checker if callable(checker) else CallableChecker(checker)
    tr = _Trace(0, 0, question, reference, p_ids, r_ids)
    timer = Timer()
    frames = _search_trace(probe, tr, chk, config, timer, progress)
    return _build_result(probe, config, [frames], pd.DataFrame(), timer, hash_inputs(p_ids, r_ids))


def run(probe, problems: Sequence[Problem] | None = None, config: Config = Config(), *,
        checkers: Sequence[Callable[[str], bool]] | None = None, n_traces: int | None = None,
        progress: Callable[[int], None] | None = None) -> "CriticalResult":
    """Sample trajectories for each problem, take the first incorrect one per problem and search it.

    Args:
        problems: tasks with reference answers (default: one built-in arithmetic problem).
        checkers: one grader per problem (default: ``config.checker`` on the reference answer).
        n_traces: analyse at most this many incorrect traces (default: one per problem).
    """
    from .tasks import builtin_arith

    problems = list(problems) if problems is not None else builtin_arith(1, seed=config.seed)
    if not problems:
        raise InputError("no problems were given.", hint="Pass at least one Problem (e.g. analyses.tasks.builtin_arith(1)).")
    chks = list(checkers) if checkers is not None else [make_checker(p, config.checker, config.tol) for p in problems]
    if config.engine == "vllm":
        vllm_engine(probe)  # fail before any sampling when vLLM or a GPU is missing
    timer = Timer()
    with timer("sample"):
        trajs = sample_trajectories(probe, problems, config, chks)
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
    for ti, (pi, t) in enumerate(sorted(wrong.items())[: n_traces or len(wrong)]):
        p = problems[pi]
        prompt_ids = probe.to_tokens(format_prompt(probe, p))[0].tolist()
        traces.append(_search_trace(probe, _Trace(ti, pi, p.question, str(p.answer), prompt_ids, list(t.response_ids)),
                                    chks[pi], config, timer, progress))
    return _build_result(probe, config, traces, tdf, timer, hash_inputs([(p.question, str(p.answer)) for p in problems]))


def _search_trace(probe, tr: _Trace, checker, cfg: Config, timer: Timer, progress) -> dict[str, Any]:
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

    def ev(k: int, stage: str) -> float:
        if k not in evals:
            with timer("rollouts"):
                c, texts = rollout_success(probe, tr.prompt_ids, tr.response_ids, k, checker, cfg.n_rollouts, cfg,
                                           seed=_seed_for(cfg.seed, tr.trace))
            evals[k] = (cfg.n_rollouts, c, stage)
            examples[k] = texts[0] if texts else ""
            if progress:
                progress(1)
        n, c, _ = evals[k]
        return c / n

    cuts = list(range(L + 1)) if cfg.granularity == "token" else (
        step_cuts(strs, cfg.max_steps) if cfg.granularity == "step" else [0, L])
    for k in cuts:
        ev(k, "coarse")
    scores = lambda: {k: c / n for k, (n, c, _) in evals.items()}  # noqa: E731
    mark = find_critical(scores(), zero_tol=cfg.zero_tol, recover_frac=cfg.recover_frac)
    if mark is not None and cfg.bisect and cfg.granularity != "token":
        lo = max(k for k in evals if k < mark)
        hi = mark
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ev(mid, "bisect") <= cfg.zero_tol:
                hi = mid
            else:
                lo = mid
        mark = find_critical(scores(), zero_tol=cfg.zero_tol, recover_frac=cfg.recover_frac)
    sc = scores()
    crit = None if mark is None else mark - 1
    exact = crit is not None and (crit in sc)  # the prefix just before the token was evaluated
    prev = None if crit is None else max(k for k in sc if k < mark)

    # counterfactual alternatives at the critical position
    alts: list[dict[str, Any]] = []
    if crit is not None and cfg.alternatives != "none" and cfg.n_alternatives > 0:
        with timer("alternatives"):
            alts = _alternatives(probe, tr, crit, checker, cfg)

    rows = []
    for j, s in enumerate(strs):
        before, after = sc.get(j), sc.get(j + 1)
        rows.append(dict(trace=tr.trace, pos=j, token=s, token_id=tr.response_ids[j],
                         score_before=before, score_after=after,
                         drop=(before - after) if before is not None and after is not None else None,
                         critical=(j == crit)))
    prefixes = pd.DataFrame([dict(trace=tr.trace, prefix_len=k, n=n, n_correct=c, score=c / n, stage=st,
                                  example=examples.get(k, "")) for k, (n, c, st) in sorted(evals.items())])
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
                   n_prefixes=len(evals), n_rollouts=sum(n for n, _, _ in evals.values()) + n_wo,
                   note=("" if crit is not None else ("already hopeless before the first response token" if sc.get(0, 1) <= cfg.zero_tol
                                                      else "the score never stays at zero (no critical token)")))
    return dict(summary=summary, tokens=pd.DataFrame(rows), prefixes=prefixes,
                alternatives=pd.DataFrame(alts), pass_at_k=pd.DataFrame(pk), prompt_ids=tr.prompt_ids, response_ids=tr.response_ids)


@torch.no_grad()
def _alternatives(probe, tr: _Trace, crit: int, checker, cfg: Config) -> list[dict[str, Any]]:
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
    for t, n in counts.items():
        resp = base + [t]
        c, texts = rollout_success(probe, tr.prompt_ids, resp, len(resp), checker, n, cfg, seed=_seed_for(cfg.seed, tr.trace, t))
        out.append(dict(trace=tr.trace, pos=crit, token=probe.tokenizer.decode([t]), token_id=t, prob=float(probs[t]),
                        n=n, n_correct=c, success=c / n, example=texts[0] if texts else ""))
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

    traces: pd.DataFrame
    tokens: pd.DataFrame
    prefixes: pd.DataFrame
    alternatives: pd.DataFrame
    pass_at_k: pd.DataFrame
    trajectories: pd.DataFrame = field(default_factory=pd.DataFrame)
    ids: dict[str, Any] = field(default_factory=dict)  # {"prompt": [[...]], "response": [[...]]} per trace

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"traces": self.traces, "tokens": self.tokens, "prefixes": self.prefixes,
                "alternatives": self.alternatives, "pass_at_k": self.pass_at_k, "trajectories": self.trajectories}

    def extra(self) -> dict[str, Any]:
        return {"ids": self.ids}

    @classmethod
    def _from_stored(cls, stored, base):
        t = stored.tables
        return cls(traces=t["traces"], tokens=t["tokens"], prefixes=t["prefixes"], alternatives=t.get("alternatives", pd.DataFrame()),
                   pass_at_k=t.get("pass_at_k", pd.DataFrame()), trajectories=t.get("trajectories", pd.DataFrame()),
                   ids=stored.extra.get("ids", {}), **base)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (trace, pos) with ``value`` = success rate after the token."""
        df = self.tokens.copy()
        df.insert(0, "model", self.model.get("name", ""))
        df["value"] = df["score_after"]
        return df

    def curve(self, trace: int = 0) -> pd.DataFrame:
        """Evaluated prefix lengths and success rates of one trace."""
        return self.prefixes[self.prefixes.trace == trace].sort_values("prefix_len").reset_index(drop=True)

    def top_critical_tokens(self) -> pd.DataFrame:
        """Critical tokens across traces, most frequent first (``token, count, mean_drop``)."""
        d = self.traces.dropna(subset=["critical_token"])
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


# ====================================================================================== contrastive estimation
@dataclass(frozen=True, kw_only=True)
class TrainConfig(_BaseConfig):
    """LoRA-SFT of the positive / negative models (method page: r=8 on gate/up/down, lr 3e-4, 1 epoch)."""

    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    lr: float = 3e-4
    epochs: int = 1
    max_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1 or self.epochs < 1 or self.max_len < 2:
            raise ConfigError(f"r={self.r}, epochs={self.epochs}, max_len={self.max_len} must be positive (max_len >= 2).")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0.", hint="Use e.g. 3e-4.")


def _peft_copy(probe):
    """A private copy of the base model (LoRA layers are injected in place; the probe stays clean)."""
    return copy.deepcopy(probe.hf_model)


def train_contrastive(probe, correct: Sequence[tuple[Sequence[int], Sequence[int]]], incorrect: Sequence[tuple[Sequence[int], Sequence[int]]],
                      out_dir: str | Path, config: TrainConfig = TrainConfig(), *, progress: Callable[[int], None] | None = None) -> Path:
    """Train LoRA adapters ``pos`` (on ``correct``) and ``neg`` (on ``incorrect``) and save them.

    Args:
        correct, incorrect: lists of ``(prompt_ids, response_ids)``; the loss covers response tokens.
        out_dir: folder; adapters land in ``out_dir/pos`` and ``out_dir/neg``.
    """
    from peft import LoraConfig, get_peft_model

    if not correct or not incorrect:
        raise InputError(f"contrastive training needs correct and incorrect trajectories; got {len(correct)} correct and "
                         f"{len(incorrect)} incorrect.", hint="Sample more trajectories (--samples) or use problems the model sometimes fails.")
    targets = [m for m in config.target_modules if any(n.endswith(m) for n, _ in probe.hf_model.named_modules())]
    if not targets:
        raise ConfigError(f"target_modules={config.target_modules} match no module of {probe.info.name}.",
                          hint="Name linear layers of this model, e.g. ('c_fc', 'c_proj') for GPT-2.")
    out = Path(out_dir)
    for name, data in (("pos", correct), ("neg", incorrect)):
        torch.manual_seed(config.seed)
        model = get_peft_model(_peft_copy(probe), LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=list(targets),
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        for _ in range(config.epochs):
            for p_ids, r_ids in data:
                ids = (list(p_ids) + list(r_ids))[: config.max_len]
                x = torch.tensor([ids], device=probe.device)
                labels = x.clone()
                labels[0, : len(p_ids)] = -100
                loss = model(input_ids=x, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                if progress:
                    progress(1)
        model.eval()
        model.save_pretrained(str(out / name))
        del model
    return out


@torch.no_grad()
def _logits_with_adapter(probe, adapter: str | Path | None, ids: torch.Tensor) -> torch.Tensor:
    if adapter is None:
        return probe.forward(ids)[0]
    from peft import PeftModel

    p = Path(adapter)
    if not (p / "adapter_config.json").is_file():
        raise InputError(f"{str(p)!r} is not a LoRA adapter folder (no adapter_config.json).",
                         hint="Train one with `sonde run contrastive-train --out DIR` (adapters in DIR/pos and DIR/neg).")
    m = PeftModel.from_pretrained(_peft_copy(probe), str(p)).eval()
    return m(input_ids=ids).logits[0]


def contrastive_scores(probe, adapters: str | Path | tuple[Any, Any], prompt_ids: Sequence[int], response_ids: Sequence[int],
                       *, beta: float = 1.0) -> pd.DataFrame:
    """Per-token CE scores of a response: ``pos, token, p_ce, weight, log_ratio``.

    Args:
        adapters: a folder with ``pos``/``neg`` adapters (from :func:`train_contrastive`) or a pair
            ``(pos, neg)`` of adapter folders (``None`` = the base model).
    """
    pos, neg = (Path(adapters) / "pos", Path(adapters) / "neg") if isinstance(adapters, (str, Path)) else adapters
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=probe.device)
    P = len(prompt_ids)
    zp = _logits_with_adapter(probe, pos, ids)[P - 1: -1]
    zn = zp if pos == neg else _logits_with_adapter(probe, neg, ids)[P - 1: -1]
    s = ce_token_scores(zp, zn, torch.tensor(list(response_ids), device=zp.device), beta)
    return pd.DataFrame(dict(pos=range(len(response_ids)), token=probe.to_str_tokens(list(response_ids)),
                             p_ce=s["p_ce"].cpu().numpy(), weight=s["weight"].cpu().numpy(), log_ratio=s["log_ratio"].cpu().numpy()))


def compare_contrastive(result: CriticalResult, ce: pd.DataFrame, trace: int = 0, *, k: int = 3) -> dict[str, float]:
    """Spearman correlation and precision@k between CE criticality (``−log_ratio``) and the rollout
    drop ``score(j) − score(j+1)``, over tokens whose drop was measured (``granularity="token"`` gives all)."""
    from scipy.stats import spearmanr

    t = result.tokens[result.tokens.trace == trace].merge(ce[["pos", "log_ratio", "weight"]], on="pos")
    t = t.dropna(subset=["drop"])
    if len(t) < 2:
        return {"n": float(len(t)), "spearman": float("nan"), "precision_at_k": float("nan"), "k": float(k)}
    crit = -t.log_ratio.to_numpy()
    rho = spearmanr(crit, t["drop"].to_numpy().astype(float)).statistic if t["drop"].nunique() > 1 and len(set(crit)) > 1 else float("nan")
    kk = min(k, len(t))
    top_ce = set(t.pos.to_numpy()[crit.argsort()[::-1][:kk]])
    top_gt = set(t.sort_values("drop", ascending=False).pos.to_numpy()[:kk])
    return {"n": float(len(t)), "spearman": float(rho), "precision_at_k": len(top_ce & top_gt) / kk, "k": float(kk)}
