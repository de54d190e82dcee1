"""Logit lens: read each layer's residual stream through the model's own unembedding.

nostalgebraist (2020), "interpreting GPT: the logit lens" (LessWrong); formalised as the identity
("no translation") probe in Belrose et al. (2023), "Eliciting Latent Predictions from Transformers with
the Tuned Lens", eq. (1)-(2):

    LogitLens_l(h_l) = W_U · LayerNorm_final(h_l),        p_l(· | x_{<=t}) = softmax(LogitLens_l(h_{l,t}))

where ``h_l = blocks.{l}.hook_resid_post`` (the residual after block ``l``). For the last block this is
exactly the model's output distribution (final norm then unembedding), which the tests check.

For every (layer, position) cell the result keeps the top-``k`` lens tokens and their probabilities,
and the probability the lens gives to the *final* prediction at that position (the model's top-1
output token), the quantity usually drawn in logit-lens heat maps. It also keeps the model's own
next-token top-``k`` per position (the output logits of the same forward pass).

Axis order everywhere: ``[layer, pos, rank]``; ``layers`` labels axis 0, ``str_tokens`` axis 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import pandas as pd
import torch

from probes import Collect, ConfigError, InputError, Probe, layer_label, site

from .core import planner, registry, store
from .core.base import Config as _BaseConfig
from .core.base import Result, Timer, option, register_result, stored
from .core.progress import ProgressFn, phase

__all__ = ["Config", "LogitLensResult", "run", "result_key", "lens_topk", "target_probs"]

_CHUNK_ELEMS = 1 << 24  # at most ~16M logits (64 MB in fp32) alive at once


@dataclass(frozen=True, kw_only=True)
class Config(_BaseConfig):
    """Logit-lens settings.

    Attributes:
        layers: blocks whose ``hook_resid_post`` is read; ``None`` = every block (the usual heat map).
        k: top tokens kept per cell (5 is what the hover shows; nostalgebraist's plots show the top-1).
        prepend_bos: start the prompt with BOS (SmolLM2's tokenizer does not add one by default).
        apply_norm: apply the final norm before unembedding (the logit lens does; ``False`` is the
            "raw" variant without the norm, rarely useful except to see why the norm matters).
    """

    layers: tuple[int, ...] | None = option(None, ge=0, help="Blocks whose resid_post is read (default: every block).")
    k: int = option(5, ge=1, le=100, help="Top tokens kept per cell.")
    prepend_bos: bool = False
    apply_norm: bool = True

    def __post_init__(self) -> None:
        if self.layers is not None and not self.layers:
            raise ConfigError(f"layers={self.layers!r} is not allowed.",
                              hint="Give a non-empty tuple of block indices, e.g. layers=(0, 10, 29), or None for all.")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers={self.layers!r} repeats a layer.", hint="List each block once.")


# ------------------------------------------------------------------------------------------ math
@torch.no_grad()
def lens_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` tokens of softmax(logits).

    Args:
        logits: ``[..., V]`` lens (or output) logits.
        k: how many tokens to keep.

    Returns:
        ``(probs [..., k] float32, ids [..., k] int64)``, descending by probability.
    """
    p = torch.softmax(logits.float(), dim=-1)
    vals, ids = p.topk(min(k, p.shape[-1]), dim=-1)
    return vals, ids


@torch.no_grad()
def target_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Probability softmax(logits) gives each position's target token.

    Args:
        logits: ``[T, V]`` lens logits of one layer.
        target: ``[T]`` token ids (the model's final top-1 at each position).

    Returns:
        ``[T]`` float32 probabilities.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, target[:, None].to(lp.device)).squeeze(-1).exp()


# ------------------------------------------------------------------------------------------ result
@register_result
@dataclass(frozen=True, kw_only=True)
class LogitLensResult(Result):
    """Logit lens of one prompt.

    Arrays (CPU): ``top_ids``/``top_probs`` ``[L, T, k]`` (lens top-k per layer and position),
    ``target`` ``[L, T]`` (lens probability of the final top-1 token ``final_ids[t]``),
    ``next_ids``/``next_probs`` ``[T, k]`` (the model's own output top-k), ``token_ids`` ``[T]``.
    Labels: ``layers`` (axis 0, block indices), ``str_tokens`` (axis 1), ``top_strs`` ``[L][T][k]``
    and ``next_strs`` ``[T][k]`` (decoded tokens).
    """

    analysis: ClassVar[str] = "logit_lens"

    saved_views: ClassVar = (("table", "main", lambda r: r.to_frame()), ("table", "next", lambda r: r._next_long()))

    layers: list[int] = stored("extra")
    str_tokens: list[str] = stored("extra")
    token_ids: torch.Tensor = stored("array")
    top_ids: torch.Tensor = stored("array")
    top_probs: torch.Tensor = stored("array")
    target: torch.Tensor = stored("array")
    next_ids: torch.Tensor = stored("array")
    next_probs: torch.Tensor = stored("array")
    top_strs: list[list[list[str]]] = stored(None, read=lambda s: _read_top_strs(s))  # from the main table
    next_strs: list[list[str]] = stored(None, read=lambda s: _read_next_strs(s))  # from the next table

    @property
    def final_strs(self) -> list[str]:
        """The model's top-1 next token at each position (the heat map's colour target)."""
        return [row[0] for row in self.next_strs]

    # --- frames ------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Tidy lens table: one row per (layer, pos, rank); ``value`` is the lens probability."""
        L, T, k = self.top_ids.shape
        rows = []
        name = self.model.get("name")
        for li, layer in enumerate(self.layers):
            for t in range(T):
                for r in range(k):
                    rows.append((name, layer, t, self.str_tokens[t], r, int(self.top_ids[li, t, r]), self.top_strs[li][t][r],
                                 float(self.top_probs[li, t, r]), float(self.target[li, t])))
        return pd.DataFrame(rows, columns=["model", "layer", "pos", "token", "rank", "pred_id", "pred_token", "value",
                                           "final_token_prob"])

    def next_frame(self) -> pd.DataFrame:
        """The model's next-token top-k per position (wide: one row per position)."""
        T, k = self.next_ids.shape
        data: dict[str, list[Any]] = {"pos": list(range(T)), "token": list(self.str_tokens)}
        for r in range(k):
            data[f"top{r + 1}"] = [self.next_strs[t][r] for t in range(T)]
            data[f"p{r + 1}"] = [round(float(self.next_probs[t, r]), 4) for t in range(T)]
        return pd.DataFrame(data)

    def _next_long(self) -> pd.DataFrame:
        """The model's next-token top-k, one row per (pos, rank): ``pos, token, rank, pred_id, pred_token, value``."""
        T, k = self.next_ids.shape
        return pd.DataFrame([(t, self.str_tokens[t], r, int(self.next_ids[t, r]), self.next_strs[t][r], float(self.next_probs[t, r]))
                             for t in range(T) for r in range(k)],
                            columns=["pos", "token", "rank", "pred_id", "pred_token", "value"])

    # --- plot --------------------------------------------------------------------------------
    def plot(self, *, color: Literal["final", "top1"] = "final", max_label: int = 10, show_text: bool = True,
             positions: tuple[int, int] | None = None):
        """Interactive heat map, layers (rows, bottom = first block) x positions (columns).

        Args:
            color: ``"final"`` colours each cell by the lens probability of the model's final top-1
                token at that position; ``"top1"`` by the lens top-1 probability.
            max_label: truncate token labels to this many characters.
            show_text: write each cell's lens top-1 token in the cell.
            positions: ``(start, stop)``: draw only these positions (a readable window of a long prompt).
        """
        import plotly.graph_objects as go

        if color not in ("final", "top1"):
            raise ConfigError(f"color={color!r} is not allowed.", hint="Use 'final' or 'top1'.")
        L, T, k = self.top_ids.shape
        a, b = (0, T) if positions is None else (max(0, int(positions[0])), min(T, int(positions[1])))
        if a >= b:
            raise ConfigError(f"positions={positions!r} selects no position of {T}.", hint=f"Use 0 <= start < stop <= {T}.")
        cols = range(a, b)

        def short(s: str) -> str:
            s = s.replace("\n", "⏎").replace(" ", "␣") if s.strip() == "" else s.replace("\n", "⏎")
            return s if len(s) <= max_label else s[: max_label - 1] + "…"

        z = (self.target if color == "final" else self.top_probs[..., 0]).float().numpy()[:, a:b]
        xlab = [f"{t}:{short(self.str_tokens[t])}" for t in cols]
        ylab = [layer_label(layer) for layer in self.layers]
        hover = [[("<b>L%d · pos %d %r</b><br>final top-1 %r: p=%.3f<br>" % (layer, t, self.str_tokens[t], self.final_strs[t],
                                                                             float(self.target[li, t])))
                  + "<br>".join(f"{r + 1}. {self.top_strs[li][t][r]!r} {float(self.top_probs[li, t, r]):.3f}" for r in range(k))
                  for t in cols] for li, layer in enumerate(self.layers)]
        text = [[short(self.top_strs[li][t][0]) for t in cols] for li in range(L)]
        fig = go.Figure(go.Heatmap(
            z=z, x=list(cols), y=list(range(L)), customdata=hover, hovertemplate="%{customdata}<extra></extra>",
            text=text if show_text else None, texttemplate="%{text}" if show_text else None, textfont={"size": 9},
            colorscale="Blues", zmin=0.0, zmax=1.0,
            colorbar={"title": {"text": "p(final top-1)" if color == "final" else "p(top-1)"}},
        ))
        fig.update_layout(
            title=f"Logit lens · {self.model.get('name')} · colour = "
                  + ("lens probability of the model's final prediction" if color == "final" else "lens top-1 probability"),
            xaxis={"title": "position: input token", "tickmode": "array", "tickvals": list(cols), "ticktext": xlab,
                   "tickangle": -45},
            yaxis={"title": "layer (resid_post)", "tickmode": "array", "tickvals": list(range(L)), "ticktext": ylab},
            height=max(420, 18 * L + 160), margin={"l": 60, "r": 20, "t": 60, "b": 90},
        )
        return fig


def _read_top_strs(stored: store.StoredResult) -> list[list[list[str]]]:
    """``top_strs [L][T][k]`` back from the saved main table."""
    layers = [int(x) for x in stored.extra["layers"]]
    L, T, k = stored.arrays["top_ids"].shape
    main = stored.tables["main"].sort_values(["layer", "pos", "rank"])
    pos_of = {layer: i for i, layer in enumerate(layers)}
    top_strs = [[[""] * k for _ in range(T)] for _ in range(L)]
    for layer, t, r, s in zip(main["layer"], main["pos"], main["rank"], main["pred_token"].tolist()):
        top_strs[pos_of[int(layer)]][int(t)][int(r)] = s
    return top_strs


def _read_next_strs(stored: store.StoredResult) -> list[list[str]]:
    """``next_strs [T][k]`` back from the saved next table."""
    T, k = stored.arrays["next_ids"].shape
    next_strs = [[""] * k for _ in range(T)]
    nxt = stored.tables["next"]
    for t, r, s in zip(nxt["pos"], nxt["rank"], nxt["pred_token"]):
        next_strs[int(t)][int(r)] = s
    return next_strs


# ------------------------------------------------------------------------------------------ run
def _tokens(probe: Probe, prompt: str | torch.Tensor | Sequence[int], config: Config) -> torch.Tensor:
    """The prompt's token ids ``[1, T]`` (text is tokenized with ``config.prepend_bos``)."""
    if isinstance(prompt, str):
        return probe.to_tokens(prompt, prepend_bos=config.prepend_bos)
    tokens = torch.as_tensor(prompt)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise InputError(f"the logit lens takes one prompt; got token ids of shape {tuple(tokens.shape)}.",
                         hint="Pass a string or ids of shape [T] / [1, T].")
    return tokens


def _input_hash(tokens: torch.Tensor) -> str:
    """The input hash of a lens over ``tokens`` ``[1, T]``: the prompt's ids."""
    return store.hash_inputs(tokens[0].cpu())


def _prepare(probe: Probe, prompt: str | torch.Tensor | Sequence[int], *, config: Config) -> registry.Inputs:
    """The prompt's ids ``[1, T]`` and their hash (shared by :func:`run` and :data:`result_key`)."""
    if not isinstance(prompt, (str, torch.Tensor, list, tuple)):
        raise InputError(f"the logit lens takes a prompt (text or token ids), got {type(prompt).__name__}.",
                         hint="Pass a string, or ids of shape [T] / [1, T].")
    tokens = _tokens(probe, prompt, config)
    return registry.Inputs(_input_hash(tokens), tokens, registry.tokens_label(probe, tokens))


def run(probe: Probe, prompt: str | torch.Tensor | Sequence[int], *, config: Config = Config(),
        progress: ProgressFn | None = None) -> LogitLensResult:
    """Logit lens of one prompt (text, or token ids ``[T]`` / ``[1, T]``).

    One forward pass collects ``blocks.{l}.hook_resid_post`` for the chosen layers (``[1, T, d]``
    each, a few hundred KB for a short prompt); the residuals are then unembedded in row chunks so at
    most ~16M logits (64 MB) are alive at a time. ``progress`` receives
    :class:`~analyses.core.progress.Progress` events: phase ``forward`` (one pass), then ``unembedding`` (row chunks);
    an exception it raises stops the run there.
    """
    inp = SPEC.inputs(probe, prompt, config=config)
    tokens = inp.data
    n = probe.info.n_layers
    layers = list(config.layers) if config.layers is not None else list(range(n))
    bad = [layer for layer in layers if layer >= n]
    if bad:
        raise ConfigError(f"layers={tuple(layers)} includes {bad[0]}, but {probe.info.name} has {n} blocks (0..{n - 1}).",
                          hint=f"Pick block indices from 0 to {n - 1}, or layers=None for all.")
    timer = Timer()
    reads = {site("resid_post", layer).name: Collect(on_device=True) for layer in layers}  # no copy inside the hooks
    with timer("forward"):
        fwd = phase(progress, "forward", 1, "pass")
        out_logits = probe.run(tokens, reads=reads)
        fwd.advance()
    with timer("unembed"):
        next_probs, next_ids = lens_topk(out_logits[0], config.k)  # [T, k]
        final = next_ids[:, 0]
        resid = torch.stack([reads[site("resid_post", layer).name].finalize()[0].to(probe.device) for layer in layers])  # [L, T, d]
        L, T, d = resid.shape
        flat, tgt = resid.reshape(L * T, d), final.repeat(L)  # row l*T + t
        # unembed many rows per matmul: the [d, V] unembedding is read once per chunk, not once per layer
        step = max(1, _CHUNK_ELEMS // probe.info.d_vocab)
        tp, ti, tg = [], [], []
        bar = phase(progress, "unembedding", -(-L * T // step), "chunks")
        for s in range(0, L * T, step):
            lg = probe.unembed(flat[s:s + step], apply_norm=config.apply_norm)  # [rows, V]
            p, i = lens_topk(lg, config.k)
            tp.append(p)
            ti.append(i)
            tg.append(target_probs(lg, tgt[s:s + step].to(lg.device)))
            del lg
            bar.advance()
    kk = tp[0].shape[-1]
    # one device-to-host copy per array, after the last chunk
    top_probs, top_ids, target = (torch.cat(x).cpu() for x in (tp, ti, tg))
    top_probs, top_ids, target = top_probs.reshape(L, T, kk), top_ids.reshape(L, T, kk), target.reshape(L, T)
    ids_row = tokens[0].cpu()
    # decode each distinct id once (vocabularies are large, a heat map repeats tokens a lot)
    uniq = torch.unique(torch.cat([top_ids.reshape(-1), next_ids.reshape(-1).cpu()])).tolist()
    dec = dict(zip(uniq, probe.to_str_tokens(uniq)))
    top_strs = [[[dec[i] for i in row] for row in layer_ids] for layer_ids in top_ids.tolist()]
    next_strs = [[dec[i] for i in row] for row in next_ids.cpu().tolist()]
    return LogitLensResult(
        config=config, model=probe.info.to_dict(), input_hash=inp.hash, timings=timer.seconds, inputs=inp.label,
        layers=layers, str_tokens=probe.to_str_tokens(ids_row), token_ids=ids_row, top_ids=top_ids, top_probs=top_probs,
        target=target, next_ids=next_ids.cpu(), next_probs=next_probs.cpu(), top_strs=top_strs, next_strs=next_strs,
    )


def _sweep_run(probe, config: Config, *, prompt: str, **_: object) -> LogitLensResult:
    return run(probe, prompt, config=config)


def _sweep_rows(result: LogitLensResult) -> list[dict]:
    """Per layer: how often the lens's top-1 is the model's next token, and the mean p(final top-1)."""
    agree = (result.top_ids[:, :, 0] == result.next_ids[:, 0].unsqueeze(0)).float().mean(dim=1)
    return ([{"metric": "top1_agree", "layer": l, "head": None, "value": float(a)} for l, a in zip(result.layers, agree)]
            + [{"metric": "p_final", "layer": l, "head": None, "value": float(p)}
               for l, p in zip(result.layers, result.target.float().mean(dim=1))])


def _memory(s, B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    """The forward pass's output logits ``[1, T, V]`` stay alive beside every layer's collected residual ``[L, T, d]``
    (float32), and one chunk of unembedded rows (at most :data:`_CHUNK_ELEMS` logits, plus their softmax)."""
    return {"logits": T * s.d_vocab * 4, "resid_store": s.n_layers * T * s.d_model * 4,
            "lens_chunk": 2 * min(_CHUNK_ELEMS, s.n_layers * T * s.d_vocab) * 4}


MEMORY = planner.MemoryModel("logit_lens", _memory, persistent=("logits", "resid_store"), one_row=True)


SPEC = registry.register(registry.Analysis(
    name="logit_lens", order=0, title="Logit lens", summary="each layer's residual read through the unembedding",
    config=Config, result=LogitLensResult, run=run, prepare=_prepare, cli="logit-lens", page="model",
    memory=MEMORY, sweep=registry.Sweep(run=_sweep_run, rows=_sweep_rows),
))
result_key = SPEC.key  # the key run() gives these inputs, from the same _prepare
