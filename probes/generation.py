"""Incremental generation: a KV-cache :class:`Decoder` with per-row edits, and batched sampling of rollouts.

A decoder feeds tokens on top of what it has already seen and returns the next-token logits::

    dec = probe.decoder(edits=[Ablate("blocks.1.attn.hook_z", heads=[0])], rows=[False, True])
    logits = dec.feed(prompt_ids)              # [B, s] prompt -> [B, V] logits at its last position
    logits = dec.feed(next_ids)                # [B] one token per row -> [B, V]
    branch = dec.fork(12, batch=4)             # a copy of the first 12 tokens' cache, each row 4 times

Edits act on the rows where ``rows`` is True (all rows if ``rows`` is None) at every position fed, so
a decoder with edits gives the logits of a full :meth:`Probe.run` with the same edits, one token at a
time. They are applied by hooks on the model's own modules (the KV cache lives there), which is why the
sites they can target are the module inputs and outputs: ``hook_embed``, ``hook_resid_pre|mid|post``,
``attn.hook_z`` (per head), ``hook_attn_out``, ``mlp.hook_pre|post``, ``hook_mlp_out``,
``ln_final.hook_normalized`` and ``hook_logits``; attention patterns and q/k/v cannot be edited here.

A model that leaves the cache empty (the TransformerLens bridge wraps the HF attention and ignores it)
is detected on the first feed: the decoder then re-runs the whole sequence at every feed, which gives
the same logits more slowly, and :meth:`Decoder.fork` returns None (there is no cache to copy).

:func:`sample` draws many continuations of one prefix in one batched decode loop: the prefix's KV cache is
computed once and copied into every batch, rows leave the batch as they end (a caller may stop the whole call
once it has what it needs), and each row samples from its own seeded random stream with transformers' warpers
(temperature, top-k, top-p) and exact inverse-CDF draws, so a row's continuation does not depend on its batch.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Sequence

import torch

from .errors import ConfigError, InputError
from .sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Probe
    from .edits import Edit

__all__ = ["Decoder", "sample", "row_seed", "warp", "draw", "DECODE_SITES"]

# site kinds a decode-time edit can target: the module (by ArchSpec path) and which end of it carries the tensor
DECODE_SITES = ("embed", "resid_pre", "z", "attn_out", "resid_mid", "mlp_pre", "mlp_post", "mlp_out", "resid_post",
                "ln_final", "logits")


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` in current transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """Forward keywords that make ``model`` compute the last position's logits only (``logits_to_keep=1`` where its
    forward takes it, else none): for passes that read no other position's logits."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _module_site(probe: "Probe", s: Site) -> tuple[torch.nn.Module, str, tuple[int, int] | None]:
    """(module, 'input'|'output', per-head split) carrying site ``s`` in the HF module tree."""
    a, L, i = probe.arch, s.layer, probe.info
    if s.kind == "embed":
        return probe.module(a.embed), "output", None
    if s.kind in ("resid_pre", "resid_post"):
        return probe.module(a.layers)[L], "input" if s.kind == "resid_pre" else "output", None
    if s.kind == "z":
        return probe.module(a.o_proj, L), "input", (i.n_heads, i.d_head)
    if s.kind == "mlp_post":
        return probe.module(a.mlp_down, L), "input", None
    if s.kind in ("attn_out", "resid_mid", "mlp_pre", "mlp_out"):
        path, which = getattr(a, s.kind)
        return probe.module(path, L), which, None
    if s.kind == "ln_final":
        return probe.module(a.final_norm), "output", None
    if s.kind == "logits":
        return probe.module(a.lm_head), "output", None
    raise ConfigError(f"{s.name} cannot be edited while decoding with a KV cache: only module inputs and outputs can.",
                      hint=f"Edit one of the kinds {', '.join(DECODE_SITES)} (e.g. blocks.{{L}}.attn.hook_z with heads=), "
                           "or run the whole sequence with probe.run(tokens, edits=...).")


class Decoder:
    """Incremental decoding over a KV cache; create it with :meth:`Probe.decoder`.

    Args:
        probe: the model.
        edits: interventions applied at every fed position (:mod:`probes.edits`; no ``positions=``).
        rows: ``[B]`` booleans: the rows the edits apply to (None: every row).

    Attributes:
        tokens: ``[B, n]`` every token fed so far (None before the first feed).
    """

    def __init__(self, probe: "Probe", edits: Sequence["Edit"] = (), rows: Sequence[bool] | torch.Tensor | None = None):
        from .backend import _Plan

        if not probe.supports("generate"):
            raise ConfigError(f"{type(probe).__name__} cannot decode: the model's weights are not here.",
                              hint="Load the model locally to generate.")
        plan = _Plan(probe, None, edits)
        for s, es in plan.edits.items():
            for e in es:
                if getattr(e, "positions", None) is not None:
                    raise ConfigError(f"{type(e).__name__} at {s.name} has positions={e.positions!r}; a decoder applies edits at every "
                                      "fed position, and positions would count from the start of each feed.",
                                      hint="Drop positions= (or run the whole sequence with probe.run(tokens, edits=...)).")
        self.probe = probe
        self.edits: tuple["Edit", ...] = tuple(edits)
        self._sites = [(_module_site(probe, s), es) for s, es in plan.edits.items()]
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.bool).reshape(-1)
        self._editors: list[Callable[[torch.Tensor], torch.Tensor]] | None = None
        self.tokens: torch.Tensor | None = None
        self.cache: Any = None
        self._no_cache = False  # set when the model turned out to ignore the cache
        model = probe.hf_model
        self._kw = _cache_kw(model)
        self._keep = last_logits_only(model)

    @property
    def length(self) -> int:
        """Tokens fed so far (per row)."""
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    @torch.no_grad()
    def feed(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed ``ids`` (``[B, s]``, or ``[B]`` for one token per row) and return the logits ``[B, V]`` after the last one."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.probe.device)
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"feed() takes token ids [B, s] (or [B]); got shape {tuple(ids.shape)}.")
        if self.tokens is not None and ids.shape[0] != self.tokens.shape[0]:
            raise InputError(f"feed() got {ids.shape[0]} rows; this decoder holds {self.tokens.shape[0]}.")
        if self.rows is not None and self.rows.numel() != ids.shape[0]:
            raise ConfigError(f"rows has {self.rows.numel()} entries for a batch of {ids.shape[0]} rows.", hint="Give one boolean per row.")
        if self.length + ids.shape[1] > self.probe.info.n_ctx:
            raise InputError(f"the sequence would be {self.length + ids.shape[1]} tokens; this model takes at most {self.probe.info.n_ctx}.")
        self.tokens = ids if self.tokens is None else torch.cat([self.tokens, ids], dim=1)
        model = self.probe.hf_model
        with self.probe.session(), self._hooks():  # the hooks sit on shared modules: no other run may see them
            if self._no_cache:
                return model(input_ids=self.tokens).logits[:, -1]
            if self.cache is None:
                from transformers import DynamicCache

                self.cache = DynamicCache(config=model.config)
            past = self.cache.get_seq_length()
            kw = {self._kw: self.cache, "use_cache": True, **self._keep}
            out = model(input_ids=ids, **kw)  # the cache object is updated in place
        if self.cache.get_seq_length() != past + ids.shape[1]:
            # the model ignores the cache (only possible on the first feed: a cache that grew once keeps growing)
            self._no_cache, self.cache = True, None
        return out.logits[:, -1]

    def fork(self, length: int, batch: int = 1) -> "Decoder | None":
        """A new decoder holding a copy of the cache of the first ``length`` tokens, each row repeated ``batch`` times
        (row b becomes rows ``b*batch .. b*batch+batch-1``), with the same edits (and ``rows`` repeated alike).

        None when there is no cache to cut exactly: nothing fed, a model that ignores the cache,
        ``length`` outside ``1..self.length``, or sliding-window layers (they keep only a window).
        """
        c = self.cache
        if c is None or not 1 <= length <= self.length or c.get_seq_length() < length:
            return None
        sliding = getattr(c, "is_sliding", None)
        if isinstance(sliding, (list, tuple)) and any(sliding):
            return None
        c = copy.deepcopy(c)
        extra = c.get_seq_length() - length
        if extra:
            c.crop(-extra)  # negative = tokens to remove (the form every transformers version accepts)
        if c.get_seq_length() != length:
            return None
        if batch > 1:
            c.batch_repeat_interleave(batch)
        rows = None if self.rows is None else self.rows.repeat_interleave(batch)
        new = Decoder(self.probe, self.edits, rows)
        new.cache = c
        new.tokens = self.tokens[:, :length].repeat_interleave(batch, dim=0)
        return new

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = []
        rows = self.rows
        if self._sites and (rows is None or bool(rows.any())):
            if self._editors is None:
                self._editors = [_editor(edits, heads, rows) for (_, _, heads), edits in self._sites]
            for ((module, which, heads), edits), fn in zip(self._sites, self._editors):
                if which == "input":
                    def pre(mod, args, kwargs, fn=fn):
                        if args:
                            return (fn(args[0]), *args[1:]), kwargs
                        key = next(iter(kwargs))  # called by keyword (hidden_states=...)
                        return args, {**kwargs, key: fn(kwargs[key])}
                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(mod, args, out, fn=fn):
                        if isinstance(out, tuple):
                            return (fn(out[0]), *out[1:])
                        return fn(out)
                    handles.append(module.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _editor(edits: Sequence["Edit"], heads: tuple[int, int] | None, rows: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a hook applies to a module's tensor: site layout, the edits in order, only the chosen rows."""

    on_device: dict[torch.device, torch.Tensor] = {}  # the row mask moved once per device, not at every step

    def fn(x: torch.Tensor) -> torch.Tensor:
        view = x.view(*x.shape[:-1], *heads) if heads else x
        new = view
        for e in edits:
            new = e.apply(new)
        if rows is not None:
            r = on_device.get(x.device)
            if r is None:
                r = on_device[x.device] = rows.to(x.device)
            new = torch.where(r.view(-1, *([1] * (view.ndim - 1))), new, view)
        return new.reshape(x.shape)

    return fn


@torch.no_grad()
def sample(probe: "Probe", tokens: Sequence[int], n: int, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float | None = None, top_k: int | None = None, seed: int = 0, batch_size: int = 64,
           eos: Collection[int] | None = None, pad: int | None = None,
           stop: Callable[[list[int]], bool] | None = None, prefix_cache: bool = True,
           first: Sequence[int] | None = None,
           on_row: Callable[[int, list[int]], bool] | None = None) -> list[list[int] | None]:
    """``n`` sampled continuations of one prefix: the new token ids of each row (ending at its EOS, if any).

    One batched decode loop: the prefix's KV cache is computed once and copied into each batch of rows (the
    batches run one after another), a row leaves the batch (and its cache) as soon as it ends, and each row draws
    its tokens from its own random stream, so row ``r``'s continuation depends on ``seed`` and ``r`` only, never on
    the batch it ran in, on ``batch_size`` or on when other rows ended.

    Args:
        probe: the model.
        tokens: the prefix ids (one row).
        n: number of continuations (rows ``0..n-1``).
        max_new_tokens: at most this many sampled tokens per row.
        temperature, top_p, top_k: the sampler (transformers' warpers: temperature, then top-k, then top-p; None: no
            cut). A token is drawn by inverting the cumulative distribution at a uniform number from the row's stream
            (``torch.Generator`` seeded from ``(seed, r)``), which is exact categorical sampling; the caller's RNG is
            untouched.
        eos: ids that end a row (default :attr:`Probe.eos_token_ids`); the EOS id is the row's last id.
        pad: accepted for callers of the padded form; rows are never padded (an ended row leaves the batch).
        stop: ``stop(new_ids) -> bool`` also ends a row (checked after every sampled token).
        prefix_cache: compute the prefix's KV cache (all tokens but the last; with ``first``, all tokens) once and
            copy it into every batch; False runs the prefix again for every batch (rows repeated).
        first: one forced token per row (``n`` ids) fed after the prefix: row ``r`` continues ``tokens ⊕ first[r]``
            and its ids start with ``first[r]`` (``max_new_tokens`` sampled tokens follow it).
        on_row: ``on_row(r, ids) -> bool``, called as each row ends; True stops the whole call at once (rows not yet
            ended are left out).
    Returns:
        one list of ids per row; ``None`` for rows that ``on_row`` left out.
    """
    if not probe.supports("generate"):
        raise ConfigError(f"{type(probe).__name__} cannot generate: the model's weights are not here.",
                          hint="Load the model locally to generate.")
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=probe.device)
    if ids.shape[1] == 0:
        raise InputError("sample() needs a non-empty prefix.")
    if first is not None and len(first) != n:
        raise InputError(f"first has {len(first)} ids for {n} rows.", hint="Give one forced token per row.")
    eos = sorted(probe.eos_token_ids if eos is None else set(eos))
    if pad is None:
        pad = probe.tokenizer.pad_token_id if probe.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    with probe.session():  # one atomic step: no other thread runs the model between the prefill and the batches
        return _sample(probe, ids, n, max_new_tokens, temperature, top_p, top_k, seed, max(1, batch_size), set(eos), pad, stop,
                       prefix_cache, None if first is None else list(first), on_row)


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row``'s random stream in :func:`sample` (a 63-bit mix of the two, so nearby seeds and rows
    give unrelated streams)."""
    x = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """transformers' sampling warpers on ``[B, V]`` float logits: divide by ``temperature``, keep the ``top_k`` largest
    (ties with the k-th kept), then the smallest set whose probability reaches ``top_p`` (at least one token); removed
    tokens get ``-inf``."""
    x = logits / temperature if temperature != 1.0 else logits
    if top_k:
        k = min(int(top_k), x.shape[-1])
        x = x.masked_fill(x < torch.topk(x, k, dim=-1).values[..., -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(x, descending=False, dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1:] = False
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical draws ``[B]`` from warped logits ``[B, V]`` by inverting the cumulative distribution at uniforms
    ``u`` ``[B]`` in [0, 1): token ``i`` is drawn for ``u`` in ``[F(i-1), F(i))`` (float64 sums), so with uniform ``u`` it
    comes with probability ``p_i`` exactly as from ``torch.multinomial``; a token of probability 0 is never drawn."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    x = (u.double().to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def _sample(probe, ids, n, max_new_tokens, temperature, top_p, top_k, seed, batch_size, eos, pad, stop, prefix_cache, first, on_row):
    from transformers import DynamicCache

    model = probe.hf_model
    kw_cache = _cache_kw(model)
    keep = last_logits_only(model)
    shared = ids if first is not None else ids[:, :-1]  # what the prefix cache holds; then one token per row is fed
    out: list[list[int] | None] = [None] * n

    def prefill(rows: int) -> Any:
        c = DynamicCache(config=model.config)
        if shared.shape[1]:
            model(input_ids=shared.expand(rows, -1), use_cache=True, **{kw_cache: c}, **keep)
        return c

    base = prefill(1) if prefix_cache else None
    for start in range(0, n, batch_size):
        rows = list(range(start, min(n, start + batch_size)))
        m = len(rows)
        if base is not None:
            cache = copy.deepcopy(base)
            if m > 1 and cache.get_seq_length() > 0:
                cache.batch_repeat_interleave(m)
        else:
            cache = prefill(m)
        u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(row_seed(seed, r))) for r in rows])
        new: list[list[int]] = [[first[r]] if first is not None else [] for r in rows]
        x = torch.tensor([first[r] for r in rows] if first is not None else [int(ids[0, -1])] * m, device=ids.device)
        live = list(range(m))  # positions in this batch still decoding, in cache order
        halted = False
        for t in range(max_new_tokens):
            logits = model(input_ids=x[:, None], use_cache=True, **{kw_cache: cache}, **keep).logits[:, -1].float()
            tok = draw(warp(logits, temperature, top_k, top_p), u[live, t]).tolist()
            ended = []
            for j, i in enumerate(live):
                new[i].append(tok[j])
                if tok[j] in eos or t + 1 == max_new_tokens or (stop is not None and stop(new[i])):
                    ended.append(j)
            for j in ended:
                i = live[j]
                out[rows[i]] = new[i]
                if on_row is not None and on_row(rows[i], new[i]):
                    halted = True
                    break
            if halted or len(ended) == len(live):
                break
            if ended:  # drop the ended rows from the batch and from its cache
                gone = set(ended)
                keep_j = [j for j in range(len(live)) if j not in gone]
                cache.batch_select_indices(torch.tensor(keep_j, device=ids.device))
                live = [live[j] for j in keep_j]
                tok = [tok[j] for j in keep_j]
            x = torch.tensor(tok, device=ids.device)
        if max_new_tokens == 0:
            for i in range(m):
                out[rows[i]] = new[i]
                if on_row is not None and on_row(rows[i], new[i]):
                    halted = True
                    break
        del cache
        if halted:
            break
    return out
