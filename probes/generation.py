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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Sequence

import torch

from .errors import ConfigError, InputError
from .sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Probe
    from .edits import Edit

__all__ = ["Decoder", "Rollouts", "sample", "sample_many", "row_seed", "warp", "draw", "DECODE_SITES"]

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


@dataclass
class Rollouts:
    """One prefix's rows in :func:`sample_many`: ``n`` continuations of ``tokens``, row ``r`` drawn from the stream
    seeded by ``(seed, r)``.

    Attributes:
        tokens: the prefix ids (one row).
        n: number of continuations (rows ``0..n-1``).
        seed: the group's seed (:func:`row_seed` mixes it with the row).
        first: one forced token per row (``n`` ids) fed after the prefix: row ``r`` continues ``tokens ⊕ first[r]``
            and its ids start with ``first[r]`` (``max_new_tokens`` sampled tokens follow it).
        stop: ``stop(new_ids) -> bool`` also ends a row (checked after every sampled token).
        on_row: ``on_row(r, ids) -> bool``, called as each row ends; True stops this group at once (its rows still
            decoding leave the batch and its later rows never start: they come back as None).
        max_new_tokens: this group's limit on sampled tokens per row (None: the call's).
    """

    tokens: Sequence[int]
    n: int
    seed: int = 0
    first: Sequence[int] | None = None
    stop: Callable[[list[int]], bool] | None = None
    on_row: Callable[[int, list[int]], bool] | None = None
    max_new_tokens: int | None = None


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
    the batch it ran in, on ``batch_size`` or on when other rows ended. :func:`sample_many` does the same for
    several prefixes in one batch.

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
    group = Rollouts(tokens, n, seed, first, stop, on_row)
    return sample_many(probe, [group], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       batch_size=batch_size, eos=eos, pad=pad, prefix_cache=prefix_cache)[0]


@torch.no_grad()
def sample_many(probe: "Probe", groups: Sequence[Rollouts], *, max_new_tokens: int, temperature: float = 1.0,
                top_p: float | None = None, top_k: int | None = None, batch_size: int = 64, chunk: int | None = None,
                eos: Collection[int] | None = None, pad: int | None = None,
                prefix_cache: bool = True) -> list[list[list[int] | None]]:
    """The rows of several prefixes (:class:`Rollouts`) sampled in shared batches: ``out[g][r]`` as :func:`sample`.

    Each batch takes up to ``chunk`` rows (default ``batch_size``) of every group that has rows left, in group
    order, at most ``batch_size`` rows in all. Prefixes of different lengths sit left-padded in one KV cache (each
    prefix's cache computed once, unpadded, and copied into its rows), with an attention mask over the padding and
    each row's own positions, so a row sees exactly its own prefix. Rows draw from their own streams, so a row's
    continuation does not depend on the other groups in its batch; the padding changes the arithmetic's order only
    (the logits agree to float rounding). Models whose cache cannot be padded (sliding-window or recurrent layers)
    run one group per batch.

    Args:
        groups: the prefixes and their rows.
        chunk: at most this many rows of one group per batch (None: ``batch_size``). A group whose ``on_row`` stops
            it early wastes at most one chunk's decoding.
        max_new_tokens, temperature, top_p, top_k, eos, pad, prefix_cache: as :func:`sample`.
    Returns:
        per group, one list of ids per row (None for rows its ``on_row`` left out).
    """
    if not probe.supports("generate"):
        raise ConfigError(f"{type(probe).__name__} cannot generate: the model's weights are not here.",
                          hint="Load the model locally to generate.")
    prepared = []
    for g in groups:
        ids = torch.tensor([list(g.tokens)], dtype=torch.long, device=probe.device)
        if ids.shape[1] == 0:
            raise InputError("sample() needs a non-empty prefix.")
        if g.first is not None and len(g.first) != g.n:
            raise InputError(f"first has {len(g.first)} ids for {g.n} rows.", hint="Give one forced token per row.")
        prepared.append(ids)
    eos = sorted(probe.eos_token_ids if eos is None else set(eos))
    if pad is None:
        pad = probe.tokenizer.pad_token_id if probe.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    with probe.session():  # one atomic step: no other thread runs the model between the prefills and the batches
        return _Engine(probe, list(groups), prepared, max_new_tokens, temperature, top_p, top_k, set(eos), prefix_cache).run(
            max(1, batch_size), max(1, chunk or batch_size))


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


class _Engine:
    """The batched decode loop of :func:`sample_many` (one call)."""

    def __init__(self, probe, groups, ids, max_new, temperature, top_p, top_k, eos, prefix_cache):
        self.probe, self.groups, self.eos, self.prefix_cache = probe, groups, eos, prefix_cache
        self.model = probe.hf_model
        self.kw_cache, self.keep = _cache_kw(self.model), last_logits_only(self.model)
        self.warp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new = [max_new if g.max_new_tokens is None else g.max_new_tokens for g in groups]
        # what a group's prefix cache holds: all its tokens with forced first tokens, else all but the last (fed per row)
        self.shared = [x if g.first is not None else x[:, :-1] for g, x in zip(groups, ids)]
        self.ids = ids
        self.out: list[list[list[int] | None]] = [[None] * g.n for g in groups]
        self.stopped = [False] * len(groups)
        self.bases: dict[int, Any] = {}
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        # prefixes of different lengths share a batch only in a cache of plain layers (no sliding window, no state)
        layers = getattr(DynamicCache(config=self.model.config), "layers", None)
        self.paddable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def prefill(self, g: int, rows: int) -> Any:
        from transformers import DynamicCache

        c = DynamicCache(config=self.model.config)
        if self.shared[g].shape[1]:
            self.model(input_ids=self.shared[g].expand(rows, -1), use_cache=True, **{self.kw_cache: c}, **self.keep)
        return c

    def base(self, g: int) -> Any:
        """Group ``g``'s one-row prefix cache, computed on first use and kept while its rows still start."""
        if g not in self.bases:
            self.bases[g] = self.prefill(g, 1)
        return self.bases[g]

    def report(self, g: int, r: int, ids: list[int]) -> None:
        self.out[g][r] = ids
        cb = self.groups[g].on_row
        if cb is not None and cb(r, ids):
            self.stopped[g] = True

    def run(self, batch_size: int, chunk: int) -> list[list[list[int] | None]]:
        nxt = [0] * len(self.groups)  # next row of each group to start
        while True:
            wave: list[tuple[int, int]] = []
            for g, grp in enumerate(self.groups):
                if self.stopped[g] or nxt[g] >= grp.n:
                    continue
                if wave and not self.paddable:
                    break  # this model's cache cannot hold two prefixes: one group per batch
                take = min(chunk, grp.n - nxt[g], batch_size - len(wave))
                wave += [(g, r) for r in range(nxt[g], nxt[g] + take)]
                nxt[g] += take
                if len(wave) >= batch_size:
                    break
            if not wave:
                return self.out
            self.decode(wave)
            for g in list(self.bases):  # a prefix whose rows have all started no longer needs its cache
                if self.stopped[g] or nxt[g] >= self.groups[g].n:
                    del self.bases[g]

    def cache_for(self, wave: list[tuple[int, int]]) -> tuple[Any, torch.Tensor | None]:
        """The batch's KV cache (rows in wave order) and its padding mask ``[B, S]`` (None when no row is padded)."""
        gs = [g for g, _ in wave]
        order = list(dict.fromkeys(gs))
        count = {g: gs.count(g) for g in order}
        if len(order) == 1:
            g = order[0]
            if not self.prefix_cache:
                return self.prefill(g, count[g]), None
            cache = copy.deepcopy(self.base(g))  # any cache type (sliding windows too): copied, never rebuilt
            if count[g] > 1 and cache.get_seq_length() > 0:
                cache.batch_repeat_interleave(count[g])
            return cache, None
        if self.prefix_cache:
            parts = {g: self.base(g) for g in order}
            rows = torch.tensor([order.index(g) for g in gs], device=self.probe.device)
        else:
            parts = {g: self.prefill(g, count[g]) for g in order}
            rows = torch.arange(len(gs), device=self.probe.device)
        from transformers import DynamicCache

        lens = {g: self.shared[g].shape[1] for g in order}
        S = max(lens.values())
        mask = None if min(lens.values()) == S else \
            torch.stack([torch.arange(S, device=self.probe.device) >= S - lens[g] for g in gs]).long()
        cache = DynamicCache(config=self.model.config)
        if S == 0:
            return cache, mask
        ref = next(parts[g] for g in order if lens[g])
        for li, layer in enumerate(ref.layers):
            ks, vs = [], []
            for g in order:
                if lens[g]:
                    pad = (0, 0, S - lens[g], 0)  # left: the prefix ends where every other row's does
                    ks.append(torch.nn.functional.pad(parts[g].layers[li].keys, pad))
                    vs.append(torch.nn.functional.pad(parts[g].layers[li].values, pad))
                else:  # an empty prefix (one token, fed per row): its rows hold padding only
                    b = 1 if self.prefix_cache else count[g]
                    ks.append(layer.keys.new_zeros((b, *layer.keys.shape[1:-2], S, layer.keys.shape[-1])))
                    vs.append(layer.values.new_zeros((b, *layer.values.shape[1:-2], S, layer.values.shape[-1])))
            cache.update(torch.cat(ks).index_select(0, rows), torch.cat(vs).index_select(0, rows), li)
        return cache, mask

    def decode(self, wave: list[tuple[int, int]]) -> None:
        dev = self.probe.device
        groups, eos = self.groups, self.eos
        if max(self.max_new[g] for g, _ in wave) == 0:
            for g, r in wave:
                if not self.stopped[g]:
                    self.report(g, r, [groups[g].first[r]] if groups[g].first is not None else [])
            return
        cache, mask = self.cache_for(wave)
        T = max(self.max_new[g] for g, _ in wave)
        u = torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(row_seed(groups[g].seed, r))) for g, r in wave])
        new = [[groups[g].first[r]] if groups[g].first is not None else [] for g, r in wave]
        x = torch.tensor([groups[g].first[r] if groups[g].first is not None else int(self.ids[g][0, -1]) for g, r in wave], device=dev)
        pos = torch.tensor([self.shared[g].shape[1] for g, _ in wave], device=dev)  # where each row's next token sits
        live = list(range(len(wave)))  # wave indices still decoding, in cache order
        for t in range(T):
            kw: dict[str, Any] = {}
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                kw = dict(attention_mask=mask, position_ids=(pos + t)[:, None])
            logits = self.model(input_ids=x[:, None], use_cache=True, **{self.kw_cache: cache}, **self.keep, **kw).logits[:, -1].float()
            tok = draw(warp(logits, **self.warp), u[live, t]).tolist()
            gone = set()
            for j, i in enumerate(live):
                g, r = wave[i]
                if self.stopped[g]:
                    gone.add(j)
                    continue
                new[i].append(tok[j])
                stop = groups[g].stop
                if tok[j] in eos or t + 1 >= self.max_new[g] or (stop is not None and stop(new[i])):
                    gone.add(j)
                    self.report(g, r, new[i])
            gone |= {j for j, i in enumerate(live) if self.stopped[wave[i][0]]}  # a group stopped: its other rows leave
            if len(gone) == len(live):
                return
            if gone:  # drop the ended rows from the batch and from its cache
                keep_j = [j for j in range(len(live)) if j not in gone]
                sel = torch.tensor(keep_j, device=dev)
                cache.batch_select_indices(sel)
                if mask is not None:
                    mask, pos = mask[sel], pos[sel]
                live = [live[j] for j in keep_j]
                tok = [tok[j] for j in keep_j]
            x = torch.tensor(tok, device=dev)
