"""cDPO's training side (Lin et al. 2024, "Critical Tokens Matter", §3.2-3.3): contrastive estimation with a
positive and a negative LoRA model, and token-level DPO on the critical tokens.

The search for critical tokens is :mod:`analyses.critical`; this module trains on what it finds:

* :func:`train_contrastive`: LoRA-SFT of a positive model on correct and a negative model on incorrect
  trajectories (:class:`TrainConfig`), then :func:`contrastive_scores` scores each response token by
  ``(1 + β) log p_pos − β log p_neg`` (:func:`analyses.critical.ce_token_scores`) and
  :func:`compare_contrastive` compares those scores with the rollout search;
* :func:`select_sft` / :func:`select_pairs`: the training sets;
* :func:`cdpo_loss` and :func:`train_cdpo` (:class:`CDPOConfig`): token-weighted DPO on the chosen/rejected pairs,
  saving a LoRA adapter (safetensors only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import torch

from probes.errors import ConfigError, InputError
from probes.weights import AdaptedModel, LoraSpec

from .core.base import Config as _BaseConfig
from .core.progress import ProgressFn, phase
from .critical import CriticalResult, Trajectory, ce_token_scores

__all__ = ["TrainConfig", "train_contrastive", "contrastive_scores", "compare_contrastive", "select_sft", "select_pairs",
           "cdpo_loss", "sequence_logps", "CDPOConfig", "train_cdpo"]


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


def _lora(probe, r: int, alpha: int, target_modules: Sequence[str], hint: str) -> LoraSpec:
    """The LoRA spec over the entries of ``target_modules`` that this model has (ConfigError if none)."""
    targets = probe.adapter_targets(target_modules)
    if not targets:
        raise ConfigError(f"target_modules={tuple(target_modules)} match no module of {probe.info.name}.", hint=hint)
    return LoraSpec(r=r, alpha=alpha, target_modules=tuple(targets), dropout=0.0)


def train_contrastive(probe, correct: Sequence[tuple[Sequence[int], Sequence[int]]], incorrect: Sequence[tuple[Sequence[int], Sequence[int]]],
                      out_dir: str | Path, config: TrainConfig = TrainConfig(), *, progress: ProgressFn | None = None) -> Path:
    """Train LoRA adapters ``pos`` (on ``correct``) and ``neg`` (on ``incorrect``) and save them.

    Each adapter trains on its own private copy of the model (:meth:`probes.Probe.adapted`); the probe
    is never modified.

    Args:
        correct, incorrect: lists of ``(prompt_ids, response_ids)``; the loss covers response tokens.
        out_dir: folder; adapters land in ``out_dir/pos`` and ``out_dir/neg`` (safetensors).
        progress: :class:`~analyses.core.progress.Progress` events, phases ``training pos`` and ``training neg``
            (one per optimizer step).
    """
    if not correct or not incorrect:
        raise InputError(f"contrastive training needs correct and incorrect trajectories; got {len(correct)} correct and "
                         f"{len(incorrect)} incorrect.", hint="Sample more trajectories (--samples) or use problems the model sometimes fails.")
    spec = _lora(probe, config.r, config.alpha, config.target_modules,
                 hint="Name linear layers of this model, e.g. ('c_fc', 'c_proj') for GPT-2.")
    out = Path(out_dir)
    for name, data in (("pos", correct), ("neg", incorrect)):
        bar = phase(progress, f"training {name}", config.epochs * len(data), "steps")
        torch.manual_seed(config.seed)
        with probe.adapted(spec) as model:
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
            for _ in range(config.epochs):
                for p_ids, r_ids in data:
                    ids = (list(p_ids) + list(r_ids))[: config.max_len]
                    x = torch.tensor([ids], device=probe.device)
                    labels = x.clone()
                    labels[0, : len(p_ids)] = -100
                    loss = model.loss(x, labels)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    bar.advance(loss=f"{float(loss.detach()):.3f}")
            model.eval()
            model.save(out / name)
    return out


@torch.no_grad()
def _logits_with_adapter(probe, adapter: str | Path | None, ids: torch.Tensor) -> torch.Tensor:
    if adapter is None:
        return probe.forward(ids)[0]
    p = Path(adapter)
    if not (p / "adapter_config.json").is_file():
        raise InputError(f"{str(p)!r} is not a LoRA adapter folder (no adapter_config.json).",
                         hint="Train one with `sonde run contrastive-train --out DIR` (adapters in DIR/pos and DIR/neg).")
    with probe.load_adapter(p) as m:
        return m.logits(ids)[0]


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


# ====================================================================================== cDPO
def _by_problem(trajectories: Sequence[Trajectory]) -> list[list[Trajectory]]:
    """Trajectories with a response, grouped by problem (in problem order, each group in input order)."""
    groups: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        if t.response_ids:
            groups.setdefault(t.problem, []).append(t)
    return [groups[p] for p in sorted(groups)]


def select_sft(trajectories: Sequence[Trajectory]) -> tuple[list[Trajectory], list[Trajectory]]:
    """The method page's SFT data for θ_p / θ_n, per problem: one response of the most frequent
    correct answer (positive), and every response of the most frequent wrong answers, taken in order
    of frequency until they cover at least half of that problem's wrong samples (negative)."""
    from collections import Counter

    pos: list[Trajectory] = []
    neg: list[Trajectory] = []
    for ts in _by_problem(trajectories):
        good = [t for t in ts if t.correct]
        if good:
            top = Counter(str(t.answer) for t in good).most_common(1)[0][0]
            pos.append(next(t for t in good if str(t.answer) == top))
        bad = [t for t in ts if not t.correct]
        covered = 0
        for ans, cnt in Counter(str(t.answer) for t in bad).most_common():
            if covered * 2 >= len(bad):
                break
            neg.extend(t for t in bad if str(t.answer) == ans)
            covered += cnt
    return pos, neg


def select_pairs(trajectories: Sequence[Trajectory]) -> list[tuple[Trajectory, Trajectory]]:
    """cDPO pairs (method page, top-k = 1): per problem with both kinds, ``(chosen, rejected)`` = the first
    response of the most frequent correct answer and the first of the most frequent wrong answer."""
    from collections import Counter

    out = []
    for ts in _by_problem(trajectories):
        good, bad = [t for t in ts if t.correct], [t for t in ts if not t.correct]
        if not good or not bad:
            continue
        g = Counter(str(t.answer) for t in good).most_common(1)[0][0]
        b = Counter(str(t.answer) for t in bad).most_common(1)[0][0]
        out.append((next(t for t in good if str(t.answer) == g), next(t for t in bad if str(t.answer) == b)))
    return out


def cdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              weights: torch.Tensor, *, chosen_mask: torch.Tensor | None = None, rejected_mask: torch.Tensor | None = None,
              chosen_weights: torch.Tensor | None = None, beta: float = 0.1,
              form: Literal["sequence", "positionwise"] = "sequence") -> torch.Tensor:
    """Token-weighted DPO loss of cDPO (mean over the batch).

    Args:
        policy_chosen, ref_chosen: per-token log-probabilities ``[B, T+]`` of the chosen responses under
            the policy and the frozen reference; ``policy_rejected, ref_rejected``: ``[B, T−]``.
        weights: rejected-token weights ``w_t = 1 − p_ce(t)`` ``[B, T−]``.
        chosen_mask, rejected_mask: 1 on real tokens, 0 on padding (default: all ones).
        chosen_weights: optional chosen-token weights (default 1, the paper's ``only_neg=True``).
        form: ``"sequence"`` (the paper's description)::

                −log σ(β·[Σ_t c_t (π(y⁺_t) − π_ref(y⁺_t)) − Σ_t w_t (π(y⁻_t) − π_ref(y⁻_t))])

            or ``"positionwise"`` (the released trainer): the weighted log-ratios are subtracted
            position by position (both padded to ``max(T+, T−)`` with zeros), ``−log σ(β·d_t)`` is
            taken per position and averaged over ``B × T`` padding included.
    With all weights 1 the sequence form is standard DPO.
    """
    if form not in ("sequence", "positionwise"):
        raise ConfigError(f"form={form!r} is not known.", hint="Use 'sequence' (paper) or 'positionwise' (released trainer).")
    if not beta > 0:
        raise ConfigError(f"beta={beta} must be > 0.", hint="The paper uses 0.1.")
    mc = torch.ones_like(policy_chosen) if chosen_mask is None else chosen_mask.to(policy_chosen.dtype)
    mr = torch.ones_like(policy_rejected) if rejected_mask is None else rejected_mask.to(policy_rejected.dtype)
    wc = mc if chosen_weights is None else chosen_weights.to(policy_chosen.dtype) * mc
    wr = weights.to(policy_rejected.dtype) * mr
    dc = (policy_chosen - ref_chosen) * wc
    dr = (policy_rejected - ref_rejected) * wr
    if form == "sequence":
        return -torch.nn.functional.logsigmoid(beta * (dc.sum(-1) - dr.sum(-1))).mean()
    T = max(dc.shape[-1], dr.shape[-1])
    dc = torch.nn.functional.pad(dc, (0, T - dc.shape[-1]))
    dr = torch.nn.functional.pad(dr, (0, T - dr.shape[-1]))
    return -torch.nn.functional.logsigmoid(beta * (dc - dr)).mean()


def sequence_logps(model: "AdaptedModel | torch.nn.Module", prompt_ids: Sequence[int], response_ids: Sequence[int], device=None) -> torch.Tensor:
    """Per-token log-probabilities ``[L]`` of ``response_ids`` after ``prompt_ids`` under ``model`` (an
    adapted copy from :meth:`probes.Probe.adapted` or a plain HF causal LM); differentiable, wrap in
    ``torch.no_grad()`` for the reference."""
    P = len(prompt_ids)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    out = model.logits(ids) if isinstance(model, AdaptedModel) else model(input_ids=ids, use_cache=False).logits
    logits = out[0, P - 1: -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, P:, None]).squeeze(-1)


@dataclass(frozen=True, kw_only=True)
class CDPOConfig(_BaseConfig):
    """cDPO training (method page: LoRA r=16, α=32 on all attention + MLP projections, lr 4e-5, 3 epochs,
    warm-up 10 %, weight decay 0.01, β = 0.1, sequence form, chosen tokens weighted 1)."""

    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lr: float = 4e-5
    epochs: int = 3
    warmup: float = 0.1
    weight_decay: float = 0.01
    beta: float = 0.1
    form: Literal["sequence", "positionwise"] = "sequence"
    grad_accum: int = 1
    max_len: int = 1500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1 or self.epochs < 1 or self.grad_accum < 1 or self.max_len < 2:
            raise ConfigError(f"r={self.r}, epochs={self.epochs}, grad_accum={self.grad_accum}, max_len={self.max_len} must be positive.")
        if not self.lr > 0 or not self.beta > 0:
            raise ConfigError(f"lr={self.lr}, beta={self.beta} must be > 0.", hint="The paper uses lr 4e-5 and beta 0.1.")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup={self.warmup} must be a fraction in [0, 1).")
        if self.form not in ("sequence", "positionwise"):
            raise ConfigError(f"form={self.form!r} is not known.", hint="Use 'sequence' or 'positionwise'.")


def train_cdpo(probe, pairs: Sequence[dict[str, Any]], out_dir: str | Path, config: CDPOConfig = CDPOConfig(), *,
               progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train a LoRA policy with the cDPO objective; the reference is the base model (adapter disabled).

    Args:
        pairs: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``weights`` (one per
            rejected token, ``1 − p_ce``; see :func:`contrastive_scores`).
        out_dir: a new (or empty) folder: the adapter (``adapter_model.safetensors`` +
            ``adapter_config.json``) and ``cdpo.json`` (config, per-step losses). No pickle.
        progress: :class:`~analyses.core.progress.Progress` events: phase ``reference`` (one per pair), then
            ``training`` (one per optimizer step).
    Returns ``{"path", "losses", "n_pairs", "steps"}``. The probe's model is never modified.
    """
    import json

    if not pairs:
        raise InputError("cDPO needs at least one (chosen, rejected) pair.",
                         hint="Sample more trajectories (--samples) so that some problem has both a correct and a wrong answer.")
    for i, p in enumerate(pairs):
        if len(p["weights"]) != len(p["rejected_ids"]) or not p["chosen_ids"] or not p["rejected_ids"]:
            raise InputError(f"pair {i}: needs non-empty chosen/rejected ids and one weight per rejected token "
                             f"(got {len(p['weights'])} weights for {len(p['rejected_ids'])} tokens).")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{str(out)!r} exists and is not empty; cDPO writes a new adapter folder.", hint="Pass a new --out folder.")
    spec = _lora(probe, config.r, config.alpha, config.target_modules,
                 hint="Name linear layers of this model, e.g. ('c_attn', 'c_fc', 'c_proj') for GPT-2.")
    dev = probe.device
    cut = lambda p, r: list(r)[: max(1, config.max_len - len(p))]  # noqa: E731
    data = [dict(prompt=list(p["prompt_ids"]), chosen=cut(p["prompt_ids"], p["chosen_ids"]),
                 rejected=cut(p["prompt_ids"], p["rejected_ids"]),
                 weights=torch.as_tensor(list(p["weights"]), dtype=torch.float32)[: len(cut(p["prompt_ids"], p["rejected_ids"]))])
            for p in pairs]
    torch.manual_seed(config.seed)
    model = probe.adapted(spec)  # a private copy: the probe's model is never modified
    # reference log-probabilities once, offline (the base model = the adapter disabled)
    model.eval()
    ref_bar = phase(progress, "reference", len(data), "pairs")
    with torch.no_grad(), model.disabled():
        for d in data:
            d["ref_c"] = sequence_logps(model, d["prompt"], d["chosen"], dev)
            d["ref_r"] = sequence_logps(model, d["prompt"], d["rejected"], dev)
            ref_bar.advance()
    params = model.parameters()
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = math.ceil(len(data) / config.grad_accum) * config.epochs
    warm = int(config.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    g = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    step = 0
    bar = phase(progress, "training", total, "steps")
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        for j in range(0, len(order), config.grad_accum):
            group = [data[i] for i in order[j: j + config.grad_accum]]
            acc = 0.0
            for d in group:
                pc = sequence_logps(model, d["prompt"], d["chosen"], dev)[None]
                pr = sequence_logps(model, d["prompt"], d["rejected"], dev)[None]
                loss = cdpo_loss(pc, pr, d["ref_c"][None], d["ref_r"][None], d["weights"].to(dev)[None],
                                 beta=config.beta, form=config.form) / len(group)
                loss.backward()
                acc += float(loss.detach())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(acc)
            step += 1
            bar.advance(loss=f"{acc:.4f}")
    model.eval()
    model.save(out)
    (out / "cdpo.json").write_text(json.dumps({"config": config.to_dict(), "losses": losses, "n_pairs": len(data), "steps": step,
                                               "model": probe.info.name}, indent=1, default=str))
    del model
    return {"path": out, "losses": losses, "n_pairs": len(data), "steps": step}
