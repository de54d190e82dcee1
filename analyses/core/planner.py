"""Memory planner: estimate a run's peak memory, pick the largest batch or chunk that fits, retry on OOM.

The estimate is arithmetic on the model's sizes (no model is run), so it also works for a model that
is only known by its config (built on the meta device). All sizes are bytes; ``B`` = batch rows,
``T`` = sequence length, ``L`` layers, ``H`` query heads, ``K`` key/value heads, ``h`` head size,
``d`` residual width, ``F`` MLP width, ``V`` vocabulary, ``a`` bytes per activation element.

Peak = weights + activations, where the activations of an inference pass (no autograd) are the live
residual stream plus the largest transient of any one step (each term is one line in
:func:`estimate`'s ``parts``):

* ``resid``: ``3·B·T·d·a`` (the residual, its normed copy and a block's output are alive together);
* ``attn``: ``2·B·T·(H + 2K)·h·a`` (q, k, v and their head-major copies);
* ``mlp``: ``3·B·T·F·a`` (gate, up and their product);
* ``logits``: ``B·T·V·a`` (the last step of every forward pass);

Each analysis declares its own terms with its :class:`MemoryModel` (``memory=`` of its
:class:`analyses.core.registry.Analysis`, every registered analysis has one), beside the code whose memory they
describe, together with the sizes its config gives (``sizes``) and the setting a plan may lower (``batch_field``):

* sinks (:data:`analyses.sinks.MEMORY`): the attention probabilities recomputed in float32 from q/k per layer
  (``pattern``: ``4·B·H·T²·4``) and each head's ``v_h W_O,h`` (``value_norm``: ``B·T·H·d·4``); dormant
  (:data:`analyses.dormant.MEMORY`) adds the next-token loss's float32 log-softmax beside the ``[B, T, V]`` logits, and
  component plans the dormant run of its fresh sink map;
* routes (:data:`analyses.routes.MEMORY`, one model for both modes, its terms chosen by the config's ``mode``): all
  positions keep the ``[L, T, T, H]`` importances beside one layer's pattern and one proximity chunk (eager:
  ``[Q, k, H, d]`` parts, ``Q`` queries by :func:`analyses.routes._chunk_size`, the rule the kernel itself uses; fused:
  ``[Q, T, H]``); top-down keeps each layer's residuals, q, k and v and the visited rows; the plan lowers the chunk
  budget, not a batch;
* counterfactual and the bias sweep (:func:`analyses.counterfactual.sampling_memory`): every decoded row's cache
  (``2·L·B·K·h·(T + new_tokens)·a``) and the sampler's ``[B, V]`` tensors;
* critical (:data:`analyses.critical.MEMORY`, the rollout engine): no ``[B, T]`` forward pass; the batch's KV cache
  over prompt, response prefix and rollout, the shared prefix's one-row cache, and the larger of the one-row
  prefill and one decode step;
* the logit lens (:data:`analyses.logit_lens.MEMORY`): the output logits beside every layer's residual and one
  chunk of unembedded rows;
* bigram (:data:`analyses.bigram.MEMORY`, mask training with autograd; ``B`` = rows per micro-batch): per-layer
  saved activations ``L·B·T·(6d + 3F)·a``, the mask logits, their gradients and AdamW moments
  (``4 × block params × 4``) and one chunk of the chunked loss (``2·chunk·V·4``; no ``[B, T, V]`` tensor, and
  no masked weight kept between a forward pass and its backward pass); ``bigram-eval``
  (:data:`analyses.bigram.EVAL_MEMORY`, declared as a further verb of bigram): the variants' masks and the batch's dense
  bigram targets;
* fiber (:data:`analyses.fiber.MEMORY`, no forward pass): the kNN block ``[block_size, V]`` and every tested
  token's neighbour radii and ids; bb-toy (:data:`analyses.bbtoy.MEMORY`): the toy it trains (no model loads).

:func:`plan_config` plans every ``sonde run`` verb from the model's config before its weights are loaded
(:func:`analyses.cli.common.planned`): it lowers the batch (bigram: the micro-batch, the step stays the configured
batch; bigram-eval: the held-out rows per pass; fiber: the kNN block; routes: the chunk budget) and says so, or
refuses with the largest setting that fits. ``sonde plan`` prints the same plan without running anything. The free
memory it reads is capped by ``$SONDE_MEMORY_LIMIT`` when set (e.g. ``4GiB``).

The test suite measures the real peak resident memory of each analysis on the embedded model at two sizes
(``tests/test_planner_peaks.py``) and checks the estimate against it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import torch

from probes.errors import ConfigError, OutOfMemoryError

__all__ = ["MemoryModel", "FORWARD", "GENERATE", "memory_model", "kinds", "ModelShape", "shape_of", "Estimate", "Plan", "estimate", "plan", "preflight", "plan_config", "generating", "tokens_bound", "longest_fitting", "free_memory", "retry_on_oom",
           "is_oom", "format_bytes", "parse_bytes"]

T_ = TypeVar("T_")

GiB = 2**30
MiB = 2**20
_OVERHEAD = 16 * MiB  # kernels' workspaces and allocator slack (CPU: a 1 x 64 forward of the embedded model peaks at 20 MiB)
_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- model sizes
@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The sizes an estimate needs (counts; ``itemsize`` = bytes per weight/activation element)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_params: int
    itemsize: int = 4
    n_ctx: int | None = field(default=None, compare=False)  # context length (max positions), when known

    def __post_init__(self):
        for name in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_params", "itemsize"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ModelShape.{name}={v!r}; every size must be a positive integer.")

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.itemsize

    @property
    def block_params(self) -> int:
        """Parameters inside the decoder blocks (attention + MLP matrices; what bigram masks)."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_mlp
        return self.n_layers * (attn + mlp)

    @classmethod
    def from_info(cls, info: Any, dtype: str | None = None) -> "ModelShape":
        """From a :class:`probes.ModelInfo` (or its ``to_dict()``)."""
        d = info.to_dict() if hasattr(info, "to_dict") else dict(info)
        return cls(n_layers=int(d["n_layers"]), n_heads=int(d["n_heads"]), n_kv_heads=int(d["n_kv_heads"]),
                   d_model=int(d["d_model"]), d_head=int(d["d_head"]), d_mlp=int(d["d_mlp"]), d_vocab=int(d["d_vocab"]),
                   n_params=int(d["n_params"]), itemsize=_itemsize(dtype or d.get("dtype", "float32")),
                   n_ctx=int(d["n_ctx"]) if d.get("n_ctx") else None)

    @classmethod
    def from_config(cls, config: Any, dtype: str = "float32") -> "ModelShape":
        """From a transformers config: the model is built on the meta device to count its parameters."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # (accelerate's init_empty_weights unties tied embeddings)
            m = AutoModelForCausalLM.from_config(config)
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        H = int(getattr(c, "num_attention_heads", None) or getattr(c, "n_head"))
        d = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd"))
        n_params = sum(t.numel() for t in {id(t): t for t in m.parameters()}.values())
        return cls(n_layers=int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")), n_heads=H,
                   n_kv_heads=int(getattr(c, "num_key_value_heads", None) or H), d_model=d,
                   d_head=int(getattr(c, "head_dim", None) or d // H),
                   d_mlp=int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d),
                   d_vocab=int(c.vocab_size), n_params=int(n_params), itemsize=_itemsize(dtype),
                   n_ctx=int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 0) or None)


def shape_of(name: str, *, dtype: str = "float32", revision: str | None = None,
             trust_remote_code: bool = False) -> ModelShape:
    """:class:`ModelShape` of a model spec (``embedded``, folder, ``.gguf`` or hub id) from its config alone."""
    from pathlib import Path

    from transformers import AutoConfig

    from probes.errors import ModelLoadError
    from probes.loading import EMBEDDED, _hub_reachable, check_revision, embedded_model_dir

    check_revision(name, revision)
    src = str(embedded_model_dir()) if name == EMBEDDED else name
    if str(src).endswith(".gguf"):
        raise ModelLoadError(f"the planner reads configs, and {name!r} is a GGUF file.",
                             hint="Load it once (`sonde info -m FILE`) and plan with the converted folder, or give its hub id.")
    kw = {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}
    try:
        try:
            cfg = AutoConfig.from_pretrained(src, local_files_only=True, **kw)
        except OSError:
            if Path(src).expanduser().exists() or not _hub_reachable():
                raise
            cfg = AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {name!r} (not local and the hub cannot be reached).",
                             hint="Use 'embedded', a local folder, or an id in the local HF cache.") from e
    return ModelShape.from_config(cfg, dtype=dtype)


def _itemsize(dtype: Any) -> int:
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        return 4
    if name not in _ITEMSIZE:
        raise ConfigError(f"dtype {dtype!r} is not known to the planner.", hint=f"Use one of {', '.join(_ITEMSIZE)}.")
    return _ITEMSIZE[name]


def _check_context(s: ModelShape, tokens: int) -> None:
    if s.n_ctx is not None and tokens > s.n_ctx:
        raise ConfigError(f"{tokens} tokens per row is more than the model's context length of {s.n_ctx} tokens.",
                          hint=f"Use --seq-len (plus --new-tokens) of at most {s.n_ctx}.")


def _shape(model: Any) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if hasattr(model, "info"):  # a probe
        return ModelShape.from_info(model.info)
    return ModelShape.from_info(model)


# ----------------------------------------------------------------------------- estimate
@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Estimated peak bytes of one run: ``weights + activations`` with the terms that make it up."""

    kind: str
    weights: int
    activations: int
    parts: Mapping[str, int] = field(default_factory=dict)
    persistent: tuple[str, ...] = ()  # the parts alive for the whole run (they add; of the others only the largest counts)

    @property
    def total(self) -> int:
        return self.weights + self.activations

    @property
    def transient(self) -> str | None:
        """The largest transient part (the one that counts), or None."""
        rest = {k: v for k, v in self.parts.items() if k not in self.persistent}
        return max(rest, key=rest.get) if rest else None


@dataclass(frozen=True)
class MemoryModel:
    """An analysis's memory terms on top of the forward pass (declared with the analysis, see
    :mod:`analyses.core.registry`).

    * ``parts(shape, B, T, opts) -> {term: bytes}``: the analysis's own terms; ``opts`` holds ``chunk_mb``,
      ``new_tokens``, ``route_itemsize`` and ``config`` (the analysis's config, or None when only sizes are
      known). A term named like a forward term (``logits``) replaces it;
    * ``persistent``: the terms alive for the whole run (they add); the others are transients of different
      steps (only the largest counts);
    * ``one_row``: the analysis runs one prompt at a time (the plan tunes no batch);
    * ``chunk(T, H, d, chunk_mb, itemsize) -> queries``: the analysis works in chunks whose budget the plan
      lowers (in powers of two) until the run fits, instead of the batch;
    * ``sizes(config) -> {seq_len, batch_size, new_tokens, chunk_mb}``: the sizes of a run read from the analysis's
      config (:func:`plan_config` plans every CLI run from them);
    * ``forward``: False for an analysis that runs no forward pass of the model (its terms are all in ``parts``);
      ``weights``: False for one that loads no model at all (a toy trained from scratch);
    * ``batch_field`` / ``option``: the config field the plan may lower to fit (``None``: none, the run is refused
      instead) and the CLI option that sets it; ``seq_option``: the option of the row length (for messages);
    * ``batch_arg``: the batch is run in passes of fewer rows whose results add up (bigram's micro-batch): the plan
      picks the rows per pass, the caller hands them to the run's keyword ``batch_arg`` and the config stays as it is;
    * ``max_batch(config, device_type) -> rows | None``: a cap on the rows per pass that is not memory's (bigram on a
      CPU: 512 tokens per pass already run at full speed);
    * ``fields``: CLI options named otherwise than the config field they set (``{"--batch-size": "batch"}``), for
      ``sonde plan``;
    * ``hint``: what to do when nothing fits at the smallest setting and the rows cannot be shortened.
    """

    name: str
    parts: Callable[["ModelShape", int, int, Mapping[str, Any]], dict[str, int]] | None = None
    persistent: tuple[str, ...] = ()
    one_row: bool = False
    chunk: Callable[..., int] | None = None
    sizes: Callable[[Any], Mapping[str, Any]] | None = None
    forward: bool = True
    weights: bool = True
    batch_field: str | None = None
    option: str = "--batch-size"
    seq_option: str = "--seq-len"
    batch_arg: str | None = None
    max_batch: Callable[[Any, str], int | None] | None = None
    fields: tuple[tuple[str, str], ...] = ()
    hint: str | None = None

    def settings(self, config: Any) -> dict[str, Any]:
        """The planner's sizes of a run with ``config`` (the analysis's own config): ``seq_len``, ``batch_size``,
        ``new_tokens``, ``chunk_mb``; those ``sizes`` does not give (the prompt's length) come from the caller."""
        return dict(self.sizes(config)) if self.sizes is not None else {}


def _generate_parts(s: "ModelShape", B: int, T: int, o: Mapping[str, Any]) -> dict[str, int]:
    return {"kv_cache": 2 * s.n_layers * B * s.n_kv_heads * s.d_head * (T + o["new_tokens"]) * s.itemsize,
            "logits": B * s.d_vocab * 4}  # generation keeps the last position's logits only


FORWARD = MemoryModel("forward")
GENERATE = MemoryModel("generate", _generate_parts, persistent=("kv_cache",))


def generating(name: str, **kw: Any) -> MemoryModel:
    """The memory model of a generating analysis (:data:`GENERATE`'s terms) under its own name, with its own
    ``sizes`` / ``batch_field`` / ``option`` (see :class:`MemoryModel`)."""
    return MemoryModel(name, _generate_parts, persistent=("kv_cache",), **kw)
_BASE_PERSISTENT = ("resid", "overhead")


def memory_model(kind: "str | MemoryModel") -> MemoryModel:
    """``forward``, ``generate``, a :class:`MemoryModel`, or the name (or CLI verb) of a registered analysis."""
    if isinstance(kind, MemoryModel):
        return kind
    if kind in ("forward", "generate"):
        return FORWARD if kind == "forward" else GENERATE
    return analysis_of(kind)[1]


def analysis_of(verb: str) -> tuple[Any, MemoryModel]:
    """``(declaration, memory model)`` of an analysis named by its name or a ``sonde run`` verb, read from the registry
    (a further verb of an analysis, such as ``bigram-eval``, has the memory model declared with it)."""
    from . import registry

    try:
        spec = registry.get(verb)
    except ConfigError:
        spec = next((s for s in registry.all_analyses().values() if verb in dict(s.verbs)), None)
        if spec is not None:
            return spec, dict(spec.verbs)[verb]
        spec = None
    if spec is None or spec.memory is None:
        raise ConfigError(f"the planner knows no analysis {verb!r}.", hint=f"Use one of: {', '.join(kinds())}.")
    return spec, spec.memory


def kinds() -> list[str]:
    """The names the planner accepts: ``forward``, ``generate`` and the verb of every analysis with a memory model."""
    from . import registry

    out = ["forward", "generate"]
    for s in registry.all_analyses().values():
        out += ([s.cli] if s.memory is not None and s.cli else []) + [v for v, _ in s.verbs]
    return out


def estimate(kind: "str | MemoryModel", model: Any, *, seq_len: int, batch_size: int = 1, chunk_mb: int = 256,
             new_tokens: int = 0, route_itemsize: int = 4, config: Any = None) -> Estimate:
    """Peak memory of one step of an analysis (bytes).

    Args:
        kind: ``forward``, ``generate``, an analysis name (``sinks``, ``routes``, ``bigram``, ``critical``, ...) or
            a :class:`MemoryModel`.
        model: a probe, a :class:`probes.ModelInfo` (or dict) or a :class:`ModelShape`.
        seq_len: tokens per row ``T``.
        batch_size: rows per forward pass ``B`` (one-prompt analyses such as routes: always one).
        chunk_mb: a chunked analysis's chunk budget (``routes.Config.chunk_mb``).
        new_tokens: tokens generated after the prompt (generating analyses).
        route_itemsize: bytes per stored route importance (4, or 8 for ``dtype="float64"``).
        config: the analysis's config, for terms that depend on more than these sizes (fiber, bb-toy).
    """
    mm = memory_model(kind)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r}; use a positive number of tokens.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; use a positive integer.")
    if not isinstance(new_tokens, int) or new_tokens < 0:
        raise ConfigError(f"new_tokens={new_tokens!r}; use a number of tokens >= 0.")
    if not isinstance(chunk_mb, int) or chunk_mb < 1:
        raise ConfigError(f"chunk_mb={chunk_mb!r}; use a positive number of MiB.")
    s = _shape(model)
    gen = new_tokens if mm.parts is not None and "kv_cache" in mm.persistent else 0
    _check_context(s, seq_len + gen)
    B, T, a = (1 if mm.one_row else batch_size), seq_len, s.itemsize
    d, F, V = s.d_model, s.d_mlp, s.d_vocab
    p: dict[str, int] = {
        "resid": 3 * B * T * d * a,
        "attn": 2 * B * T * (s.n_heads + 2 * s.n_kv_heads) * s.d_head * a,
        "mlp": 3 * B * T * F * a,
        "logits": B * T * V * a,
        "overhead": _OVERHEAD,
    } if mm.forward else {"overhead": _OVERHEAD}
    if mm.parts is not None:
        p.update(mm.parts(s, B, T, {"chunk_mb": chunk_mb, "new_tokens": new_tokens, "route_itemsize": route_itemsize,
                                    "config": config}))
    # the live residual stream and persistent stores add; transients of different steps do not
    persistent = _BASE_PERSISTENT + mm.persistent
    transient = [v for k, v in p.items() if k not in persistent]
    acts = sum(v for k, v in p.items() if k in persistent) + max(transient, default=0)
    return Estimate(kind=mm.name, weights=s.weight_bytes if mm.weights else 0, activations=int(acts), parts=p,
                    persistent=tuple(k for k in p if k in persistent))


# ----------------------------------------------------------------------------- free memory
MEMORY_LIMIT_ENV = "SONDE_MEMORY_LIMIT"


def free_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on the CPU; at most
    ``$SONDE_MEMORY_LIMIT`` (e.g. ``4GiB``) when it is set, so a run can be held to less than the machine has."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        free = int(free)
    else:
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover - psutil is a dependency
            text = open("/proc/meminfo").read()
            free = int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024
    limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if limit:
        try:
            cap = parse_bytes(limit)
        except ConfigError as e:
            raise ConfigError(f"${MEMORY_LIMIT_ENV}={limit!r} is not a memory size.", hint=e.hint) from None
        free = min(free, cap)
    return free


def format_bytes(n: float) -> str:
    """``1536 MiB`` -> ``"1.5 GiB"``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """``"20GiB"``, ``"512MB"``, ``"1.5GB"`` or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.I)
    if not m:
        raise ConfigError(f"{text!r} is not a memory size.", hint="Write e.g. 20GiB, 512MiB, 1.5GB or a number of bytes.")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": MiB, "G": 1e9, "GB": 1e9,
             "GIB": GiB, "T": 1e12, "TB": 1e12, "TIB": 2**40}.get(unit)
    if scale is None:
        raise ConfigError(f"{text!r}: unknown unit {m.group(2)!r}.", hint="Use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB).")
    return int(num * scale)


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True, kw_only=True)
class Plan:
    """What the planner chose: the batch (or, for routes, the chunk budget) and why.

    ``estimate`` is the peak at the chosen setting; ``fits`` is False when even the smallest setting
    exceeds ``budget`` (the run may still go ahead with the smallest one; ``message`` says so).
    """

    kind: str
    device: str
    seq_len: int
    batch_size: int
    chunk_mb: int | None
    estimate: Estimate
    free: int
    budget: int
    fits: bool
    message: str
    setting: str = ""  # the chosen setting as the CLI writes it (``--batch-size 16``, ``--chunk-mb 64``)
    lowered: bool = False  # the plan lowered the requested setting to fit (:func:`plan_config`)

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {"kind": self.kind, "device": self.device, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "chunk_mb": self.chunk_mb, "setting": self.setting, "lowered": self.lowered, "peak_bytes": e.total,
                "weights_bytes": e.weights, "activation_bytes": e.activations, "free_bytes": self.free,
                "budget_bytes": self.budget, "fits": self.fits, "message": self.message, "parts": dict(e.parts),
                "persistent_parts": list(e.persistent), "largest_transient": e.transient}


def plan(kind: "str | MemoryModel", model: Any, *, seq_len: int, batch_size: int | None = None, device: str | torch.device = "cpu",
         free_bytes: int | None = None, headroom: float = 0.8, weights_loaded: bool = False, chunk_mb: int = 256,
         new_tokens: int = 0, max_batch: int = 1024, config: Any = None) -> Plan:
    """Largest batch (``routes``: largest chunk budget) whose estimated peak fits the device.

    Args:
        kind, model, seq_len, chunk_mb, new_tokens: as for :func:`estimate`.
        batch_size: the batch the user asked for; the plan never goes above it (``None``: up to
            ``max_batch``).
        device: where the run goes; its free memory is read unless ``free_bytes`` is given.
        headroom: fraction of the free memory the plan may use (the rest is left for fragmentation).
        weights_loaded: the model already sits on ``device`` (its weights are out of the free memory,
            so they are not counted again).
    """
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom={headroom!r}; use a fraction in (0, 1].")
    dev = str(torch.device(device))
    free = int(free_memory(device) if free_bytes is None else free_bytes)
    budget = int(free * headroom)
    cap = max_batch if batch_size is None else batch_size
    if not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"batch_size={batch_size!r}; use a positive integer (or leave it out to let the planner choose).")

    def need(e: Estimate) -> int:
        return e.activations if weights_loaded else e.total

    mm = memory_model(kind)
    kind = mm
    if mm.chunk is not None:
        # largest power-of-two chunk budget (≤ the requested one) that fits beside the stored results
        mb = chunk_mb
        est = estimate(kind, model, seq_len=seq_len, chunk_mb=mb, config=config)
        while need(est) > budget and mb > 1:
            mb //= 2
            est = estimate(kind, model, seq_len=seq_len, chunk_mb=mb, config=config)
        fits = need(est) <= budget
        q = mm.chunk(seq_len, _shape(model).n_heads, _shape(model).d_model, mb)
        what = f"chunk_mb={mb} ({q} queries per chunk)"
        return Plan(kind=mm.name, device=dev, seq_len=seq_len, batch_size=1, chunk_mb=mb, estimate=est, free=free,
                    budget=budget, fits=fits, message=_sentence(kind, dev, seq_len, what, est, free, budget, fits,
                                                                lowered=mb < chunk_mb, weights_loaded=weights_loaded))
    # batch: the estimate grows monotonically with B, so bisect the largest one that fits
    lo, hi = 1, cap
    if need(estimate(kind, model, seq_len=seq_len, batch_size=hi, new_tokens=new_tokens, config=config)) <= budget:
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(estimate(kind, model, seq_len=seq_len, batch_size=mid, new_tokens=new_tokens, config=config)) <= budget:
                lo = mid
            else:
                hi = mid
    est = estimate(kind, model, seq_len=seq_len, batch_size=lo, new_tokens=new_tokens, config=config)
    fits = need(est) <= budget
    return Plan(kind=mm.name, device=dev, seq_len=seq_len, batch_size=lo, chunk_mb=None, estimate=est, free=free,
                budget=budget, fits=fits, message=_sentence(kind, dev, seq_len, f"batch size {lo}", est, free, budget, fits,
                                                            lowered=lo < cap and batch_size is not None,
                                                            weights_loaded=weights_loaded))


def _sentence(kind, dev, T, what, est: Estimate, free, budget, fits, *, lowered: bool, weights_loaded: bool) -> str:
    peak = est.activations if weights_loaded else est.total
    base = (f"{est.kind} on {dev} at T={T}: {what}, estimated peak {format_bytes(peak)} "
            f"(weights {format_bytes(est.weights)}{', already loaded' if weights_loaded else ''}, "
            f"activations {format_bytes(est.activations)}) of {format_bytes(free)} free")
    if not fits:
        return base + f"; even this exceeds the {format_bytes(budget)} budget: use a shorter T, a smaller dtype or a bigger device."
    return base + ("; lowered from the requested setting to fit." if lowered else ".")


# ----------------------------------------------------------------------------- before loading
def preflight(kind: "str | MemoryModel", model: "str | ModelShape", *, seq_len: int, batch_size: int, device: str = "cpu",
              dtype: str = "auto", option: str | None = None, new_tokens: int = 0, free_bytes: int | None = None,
              seq_option: str | None = None, headroom: float = 0.8, max_batch: int | None = None, revision: str | None = None,
              config: Any = None, refuse: bool = True) -> Plan | None:
    """Plan a run from the model's config alone, before its weights are loaded.

    Returns the plan (its batch is the largest ≤ ``batch_size`` and ≤ ``max_batch`` that fits; the caller
    runs with it and prints ``plan.message``), or None when the config cannot be read without loading
    (a GGUF file). When not even a batch of one row fits, raises :class:`probes.OutOfMemoryError` (the CLI's
    exit 2) naming the largest ``seq_len`` that does, so nothing heavy is loaded for a run that cannot finish
    (``refuse=False``: returns that plan, ``fits`` False, with the refusal as its message). ``option`` /
    ``seq_option`` default to the memory model's.
    """
    from probes.errors import ModelLoadError
    from probes.loading import resolve_device, resolve_dtype

    mm = memory_model(kind)
    option, seq_option = option or mm.option, seq_option or mm.seq_option
    dev = resolve_device(device)
    dt = str(resolve_dtype(dtype, dev)).replace("torch.", "")
    try:
        shape = model if isinstance(model, ModelShape) else shape_of(model, dtype=dt, revision=revision)
    except ModelLoadError:
        return None
    cap = min(batch_size, max_batch) if max_batch else batch_size
    p = plan(mm, shape, seq_len=seq_len, batch_size=cap, device=dev, free_bytes=free_bytes, headroom=headroom,
             new_tokens=new_tokens, config=config)
    p = dataclasses.replace(p, setting=f"{option} {p.batch_size}")
    if p.fits:
        if p.batch_size < batch_size:
            n = -(-batch_size // p.batch_size)
            tail = (f"; runs each batch of {batch_size} rows as {n} passes of ≤ {p.batch_size} rows ({option} {p.batch_size})."
                    if mm.batch_arg else f"; runs {option} {batch_size} as {n} passes of ≤ {p.batch_size} rows.")
            p = dataclasses.replace(p, message=p.message.rstrip(".").replace("; lowered from the requested setting to fit", "") + tail)
        return p
    lo, hi = 0, seq_len  # the longest rows that fit one at a time
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate(mm, shape, seq_len=mid, batch_size=1, new_tokens=new_tokens, config=config).total <= p.budget:
            lo = mid
        else:
            hi = mid
    if lo >= 1:
        fix = f"The largest setting that fits is {option} 1 with rows of {lo} tokens ({seq_option} {lo})."
    else:
        fix = mm.hint or "Nothing fits: use a smaller model or dtype (--dtype bfloat16), or a bigger device."
    message = (f"{p.kind} on {dev} needs about {format_bytes(p.estimate.total)} at {option} 1 and T={seq_len}, more than the "
               f"{format_bytes(p.budget)} budget ({format_bytes(p.free)} free); not starting.")
    if refuse:
        raise OutOfMemoryError(message, hint=fix)
    return dataclasses.replace(p, message=f"{message} {fix}")


def plan_config(kind: "str | MemoryModel", model: "str | ModelShape | None", config: Any, *, device: str = "cpu",
                dtype: str = "auto", revision: str | None = None, free_bytes: int | None = None, headroom: float = 0.8,
                refuse: bool = True, max_batch: int | None = None, prompt_bound: bool = False,
                **given: Any) -> tuple[Any, Plan | None]:
    """Plan a run of an analysis from its config alone, before the model's weights load (every ``sonde run`` verb
    and ``sonde plan``).

    The sizes come from the analysis's :class:`MemoryModel` (``sizes(config)``); ``given`` adds those the config
    does not hold (``seq_len`` of a prompt, read as an upper bound before tokenizing; ``batch_size`` of a run
    argument; ``max_batch``: the most rows per pass a ``batch_arg`` run was given, else the memory model's own cap).
    Returns ``(config, plan)``: the config with its batch (``batch_field``; routes: its chunk budget)
    lowered to the largest setting that fits, or unchanged (a ``batch_arg`` model: the rows per pass are
    ``plan.batch_size``); ``plan.lowered`` says whether memory lowered the setting. ``plan`` is None when there is
    nothing to plan (no sizes, or a GGUF file whose config cannot be read without loading it). A run that does not
    fit at any setting, or whose batch cannot be lowered, raises :class:`probes.OutOfMemoryError` (the CLI's exit 2)
    naming the largest setting that fits; with ``refuse=False`` it returns that plan instead (``fits`` False, the
    refusal as its message; a chunked analysis's refusal names the longest prompt that fits, :func:`longest_fitting`).
    ``prompt_bound``: ``seq_len`` is :func:`tokens_bound` of a prompt, an upper bound: a bound past the model's context
    is planned at the context (the prompt itself is refused when it is tokenized, if it is longer).
    """
    from probes.errors import ModelLoadError
    from probes.loading import resolve_device

    mm = memory_model(kind)
    sz = {**mm.settings(config), **{k: v for k, v in given.items() if v is not None}}
    if not sz.get("seq_len"):
        return config, None
    if not mm.weights:  # no model is loaded: the sizes of the analysis's own config are all there is
        model = ModelShape(n_layers=1, n_heads=1, n_kv_heads=1, d_model=1, d_head=1, d_mlp=1, d_vocab=1, n_params=1)
    seq_len, batch = int(sz["seq_len"]), int(sz.get("batch_size") or 1)
    new_tokens = int(sz.get("new_tokens") or 0)
    dev = resolve_device(device)

    def refused(p: Plan, message: str, hint: str) -> tuple[Any, Plan]:
        if refuse:
            raise OutOfMemoryError(message, hint=hint)
        return config, dataclasses.replace(p, fits=False, message=f"{message} {hint}")

    if prompt_bound and isinstance(model, str):
        # a prompt's bound (tokens_bound) may pass the context while the prompt itself does not: plan for at most the
        # context; a longer prompt is refused when it is tokenized (probes' to_tokens), before any forward pass
        try:
            n_ctx = _shape_for(model, device, dtype, revision).n_ctx
        except ModelLoadError:
            n_ctx = None
        if n_ctx is not None and seq_len > n_ctx:
            seq_len = n_ctx
    if mm.chunk is not None:
        try:
            shape = model if isinstance(model, ModelShape) else _shape_for(model, device, dtype, revision)
        except ModelLoadError:
            return config, None
        mb = int(sz.get("chunk_mb") or 256)
        p = plan(mm, shape, seq_len=seq_len, device=dev, free_bytes=free_bytes, headroom=headroom, chunk_mb=mb, config=config)
        p = dataclasses.replace(p, setting=f"--chunk-mb {p.chunk_mb}", lowered=p.chunk_mb < mb)
        if not p.fits:
            lo = longest_fitting(mm, shape, p.budget, seq_len, chunk_mb=1, config=config)
            fix = (f"Prompts of at most {lo} tokens fit this budget" if lo >= 1 else "Not even one token fits this budget")
            fix += "; " + (mm.hint or "use a shorter prompt, a smaller dtype (--dtype bfloat16) or a bigger device.")
            return refused(p, f"{p.kind} on {p.device} needs about {format_bytes(p.estimate.total)} at T={seq_len}, more "
                              f"than the {format_bytes(p.budget)} budget ({format_bytes(p.free)} free) at any chunk size; "
                              f"not starting.", fix)
        if p.lowered and mm.batch_field:
            config = config.replace(**{mm.batch_field: p.chunk_mb})
        return config, p
    cap = batch
    if max_batch is not None:
        cap = min(cap, max_batch)
    elif mm.max_batch is not None and not mm.one_row:
        cap = min(cap, mm.max_batch(config, dev.type) or cap)
    p = preflight(mm, model, seq_len=seq_len, batch_size=1 if mm.one_row else batch, max_batch=None if mm.one_row else cap,
                  device=device, dtype=dtype, new_tokens=new_tokens, free_bytes=free_bytes, headroom=headroom,
                  revision=revision, config=config, refuse=refuse)
    if p is None or not p.fits:
        return config, p
    if mm.one_row:
        return config, dataclasses.replace(p, setting="one row per pass")
    p = dataclasses.replace(p, lowered=p.batch_size < cap)
    if not p.lowered or mm.batch_arg:
        return config, p
    if mm.batch_field is None:
        shape = model if isinstance(model, ModelShape) else _shape_for(model, device, dtype, revision)
        need = estimate(mm, shape, seq_len=seq_len, batch_size=batch, new_tokens=new_tokens, config=config)
        return refused(p, f"{p.kind} on {p.device} needs about {format_bytes(need.total)} at {mm.option} {batch}, more than the "
                          f"{format_bytes(p.budget)} budget ({format_bytes(p.free)} free); not starting.",
                       f"The largest setting that fits is {mm.option} {p.batch_size}.")
    return config.replace(**{mm.batch_field: p.batch_size}), p


def longest_fitting(kind: "str | MemoryModel", model: Any, budget: int, seq_len: int, *, chunk_mb: int = 1,
                    config: Any = None) -> int:
    """The longest ``T`` ≤ ``seq_len`` whose estimated peak (weights included) fits ``budget`` bytes at ``chunk_mb``
    (0 when not one token fits): bisection, the estimate growing with ``T``."""
    lo, hi = 0, seq_len + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate(kind, model, seq_len=mid, chunk_mb=chunk_mb, config=config).total <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def tokens_bound(*texts: str, extra: int = 64, model: str | None = None, revision: str | None = None) -> int:
    """An upper bound on the tokens of the longest of ``texts`` before any weights load, plus ``extra`` for special
    tokens and a chat template: with ``model``, its tokenizer's count (the tokenizer alone loads: ``embedded``, a
    local folder or an id in the local cache); without it, or when the tokenizer cannot be read, one token per
    UTF-8 byte (a byte-level tokenizer gives no more)."""
    if model is not None:
        n = _counted_tokens(model, texts, revision)
        if n is not None:
            return n + extra
    return max((len(str(t).encode("utf-8")) for t in texts), default=0) + extra


def _counted_tokens(model: str, texts: "tuple[str, ...]", revision: str | None) -> int | None:
    """The longest of ``texts`` in tokens of ``model``'s tokenizer (loaded from local files only), or None."""
    from probes.loading import EMBEDDED, embedded_model_dir

    src = str(embedded_model_dir()) if model == EMBEDDED else model
    if src.endswith(".gguf") or not texts:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, local_files_only=True, **({"revision": revision} if revision else {}))
        return max(len(tok(str(t), add_special_tokens=False)["input_ids"]) for t in texts)
    except Exception:  # noqa: BLE001 - any failure falls back to the byte bound; loading reports real errors later
        return None


def _shape_for(model: str, device: str, dtype: str, revision: str | None) -> ModelShape:
    from probes.loading import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return shape_of(model, dtype=str(resolve_dtype(dtype, dev)).replace("torch.", ""), revision=revision)


# ----------------------------------------------------------------------------- OOM retry
def is_oom(e: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA, MPS, CPU allocation failures) and the
    :class:`probes.OutOfMemoryError` that ``Probe.run`` turns a CUDA one into."""
    if isinstance(e, (OutOfMemoryError, torch.cuda.OutOfMemoryError)) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in str(e).lower() or "DefaultCPUAllocator: can't allocate" in str(e))


def retry_on_oom(fn: Callable[[int], T_], batch_size: int, *, what: str = "the run",
                 log: Callable[[str], None] | None = None) -> T_:
    """``fn(batch_size)``; on an out-of-memory error, free the cache and retry once with half the batch.

    A second failure (or a failure at batch size 1) raises :class:`probes.OutOfMemoryError` with a hint.
    ``log`` receives the one-line retry message (default: stderr).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    try:
        return fn(batch_size)
    except Exception as e:
        if not is_oom(e):
            raise
        first = e
    _empty_cache()
    if batch_size <= 1:
        raise OutOfMemoryError(f"{what} ran out of memory at batch size 1.",
                               hint="Use a shorter sequence (--T/--seq-len), a smaller dtype (--dtype bfloat16), "
                                    "--device-map auto with --max-memory, or a bigger device.") from first
    half = max(1, batch_size // 2)
    log(f"{what} ran out of memory at batch size {batch_size}; retrying once with batch size {half}.")
    try:
        return fn(half)
    except Exception as e:
        if not is_oom(e):
            raise
        _empty_cache()
        raise OutOfMemoryError(f"{what} ran out of memory at batch size {batch_size} and again at {half}.",
                               hint=f"Use a smaller batch (--batch-size {max(1, half // 2)}), a shorter sequence, "
                                    "or run `sonde plan` to see what fits.") from e


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    import gc

    gc.collect()


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> "Callable[[int], int] | None":
    """glibc's ``malloc_trim`` (Linux), or None."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> None:
    """Give the freed parts of the C heap back to the system (glibc ``malloc_trim``; nothing elsewhere). A loop
    that frees and allocates tensors of many sizes, as a training pass does, otherwise keeps the holes between
    live blocks resident: on the embedded model's bigram search, 0.1–0.3 GiB more per pass. Costs one system call
    and the page faults of re-touching the memory, a few ms per pass."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
