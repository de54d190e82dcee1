"""The :class:`Probe`: one model object, whatever backend reads and edits its activations.

A probe owns the HF model, its tokenizer and a summary (:class:`ModelInfo`). Its one run method::

    logits = probe.run(tokens, reads={"blocks.3.hook_resid_post": Mean(dims=(0,))},
                       edits=[Ablate("blocks.5.attn.hook_z", heads=[3])])

streams each read site's tensor through its reducers (or hands it to a function) inside the hook and
applies the edits there. :meth:`Probe.decoder` decodes token by token over a KV cache with the same
edits, and :meth:`Probe.sample` draws rollouts (:mod:`probes.generation`).
Backends (:mod:`probes.tl`, :mod:`probes.nns`) only locate site tensors; edits, derived sites and
reducer updates happen here, so every backend computes the same statistics the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

from .arch import ArchSpec, arch_for, get_module
from .edits import Edit
from .errors import ConfigError, InputError, OutOfMemoryError, UnknownSiteError
from .reducers import Reducer
from .sites import Site, execution_order, parse_site

if TYPE_CHECKING:  # types of the weights and generation APIs (their modules are imported at call time)
    from collections.abc import Iterator
    from contextlib import AbstractContextManager as ContextManager
    from pathlib import Path

    from .generation import Decoder
    from .weights import AdaptedModel, Factor, LoraSpec, WeightSpec

__all__ = ["Probe", "ModelInfo", "Reads", "Read", "BACKENDS", "FEATURES", "Feature"]

BACKENDS = ("nnsight", "transformer_lens")
Read = Reducer | Callable[[torch.Tensor], None]  # a reducer, or a function called with the site's tensor
Reads = Mapping["str | Site", "Read | Sequence[Read]"]
Feature = Literal["resid_mid", "pattern", "pattern_edit", "gqa", "generate", "remote"]
FEATURES: tuple[str, ...] = Feature.__args__


@dataclass(frozen=True)
class ModelInfo:
    """Summary of a loaded model (all sizes are counts)."""

    name: str
    source: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_params: int
    positional: str
    parallel_blocks: bool
    dtype: str
    device: str
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_NOT_CONTENT = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def _fingerprint(model: torch.nn.Module) -> str:
    """Content hash of the config and a sample of every weight (cheap, stable across loads, folders and machines:
    where the weights were read from and which transformers wrote the config do not count)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_CONTENT}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(name.encode())
        h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _summary(model, name: str, source: str, arch: ArchSpec, fingerprint: str | None = None) -> ModelInfo:
    c = model.config
    n_heads = int(getattr(c, arch.n_heads_attr))
    n_kv = int(getattr(c, arch.n_kv_attr, None) or n_heads) if arch.n_kv_attr else n_heads
    d_model = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd"))
    d_head = int(getattr(c, "head_dim", None) or d_model // n_heads)
    d_mlp = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d_model)
    n_ctx = int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)
    positional = "learned" if arch.pos_embed else "rotary"
    p = next(model.parameters())
    n_params = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    n_layers = len(get_module(model, arch.layers))
    return ModelInfo(
        name=name, source=source, family=arch.family, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        d_model=d_model, d_head=d_head, d_mlp=d_mlp, d_vocab=int(c.vocab_size), n_ctx=n_ctx, n_params=n_params,
        positional=positional, parallel_blocks=arch.parallel, dtype=str(p.dtype).replace("torch.", ""),
        device=str(p.device), fingerprint=fingerprint or _fingerprint(model),
    )


class _Plan:
    """What one run does at each site: reducers to update and edits to apply, in execution order."""

    def __init__(self, probe: "Probe", reads: Reads | None, edits: Sequence[Edit], *, return_logits: bool = True):
        self.reads: dict[Site, list[Read]] = {}
        self.edits: dict[Site, list[Edit]] = {}
        n = probe.info.n_layers
        for key, reds in (reads or {}).items():
            s = parse_site(key, n)
            reds = [reds] if isinstance(reds, Reducer) or callable(reds) else list(reds)
            for r in reds:
                if not (isinstance(r, Reducer) or callable(r)):
                    raise ConfigError(f"reads[{s.name!r}] must be a Reducer or a function of the tensor (or a list of them), "
                                      f"got {type(r).__name__}.")
            self.reads.setdefault(s, []).extend(reds)
        for e in edits or ():
            if not isinstance(e, Edit):
                raise ConfigError(f"edits must be Edit objects (Ablate, Patch, AddVector, AttendTo ...), got {type(e).__name__}.")
            s = parse_site(e.site, n)
            self.edits.setdefault(s, []).append(e)
        for s in set(self.reads) | set(self.edits):
            probe._check_site(s)
        if any(s.kind == "result" for s in self.edits):
            raise ConfigError("hook_result is read-only; edit blocks.{L}.attn.hook_z (per-head) instead.")
        # False: nobody reads the logits, so a backend may compute them for the last position only
        self.all_logits = return_logits or any(s.kind == "logits" for s in self.sites())

    def sites(self) -> list[Site]:
        """Sites a backend must visit (``result`` is derived from ``z``)."""
        need = set(self.reads) | set(self.edits)
        need = {Site("z", s.layer) if s.kind == "result" else s for s in need}
        return sorted(need, key=execution_order)

    def pattern_mode(self, layer: int) -> str | None:
        s = Site("pattern", layer)
        if s in self.edits:
            return "edit"
        return "read" if s in self.reads else None


def _serialized(method: Callable) -> Callable:
    """Run ``method`` holding the probe's lock (see :meth:`Probe.session`)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Probe:
    """A loaded model with Sonde's read/edit API. Create it with :func:`probes.load_model`.

    A probe may be shared between threads (a dashboard's pages and its background runs): every method
    that runs the model (``run``, ``cache``, ``forward``, ``unembed``, a decoder's ``feed``, ``sample``) holds the probe's re-entrant lock,
    so forward passes never interleave and each sees only its own reads and edits. Hold
    :meth:`session` to make several calls one atomic step.
    """

    backend: str = "base"

    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any, *, name: str, source: str):
        self._lock = threading.RLock()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.arch = arch_for(hf_model)
        self.info = _summary(hf_model, name, source, self.arch)

    @contextlib.contextmanager
    def session(self):
        """Hold the probe's lock for several calls, so no other thread runs the model in between.

        The lock is re-entrant: the probe's own methods work inside. Code that drives ``probe.hf_model``
        directly (its own hooks, ``generate``) should run inside a session too::

            with probe.session():
                base = probe.run(tokens, reads=reads)
                edited = probe.run(tokens, edits=edits)
        """
        with self._lock:
            yield self

    # ----------------------------------------------------------------------------- features
    def supports(self, feature: Feature) -> bool:
        """Whether this probe has ``feature``, one of :data:`FEATURES`: ``resid_mid`` (sequential blocks),
        ``pattern`` (read attention patterns), ``pattern_edit``, ``gqa`` (fewer KV heads than query heads),
        ``generate`` (:meth:`decoder`, :meth:`sample`), ``remote`` (runs on NDIF)."""
        if feature not in FEATURES:
            import difflib

            close = difflib.get_close_matches(str(feature), FEATURES, n=1)
            raise ConfigError(f"unknown feature {feature!r}.",
                              hint=(f"Did you mean {close[0]!r}? " if close else "") + f"Features: {', '.join(FEATURES)}.")
        return {
            "resid_mid": self.arch.resid_mid is not None,
            "pattern": True,
            "pattern_edit": True,
            "gqa": self.info.n_kv_heads < self.info.n_heads,
            "generate": True,
            "remote": False,
        }[feature]

    def _check_site(self, s: Site) -> None:
        if s.kind == "resid_mid" and not self.supports("resid_mid"):
            raise UnknownSiteError(
                f"{s.name} does not exist in {self.info.family}: its blocks are parallel (attention and MLP read the same input).",
                hint="Use hook_resid_pre, hook_attn_out, hook_mlp_out and hook_resid_post.",
            )

    # ----------------------------------------------------------------------------- tokens
    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def to_tokens(self, text: str | Sequence[str], *, prepend_bos: bool | None = None,
                  max_length: int | None = None, padding_side: Literal["left", "right"] = "right",
                  truncate: bool = False) -> torch.Tensor:
        """Tokenize to ``[B, T]`` ids on the model's device.

        ``prepend_bos=None`` follows the tokenizer's default; ``True`` makes sure every row starts with
        BOS, ``False`` strips it. Several texts are padded (``padding_side``) with the pad token.
        A text longer than ``max_length`` tokens (default: the model's context) is refused, or cut to its
        first ``max_length`` tokens with ``truncate=True``. Either way only a prefix of a long text is
        tokenized (a few characters per allowed token), so a huge text costs no more than a short one.
        """
        if isinstance(text, (bytes, bytearray)) or text is None:
            raise InputError(f"to_tokens takes a string or a list of strings, not {type(text).__name__}.",
                             hint="Decode bytes first (text.decode('utf-8')).")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise InputError("no text was given.", hint="Pass a non-empty prompt.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise InputError(f"max_length={max_length!r}; give a positive number of tokens.")
        limit = max_length or self.info.n_ctx
        rows = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i} is a {type(t).__name__}, not a string.")
            if not t.strip():
                raise InputError("the prompt is empty." if len(texts) == 1 else f"text {i} is empty.", hint="Type a prompt with at least one word.")
            ids, whole = self._encode_prefix(t, limit)
            bos = self.bos_token_id
            if prepend_bos is True and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            elif prepend_bos is False and bos is not None and ids and ids[0] == bos:
                ids = ids[1:]
            if len(ids) > limit:
                if not truncate:
                    size = f"{len(ids)} tokens long" if whole else f"more than {limit} tokens long ({len(t)} characters)"
                    which = "" if len(texts) == 1 else f" {i}"
                    allowed = "this model takes at most" if max_length is None else "at most"
                    raise InputError(f"the prompt{which} is {size}; {allowed} {limit}{'' if max_length is None else ' are allowed'}.",
                                     hint="Shorten it (or pass a smaller text).")
                ids = ids[:limit]
            rows.append(ids)
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = torch.full((len(rows), T), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if padding_side == "right":
                out[i, : len(r)] = torch.tensor(r)
            else:
                out[i, T - len(r):] = torch.tensor(r)
        return out.to(self.device)

    #: tokens past the limit that a prefix must give before its first ``limit`` tokens are trusted to be those of
    #: the whole text (a cut only changes the tokens of the word it falls in)
    _PREFIX_MARGIN = 16

    def _encode_prefix(self, text: str, limit: int) -> tuple[list[int], bool]:
        """``(ids, whole)``: the ids of ``text``, or of a prefix of it that already gives more than ``limit`` tokens
        (``whole`` False; its first ``limit + 1`` ids are those of the whole text). The prefix starts at 8 characters per
        allowed token and grows fourfold, so a text far over the limit is never tokenized as a whole."""
        n = max(256, 8 * (limit + self._PREFIX_MARGIN))
        while n < len(text):
            ids = self.tokenizer(text[:n], add_special_tokens=True).input_ids
            if len(ids) > limit + self._PREFIX_MARGIN:
                return ids, False
            n *= 4
        return self.tokenizer(text, add_special_tokens=True).input_ids, True

    def to_str_tokens(self, tokens: torch.Tensor | Sequence[int]) -> list[str]:
        """Token strings of one row (as the tokenizer decodes each token alone)."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise InputError("to_str_tokens takes one row; index the batch first.")
            ids = ids[0]
        return [self.tokenizer.decode([i]) for i in ids]

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self.tokenizer.decode(ids)

    def chat(self, user: str, *, system: str | None = None) -> str:
        """The prompt text for one user turn under the model's chat template (plain text if it has none)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return user
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    # ----------------------------------------------------------------------------- weights
    def module(self, path: str, layer: int | None = None) -> torch.nn.Module:
        """A module by table path: ``probe.module(probe.arch.o_proj, layer=3)``."""
        if layer is None:
            return get_module(self.hf_model, path)
        return get_module(get_module(self.hf_model, self.arch.layers)[layer], path)

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of block ``layer``'s attention (keys at most this many positions back), or None: the
        attention module's own, else the config's when the config switches it on for every layer."""
        w = getattr(self.module(self.arch.attn, layer=layer), "sliding_window", None)
        if w is None:
            c = self.hf_model.config
            if getattr(c, "use_sliding_window", True) is not False and not hasattr(c, "layer_types"):
                w = getattr(c, "sliding_window", None)
        return int(w) if w else None

    def linear_weight(self, path: str, layer: int) -> torch.Tensor:
        """Weight of a block's projection as ``[out, in]`` (GPT-2's Conv1D transposed)."""
        w = self.module(path, layer).weight
        return w.T if self.arch.conv1d else w

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output projection ``[H, h, d]`` (head h's slice of o_proj's input columns)."""
        i = self.info
        w = self.linear_weight(self.arch.o_proj, layer)  # [d, H*h]
        return w.T.reshape(i.n_heads, i.d_head, w.shape[0])

    def b_O(self, layer: int) -> torch.Tensor | None:
        b = getattr(self.module(self.arch.o_proj, layer), "bias", None)
        return b

    def W_out(self, layer: int) -> torch.Tensor:
        """MLP output projection ``[F, d]`` (row n is neuron n's write direction)."""
        return self.linear_weight(self.arch.mlp_down, layer).T

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d, V]``."""
        return get_module(self.hf_model, self.arch.lm_head).weight.T

    @property
    def W_E(self) -> torch.Tensor:
        """Input embedding ``[V, d]``."""
        return get_module(self.hf_model, self.arch.embed).weight

    @_serialized
    @torch.no_grad()
    def unembed(self, resid: torch.Tensor, *, apply_norm: bool = True) -> torch.Tensor:
        """Logit lens: final norm then unembedding of a residual ``[..., d]`` -> ``[..., V]``."""
        x = resid.to(self.device, next(self.hf_model.parameters()).dtype)
        if apply_norm:
            x = get_module(self.hf_model, self.arch.final_norm)(x)
        logits = get_module(self.hf_model, self.arch.lm_head)(x)
        softcap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def weights(self, layers: Sequence[int] | None = None) -> "list[WeightSpec]":
        """The maskable block weight matrices (path, layer, name, storage shape); see :mod:`probes.weights`."""
        from .weights import block_weights

        return block_weights(self, layers)

    @contextlib.contextmanager
    def weight_masks(self, factors: "Mapping[str, Factor]") -> "Iterator[None]":
        """Context: each named weight is ``W ⊙ factor`` on both backends, restored exactly on exit.
        The block holds the probe's lock (:meth:`session`), so other threads never see masked weights.

        >>> with probe.weight_masks({w.path: keep[w.path] for w in probe.weights()}):
        ...     logits = probe.run(tokens)
        """
        from .weights import weight_masks

        with self._lock, weight_masks(self, factors):
            yield

    @contextlib.contextmanager
    def only_blocks(self, keep: Sequence[int]) -> "Iterator[None]":
        """Context: the HF forward runs only the blocks in ``keep`` (see :func:`probes.weights.only_blocks`);
        holds the probe's lock like :meth:`weight_masks`."""
        from .weights import only_blocks

        with self._lock, only_blocks(self, keep):
            yield

    def frozen_weights(self) -> "ContextManager[None]":
        """Context: no model parameter requires grad inside; the flags are restored on exit."""
        from .weights import frozen_weights

        return frozen_weights(self)

    @_serialized
    def trainable_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain forward with autograd on (no hooks, no KV cache) -> logits ``[B, T, V]``: for training
        masks or other parameters outside the model through :meth:`weight_masks`."""
        ids = torch.as_tensor(tokens).to(self.device)
        return self.hf_model(input_ids=ids, use_cache=False).logits

    def trainable_hidden(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Final normed hidden states ``[B, T, d]`` with autograd on (the decoder without its unembedding; no hooks, no
        KV cache), or None when the model's layout does not put the final norm inside the module that holds the
        blocks. With :meth:`unembedding` it gives the logits chunk by chunk, without a ``[B, T, V]`` tensor."""
        a = self.arch
        prefix = a.layers.rsplit(".", 1)[0] if "." in a.layers else ""
        if not prefix or not a.final_norm.startswith(prefix + ".") or a.lm_head.startswith(prefix + "."):
            return None
        ids = torch.as_tensor(tokens).to(self.device)
        with self.session():
            return get_module(self.hf_model, prefix)(input_ids=ids, use_cache=False)[0]

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """The output layer as ``(weight [V, d], bias [V] or None, logit soft-cap or None)``: the logits of a final
        hidden state ``h`` are ``softcap·tanh((h Wᵀ + b)/softcap)`` (plain ``h Wᵀ + b`` without a soft-cap)."""
        head = get_module(self.hf_model, self.arch.lm_head)
        return head.weight, getattr(head, "bias", None), getattr(self.hf_model.config, "final_logit_softcapping", None)

    def adapter_targets(self, names: Sequence[str]) -> list[str]:
        """The entries of ``names`` that name a module of this model (PEFT's suffix rule)."""
        from .weights import adapter_targets

        return adapter_targets(self, names)

    def adapted(self, lora: "LoraSpec") -> "AdaptedModel":
        """A trainable private copy of the model with a fresh LoRA adapter (the probe is untouched)."""
        from .weights import adapted

        return adapted(self, lora)

    def load_adapter(self, folder: "str | Path") -> "AdaptedModel":
        """A private copy of the model with a saved LoRA adapter (safetensors only), in eval mode."""
        from .weights import load_adapter

        return load_adapter(self, folder)

    def adapter_probe(self, folder: "str | Path") -> "Probe":
        """A new probe of this model with a saved LoRA adapter merged into a private copy of its weights."""
        from .weights import adapter_probe

        return adapter_probe(self, folder)

    # ----------------------------------------------------------------------------- running
    @_serialized
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Plain forward pass (no hooks) -> logits ``[B, T, V]``."""
        return self.hf_model(input_ids=self._ids(tokens), attention_mask=attention_mask).logits

    @_serialized
    def run(self, tokens: "torch.Tensor | str", reads: Reads | None = None, edits: Sequence[Edit] = (), *,
            attention_mask: torch.Tensor | None = None, return_logits: bool = True) -> torch.Tensor | None:
        """One forward pass that updates ``reads``' reducers and applies ``edits`` inside the hooks.

        Args:
            tokens: ids ``[B, T]`` (or ``[T]``; a tensor, an array or lists of ints), or a text, tokenized as
                ``to_tokens(text)`` does (the tokenizer's BOS rule).
            reads: site name (or :class:`Site`) -> a reducer, a function ``fn(x)`` called with the site's tensor
                inside the hook (after the edits; to stream a computation without keeping the tensor), or a list of them.
            edits: interventions (:mod:`probes.edits`).
            attention_mask: ``[B, T]`` padding mask (1 = real token), if the batch is padded.
            return_logits: return the logits ``[B, T, V]``; ``False`` returns ``None``.
        """
        plan = _Plan(self, reads, edits, return_logits=return_logits)
        ids = self._ids(tokens)
        try:
            with torch.no_grad():
                logits = self._run(ids, plan, attention_mask)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
            torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of GPU memory on a batch of {ids.shape[0]} x {ids.shape[1]} tokens.",
                hint="Use a smaller batch size (--batch-size) or shorter texts.",
            ) from e
        return logits if return_logits else None

    @_serialized
    def cache(self, tokens: torch.Tensor, sites: Iterable[str | Site], edits: Sequence[Edit] = ()) -> dict[str, torch.Tensor]:
        """Whole activations of a few sites for one (small) batch: ``{name: tensor}`` on the CPU."""
        from .reducers import Collect

        reds = {parse_site(s, self.info.n_layers): Collect() for s in sites}
        self.run(tokens, reads=reds, edits=edits, return_logits=False)
        return {s.name: r.finalize() for s, r in reds.items()}

    def decoder(self, edits: Sequence[Edit] = (), *, rows: Sequence[bool] | torch.Tensor | None = None) -> "Decoder":
        """An incremental decoder over a KV cache (:class:`probes.generation.Decoder`)::

            dec = probe.decoder(edits=[Ablate("blocks.1.attn.hook_z", heads=[0])], rows=[False, True])
            logits = dec.feed(prompt_ids)      # [B, s] -> next-token logits [B, V]
            logits = dec.feed(next_ids)        # [B], one token per row -> [B, V]
            branch = dec.fork(12, batch=4)     # copy of the first 12 tokens' cache, each row 4 times

        ``edits`` apply at every fed position to the rows where ``rows`` is True (all rows if None).
        """
        from .generation import Decoder

        return Decoder(self, edits, rows)

    def sample(self, tokens: Sequence[int], n: int, *, max_new_tokens: int, temperature: float = 1.0,
               top_p: float | None = None, top_k: int | None = None, seed: int = 0, batch_size: int = 64,
               eos: Iterable[int] | None = None, pad: int | None = None,
               stop: Callable[[list[int]], bool] | None = None, prefix_cache: bool = True,
               first: Sequence[int] | None = None,
               on_row: Callable[[int, list[int]], bool] | None = None) -> list[list[int] | None]:
        """``n`` sampled continuations (new ids per row, ending at EOS) of the prefix ``tokens`` in one batched decode
        loop over the prefix's KV cache computed once; row ``r`` samples from its own stream seeded by ``(seed, r)``.
        See :func:`probes.generation.sample`."""
        from .generation import sample

        return sample(self, tokens, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      seed=seed, batch_size=batch_size, eos=None if eos is None else list(eos), pad=pad, stop=stop,
                      prefix_cache=prefix_cache, first=first, on_row=on_row)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the generation config's ``eos_token_id`` (one id or several), else the tokenizer's."""
        gc = getattr(self.hf_model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None)
        if e is None:
            e = self.tokenizer.eos_token_id
        return tuple(sorted(set(e if isinstance(e, (list, tuple)) else [e]) - {None}))

    def _ids(self, tokens) -> torch.Tensor:
        """The ``[B, T]`` ids of what ``run`` was given: token ids (a tensor, array or list of ints, one row or a batch),
        or a text, tokenized as :meth:`to_tokens` does by default (the tokenizer's BOS rule)."""
        if isinstance(tokens, str):
            return self.to_tokens(tokens)
        if tokens is None or isinstance(tokens, (bytes, bytearray, dict, set)) or isinstance(tokens, float):
            raise InputError(f"run() takes token ids or a text, not {type(tokens).__name__}.",
                             hint="Pass probe.to_tokens(text), a [B, T] tensor of ids, or the text itself.")
        if isinstance(tokens, (list, tuple)):
            flat = [x for row in tokens for x in (row if isinstance(row, (list, tuple)) else [row])]
            if not flat or not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
                raise InputError("run() takes token ids (lists of ints, one row or a batch of equal rows) or a text.",
                                 hint="Tokenize texts with probe.to_tokens(...) first.")
        try:
            ids = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"tokens cannot be read as a [B, T] array of ids ({' '.join(str(e).split())}).",
                             hint="Pass equal-length rows of ints, or probe.to_tokens(texts).") from None
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"tokens must be integer ids of shape [B, T]; got {tuple(ids.shape)} {ids.dtype}.")
        if ids.numel() == 0:
            raise InputError("the token batch is empty.")
        if int(ids.max()) >= self.info.d_vocab or int(ids.min()) < 0:
            raise InputError(f"token ids must lie in 0..{self.info.d_vocab - 1}.")
        if ids.shape[1] > self.info.n_ctx:
            raise InputError(f"the input is {ids.shape[1]} tokens long; this model takes at most {self.info.n_ctx}.")
        return ids.to(self.device)

    def _visit(self, plan: _Plan, s: Site, x: torch.Tensor) -> torch.Tensor | None:
        """Called by a backend with a site's tensor (site layout). Returns the edited tensor or None."""
        new = None
        for e in plan.edits.get(s, ()):
            new = e.apply(x if new is None else new)
        cur = x if new is None else new
        for r in plan.reads.get(s, ()):
            r.update(cur) if isinstance(r, Reducer) else r(cur)
        if s.kind == "z":
            rs = plan.reads.get(Site("result", s.layer))
            if rs:
                res = torch.einsum("bthe,hed->bthd", cur.to(self.W_O(s.layer).dtype), self.W_O(s.layer))
                for r in rs:
                    r.update(res) if isinstance(r, Reducer) else r(res)
        return new

    def _run(self, ids: torch.Tensor, plan: _Plan, attention_mask: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        i = self.info
        return (f"<{type(self).__name__} {i.name} ({i.family}, {i.n_layers} layers, {i.n_heads} heads/{i.n_kv_heads} kv, "
                f"d={i.d_model}, {i.n_params / 1e6:.1f}M params) on {i.device}, {i.dtype}>")
