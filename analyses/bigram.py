"""Bigram subnetworks: the sparse set of block weights that turns the current token into a bigram prediction.

Chang & Bergen (2025), "Bigram Subnetworks: Mapping to Next Tokens in Transformer Language Models"
(arXiv 2504.15471; code tylerachang/bigram-subnetworks, masking via mlepori1/NeuroSurgeon).

Target (Sec. 3.1). An empirical bigram model from a reference corpus tokenized with the model's own
tokenizer: raw counts, no smoothing, ``P(w_i | w_{i-1}) = c(w_{i-1}, w_i) / c(w_{i-1}, ·)``; an unseen
context backs off to the unigram distribution, and with no counts at all to uniform ``1/V``. The
target at position t is the whole V-dim row of the *current* token t. Counts are kept sparse (CSR);
dense ``[B, T, V]`` targets are built per batch only.

Mask search (continuous sparsification, Sec. 3.2). One real logit ``s`` per weight of every weight
matrix inside the decoder blocks (embeddings, unembedding, norms and biases are never masked; base
weights frozen). The soft mask is ``m = σ(β·s)``, ``s₀ = 0`` (m = 0.5), ``β₀ = 1`` and ``β ← 1.001·β``
after every optimizer step; the effective weight is ``W ⊙ m``. The loss is

    L = CE(p_target, softmax(subnetwork logits)) + (λ / N) · Σ σ(β·s)                 (Eq. 1)

(soft-label cross-entropy averaged over positions plus the continuous L0 surrogate normalised by the
number N of mask parameters), minimised with AdamW (lr 5e-5). Training stops early when the
"undecided" masks (0.1 < σ < 0.9) number fewer than 1 % of the masks above 0.9. The final binary
mask keeps a weight iff ``s > 0`` (σ > 0.5). ``target="self"`` replaces the bigram target by the
full model's own next-token distribution (the paper's "optimal pruning" subnetworks).

Evaluation (Sec. 4). ``ngram_xent``: soft CE (nats) between subnetwork logits and bigram rows;
Pearson r between per-token surprisals (bits) of the subnetwork and of the bigram model (infinite
bigram surprisals clipped to the largest finite one; a second r drops them); the ablation table of
mean surprisal for full model, subnetwork, random same-size subnetwork (mask shuffled within each
matrix), complement and random complement; sparsity overall, per layer, matrix, head and MLP neuron.

Masks are applied through the probe's weight-mask context (:meth:`probes.Probe.weight_masks`: torch
parametrizations on the model's own modules, no copy), so every backend and every other analysis
sees the masked weights inside :func:`apply_mask`.
"""

from __future__ import annotations

import dataclasses
import os
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from probes.errors import ConfigError, InputError
from probes.labels import head_label
from probes.weights import WeightMap, WeightSpec

from .core.base import Config as _BaseConfig
from .core.base import Result, Timer, option, register_result, stored
from .core.progress import ProgressFn, phase
from .core import planner, registry, store

__all__ = [
    "Config", "BigramResult", "BigramTable", "MaskSet", "run", "result_key", "evaluate", "train_mask", "apply_mask",
    "load_corpus_ids", "builtin_corpus_text", "train_table", "masked_weights", "mask_overlap", "unit_sparsity",
    "compare_predictions", "soft_cross_entropy", "surprisal_bits", "binarize", "temperature_after",
    "short_run_config", "bigram_entropy_nats", "ship_result", "default_result", "DEFAULT_RESULT",
]

Target = Literal["bigram", "self"]
Mode = Literal["keep", "complement", "random", "random_complement"]
MODES: tuple[str, ...] = ("keep", "complement", "random", "random_complement")


# ============================================================================== config
@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Settings of a bigram-subnetwork run (defaults: ../shared/methods/bigram.md, the paper's code).

    ``steps`` counts optimizer steps; each uses ``batch × grad_accum`` rows of ``seq_len`` tokens.
    """

    lam: float = option(10.0, ge=0, help="λ, the sparsity weight (paper: 10 for Pythia ≤410M / GPT-2 ≤ medium, 100 for ~1B; "
                                          "math.inf keeps nothing).", hint="Use e.g. lam=10 (paper default; 1, 10, 100, 500 in its grid).")
    lr: float = option(5e-5, gt=0, help="AdamW learning rate (paper).", hint="The paper uses 5e-5.")
    weight_decay: float = option(0.01, ge=0, help="AdamW weight decay (torch default, as in the reference code).")
    temp_mult: float = option(1.001, ge=1, help="β multiplier per optimizer step (paper); β must not shrink.", hint="The paper uses 1.001.")
    init: float = 0.0  # initial mask logit s₀ (σ = 0.5; NeuroSurgeon mask_init_value)
    steps: int = option(15000, ge=1, help="Maximum optimizer steps (paper).")
    batch: int = option(32, ge=1, help="Rows per micro-batch (paper).")
    seq_len: int = option(128, ge=2, help="Tokens per row (paper code comment).", hint="Use 128 (paper) or 32 for quick runs.")
    grad_accum: int = option(1, ge=1, help="Micro-batches per optimizer step (paper: 2 for 1B models).")
    target: Target = option("bigram", help="bigram (bigram subnetwork) or self (optimal pruning: distil the full model).")
    stop_undecided: float | None = option(0.01, ge=0, lt=1, help="Early stop when undecided < this × (#σ>0.9); None = never.",
                                          hint="The paper uses 0.01.")
    layers: tuple[int, ...] | None = option(None, ge=0, help="Blocks to mask; None = every block (paper).")
    others: Literal["keep", "drop"] = option("keep", help="Blocks outside `layers`: kept whole, or dropped (mask 0; skipped in training).")
    eval_rows: int = option(10000, ge=1, help="At most this many held-out rows (paper: 10k), capped at 10 % of the corpus.")
    reuse: bool = False  # paper: no row is used twice; True cycles a small corpus
    seed: int = 0  # data order and random-mask baselines
    log_every: int = option(10, ge=1, help="Steps between curve points / early-stop checks.")

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr):
            raise ConfigError(f"lr={self.lr!r}; the learning rate must be a positive number.", hint="The paper uses 5e-5.")
        if self.layers is not None and not self.layers:
            raise ConfigError(f"layers={self.layers!r}; give block indices ≥ 0 (or None for every block).")


EVAL_BATCH = 8  # held-out rows per forward pass of the evaluation (the numbers do not depend on it)


def temperature_after(k: int, temp_mult: float = 1.001) -> float:
    """β after ``k`` optimizer steps: ``temp_mult ** k`` (β₀ = 1)."""
    return float(temp_mult) ** k


SHORT_FINAL_BETA = 1000.0  # β at the end of a short run: |β·s| > 2.2 then holds for all but a sliver of entries


def short_run_config(steps: int = 250, *, lam: float = 100.0, lr: float = 0.05, final_beta: float = SHORT_FINAL_BETA,
                     **kw: Any) -> Config:
    """Settings for a run of a few hundred steps that still ends with a binary mask.

    The paper's schedule (lr 5e-5, β ×1.001 per step, 15k steps) reaches β ≈ 3·10⁶; cut to a few
    hundred steps, β stays near 1 and almost every σ(β·s) is still between 0.1 and 0.9. A short run
    therefore needs all three knobs together: a large learning rate (0.05: Adam moves each logit by up
    to ~lr per step), a temperature multiplier that reaches ``final_beta`` at the last step
    (``temp_mult = final_beta ** (1 / steps)``, e.g. 1.028 for 250 steps) and a sparsity weight strong
    enough to beat the minibatch noise of the CE gradient (λ ≈ 100 with λ/N normalisation, against the
    paper's 10 over 15k steps of 32 × 128 tokens). ``kw`` sets any other :class:`Config` field
    (``reuse`` defaults to True: the built-in corpus is small).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}; it must be a positive integer.")
    kw.setdefault("reuse", True)
    return Config(lam=lam, lr=lr, steps=steps, temp_mult=temp_mult_for(final_beta, steps), **kw)


def temp_mult_for(final_beta: float, steps: int) -> float:
    """The per-step β multiplier that reaches ``final_beta`` after ``steps`` steps (``final_beta ** (1/steps)``)."""
    if not final_beta >= 1:
        raise ConfigError(f"final_beta={final_beta!r}; it must be ≥ 1.", hint=f"Use {SHORT_FINAL_BETA:g}, or 300 with lr 0.01.")
    return float(final_beta) ** (1.0 / steps)


# ============================================================================== corpus and bigram table
def builtin_corpus_text() -> str:
    """An offline English text of ~465k characters: the Python reference manual's topic help
    (``pydoc_data.topics``), joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_corpus_ids(probe, corpus: "str | Path | torch.Tensor | Sequence[int]" = "builtin") -> torch.Tensor:
    """Token ids ``[N]`` of a corpus: ``"builtin"``, a UTF-8 text file, a JSONL file (field ``text``)
    or ids already tokenized (a tensor / list). Texts are tokenized with the probe's tokenizer,
    without special tokens, into one stream (documents separated by EOS when the tokenizer has one)."""
    if isinstance(corpus, torch.Tensor) or (isinstance(corpus, (list, tuple)) and corpus and isinstance(corpus[0], int)):
        ids = torch.as_tensor(corpus, dtype=torch.long).reshape(-1)
        V = probe.info.d_vocab
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise InputError(f"corpus ids must lie in 0..{V - 1}; got {int(ids.min())}..{int(ids.max())}.",
                             hint="Tokenize with this model's tokenizer.")
        return ids
    if not isinstance(corpus, (str, Path)):
        raise InputError(f"corpus must be 'builtin', a file path or token ids; got {type(corpus).__name__}.")
    if str(corpus) == "builtin":
        docs = [builtin_corpus_text()]
    else:
        p = Path(corpus)
        if not p.is_file():
            raise InputError(f"corpus file {str(p)!r} does not exist.", hint="Pass --corpus builtin or the path of a UTF-8 .txt or .jsonl file.")
        if p.suffix in (".jsonl", ".ndjson", ".json"):
            from .core.io import iter_records

            docs = [r.text for r in iter_records(p)]
        else:
            from .core.io import read_text

            docs = [read_text(p)]
    tok = probe.tokenizer
    eos = tok.eos_token_id
    out: list[int] = []
    for d in docs:
        if not d.strip():
            continue
        out.extend(tok(d, add_special_tokens=False).input_ids)
        if eos is not None and len(docs) > 1:
            out.append(eos)
    if not out:
        raise InputError(f"corpus {str(corpus)!r} holds no text.", hint="Give a non-empty UTF-8 file.")
    return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class BigramTable:
    """Sparse empirical bigram counts in CSR form over a vocabulary of V tokens.

    Attributes:
        crow: ``[V+1]`` int64 row pointers (row = context token).
        col: ``[nnz]`` int64 next-token ids.
        count: ``[nnz]`` float32 counts.
        row_total: ``[V]`` float32 count of each context.
        unigram: ``[V]`` float32 unigram counts (every corpus token).
    """

    crow: torch.Tensor
    col: torch.Tensor
    count: torch.Tensor
    row_total: torch.Tensor
    unigram: torch.Tensor

    @property
    def V(self) -> int:
        return int(self.row_total.numel())

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @classmethod
    @torch.no_grad()
    def from_ids(cls, ids: torch.Tensor, vocab_size: int) -> "BigramTable":
        """Count pairs ``(ids[..., i], ids[..., i+1])`` along the last axis of ``ids`` (``[N]`` or ``[R, T]``;
        rows never pair across their boundary)."""
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim > 1 else ids[None]
        V = int(vocab_size)
        prev, nxt = rows[:, :-1].reshape(-1), rows[:, 1:].reshape(-1)
        key = prev * V + nxt  # < V² ≤ 2^63 for any real vocabulary
        uniq, cnt = torch.unique(key, sorted=True, return_counts=True)
        r, c = uniq // V, uniq % V
        crow = torch.zeros(V + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=V), 0)
        row_total = torch.zeros(V, dtype=torch.float32).index_add_(0, r, cnt.float())
        unigram = torch.bincount(rows.reshape(-1), minlength=V).float()
        return cls(crow=crow, col=c, count=cnt.float(), row_total=row_total, unigram=unigram)

    def to_sparse_csr(self) -> torch.Tensor:
        """The counts as a ``torch.sparse_csr_tensor`` ``[V, V]``."""
        import warnings

        with warnings.catch_warnings():  # torch flags sparse CSR as beta
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.col, self.count, size=(self.V, self.V))

    @torch.no_grad()
    def rows(self, tokens: torch.Tensor, *, device: torch.device | str | None = None) -> "SparseTarget":
        """The bigram rows of the current tokens ``[...]`` (flattened to N positions) without densifying them:
        a :class:`SparseTarget` holding the seen rows' CSR entries and, for unseen contexts, the shared
        back-off row (unigram; uniform for an empty table)."""
        dev = torch.device(device) if device is not None else tokens.device
        flat = tokens.reshape(-1).cpu()
        V = self.V
        uni_total = float(self.unigram.sum())
        backoff = self.unigram / uni_total if uni_total > 0 else torch.full((V,), 1.0 / V)
        seen = self.row_total[flat] > 0
        pos = torch.nonzero(seen).reshape(-1)
        ctx = flat[pos]
        start, length = self.crow[ctx], self.crow[ctx + 1] - self.crow[ctx]
        rep_pos = torch.repeat_interleave(pos, length)
        # index of each entry: start of its row + offset within the row
        offs = torch.arange(int(length.sum())) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
        idx = torch.repeat_interleave(start, length) + offs
        val = self.count[idx] / self.row_total[flat[rep_pos]]
        return SparseTarget(n=flat.numel(), pos=rep_pos.to(dev), col=self.col[idx].to(dev), val=val.to(dev),
                            unseen=torch.nonzero(~seen).reshape(-1).to(dev), backoff=backoff.to(dev))

    @torch.no_grad()
    def targets(self, tokens: torch.Tensor, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense bigram rows for the current tokens: ``[B, T] -> [B, T, V]`` float32 (each row sums to 1).

        Seen context → normalised bigram counts; unseen context → unigram; empty table → uniform.
        Training never calls this for a whole batch (:meth:`rows` keeps the rows sparse).
        """
        dev = torch.device(device) if device is not None else tokens.device
        return self.rows(tokens, device="cpu").dense(self.V).reshape(*tokens.shape, self.V).to(dev)

    @torch.no_grad()
    def next_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bigram probability of each actual next token: ``[B, T] -> [B, T-1]`` (0 for unseen pairs)."""
        return self.targets(tokens[:, :-1]).gather(-1, tokens[:, 1:].cpu()[..., None]).squeeze(-1)


# ============================================================================== pure math
@torch.no_grad()
def binarize(logits: torch.Tensor) -> torch.Tensor:
    """Final mask: keep iff ``s > 0`` (equivalently σ(β·s) > 0.5 for any β > 0). Same shape, bool."""
    return logits > 0


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``-Σ_v p_v log softmax(logits)_v`` (nats). ``logits, target: [..., V]``."""
    V = target.shape[-1]
    logp = torch.log_softmax(logits[..., :V].float(), dim=-1)
    return -(target * logp).sum(-1).mean()


@dataclass(frozen=True)
class SparseTarget:
    """Soft targets for ``n`` positions, each row summing to 1, kept sparse: position ``pos[k]`` puts
    ``val[k]`` on token ``col[k]``; the positions in ``unseen`` all share the dense row ``backoff`` ``[V]``."""

    n: int
    pos: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    unseen: torch.Tensor
    backoff: torch.Tensor

    def slice(self, lo: int, hi: int) -> "SparseTarget":
        """Positions ``lo..hi-1`` (renumbered from 0); ``pos`` is sorted, so this is two searches."""
        a, b = (int(x) for x in torch.searchsorted(self.pos, torch.tensor([lo, hi], device=self.pos.device)))
        u0, u1 = (int(x) for x in torch.searchsorted(self.unseen, torch.tensor([lo, hi], device=self.unseen.device)))
        return SparseTarget(n=hi - lo, pos=self.pos[a:b] - lo, col=self.col[a:b], val=self.val[a:b],
                            unseen=self.unseen[u0:u1] - lo, backoff=self.backoff)

    def dot(self, z: torch.Tensor) -> torch.Tensor:
        """``Σ_v t_v z_v`` per position: ``z [n, V] -> [n]`` (float32)."""
        out = torch.zeros(self.n, dtype=torch.float32, device=z.device)
        if self.pos.numel():
            out.index_add_(0, self.pos, self.val * z[self.pos, self.col])
        if self.unseen.numel():
            out[self.unseen] = z[self.unseen] @ self.backoff
        return out

    def subtract_from(self, p: torch.Tensor) -> None:
        """``p -= t`` in place (``p [n, V]``)."""
        if self.pos.numel():
            p.index_put_((self.pos, self.col), -self.val, accumulate=True)
        if self.unseen.numel():
            p[self.unseen] -= self.backoff

    def dense(self, V: int) -> torch.Tensor:
        """The rows as a dense ``[n, V]`` float32 tensor."""
        out = torch.zeros(self.n, V, dtype=torch.float32, device=self.val.device)
        out[self.unseen] = self.backoff
        out[self.pos, self.col] = self.val
        return out


@dataclass(frozen=True)
class _DenseTarget:
    """Dense soft targets ``[n, V]`` behind the :class:`SparseTarget` interface (the ``self`` target)."""

    t: torch.Tensor

    def slice(self, lo: int, hi: int) -> "_DenseTarget":
        return _DenseTarget(self.t[lo:hi])

    def dot(self, z: torch.Tensor) -> torch.Tensor:
        return (self.t * z).sum(-1)

    def subtract_from(self, p: torch.Tensor) -> None:
        p -= self.t


LOSS_CHUNK_MB = 64  # float32 logits of one token chunk in the chunked loss (the loss never holds more)


def loss_chunk_tokens(d_vocab: int, chunk_mb: int = LOSS_CHUNK_MB) -> int:
    """Tokens per chunk of :func:`chunked_soft_cross_entropy`: ``chunk_mb`` MiB of float32 logits."""
    return max(1, chunk_mb * 2**20 // (4 * d_vocab))


class _ChunkedSoftCE(torch.autograd.Function):
    """Soft CE of ``hidden @ W.T (+ b)`` against a target, chunk by chunk over tokens.

    The forward pass computes each chunk's logits, its loss and its gradient at once and keeps only the
    gradient with respect to ``hidden`` (``[N, d]``), so no ``[N, V]`` tensor ever lives beyond one chunk
    and nothing is recomputed in the backward pass. With a frozen unembedding (the mask search) that is
    the whole backward; a trainable ``W`` or ``b`` also gets its gradient accumulated per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, softcap):
        N = hidden.shape[0]
        V = target.backoff.numel() if isinstance(target, SparseTarget) else target.t.shape[-1]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if (need_b and bias is not None) else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        Wv = weight[:V]
        for lo in range(0, N, chunk):
            hi = min(N, lo + chunk)
            h = hidden[lo:hi]
            z = torch.nn.functional.linear(h, Wv, None if bias is None else bias[:V]).float()
            th = None
            if softcap:
                th = torch.tanh(z / softcap)
                z = th * softcap
            tg = target.slice(lo, hi)
            lse = torch.logsumexp(z, -1)
            total += (lse - tg.dot(z)).double().sum()
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            tg.subtract_from(p)  # d(CE)/d(logits) = softmax - target
            if th is not None:
                p.mul_(1 - th.square())
            g = p.div_(N).to(hidden.dtype)
            if gh is not None:
                gh[lo:hi] = g @ Wv
            if gw is not None:
                gw[:V] += g.T @ h
            if gb is not None:
                gb[:V] += g.sum(0)
        ctx.save_for_backward(*(x for x in (gh, gw, gb) if x is not None))
        ctx.has = (gh is not None, gw is not None, gb is not None)
        return (total / N).float()

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        outs = []
        for has in ctx.has:
            g = next(saved) if has else None
            outs.append(None if g is None else g * grad_out.to(g.dtype))
        return outs[0], outs[1], outs[2], None, None, None


def chunked_soft_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: "SparseTarget | torch.Tensor", *,
                               bias: torch.Tensor | None = None, chunk: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """:func:`soft_cross_entropy` of the logits ``hidden @ weight.T + bias`` without building them.

    Args:
        hidden: final (normed) hidden states ``[N, d]`` (or ``[B, T, d]``, flattened).
        weight: the unembedding ``[V', d]`` (``V' ≥ V``: extra padded rows are ignored, as in
            :func:`soft_cross_entropy`).
        target: a :class:`SparseTarget` over the N positions, or dense rows ``[N, V]``.
        chunk: tokens per chunk (default :func:`loss_chunk_tokens`).
        softcap: Gemma-2's final logit soft-capping, ``c·tanh(z/c)``.
    Returns the mean CE over positions (nats, scalar), differentiable in ``hidden`` (and ``weight``/``bias``
    if they require grad). Equal to the dense loss within float rounding; peak extra memory is one chunk.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if isinstance(target, torch.Tensor):
        target = _DenseTarget(target.reshape(-1, target.shape[-1]).float())
    V = target.backoff.numel() if isinstance(target, SparseTarget) else target.t.shape[-1]
    chunk = chunk or loss_chunk_tokens(V)
    return _ChunkedSoftCE.apply(hidden, weight, bias, target, int(chunk), softcap)


@torch.no_grad()
def surprisal_bits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``-log2 p(next token)``: logits ``[B, T, V]``, tokens ``[B, T]`` -> ``[B, T-1]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1) / math.log(2)


@torch.no_grad()
def pearson_r(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two equal-length vectors (NaN if either is constant)."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = (xc.square().sum() * yc.square().sum()).sqrt()
    return float((xc * yc).sum() / den) if den > 0 else float("nan")


@torch.no_grad()
def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Overlap of two binary masks over their shared weights.

    Returns ``kept_a, kept_b, intersection, jaccard, frac_a_in_b, frac_b_in_a`` and ``expected_random``
    (the intersection two independent random masks of the same sizes would have) and ``ratio_to_random``.
    """
    names = sorted(set(a) & set(b))
    if not names:
        raise InputError("the two masks share no weight names.", hint="Compare masks trained on the same model.")
    ka = kb = inter = union = total = 0
    for n in names:
        x, y = a[n].bool(), b[n].bool()
        if x.shape != y.shape:
            raise InputError(f"mask {n!r} has shape {tuple(x.shape)} in one mask and {tuple(y.shape)} in the other.")
        ka += int(x.sum()); kb += int(y.sum()); inter += int((x & y).sum()); union += int((x | y).sum()); total += x.numel()
    exp = ka * kb / total if total else 0.0
    return {"total": float(total), "kept_a": float(ka), "kept_b": float(kb), "intersection": float(inter),
            "jaccard": inter / union if union else float("nan"), "frac_a_in_b": inter / ka if ka else float("nan"),
            "frac_b_in_a": inter / kb if kb else float("nan"), "expected_random": exp,
            "ratio_to_random": inter / exp if exp else float("nan")}


@torch.no_grad()
def transform_mask(mask: Mapping[str, torch.Tensor], mode: Mode, seed: int = 0) -> dict[str, torch.Tensor]:
    """``keep`` (as is), ``complement`` (~m), ``random`` (m shuffled within each matrix, same count),
    ``random_complement`` (complement of the random mask)."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}; use one of {', '.join(MODES)}.")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in mask.items():
        m = m.bool()
        if mode in ("random", "random_complement"):
            perm = torch.randperm(m.numel(), generator=g)
            m = m.reshape(-1).cpu()[perm].reshape(m.shape).to(m.device)
        if mode in ("complement", "random_complement"):
            m = ~m
        out[n] = m
    return out


# ============================================================================== masked weights
# One maskable weight: full module path, block index, block-relative name, storage shape.
MaskedWeight = WeightSpec


def masked_weights(probe, layers: Sequence[int] | None = None) -> list[MaskedWeight]:
    """Every weight matrix in the decoder blocks that the masker handles (``probe.arch.weight_names``;
    biases, norms and embeddings excluded). GPT-2 Conv1D weights keep their ``[in, out]`` storage."""
    return probe.weights(layers)


def dropped_weights(probe, cfg: Config) -> list[MaskedWeight]:
    """The block weights that ``others="drop"`` removes from the subnetwork (empty otherwise)."""
    if cfg.others != "drop" or cfg.layers is None:
        return []
    keep = set(cfg.layers)
    return [w for w in masked_weights(probe, None) if w.layer not in keep]


SOFT_FLOOR = 30.0  # β·s is floored here in the soft mask (see MaskSet.soft)


def _sigma(s: torch.Tensor, beta: float) -> torch.Tensor:
    """``σ(max(β·s, −SOFT_FLOOR))`` in one new buffer."""
    return (s * beta).clamp_(min=-SOFT_FLOOR).sigmoid_()


def _sigma_slope(s: torch.Tensor, beta: float) -> torch.Tensor:
    """``d σ(max(β·s, −SOFT_FLOOR)) / ds``: ``β·σ·(1 − σ)`` above the floor (and at it, as torch's clamp), 0 below;
    one new buffer besides a boolean one."""
    x = s * beta
    below = x < -SOFT_FLOOR
    m = x.clamp_(min=-SOFT_FLOOR).sigmoid_()
    return m.addcmul_(m, m, value=-1).mul_(beta).masked_fill_(below, 0.0)


def _masked(W: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    """``W ⊙ σ(max(β·s, −SOFT_FLOOR))`` (the factor cast to ``W``'s dtype first), in one new buffer."""
    m = _sigma(s, beta)
    return m.mul_(W) if m.dtype == W.dtype else W * m.to(W.dtype)


class _MaskedWeight(torch.autograd.Function):
    """``W ⊙ σ(max(β·s, −SOFT_FLOOR))`` as one operation that keeps only ``s`` (alive anyway) for its backward
    pass: built from ``σ`` and a product, autograd would save ``β·s``, ``σ`` and run six more elementwise passes
    over every mask (0.4 GiB each on a 135M model) per forward and backward. Here the forward pass writes one
    buffer, and the backward pass one buffer and one boolean mask."""

    @staticmethod
    def forward(ctx, W, s, beta):
        ctx.save_for_backward(s)
        ctx.beta, ctx.W = beta, W
        return _masked(W, s, beta)

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        W = ctx.W
        gw = g * _sigma(s, ctx.beta).to(g.dtype) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = _sigma_slope(s, ctx.beta)
            gs = gs.mul_(g).mul_(W) if g.dtype == gs.dtype == W.dtype else gs.mul_(g.float()).mul_(W.float())
        return gw, gs, None


def _stored_weight(probe, path: str) -> torch.Tensor | None:
    """The weight Parameter stored at module ``path`` (under a mask's parametrization, the original one), or None
    when the module there keeps it elsewhere (a wrapper): such a weight is then saved as usual, not recomputed."""
    try:
        mod = probe.module(path)
    except (AttributeError, KeyError):
        return None
    par = getattr(mod, "parametrizations", None)
    w = par["weight"].original if par is not None and "weight" in par else mod._parameters.get("weight")
    return w if isinstance(w, torch.Tensor) else None


class MaskSet(torch.nn.Module):
    """Mask logits ``s`` (one per weight, fp32) for a list of :class:`MaskedWeight`, plus β and a mode.

    ``mode``: ``"soft"`` σ(β·s) (training), ``"hard"`` (s > 0), ``"off"`` (full model, for the
    ``self`` target).
    """

    def __init__(self, weights: Sequence[MaskedWeight], *, init: float = 0.0, device=None):
        super().__init__()
        self.weights = list(weights)
        self.logits = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full(w.shape, float(init), dtype=torch.float32, device=device)) for w in self.weights])
        self.beta = 1.0
        self.mode: Literal["soft", "hard", "off"] = "soft"
        self._made: dict[Any, int] | None = None  # masked-weight node -> weight index, while recompute_masked() is open

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.logits)

    def masked(self, i: int, W: torch.Tensor) -> torch.Tensor | None:
        """Weight ``W`` under mask ``i``: ``W ⊙ σ(β·s)`` in one fused operation (soft), ``W ⊙ (s > 0)`` (hard), or
        None (off: ``W`` as it is)."""
        s = self.logits[i]
        if self.mode == "off":
            return None
        if self.mode == "hard":
            return W * (s > 0).to(W.dtype)
        out = _MaskedWeight.apply(W, s, float(self.beta))
        if self._made is not None and out.grad_fn is not None:
            self._made[out.grad_fn] = i
        return out

    def soft(self, s: torch.Tensor) -> torch.Tensor:
        """σ(β·s) with β·s floored at −:data:`SOFT_FLOOR`: once β is large, σ of a decided-off logit
        would be a subnormal float, and CPU matmuls over subnormal weights run ~10x slower. The floor
        changes nothing measurable: σ(−30) ≈ 9e-14, and the logit's gradient there (≤ β·9e-14 per unit of
        loss) is already far below AdamW's ε, so such a logit had stopped moving anyway. (Values only: training
        goes through :meth:`masked` and :meth:`add_l0_grad`.)"""
        return _sigma(s, float(self.beta))

    @torch.no_grad()
    def add_l0_grad(self, scale: float) -> float:
        """Add ``scale · ∂L0/∂s`` to every logit's gradient for the continuous L0 surrogate ``L0 = Σ σ(β·s)``,
        without autograd (one buffer per mask at a time); returns ``L0``."""
        parts = []
        for s in self.logits:
            parts.append(_sigma(s, self.beta).sum(dtype=torch.float64))
            g = _sigma_slope(s, self.beta).mul_(scale)
            if s.grad is None:
                s.grad = g
            else:
                s.grad.add_(g)
        return float(torch.stack(parts).sum()) if parts else 0.0  # one host sync for all masks

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """``kept`` (s>0), ``above`` (σ>0.9), ``below`` (σ<0.1), ``undecided`` fractions and mean σ."""
        n = self.n_params
        parts = []
        for s in self.logits:
            m = torch.sigmoid(self.beta * s)
            parts.append(torch.stack([(s > 0).sum(), (m > 0.9).sum(), (m < 0.1).sum(), m.sum()]).double())
        kept, above, below, msum = torch.stack(parts).sum(0).tolist()  # one host sync for all weights
        kept, above, below = int(kept), int(above), int(below)
        return {"kept": kept / n, "above": above / n, "below": below / n, "undecided": (n - above - below) / n,
                "mean_sigma": msum / n, "n_above": above, "n_undecided": n - above - below}

    @torch.no_grad()
    def binary(self) -> dict[str, torch.Tensor]:
        return {w.path: binarize(s).cpu() for w, s in zip(self.weights, self.logits)}

    @contextmanager
    def recompute_masked(self, probe) -> Iterator[dict[str, int]]:
        """Keep no masked weight ``W ⊙ σ(β·s)`` from a forward pass to its backward pass: each linear layer would
        save its masked weight (one float32 copy of every masked matrix, 0.4 GiB on a 135M model, alive through
        the whole pass); here it saves only which weight it was, and the backward pass recomputes the product
        (one elementwise op per matrix, bit-identical). Open it inside :meth:`applied`; forward passes inside it
        must be followed by their backward pass (:meth:`forget` after each). Yields ``{"packed": n}``, the number
        of masked weights kept as a reference so far."""
        W = [_stored_weight(probe, w.path) for w in self.weights]
        self._made = {}
        count = {"packed": 0}

        def pack(t: torch.Tensor):
            fn = t.grad_fn
            if fn is None or t.dim() != 2:
                return t
            flip = fn.name() == "TBackward0"  # a linear layer run as t() + mm saves the transposed view
            if flip:
                fn = fn.next_functions[0][0]
            i = self._made.get(fn) if fn is not None else None
            if i is not None and W[i] is not None and W[i].dtype == t.dtype \
                    and tuple(W[i].shape) == (tuple(t.shape)[::-1] if flip else tuple(t.shape)):
                count["packed"] += 1
                return (i, float(self.beta), flip)
            return t

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            i, beta, flip = saved
            with torch.no_grad():
                w = _masked(W[i], self.logits[i], beta)
            return w.t() if flip else w

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield count
        finally:
            self._made = None

    def forget(self) -> None:
        """Drop the soft-mask nodes :meth:`recompute_masked` remembers for the last forward pass."""
        if self._made is not None:
            self._made.clear()

    @contextmanager
    def applied(self, probe) -> Iterator["MaskSet"]:
        with probe.weight_masks({w.path: WeightMap(lambda W, i=i: self.masked(i, W)) for i, w in enumerate(self.weights)}):
            yield self


@contextmanager
def apply_mask(probe, mask: "Mapping[str, torch.Tensor] | BigramResult | str | Path", mode: Mode = "keep", *,
               seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Run any analysis on the masked model: inside the block every masked weight is ``W ⊙ mask``.

    >>> with apply_mask(probe, result, mode="complement"):
    ...     logits = probe.run(tokens)

    Args:
        mask: ``{module path: bool [storage shape]}``, a :class:`BigramResult` or its saved folder.
        mode: ``keep``, ``complement``, ``random`` (same per-matrix count, shuffled) or ``random_complement``.
        seed: seed of the random variants.
    Yields the applied ``{path: bool}`` dict. Unmasked weights (embeddings, norms, biases, other
    modules) stay as they are; the model is restored on exit, even after an error.
    """
    if isinstance(mask, (str, Path)):
        mask = BigramResult.load(mask)
    if isinstance(mask, BigramResult):
        mask = mask.masks
    m = transform_mask(mask, mode, seed)
    with probe.weight_masks(m):
        yield m


# ============================================================================== sparsity summaries
def _role(probe, wname: str) -> str:
    a = probe.arch
    if wname == a.o_proj:
        return "o"
    if wname == a.mlp_down:
        return "mlp_down"
    if wname in a.mlp_in:
        return "mlp_in"
    leaf = wname.rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return leaf[0]
    if leaf in ("c_attn", "query_key_value"):
        return "qkv"
    return "other"


@torch.no_grad()
def unit_sparsity(probe, mask: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Kept fractions per head ``[L, H]``, per MLP neuron ``[L, F]`` (NaN where a layer is unmasked) and
    per matrix (DataFrame ``layer, matrix, kept, total, fraction``).

    A head counts its q rows, its KV group's k/v rows and its o_proj input columns; a neuron counts
    its rows of the MLP input projections and its column of the down projection.
    """
    i, a = probe.info, probe.arch
    L, H, Hkv, dh, F = i.n_layers, i.n_heads, i.n_kv_heads, i.d_head, i.d_mlp
    hk, ht = torch.zeros(L, H), torch.zeros(L, H)
    nk, nt = torch.zeros(L, F), torch.zeros(L, F)
    rows = []
    prefix = a.layers + "."
    for path, m in mask.items():
        rest = path[len(prefix):] if path.startswith(prefix) else path
        l_s, _, wname = rest.partition(".")
        l = int(l_s)
        m = m.bool().cpu()
        rows.append({"layer": l, "matrix": wname, "kept": int(m.sum()), "total": m.numel()})
        m = (m.T if a.conv1d else m).float()  # [out, in]
        role = _role(probe, wname)
        per_row, per_col = m.sum(1), m.sum(0)
        rlen, clen = float(m.shape[1]), float(m.shape[0])
        if role == "q" or (role == "o"):
            v = per_row if role == "q" else per_col
            ln = rlen if role == "q" else clen
            if v.numel() == H * dh:
                hk[l] += v.reshape(H, dh).sum(1); ht[l] += ln * dh
        elif role in ("k", "v"):
            if per_row.numel() == Hkv * dh:
                g = per_row.reshape(Hkv, dh).sum(1).repeat_interleave(H // Hkv)
                hk[l] += g; ht[l] += rlen * dh
        elif role == "qkv" and per_row.numel() == 3 * H * dh:
            if i.family == "gpt_neox":
                hk[l] += per_row.reshape(H, 3 * dh).sum(1)
            else:
                hk[l] += per_row.reshape(3, H, dh).sum((0, 2))
            ht[l] += rlen * 3 * dh
        elif role == "mlp_in" and per_row.numel() == F:
            nk[l] += per_row; nt[l] += rlen
        elif role == "mlp_down" and per_col.numel() == F:
            nk[l] += per_col; nt[l] += clen
    df = pd.DataFrame(rows, columns=["layer", "matrix", "kept", "total"])
    df["fraction"] = df["kept"] / df["total"].clip(lower=1)
    return hk / ht, nk / nt, df.sort_values(["layer", "matrix"]).reset_index(drop=True)


# ============================================================================== data
def _split_rows(ids: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the stream into rows ``[R, seq_len]``; the last rows (≤10 %, ≤ eval_rows, ≥1) are held out."""
    R = ids.numel() // cfg.seq_len
    if R < 2:
        raise InputError(f"the corpus has {ids.numel()} tokens, fewer than two rows of seq_len={cfg.seq_len}.",
                         hint="Give a longer --corpus or a smaller --seq-len.")
    rows = ids[: R * cfg.seq_len].reshape(R, cfg.seq_len)
    n_eval = max(1, min(cfg.eval_rows, R // 10))
    return rows[: R - n_eval], rows[R - n_eval:]


def train_table(ids: torch.Tensor, cfg: Config, vocab_size: int) -> BigramTable:
    """The bigram table counted on the training part of the stream only (every token before the first
    held-out row), so held-out rows are seen neither by training nor by the table that scores them."""
    train_rows, _ = _split_rows(ids, cfg)
    return BigramTable.from_ids(ids[: train_rows.numel()], vocab_size)


def _batch_index(step: int, micro: int, n_train: int, cfg: Config, perm: torch.Tensor) -> torch.Tensor:
    k = (step * cfg.grad_accum + micro) * cfg.batch
    idx = torch.arange(k, k + cfg.batch) % n_train
    return perm[idx]


# ============================================================================== training
def _state_fingerprint(probe, cfg: Config, input_hash: str) -> str:
    return store.hash_inputs("bigram-train", probe.info.fingerprint, cfg.to_dict(), input_hash)


def _save_checkpoint(folder: Path, fp: str, step: int, masks: MaskSet, opt: torch.optim.Optimizer, curve: list[dict]) -> None:
    """Mask logits + AdamW state + progress in one state file (:func:`analyses.core.io.save_state`:
    safetensors + JSON header, one atomic rename, private folder; no pickle)."""
    from .core.io import private_dir, save_state

    private_dir(folder)
    sd = opt.state_dict()
    tree = {"logits": [s.detach() for s in masks.logits],
            "opt": {int(pid): {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in st.items()}
                    for pid, st in sd["state"].items()}}
    save_state(folder / "mask_state.safetensors", tree, fingerprint=fp,
               meta={"step": step, "beta": masks.beta, "param_groups": sd["param_groups"], "curve": curve})


def _load_checkpoint(folder: Path, fp: str, masks: MaskSet, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    from .core.io import load_state

    got = load_state(folder / "mask_state.safetensors", fp)
    if got is None:
        return 0, []
    tree, meta = got
    with torch.no_grad():
        for s, t in zip(masks.logits, tree["logits"]):
            s.copy_(t)
    state = {int(pid): {k: (v.to(masks.logits[int(pid)].device) if k != "step" else v) for k, v in st.items()}
             for pid, st in tree["opt"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    masks.beta = float(meta["beta"])
    return int(meta["step"]), list(meta.get("curve", []))


@contextmanager
def _flush_subnormals(device) -> Iterator[None]:
    """On CPU, treat subnormal floats as zero while training: AdamW's first moment of a logit that has
    stopped moving decays by 0.9 per step into the subnormal range after a few hundred steps, and
    arithmetic on subnormals is many times slower there. torch has no getter for this flag; it is off by
    default and is switched off again on exit."""
    on = torch.device(device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def _loss(probe, ids: torch.Tensor, target: "SparseTarget | torch.Tensor", chunk: int | None) -> torch.Tensor:
    """Soft CE of the (masked) model on ``ids`` ``[b, T]``: chunked over tokens from the final hidden
    states (:func:`chunked_soft_cross_entropy`), so no ``[b, T, V]`` logits exist; models whose layout
    hides the final hidden states fall back to the dense logits."""
    h = probe.trainable_hidden(ids)
    if h is None:
        logits = probe.trainable_logits(ids)
        if isinstance(target, SparseTarget):
            target = target.dense(target.backoff.numel())
        return soft_cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1, target.shape[-1]))
    weight, bias, softcap = probe.unembedding()
    return chunked_soft_cross_entropy(h, weight, target, bias=bias, chunk=chunk, softcap=softcap)


def mask_pass(probe, masks: MaskSet, ids: torch.Tensor, target: "SparseTarget | torch.Tensor", share: float,
              loss_chunk: int | None = None) -> float:
    """One forward/backward pass of a mask step (inside :meth:`MaskSet.applied` and :meth:`MaskSet.recompute_masked`):
    the soft CE on ``ids``, its gradient weighted by ``share`` (the pass's part of the step) added to the mask logits;
    then the pass's bookkeeping is dropped and, on a CPU, the freed heap returned (:func:`planner.trim_heap`).
    Returns the pass's CE (nats)."""
    xent = _loss(probe, ids, target, loss_chunk)
    (xent * share).backward()
    out = float(xent.detach())
    del xent
    masks.forget()
    if ids.device.type == "cpu":
        planner.trim_heap()
    return out


def train_mask(probe, train_rows: torch.Tensor, table: BigramTable | None, cfg: Config, *,
               checkpoint: str | Path | None = None, checkpoint_every: int = 50, input_hash: str = "",
               progress: ProgressFn | None = None, micro_batch: int | None = None,
               loss_chunk: int | None = None) -> tuple[MaskSet, pd.DataFrame, int, bool]:
    """Continuous sparsification (Eq. 1) of the probe's block weights toward the bigram (or self) target.

    Args:
        train_rows: ``[R, T]`` token rows.
        table: the bigram table (unused for ``target="self"``).
        checkpoint: folder for resumable state (mask logits + AdamW state, safetensors); a run with the
            same model, config and inputs resumes from it.
        progress: :class:`~analyses.core.progress.Progress` events: phase ``training``, one per optimizer step
            (a resumed run starts at its checkpoint's step); ``info`` has the step's cross-entropy and, from the
            last curve point, the kept and undecided fractions.
        micro_batch: rows per forward/backward pass (default ``cfg.batch``). Each batch of ``cfg.batch``
            rows is run in pieces of at most this many rows whose gradients add up (each piece's CE weighted
            by its share of the rows), so the step, the data order and the result are those of the full
            batch; only the peak memory of the activations shrinks.
        loss_chunk: tokens per chunk of the loss (default :func:`loss_chunk_tokens`).
    Returns ``(mask set, curve DataFrame, steps done, stopped early)``.
    """
    weights = masked_weights(probe, cfg.layers)
    dev = probe.device
    masks = MaskSet(weights, init=cfg.init, device=dev)
    N = masks.n_params
    opt = torch.optim.AdamW(masks.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ck = Path(checkpoint) if checkpoint is not None else None
    fp = _state_fingerprint(probe, cfg, input_hash)
    start, curve = (_load_checkpoint(ck, fp, masks, opt) if ck is not None else (0, []))
    n_train = train_rows.shape[0]
    mb = min(cfg.batch, micro_batch or cfg.batch)
    if mb < 1:
        raise ConfigError(f"micro_batch={micro_batch!r}; use a positive number of rows.")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
    stopped = False
    step = start
    from contextlib import nullcontext

    skip = probe.only_blocks(sorted(set(cfg.layers))) if (cfg.others == "drop" and cfg.layers is not None) else nullcontext()
    bar = phase(progress, "training", cfg.steps, "steps", done=start)
    with probe.frozen_weights(), _flush_subnormals(dev):
        with masks.applied(probe), skip, masks.recompute_masked(probe):  # paths resolve on the full block list first
            while step < cfg.steps:
                opt.zero_grad(set_to_none=True)
                xent_sum = 0.0
                for micro in range(cfg.grad_accum):
                    rows = _batch_index(step, micro, n_train, cfg, perm)
                    for lo in range(0, cfg.batch, mb):
                        ids = train_rows[rows[lo: lo + mb]].to(dev)
                        share = ids.shape[0] / (cfg.batch * cfg.grad_accum)  # mean over the step's positions
                        if cfg.target == "self":
                            masks.mode = "off"
                            with torch.no_grad():
                                target = torch.softmax(probe.trainable_logits(ids).float(), -1)
                            masks.mode = "soft"
                        else:
                            target = table.rows(ids, device=dev)
                        xent_sum += mask_pass(probe, masks, ids, target, share, loss_chunk) * share
                        del target
                if cfg.lam:
                    masks.add_l0_grad(cfg.lam / N)
                opt.step()
                step += 1
                check = step % cfg.log_every == 0 or step == cfg.steps
                if check:
                    st = masks.stats()
                    point = {"step": step, "xent": xent_sum, "loss": xent_sum + cfg.lam * st["mean_sigma"],
                             "kept": st["kept"], "undecided": st["undecided"], "mean_sigma": st["mean_sigma"], "beta": masks.beta}
                    curve.append(point)
                    bar.info.update(kept=f"{st['kept']:.3%}", undecided=f"{st['undecided']:.3%}")
                    # paper code: stop when undecided < 1 % of the masks above 0.9 (checked before β grows)
                    if cfg.stop_undecided is not None and st["n_undecided"] < cfg.stop_undecided * max(st["n_above"], 1):
                        stopped = True
                bar.set(step, xent=f"{xent_sum:.3f}")
                masks.beta *= cfg.temp_mult
                if ck is not None and (step % checkpoint_every == 0 or stopped):
                    _save_checkpoint(ck, fp, step, masks, opt, curve)
                if stopped:
                    break
    masks.mode = "hard"
    cols = ["step", "xent", "loss", "kept", "undecided", "mean_sigma", "beta"]
    return masks, pd.DataFrame(curve, columns=cols), step, stopped


# ============================================================================== evaluation
@torch.no_grad()
def evaluate_mask(probe, mask: Mapping[str, torch.Tensor], eval_rows: torch.Tensor, table: BigramTable, *,
                  batch: int = EVAL_BATCH, seed: int = 0, progress: ProgressFn | None = None) -> pd.DataFrame:
    """The ablation table: one row per variant (``full``, ``subnetwork``, ``random``, ``complement``,
    ``random_complement``) with ``kept_fraction``, ``mean_surprisal_bits``, ``bigram_xent_nats``,
    ``pearson_r`` (inf bigram surprisals clipped) and ``pearson_r_finite`` (those tokens dropped).

    Batches are the outer loop, so each batch's dense ``[b, T, V]`` target is built once. ``progress``:
    :class:`~analyses.core.progress.Progress` events, phase ``evaluating`` (held-out rows, 5 variants each)."""
    total = sum(m.numel() for m in mask.values())
    variants: dict[str, dict[str, torch.Tensor] | None] = {"full": None}
    for name, mode in (("subnetwork", "keep"), ("random", "random"), ("complement", "complement"),
                       ("random_complement", "random_complement")):
        variants[name] = transform_mask(mask, mode, seed)
    ce = {k: 0.0 for k in variants}
    surp: dict[str, list[torch.Tensor]] = {k: [] for k in variants}
    big_p, n, ent = [], 0, 0.0
    bar = phase(progress, "evaluating", int(eval_rows.shape[0]), "rows")
    for k in range(0, eval_rows.shape[0], batch):
        ids = eval_rows[k: k + batch].to(probe.device)
        tgt = table.targets(ids)
        ent += float(-(tgt * torch.log(tgt.clamp_min(1e-30))).sum(-1).sum())
        big_p.append(tgt[:, :-1].gather(-1, ids[:, 1:, None].cpu()).reshape(-1))
        n += ids.numel()
        for name, m in variants.items():
            if m is None:
                logits = probe.run(ids)
            else:
                with apply_mask(probe, m, "keep"):
                    logits = probe.run(ids)
            ce[name] += float(soft_cross_entropy(logits, tgt.to(logits.device))) * ids.numel()
            surp[name].append(surprisal_bits(logits, ids).reshape(-1).cpu())
            del logits
        del tgt
        bar.set(min(k + batch, eval_rows.shape[0]))
    big = -torch.log2(torch.cat(big_p).double())
    finite = torch.isfinite(big)
    big_clip = big.clone()
    if (~finite).any():
        big_clip[~finite] = big[finite].max() if finite.any() else 0.0
    rows = []
    for name, m in variants.items():
        s = torch.cat(surp[name])
        kept = 1.0 if m is None else sum(int(x.sum()) for x in m.values()) / max(total, 1)
        rows.append({"variant": name, "kept_fraction": kept, "mean_surprisal_bits": float(s.double().mean()),
                     "bigram_xent_nats": ce[name] / n, "pearson_r": pearson_r(s, big_clip),
                     "pearson_r_finite": pearson_r(s[finite], big[finite])})
    # the floor: the bigram rows' own entropy (CE of the target with itself), averaged like the others
    rows.append({"variant": "bigram", "kept_fraction": float("nan"), "mean_surprisal_bits": float(big_clip.mean()),
                 "bigram_xent_nats": ent / n, "pearson_r": 1.0, "pearson_r_finite": 1.0})
    return pd.DataFrame(rows)


@torch.no_grad()
def compare_predictions(probe, mask: "Mapping[str, torch.Tensor] | BigramResult", table: BigramTable, prompt: str) -> pd.DataFrame:
    """Token-level comparison for one prompt: for each position the current token and the top next-token
    prediction (with its probability) of the bigram model, the full model and the subnetwork, plus the
    surprisal (bits) of the actual next token under each. Columns: ``pos, token, next, bigram, full,
    subnetwork, p_bigram, p_full, p_subnetwork, s_bigram, s_full, s_subnetwork``."""
    ids = probe.to_tokens(prompt)
    tgt = table.targets(ids, device="cpu")[0]
    full = torch.softmax(probe.run(ids).float(), -1)[0, :, : table.V].cpu()
    with apply_mask(probe, mask):
        sub = torch.softmax(probe.run(ids).float(), -1)[0, :, : table.V].cpu()
    toks = probe.to_str_tokens(ids[0])
    ids0 = ids[0].tolist()
    rows = []
    for t in range(len(ids0)):
        r = {"pos": t, "token": toks[t], "next": toks[t + 1] if t + 1 < len(ids0) else ""}
        for name, p in (("bigram", tgt[t]), ("full", full[t]), ("subnetwork", sub[t])):
            j = int(p.argmax())
            r[name] = probe.tokenizer.decode([j])
            r[f"p_{name}"] = float(p[j])
            r[f"s_{name}"] = float(-torch.log2(p[ids0[t + 1]])) if t + 1 < len(ids0) else float("nan")
        rows.append(r)
    return pd.DataFrame(rows)


# ============================================================================== result
def _pack(m: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(m.reshape(-1).cpu().numpy().astype(np.uint8)))


def _unpack(p: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(p.numpy())[:n].astype(bool)).reshape(*shape)


def _read_masks(arrays: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """``{path: bool mask}`` from the saved arrays; a mask listed in ``shapes`` without an array keeps nothing (the
    shipped result stores its all-zero masks by shape only, :func:`ship_result`)."""
    return {k: (_unpack(arrays[f"mask.{k}"], shp) if f"mask.{k}" in arrays else torch.zeros(shp, dtype=torch.bool))
            for k, shp in shapes.items()}


@register_result
@dataclass(frozen=True, kw_only=True)
class BigramResult(Result):
    """A learned binary mask and its evaluation.

    Attributes:
        masks: ``{module path: bool tensor}`` in the weight's storage layout (GPT-2 Conv1D: ``[in, out]``).
        matrices: per matrix ``layer, matrix, kept, total, fraction``.
        head_kept: ``[L, H]`` kept fraction per head (labels ``L{l}H{h}``; NaN for unmasked layers).
        neuron_kept: ``[L, F]`` kept fraction per MLP neuron (labels ``L{l}N{n}``).
        curve: training curve ``step, xent, loss, kept, undecided, mean_sigma, beta``.
        ablation: :func:`evaluate_mask` table (empty when not evaluated).
        sparsity: kept / total masked weights.
        corpus: what the corpus was (``builtin``, a path, or ``ids``).
    """

    analysis: ClassVar[str] = "bigram"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()),
                             ("extra", "mask_shapes", lambda r: {k: list(v.shape) for k, v in r.masks.items()}))

    masks: dict[str, torch.Tensor] = stored("arrays", key="mask", save=lambda r: {k: _pack(v) for k, v in r.masks.items()},
                                            read=lambda s: _read_masks(s.arrays, s.extra["mask_shapes"]))
    matrices: pd.DataFrame = stored(None, read=lambda s: s.tables["main"].drop(columns=["model"]).rename(columns={"value": "fraction"}))
    head_kept: torch.Tensor = stored("array", save=lambda r: r.head_kept.float())
    neuron_kept: torch.Tensor = stored("array", save=lambda r: r.neuron_kept.float())
    curve: pd.DataFrame = stored("table")
    ablation: pd.DataFrame = stored("table")
    sparsity: float = stored("extra")
    steps_done: int = stored("extra", default=0)
    stopped_early: bool = stored("extra", default=False)
    corpus: str = stored("extra", default="builtin")
    overlaps: dict[str, dict[str, float]] = stored("extra", default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "BigramResult":
        """The result in the folder ``path``; ``"shipped"`` (when no such folder exists here) is the mask shipped
        with Sonde (:data:`DEFAULT_RESULT`)."""
        return super().load(mask_path(path))

    # ---- views
    def per_layer(self) -> pd.DataFrame:
        """Kept fraction per layer: ``layer, kept, total, fraction``."""
        g = self.matrices.groupby("layer", as_index=False)[["kept", "total"]].sum()
        g["fraction"] = g["kept"] / g["total"]
        return g

    def head_labels(self) -> list[str]:
        L, H = self.head_kept.shape
        return [head_label(l, h) for l in range(L) for h in range(H)]

    def to_frame(self) -> pd.DataFrame:
        """Tidy per-matrix sparsity: ``model, layer, matrix, kept, total, value`` (value = kept fraction)."""
        df = self.matrices.rename(columns={"fraction": "value"}).copy()
        df.insert(0, "model", self.model.get("name", ""))
        return df

    def apply(self, probe, mode: Mode = "keep", seed: int = 0):
        """Context manager applying this mask to ``probe`` (see :func:`apply_mask`)."""
        return apply_mask(probe, self.masks, mode, seed=seed)

    # ---- plots
    def plot(self, **kwargs):
        """Grouped bar chart: kept fraction per layer and matrix."""
        import plotly.express as px

        df = self.to_frame()
        fig = px.bar(df, x="layer", y="value", color="matrix", barmode="group",
                     labels={"value": "kept fraction", "layer": "layer"},
                     title=f"Bigram subnetwork: {self.sparsity:.3%} of block weights kept", **kwargs)
        return fig

    def plot_heads(self):
        import plotly.express as px

        return px.imshow(self.head_kept.numpy(), aspect="auto", color_continuous_scale="Blues",
                         labels={"x": "head", "y": "layer", "color": "kept"}, title="Kept fraction per head")

    def plot_neurons(self):
        import plotly.express as px

        return px.imshow(self.neuron_kept.numpy(), aspect="auto", color_continuous_scale="Blues",
                         labels={"x": "neuron", "y": "layer", "color": "kept"}, title="Kept fraction per MLP neuron")

    def plot_curve(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        c = self.curve
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(go.Scatter(x=c["step"], y=c["xent"], name="xent (nats)", line=dict(color="#1f77b4", width=2)),
                      secondary_y=False)
        # the two mask fractions on the right axis, in colours and dashes of their own (not a lighter blue)
        fig.add_trace(go.Scatter(x=c["step"], y=c["kept"], name="kept (s>0)", line=dict(color="#2ca02c", width=2, dash="dash")),
                      secondary_y=True)
        fig.add_trace(go.Scatter(x=c["step"], y=c["undecided"], name="undecided", line=dict(color="#d62728", width=2, dash="dot")),
                      secondary_y=True)
        fig.update_layout(title="Training curve", xaxis_title="step")
        fig.update_yaxes(title_text="cross-entropy (nats)", secondary_y=False)
        fig.update_yaxes(title_text="fraction of masked weights", range=[0, 1.02], tickformat=".0%", tickmode="linear",
                         tick0=0, dtick=0.2, showgrid=False, secondary_y=True)
        return fig


# ============================================================================== entry points
def _check_corpus_size(n_train: int, cfg: Config) -> None:
    need = cfg.steps * cfg.batch * cfg.grad_accum
    if need > n_train and not cfg.reuse:
        raise InputError(
            f"the corpus gives {n_train} training rows of {cfg.seq_len} tokens, but steps={cfg.steps} × batch={cfg.batch}"
            f" × grad_accum={cfg.grad_accum} needs {need} (the paper never reuses a row).",
            hint=f"Give a bigger corpus, lower steps to ≤ {max(n_train // (cfg.batch * cfg.grad_accum), 0)}, "
                 "or allow reuse (reuse=True, --reuse).")


def _corpus_label(corpus) -> str:
    return str(corpus) if isinstance(corpus, (str, Path)) else "ids"


def _input_hash(corpus, ids: torch.Tensor) -> str:
    """The input hash of a run on ``corpus`` (tokenized to ``ids`` ``[N]``): its label and its ids."""
    return store.hash_inputs(_corpus_label(corpus), ids)


def _prepare(probe, corpus: "str | Path | torch.Tensor | Sequence[int]" = "builtin", *, config: Config, **_: Any) -> registry.Inputs:
    """The corpus's token ids ``[N]`` and the hash of its label and ids (shared by :func:`run` and :data:`result_key`)."""
    if not isinstance(corpus, (str, Path, torch.Tensor, list, tuple)):
        raise InputError(f"corpus must be 'builtin', a file path or token ids, got {type(corpus).__name__}.",
                         hint="E.g. bigram.run(probe, 'builtin') or bigram.run(probe, 'corpus.jsonl').")
    ids = load_corpus_ids(probe, corpus)
    return registry.Inputs(_input_hash(corpus, ids), ids, f"corpus {_corpus_label(corpus)} ({ids.numel()} tokens)")


def run(probe, corpus: "str | Path | torch.Tensor | Sequence[int]" = "builtin", *, config: Config = Config(),
        evaluate: bool = True, checkpoint: str | Path | None = None, checkpoint_every: int = 50,
        progress: ProgressFn | None = None, table: BigramTable | None = None,
        micro_batch: int | None = None) -> BigramResult:
    """Learn a bigram (or optimal-pruning) subnetwork of ``probe``'s blocks and evaluate it.

    Args:
        corpus: ``"builtin"``, a text/JSONL file, or token ids ``[N]``; the stream is cut into rows, the
            last rows are held out, and the bigram table is counted on the training part only
            (:func:`train_table`), so the evaluation is strictly held out.
        evaluate: compute the ablation table on the held-out rows.
        checkpoint: folder for resumable training state (see :func:`train_mask`).
        table: a prebuilt bigram table (else counted from the training rows of ``corpus``); to keep the
            evaluation held out it must not have seen the held-out rows.
        micro_batch: rows per forward/backward pass (see :func:`train_mask`; the result does not depend on
            it, the peak memory does: the planner picks one that fits, :data:`MEMORY`).
        progress: :class:`~analyses.core.progress.Progress` events, phase by phase: ``tokenizing`` (the corpus),
            ``counting bigrams`` (tokens), ``training`` (optimizer steps, see :func:`train_mask`) and
            ``evaluating`` (held-out rows, see :func:`evaluate_mask`).
    """
    timer = Timer()
    with timer("tokenize"):
        tok = phase(progress, "tokenizing", 1, "corpus")
        inp = SPEC.inputs(probe, corpus, config=config)
        ids = inp.data
        train_rows, eval_rows = _split_rows(ids, config)
        tok.advance()
        counting = phase(progress, "counting bigrams", int(ids.numel()), "tokens")
        table = table or train_table(ids, config, probe.info.d_vocab)
        counting.set(int(ids.numel()))
    input_hash = inp.hash
    weights = masked_weights(probe, config.layers)  # fail early on a model the masker does not handle
    if math.isinf(config.lam):  # keep-nothing baseline: no training
        masks = {w.path: torch.zeros(w.shape, dtype=torch.bool) for w in weights}
        curve, steps, stopped = pd.DataFrame(columns=["step", "xent", "loss", "kept", "undecided", "mean_sigma", "beta"]), 0, False
    else:
        _check_corpus_size(train_rows.shape[0], config)
        with timer("train"):
            ms, curve, steps, stopped = train_mask(probe, train_rows, table, config, checkpoint=checkpoint,
                                                   checkpoint_every=checkpoint_every, input_hash=input_hash, progress=progress,
                                                   micro_batch=micro_batch)
        masks = ms.binary()
        del ms  # the float mask logits are not needed for the evaluation
    for w in dropped_weights(probe, config):  # others="drop": outside `layers` nothing is kept
        masks[w.path] = torch.zeros(w.shape, dtype=torch.bool)
    res = _finish(probe, masks, config, input_hash, curve, steps, stopped, _corpus_label(corpus),
                  eval_rows if evaluate else None, table, timer, progress)
    return dataclasses.replace(res, inputs=inp.label)


def _finish(probe, masks, config, input_hash, curve, steps, stopped, corpus, eval_rows, table, timer, progress=None) -> BigramResult:
    head, neuron, mat = unit_sparsity(probe, masks)
    total = sum(m.numel() for m in masks.values())
    ablation = pd.DataFrame(columns=["variant", "kept_fraction", "mean_surprisal_bits", "bigram_xent_nats", "pearson_r", "pearson_r_finite"])
    if eval_rows is not None:
        with timer("evaluate"):
            ablation = evaluate_mask(probe, masks, eval_rows, table, batch=EVAL_BATCH, seed=config.seed, progress=progress)
    return BigramResult(config=config, model=probe.info.to_dict(), input_hash=input_hash, timings=timer.seconds,
                        masks=masks, matrices=mat, head_kept=head, neuron_kept=neuron, curve=curve, ablation=ablation,
                        sparsity=sum(int(m.sum()) for m in masks.values()) / max(total, 1), steps_done=steps,
                        stopped_early=stopped, corpus=corpus)


def evaluate(probe, result: "BigramResult | str | Path", corpus: "str | Path | torch.Tensor | None" = None, *,
             compare: "BigramResult | str | Path | None" = None, eval_rows: int | None = None,
             progress: ProgressFn | None = None, batch: int = EVAL_BATCH) -> BigramResult:
    """Re-evaluate a saved mask on ``probe`` (default corpus: the one it was trained on; ``progress``: phase
    ``evaluating``, see :func:`evaluate_mask`; ``batch``: held-out rows per forward pass, which the numbers do not
    depend on, only the peak memory does: :data:`EVAL_MEMORY`).

    ``compare`` adds the overlap with another mask (e.g. the optimal-pruning one, or another λ) under
    ``result.overlaps["compare"]``. Returns a new result with the fresh ablation table.
    """
    if isinstance(result, (str, Path)):
        result = BigramResult.load(result)
    corpus = corpus if corpus is not None else result.corpus
    if corpus == "ids":
        raise InputError("this mask was trained on raw token ids, so its corpus cannot be re-read.", hint="Pass --corpus FILE or builtin.")
    cfg = result.config if eval_rows is None else result.config.replace(eval_rows=eval_rows)
    ids = load_corpus_ids(probe, corpus)
    _, rows = _split_rows(ids, cfg)
    table = train_table(ids, cfg, probe.info.d_vocab)
    timer = Timer()
    with timer("evaluate"):
        ablation = evaluate_mask(probe, result.masks, rows, table, batch=batch, seed=cfg.seed, progress=progress)
    overlaps = dict(result.overlaps)
    if compare is not None:
        other = BigramResult.load(compare) if isinstance(compare, (str, Path)) else compare
        overlaps["compare"] = mask_overlap(result.masks, other.masks)
    return dataclasses.replace(result, ablation=ablation, overlaps=overlaps, timings={**result.timings, **timer.seconds},
                               corpus=_corpus_label(corpus), config=cfg)


# ============================================================================== the shipped default result
DEFAULT_RESULT = Path(__file__).resolve().parent / "data" / "bigram_default"
SHIPPED = "shipped"  # the name every command accepts for DEFAULT_RESULT (``--mask shipped``)


def mask_path(path: str | Path) -> Path:
    """The folder a mask argument names: ``"shipped"`` is :data:`DEFAULT_RESULT` unless a path of that name
    exists here (an existing path always wins); anything else is the path itself."""
    p = Path(path)
    if str(path) == SHIPPED and not os.path.lexists(p):
        return DEFAULT_RESULT
    return p


def bigram_entropy_nats(result: "BigramResult") -> float:
    """The floor of the held-out bigram CE: the entropy of the bigram rows (``bigram`` row of the ablation)."""
    ab = result.ablation.set_index("variant")
    return float(ab.loc["bigram", "bigram_xent_nats"]) if "bigram" in ab.index else float("nan")


def ship_result(result: "BigramResult", folder: str | Path) -> Path:
    """Write a compact copy of ``result`` as an ordinary signed result folder (``manifest.json``, tables, arrays;
    every command and :meth:`BigramResult.load` read it): the same files :meth:`BigramResult.save` writes, except
    that masks which keep nothing are listed by shape only (the ``mask_shapes`` of the manifest), not stored as
    bit-packed zeros. A mask over a few blocks of a 30-block model so takes 1 MB instead of 13 MB. Written
    whole or not at all; an existing folder is replaced only when it is a Sonde result."""
    out = Path(folder)
    parts = result._saved()
    arrays = {k: v for k, v in parts["array"].items()
              if not (k.startswith("mask.") and not bool(result.masks[k[len("mask."):]].any()))}
    return store.write_result(out, analysis=result.analysis, model=result.model, config=result.config.to_dict(),
                              input_hash=result.input_hash, tables=parts["table"], arrays=arrays, extra=parts["extra"],
                              timings=result.timings, inputs=result.inputs, replace=store.is_result(out))


def default_result(folder: str | Path | None = None) -> "BigramResult":
    """The bigram subnetwork shipped with Sonde (embedded SmolLM2-135M, built-in corpus; see
    ``benchmarks/RESULTS.md`` for how it was trained), or a folder written by :func:`ship_result`.
    Loads in well under a second and needs no model. The shipped folder is an ordinary result folder, so
    ``BigramResult.load(DEFAULT_RESULT)``, ``sonde run bigram-eval --mask shipped`` (or its path) and
    ``sonde results show`` read it as well."""
    d = Path(folder) if folder is not None else DEFAULT_RESULT
    if not (d / store.MANIFEST).is_file():
        raise InputError(f"{str(d)!r} holds no shipped bigram result (no {store.MANIFEST}).",
                         hint="Use analyses.bigram.ship_result(result, folder) to write one, or load a result folder with BigramResult.load.")
    return BigramResult.load(d)


def _memory(s, B: int, T: int, o) -> dict[str, int]:
    """Mask training with autograd on a micro-batch of ``B`` rows: per-layer saved activations, the mask logits
    with their gradients and AdamW moments, and one chunk of the chunked loss (its float32 logits and softmax,
    plus the ``[B·T, d]`` gradient of the final hidden states); no ``[B, T, V]`` tensor exists, and no masked
    weight ``W ⊙ σ(β·s)`` is kept from a forward pass to its backward pass (:meth:`MaskSet.recompute_masked`). With
    ``layers``, the mask state is that of the masked blocks; with ``others="drop"`` only those blocks run."""
    chunk = min(loss_chunk_tokens(s.d_vocab), B * T)
    c = o.get("config")
    masked = min(len(set(c.layers)), s.n_layers) if c is not None and c.layers is not None else s.n_layers
    run = masked if c is not None and c.others == "drop" and c.layers is not None else s.n_layers  # blocks that run
    return {"saved_activations": run * B * T * (6 * s.d_model + 3 * s.d_mlp) * s.itemsize,
            # logits, their gradients and the two AdamW moments (float32), of the masked blocks' weights
            "mask_state": 4 * s.block_params * 4 * masked // s.n_layers,
            "logits": 2 * chunk * s.d_vocab * 4 + B * T * s.d_model * 4}


CPU_MICRO_TOKENS = 512  # a CPU matmul over 512 tokens already runs at full speed, so bigger passes only cost memory


def _cpu_cap(c: Config, device_type: str) -> int | None:
    return max(1, CPU_MICRO_TOKENS // c.seq_len) if device_type == "cpu" else None


MEMORY = planner.MemoryModel("bigram", _memory, persistent=("saved_activations", "mask_state"),
                             sizes=lambda c: {"seq_len": c.seq_len, "batch_size": c.batch}, batch_arg="micro_batch",
                             option="--micro-batch", max_batch=_cpu_cap, fields=(("--batch-size", "batch"),))


def _eval_memory(s, B: int, T: int, o) -> dict[str, int]:
    """The evaluation (no autograd) of ``B`` held-out rows: the five variants' boolean masks (the mask read and its
    four transforms, one byte per block weight; ``layers``: of those blocks) and the batch's dense ``[B, T, V]`` float32 bigram target stay alive;
    the entropy of the target (its clamp, log and product) and each variant's logits with their float32
    log-softmax and product with the target are transients of different steps."""
    btv = B * T * s.d_vocab * 4
    c = o.get("config")
    masked = min(len(set(c.layers)), s.n_layers) if c is not None and c.layers is not None else s.n_layers
    return {"masks": 5 * s.block_params * masked // s.n_layers, "target": btv, "entropy": 3 * btv,
            "logits": B * T * s.d_vocab * s.itemsize + 2 * btv}


EVAL_MEMORY = planner.MemoryModel("bigram-eval", _eval_memory, persistent=("masks", "target"),
                                  sizes=lambda c: {"seq_len": c.seq_len, "batch_size": EVAL_BATCH}, batch_arg="batch")

SPEC = registry.register(registry.Analysis(
    name="bigram", order=3, title="Bigram subnetworks", summary="a tiny mask of block weights that reproduces next-token bigram predictions",
    config=Config, result=BigramResult, run=run, prepare=_prepare, cli="bigram", page="bigram", memory=MEMORY,
    verbs=(("bigram-eval", EVAL_MEMORY),),
))
result_key = SPEC.key  # the key run() gives this corpus, from the same _prepare
