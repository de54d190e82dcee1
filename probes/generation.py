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

:func:`sample` draws many continuations of one prefix with the model's own sampler (transformers'
``generate``: temperature, top-k, top-p, multinomial), the prefix's KV cache computed once and copied
into every batch, each batch under its own torch seed in a forked RNG.
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

__all__ = ["Decoder", "sample", "DECODE_SITES"]

# site kinds a decode-time edit can target: the module (by ArchSpec path) and which end of it carries the tensor
DECODE_SITES = ("embed", "resid_pre", "z", "attn_out", "resid_mid", "mlp_pre", "mlp_post", "mlp_out", "resid_post",
                "ln_final", "logits")


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` in current transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

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
            kw = {self._kw: self.cache, "use_cache": True}
            if self._keep:
                kw["logits_to_keep"] = 1
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
           stop: Callable[[list[int]], bool] | None = None, prefix_cache: bool = True) -> list[list[int]]:
    """``n`` sampled continuations of one prefix: new token ids per row (after EOS, rows are filled with ``pad``).

    Args:
        probe: the model.
        tokens: the prefix ids (one row).
        n: number of continuations.
        max_new_tokens: at most this many new tokens per row.
        temperature, top_p, top_k: the sampler (None: no top-p / top-k cut).
        seed: batch ``b`` (of ``batch_size`` rows) samples under ``torch.manual_seed(seed + b)`` in a forked RNG
            (the caller's RNG is untouched).
        eos: ids that end a row (default :attr:`Probe.eos_token_ids`).
        pad: the filler after a row ends (default the tokenizer's pad token, else the first EOS id).
        stop: ``stop(new_ids) -> bool`` also ends a row (checked after every step).
        prefix_cache: compute the KV cache of the prefix (all tokens but the last) once and copy it into every batch.
    """
    if not probe.supports("generate"):
        raise ConfigError(f"{type(probe).__name__} cannot generate: the model's weights are not here.",
                          hint="Load the model locally to generate.")
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=probe.device)
    T = ids.shape[1]
    if T == 0:
        raise InputError("sample() needs a non-empty prefix.")
    eos = sorted(probe.eos_token_ids if eos is None else set(eos))
    if pad is None:
        pad = probe.tokenizer.pad_token_id if probe.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    with probe.session():  # one atomic step: no other thread runs the model between the prefill and the batches
        return _sample(probe, ids, n, max_new_tokens, temperature, top_p, top_k, seed, batch_size, eos, pad, stop, prefix_cache)


def _sample(probe, ids, n, max_new_tokens, temperature, top_p, top_k, seed, batch_size, eos, pad, stop, prefix_cache):
    from transformers import DynamicCache, StoppingCriteriaList

    model, T = probe.hf_model, ids.shape[1]
    kw_cache = _cache_kw(model)
    base = None
    if prefix_cache and T > 1:
        base = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], use_cache=True, **{kw_cache: base})
    out: list[list[int]] = []
    devices = [probe.device] if probe.device.type == "cuda" else []
    for b, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        kw: dict[str, Any] = {}
        if base is not None:
            c = copy.deepcopy(base)
            c.batch_repeat_interleave(m)
            kw[kw_cache] = c
        if stop is not None:
            kw["stopping_criteria"] = StoppingCriteriaList([_Stop(stop, T)])
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + b)
            gen = model.generate(input_ids=ids.expand(m, -1), attention_mask=torch.ones(m, T, dtype=torch.long, device=ids.device),
                                 do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos or None, **kw)
        out.extend(gen[:, T:].tolist())
    return out


class _Stop:
    """transformers stopping criterion from a per-row ``stop(new_ids) -> bool``."""

    def __init__(self, stop: Callable[[list[int]], bool], start: int):
        self.stop, self.start = stop, start

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kw) -> torch.Tensor:
        return torch.tensor([bool(self.stop(row[self.start:])) for row in input_ids.tolist()], dtype=torch.bool, device=input_ids.device)
