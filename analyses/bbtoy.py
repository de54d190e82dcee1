"""The Bigram-Backcopy (BB) toy task of Guo et al. 2024 (arXiv 2410.13835, §3, code BBM/).

Data: a character bigram chain with trigger tokens. After BOS, ``x₁`` is drawn from the unigram
marginal without triggers; then if ``x_t`` is a trigger, ``x_{t+1} = x_{t−1}`` (back-copy), else
``x_{t+1} ~ P(·|x_t)`` (bigram). Triggers are the k most frequent characters (k = 3). The paper's
corpus is tiny-Shakespeare; offline, Sonde estimates the chain from the English text shipped in
``pydoc_data`` (64 most frequent characters).

Model: a pre-norm transformer with one head per layer (1 layer: sink + value drain; 3 layers: also
the residual peak), learned positions, trained on fresh batches. What emerges (dormant.md): the
head is *active* at trigger positions (attends to ``x_{t−1}``) and *dormant* elsewhere (mass on
BOS, whose value state shrinks). Dynamics (mutual reinforcement): the centred BOS attention logit
grows while the BOS value norm falls. ReLU attention removes sink and drain; SGD removes the peak.

Everything here is small and runs on the CPU; metrics are logged every ``log_every`` steps:
``loss``, ``icl_loss`` (trigger positions), ``markov_loss`` (others), and per layer
``bos_mass`` (mean attention weight on BOS from non-trigger queries; raw ReLU weights for ReLU), ``prev_mass`` (mean attention on
``x_{t−1}`` from trigger queries), ``bos_logit`` (BOS score minus the row mean), ``bos_value``
(‖v_BOS W_O‖ / mean over other positions) and ``resid_peak`` (‖x_BOS‖ / mean ‖x_other‖ after the layer).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import pandas as pd
import torch
from torch import nn


from .core import base, planner, registry
from .core.base import option, stored
from .core.progress import ProgressFn, phase

__all__ = ["Config", "BBData", "BBModel", "BBToyResult", "run", "make_data"]


@dataclass(frozen=True, kw_only=True)
class Config(base.Config):
    """BB-toy settings. Paper defaults (dormant.md): d=256, seq 256, batch 512, 10k steps, AdamW lr 3e-4,
    betas (0.9, 0.99), wd 1e-4; SGD momentum 0.9 lr 0.03; ReLU lr 3e-3. Sonde's defaults are a CPU-sized run."""

    n_layers: Literal[1, 3] = 1  # dormant.md: 1 layer (sink + drain) or 3 layers (adds the peak)
    d_model: int = option(32, ge=1, help="Model width (paper 256).")
    seq_len: int = option(32, ge=4, help="Sequence length (paper 256).")
    batch_size: int = option(32, ge=1, help="Sequences per step (paper 512).")
    steps: int = option(400, ge=1, help="Training steps (paper 10k; sink mass 0.1 -> 0.44 by step 300 at these sizes).")
    k_triggers: int = option(3, ge=1, le=16, help="Trigger tokens (dormant.md: 3 by default, or 5).")
    attention: Literal["softmax", "relu"] = "softmax"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = option(None, gt=0, help="None = 3e-3 (adam, softmax; paper 3e-4 over 25x more steps), 0.03 sgd, 3e-3 relu.")
    weight_decay: float = 1e-4  # paper
    log_every: int = option(50, ge=1, help="Steps between logged metrics.")
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.03 if self.optimizer == "sgd" else 3e-3


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class BBData:
    """The chain: ``vocab`` characters (id = index; BOS = len(vocab)), ``bigram [V, V]``, ``marginal [V]``, ``triggers``."""

    vocab: tuple[str, ...]
    bigram: torch.Tensor
    marginal: torch.Tensor
    triggers: tuple[int, ...]

    @property
    def bos(self) -> int:
        return len(self.vocab)

    def sample(self, batch: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch, seq_len + 1]`` ids: BOS then ``seq_len`` chain tokens."""
        V = len(self.vocab)
        trig = torch.zeros(V, dtype=torch.bool)
        trig[list(self.triggers)] = True
        m0 = self.marginal.clone()
        m0[trig] = 0
        cdf = self.bigram.cumsum(dim=1)
        x = torch.empty(batch, seq_len + 1, dtype=torch.long)
        x[:, 0] = self.bos
        x[:, 1] = torch.multinomial(m0 / m0.sum(), batch, replacement=True, generator=generator)
        for t in range(1, seq_len):
            cur = x[:, t]
            u = torch.rand(batch, 1, generator=generator)
            nxt = torch.searchsorted(cdf[cur], u).squeeze(1).clamp_max(V - 1)
            # back-copy: after a trigger comes the token before it (x_0 is BOS only when t = 1, never a trigger)
            copy = trig[cur] & (t >= 2)
            x[:, t + 1] = torch.where(copy, x[:, t - 1], nxt)
        return x

    def is_trigger(self, x: torch.Tensor) -> torch.Tensor:
        trig = torch.zeros(len(self.vocab) + 1, dtype=torch.bool)
        trig[list(self.triggers)] = True
        return trig[x]


def make_data(k_triggers: int = 3, n_chars: int = 64) -> BBData:
    """Estimate the chain from ``pydoc_data`` English text: top ``n_chars`` characters, add-0.1 smoothed bigram."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    counts = Counter(text)
    vocab = tuple(sorted(c for c, _ in counts.most_common(n_chars)))
    idx = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([idx[c] for c in text if c in idx])
    V = len(vocab)
    big = torch.zeros(V, V, dtype=torch.float64)
    big.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True)
    big = (big + 0.1) / (big + 0.1).sum(1, keepdim=True)
    marg = torch.bincount(ids, minlength=V).double()
    marg = marg / marg.sum()
    triggers = tuple(int(i) for i in marg.argsort(descending=True)[:k_triggers])
    return BBData(vocab, big.float(), marg.float(), triggers)


# ----------------------------------------------------------------------------- model
class _Block(nn.Module):
    def __init__(self, d: int, attention: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.attention = attention

    def forward(self, x, stats: dict | None = None):
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        T = x.shape[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.attention == "softmax":
            A = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        else:  # ReLU attention (Guo et al. mitigation): no normalisation across keys
            A = torch.relu(scores).masked_fill(~mask, 0.0) / T
        if stats is not None:
            stats["A"], stats["scores"], stats["vo"] = A, scores.masked_fill(~mask, float("nan")), self.o(v)
        x = x + self.o(A @ v)
        x = x + self.mlp(self.ln2(x))
        if stats is not None:
            stats["resid"] = x
        return x


class BBModel(nn.Module):
    """Pre-norm transformer with one head per layer, learned positions, untied unembedding."""

    def __init__(self, vocab_size: int, n_ctx: int, d: int, n_layers: int, attention: str):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList(_Block(d, attention) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab_size, bias=False)

    def forward(self, x, stats: list | None = None):
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for i, b in enumerate(self.blocks):
            h = b(h, None if stats is None else stats[i])
        return self.unembed(self.ln_f(h))


@torch.no_grad()
def layer_metrics(stats: dict, x: torch.Tensor, trig: torch.Tensor) -> dict[str, float]:
    """Metrics of one layer from its stats (``A [B, T, T]``, ``scores``, ``vo [B, T, d]``, ``resid``), ids ``x [B, T]``
    and the trigger mask ``trig [B, T]`` (query t is a trigger position)."""
    A = stats["A"]
    B, T, _ = A.shape
    q_non = ~trig
    q_non[:, 0] = False  # BOS query sees only itself
    # raw weights: softmax rows sum to 1; ReLU rows are unnormalised (scores⁺ / T), as the paper plots them
    share = A
    bos_mass = share[..., 0][q_non].mean()
    t_idx = torch.arange(T)
    prev = torch.zeros(B, T)
    prev[:, 1:] = share[:, t_idx[1:], t_idx[1:] - 1]
    trig_q = trig.clone()
    trig_q[:, :2] = False
    prev_mass = prev[trig_q].mean() if trig_q.any() else torch.tensor(float("nan"))
    s = stats["scores"]
    bos_logit = (s[..., 0] - s.nanmean(dim=-1))[q_non].mean()
    vn = stats["vo"].norm(dim=-1)  # [B, T]
    rn = stats["resid"].norm(dim=-1)
    return {"bos_mass": float(bos_mass), "prev_mass": float(prev_mass), "bos_logit": float(bos_logit),
            "bos_value": float(vn[:, 0].mean() / vn[:, 1:].mean()), "resid_peak": float(rn[:, 0].mean() / rn[:, 1:].mean())}


# ----------------------------------------------------------------------------- result
def _layer_as_int(h: pd.DataFrame) -> pd.DataFrame:
    """The saved history with its nullable integer ``layer`` column restored."""
    h["layer"] = h["layer"].astype("Int64")
    return h


@base.register_result
@dataclass(frozen=True, kw_only=True)
class BBToyResult(base.Result):
    """Training history: ``history`` tidy frame ``step, layer, metric, value`` (layer NA for losses)."""

    analysis: ClassVar[str] = "bb-toy"
    config_class: ClassVar[type] = Config

    saved_views: ClassVar = (("extra", "summary", lambda r: r.summary()),)

    history: pd.DataFrame = stored("table", key="main", load=_layer_as_int)  # tidy ``step, layer, metric, value``
    triggers: tuple[str, ...] = stored("extra", default=())

    def final(self, metric: str, layer: int | None = None) -> float:
        h = self.history[self.history.metric == metric]
        if layer is not None:
            h = h[h.layer == layer]
        return float(h[h.step == h.step.max()]["value"].mean())

    def summary(self) -> dict[str, Any]:
        L = self.config.n_layers
        out = {"loss": round(self.final("loss"), 3), "icl_loss": round(self.final("icl_loss"), 3),
               "markov_loss": round(self.final("markov_loss"), 3)}
        for l in range(L):
            for m in ("bos_mass", "prev_mass", "bos_value", "resid_peak"):
                out[f"L{l} {m}"] = round(self.final(m, l), 3)
        return out

    def to_frame(self) -> pd.DataFrame:
        df = self.history.copy()
        df.insert(0, "model", "bb-toy")
        return df

    def plot(self, metrics: tuple[str, ...] = ("loss", "bos_mass", "prev_mass", "bos_logit", "bos_value", "resid_peak")):
        """Training curves, one panel per metric (a line per layer)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=math.ceil(len(metrics) / 3), cols=min(3, len(metrics)), subplot_titles=metrics)
        for i, m in enumerate(metrics):
            h = self.history[self.history.metric == m]
            r, c = i // 3 + 1, i % 3 + 1
            if m.endswith("loss"):
                for mm in ("loss", "icl_loss", "markov_loss"):
                    hh = self.history[self.history.metric == mm]
                    fig.add_trace(go.Scatter(x=hh.step, y=hh.value, name=mm, mode="lines"), row=r, col=c)
                continue
            for l in sorted(h.layer.dropna().unique()):
                hl = h[h.layer == l]
                fig.add_trace(go.Scatter(x=hl.step, y=hl.value, name=f"{m} L{l}", mode="lines"), row=r, col=c)
        fig.update_layout(title=f"BB toy: {self.config.n_layers} layer(s), {self.config.attention}, {self.config.optimizer}",
                          height=300 * math.ceil(len(metrics) / 3))
        return fig


def run(config: Config = Config(), *, progress: ProgressFn | None = None) -> BBToyResult:
    """Train the BB toy from scratch and log its dynamics (deterministic for a seed, CPU).

    ``progress`` receives :class:`~analyses.core.progress.Progress` events: phase ``training``, one per step."""
    timer = base.Timer()
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    data = make_data(config.k_triggers)
    V = len(data.vocab) + 1
    model = BBModel(V, config.seq_len + 1, config.d_model, config.n_layers, config.attention)
    lr = config.learning_rate
    if config.optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=config.weight_decay)
    eval_x = data.sample(128, config.seq_len, generator=torch.Generator().manual_seed(config.seed + 1))
    rows: list[dict] = []

    def log(s: int) -> None:
        model.eval()
        stats = [{} for _ in range(config.n_layers)]
        with torch.no_grad():
            logits = model(eval_x[:, :-1], stats)
        nll = nn.functional.cross_entropy(logits.reshape(-1, V), eval_x[:, 1:].reshape(-1), reduction="none").view(eval_x.shape[0], -1)
        trig = data.is_trigger(eval_x[:, :-1])
        icl = trig.clone()
        icl[:, :2] = False
        rows.append({"step": s, "layer": None, "metric": "loss", "value": float(nll.mean())})
        rows.append({"step": s, "layer": None, "metric": "icl_loss", "value": float(nll[icl].mean())})
        rows.append({"step": s, "layer": None, "metric": "markov_loss", "value": float(nll[~trig].mean())})
        for l, st in enumerate(stats):
            for k, v in layer_metrics(st, eval_x[:, :-1], trig).items():
                rows.append({"step": s, "layer": l, "metric": k, "value": v})
        model.train()

    with timer("train"):
        bar = phase(progress, "training", config.steps, "steps")
        log(0)
        for s in range(1, config.steps + 1):
            # a fixed pool of sequences, redrawn every 50 steps (cheaper than fresh batches on a CPU)
            if (s - 1) % 50 == 0:
                pool = data.sample(config.batch_size * 8, config.seq_len, generator=g)
            x = pool[torch.randint(pool.shape[0], (config.batch_size,), generator=g)]
            logits = model(x[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if s % config.log_every == 0 or s == config.steps:
                log(s)
            bar.advance(loss=f"{float(loss.detach()):.3f}")
    hist = pd.DataFrame(rows)
    hist["layer"] = hist["layer"].astype("Int64")
    info = {"name": "bb-toy", "fingerprint": f"bb-toy-{config.seed}", "family": "bb-toy", "n_layers": config.n_layers,
            "n_heads": 1, "d_model": config.d_model, "d_vocab": V}
    return BBToyResult(config=config, model=info, input_hash="", timings=timer.seconds, history=hist,
                       triggers=tuple(data.vocab[i] for i in data.triggers))


def _memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """Training the toy from scratch (no model is loaded): per layer the saved activations of one head's q, k, v,
    output and residual, its ``4·d`` MLP and norms (``11·d`` in all) and the ``[T, T]`` scores and probabilities; the
    logits over its small vocabulary with their softmax and gradient (float32); and the run's own constant share (the
    chain's tables, the optimizer and autograd's bookkeeping: 28 MiB, measured at two sizes on the CPU)."""
    c = o.get("config")
    d, L = (c.d_model, c.n_layers) if c is not None else (32, 1)
    vocab = 64
    return {"saved_activations": L * B * T * (11 * d + 2 * T) * 4, "runtime": 28 * 2**20, "logits": 3 * B * T * vocab * 4}


MEMORY = planner.MemoryModel("bb-toy", _memory, persistent=("saved_activations", "runtime"), forward=False, weights=False,
                             sizes=lambda c: {"seq_len": c.seq_len, "batch_size": c.batch_size})


SPEC = registry.register(registry.Analysis(
    name="bb-toy", order=2, doc="sinks", title="Bigram-Backcopy toy", summary="a toy transformer trained from scratch to watch a sink form",
    config=Config, result=BBToyResult, run=run, cli="bb-toy", page="sinks", needs_probe=False, memory=MEMORY,
))
