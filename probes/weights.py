"""Weight-level edits scoped to a context: multiplicative masks, skipped blocks and LoRA adapters.

Activation edits (:mod:`probes.edits`) act inside one run; the edits here act on the weights for
the duration of a ``with`` block and are undone on exit, even when the block raises::

    with probe.weight_masks({"model.layers.3.self_attn.o_proj": keep}):   # W -> W ⊙ keep
        logits = probe.run(tokens)                                         # either backend

    with probe.adapted(LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))) as ad:
        loss = ad.loss(ids, labels)                                        # a private, trainable copy

Weights are named by their module path in the probe's table (``f"{probe.arch.layers}.{L}.{name}"``
with ``name`` in ``probe.arch.weight_names``, e.g. ``model.layers.3.self_attn.o_proj``);
:func:`block_weights` lists them with their storage shapes (GPT-2 Conv1D weights keep their
``[in, out]`` storage). Masks use ``torch.nn.utils.parametrize`` on the probe's own modules (no
copy), so every backend sees them: the TransformerLens bridge wraps the same HF modules (and splits
GPT-2's fused ``c_attn`` into q/k/v views of the same storage, which get the matching view of the
mask). Adapters, in contrast, live on a deep copy of the model, so the probe itself never changes
and other readers of the probe may keep running while an adapter trains.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence, Union

import torch

from .arch import get_module
from .errors import ConfigError, InputError, UnsupportedModelError

if TYPE_CHECKING:
    from .backend import Probe

__all__ = ["WeightSpec", "LoraSpec", "AdaptedModel", "Factor", "WeightMap", "block_weights", "weight_masks", "only_blocks",
           "frozen_weights", "adapter_targets", "adapted", "load_adapter", "adapter_probe", "check_adapter_folder"]


class WeightMap:
    """A mask given as a map of the weight itself: ``fn(W)`` returns the weight to use at this forward (or None to
    leave ``W`` as it is). For masks that compute ``W ⊙ f`` in one fused operation instead of building ``f`` first
    (a trainable soft mask whose backward pass should keep nothing but its logits)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[torch.Tensor], "torch.Tensor | None"]):
        self.fn = fn

    def __call__(self, W: torch.Tensor) -> "torch.Tensor | None":
        return self.fn(W)


# A mask factor: a fixed tensor (bool or float, storage shape), a zero-argument callable that returns one (or
# None = leave the weight as it is) at every forward, e.g. a trainable soft mask, or a :class:`WeightMap`.
Factor = Union[torch.Tensor, Callable[[], "torch.Tensor | None"], WeightMap]


# ============================================================================== listing
@dataclass(frozen=True)
class WeightSpec:
    """One maskable weight matrix: full module path, block index, block-relative name, storage shape."""

    path: str
    layer: int
    name: str
    shape: tuple[int, ...]


def block_weights(probe: "Probe", layers: Sequence[int] | None = None) -> list[WeightSpec]:
    """Every weight matrix inside the decoder blocks (``probe.arch.weight_names``, in block then table
    order; biases, norms and embeddings excluded).

    Args:
        layers: block indices (default: all).
    Raises ConfigError for a block the model does not have and UnsupportedModelError when the table
    names no matrix that exists.
    """
    arch = probe.arch
    n = probe.info.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise ConfigError(f"layers={tuple(layers)} includes {bad}; this model has blocks 0..{n - 1}.")
    names = arch.weight_names
    if not names:
        raise UnsupportedModelError(f"the {probe.info.family} table entry lists no block weight matrices to mask.",
                                    hint="Add weight_names to its ArchSpec in probes/arch.py.")
    out = []
    for l in layers:
        for wn in names:
            try:
                w = _weight_owner(probe.hf_model, f"{arch.layers}.{l}.{wn}").weight
            except AttributeError:
                w = None
            if w is None or w.ndim != 2:
                continue
            out.append(WeightSpec(f"{arch.layers}.{l}.{wn}", l, wn, tuple(w.shape)))
    if not out:
        raise UnsupportedModelError(
            f"no weight matrix of {probe.info.family} blocks matched the masker's names {list(names)}.",
            hint="Check the ArchSpec weight_names in probes/arch.py for this model.")
    return out


def _weight_owner(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module that owns the ``weight`` Parameter at ``path`` (TransformerLens bridges replace HF
    modules in the tree by wrappers that keep the original under ``original_component``)."""
    mod = get_module(root, path)
    while not isinstance(mod._parameters.get("weight"), torch.Tensor) and not _is_parametrized(mod):
        inner = getattr(mod, "original_component", None)
        if not isinstance(inner, torch.nn.Module):
            raise AttributeError(f"{path} has no weight")
        mod = inner
    return mod


def _storage_aliases(root: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """Modules with a 2-D ``weight`` Parameter, grouped by the storage that weight lives in."""
    out: dict[int, list[torch.nn.Module]] = {}
    for mod in root.modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            out.setdefault(w.untyped_storage().data_ptr(), []).append(mod)
    return out


def _is_parametrized(mod: torch.nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(mod, "weight")


def _need_weights(probe: "Probe", what: str) -> None:
    if getattr(probe, "remote", False) is True:
        raise UnsupportedModelError(f"{what} need the model's weights, which stay on the NDIF server.",
                                    hint="Load the model locally (probes.load_model) to mask or adapt its weights.")


# ============================================================================== masks
class _Multiply(torch.nn.Module):
    """Parametrization ``W -> W ⊙ f()`` (``f`` is a closure, so no parameter joins the model)."""

    def __init__(self, fn: WeightMap):
        super().__init__()
        self._fn = [fn]  # a list hides the callable from nn.Module attribute registration

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        out = self._fn[0](W)
        return W if out is None else out


def _times(fn: Callable[[], "torch.Tensor | None"]) -> WeightMap:
    """The :class:`WeightMap` ``W -> W ⊙ fn()`` (``fn()`` None: ``W`` as it is)."""
    return WeightMap(lambda W: None if (m := fn()) is None else W * m.to(W.dtype))


def _as_factor(path: str, factor: Factor, W: torch.Tensor) -> WeightMap:
    """Every kind of factor as the one map the parametrization applies."""
    if isinstance(factor, WeightMap):
        return factor
    if callable(factor) and not isinstance(factor, torch.Tensor):
        return _times(factor)
    if not isinstance(factor, torch.Tensor):
        raise InputError(f"the mask of {path!r} is a {type(factor).__name__}; give a tensor or a zero-argument callable.")
    if tuple(factor.shape) != tuple(W.shape):
        raise InputError(f"mask {path!r} has shape {tuple(factor.shape)} but the weight is {tuple(W.shape)}.",
                         hint="Apply a mask trained on this model (same architecture and sizes).")
    t = factor.to(W.device)
    return _times(lambda: t)


@contextmanager
def weight_masks(probe: "Probe", factors: Mapping[str, Factor]) -> Iterator[None]:
    """Inside the block every named weight is ``W ⊙ factor`` on both backends; restored exactly on exit.

    Args:
        factors: ``{module path: factor}``; a factor is a tensor of the weight's storage shape (bool
            or float), a zero-argument callable evaluated at each forward (a trainable soft mask;
            returning ``None`` leaves the weight as it is for that forward), or a :class:`WeightMap` that
            returns the masked weight itself. Paths as in :func:`block_weights`.
    Raises InputError for a path that names no weight or a tensor of the wrong shape, ConfigError
    when a weight already carries a mask (masks do not nest). Unnamed weights stay as they are.

    The masks act in place on the probe's model (nothing is copied). Through ``probe.weight_masks`` the
    block holds the probe's lock, so other threads wait until the weights are restored; called directly,
    every run of this probe from any thread sees them while the block is open.
    """
    from torch.nn.utils import parametrize

    _need_weights(probe, "weight masks")
    model = probe.hf_model
    resolved = []
    for path, factor in factors.items():
        try:
            mod = _weight_owner(model, path)
        except AttributeError:
            raise InputError(f"mask entry {path!r} names no weight of {probe.info.name}.",
                             hint="Apply a mask trained on this model (same architecture and sizes).") from None
        resolved.append((path, mod, _as_factor(path, factor, mod.weight)))
    aliases = _storage_aliases(model)
    mods: list[torch.nn.Module] = []

    def register(mod, fn, path):
        if parametrize.is_parametrized(mod, "weight"):
            raise ConfigError(f"{path}.weight already carries a mask.", hint="Leave the other mask block first (masks do not nest).")
        parametrize.register_parametrization(mod, "weight", _Multiply(fn), unsafe=True)
        mods.append(mod)

    try:
        for path, mod, fn in resolved:
            W = mod.weight
            # TransformerLens splits fused weights (GPT-2 c_attn) into q/k/v Linears that are views of
            # the same storage; mask those views with the matching strided view of the mask.
            for other in aliases.get(W.untyped_storage().data_ptr(), ()):
                w2 = other.weight
                if other is mod or w2 is W:
                    continue
                if not W.is_contiguous():
                    raise UnsupportedModelError(f"{path}.weight is shared with a view but is not contiguous; cannot mask it.")
                off = w2.storage_offset() - W.storage_offset()
                # the view's weight is the matching strided view of the whole masked weight
                register(other, WeightMap(lambda _w2, fn=fn, W=W, shp=tuple(w2.shape), st=w2.stride(), off=off:
                                          None if (o := fn(W)) is None else o.contiguous().as_strided(shp, st, off)), path)
            register(mod, fn, path)
        yield
    finally:
        for mod in mods:
            # leave_parametrized=False puts the original Parameter object back, untouched
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)


@contextmanager
def only_blocks(probe: "Probe", keep: Sequence[int]) -> Iterator[None]:
    """Run the HF model with only the blocks in ``keep`` (in order); restored on exit.

    Seen by the plain forward (:meth:`Probe.forward`, :meth:`Probe.trainable_logits`) and the
    nnsight backend, which run the HF module tree. For blocks whose masked weights are all zero this
    is exact when they have no bias (attention and MLP then add nothing to the residual stream of a
    pre-norm block); raises ConfigError for dropped blocks with non-zero biases.
    """
    _need_weights(probe, "skipped blocks")
    arch = probe.arch
    root = getattr(probe.hf_model, "original_model", probe.hf_model)  # the module that owns arch.layers
    parent_path, _, attr = arch.layers.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    blocks = getattr(parent, attr)
    bad = [l for l in keep if not 0 <= l < len(blocks)]
    if bad:
        raise ConfigError(f"keep={tuple(keep)} includes {bad}; this model has blocks 0..{len(blocks) - 1}.")
    for l, b in enumerate(blocks):
        if l in keep:
            continue
        for n, p in b.named_parameters():
            if n.endswith("bias") and p is not None and bool((p != 0).any()):
                raise ConfigError(f"others='drop' needs bias-free blocks; block {l} has {n}.",
                                  hint="Use others='keep' (--others keep) or mask every block (--layers all) on this model.")
    cfg = probe.hf_model.config
    n_old = getattr(cfg, "num_hidden_layers", None)
    types = getattr(cfg, "layer_types", None)
    setattr(parent, attr, torch.nn.ModuleList([blocks[l] for l in sorted(keep)]))
    try:
        if n_old is not None:
            cfg.num_hidden_layers = len(keep)
        if isinstance(types, list):
            cfg.layer_types = [types[l] for l in sorted(keep)]
        yield
    finally:
        setattr(parent, attr, blocks)
        if n_old is not None:
            cfg.num_hidden_layers = n_old
        if isinstance(types, list):
            cfg.layer_types = types


@contextmanager
def frozen_weights(probe: "Probe") -> Iterator[None]:
    """Every model parameter has ``requires_grad=False`` inside the block (train masks or other
    outside parameters against fixed weights); the flags are restored on exit."""
    params = list(probe.hf_model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# ============================================================================== adapters
@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """A LoRA adapter: rank ``r``, scale ``alpha / r``, the module names it wraps (last path component
    or a dotted suffix, as PEFT matches them) and the adapter dropout."""

    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r={self.r!r} must be a positive integer.", hint="Use e.g. r=8.")
        if not self.target_modules or isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules={self.target_modules!r} must be a non-empty tuple of module names.",
                              hint="E.g. ('q_proj', 'v_proj').")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1).")


def _module_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _unwrapped(mod: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(mod, "original_component", None), torch.nn.Module):
        mod = mod.original_component
    return mod


def _plain_module_names(root: torch.nn.Module, prefix: str = "") -> Iterator[str]:
    """Module paths of the HF model as transformers built it (TransformerLens bridge wrappers, and the
    submodules they add, left out)."""
    for name, child in root.named_children():
        path = f"{prefix}{name}"
        yield path
        yield from _plain_module_names(_unwrapped(child), path + ".")


def _unwrap(root: torch.nn.Module) -> torch.nn.Module:
    """Put each bridge-wrapped module's original back in its place (in a private copy)."""
    for name, child in list(root.named_children()):
        inner = _unwrapped(child)
        if inner is not child:
            setattr(root, name, inner)
        _unwrap(inner)
    return root


def adapter_targets(probe: "Probe", names: Sequence[str]) -> list[str]:
    """The entries of ``names`` that name at least one module of the model (as PEFT matches them: the
    whole path or a suffix after a dot, e.g. ``"down_proj"`` or ``"mlp.c_proj"``), in the given order."""
    mods = list(_plain_module_names(probe.hf_model))
    return [t for t in names if any(_module_matches(n, t) for n in mods)]


class AdaptedModel:
    """A private, trainable copy of a probe's model carrying one LoRA adapter (PEFT).

    The copy is made once, at creation; the probe's own model is never modified, so other readers of
    the probe (threads, the dashboard) keep seeing the base weights while the adapter trains. Only
    the adapter's parameters are trainable. The copy is the HF model as transformers built it on
    either backend (no TransformerLens bridges). Use it as a context manager to drop the copy on exit.
    """

    def __init__(self, probe: "Probe", model: torch.nn.Module):
        self.probe = probe
        self.model = model

    def __enter__(self) -> "AdaptedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.model = None  # free the copy

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable (adapter) parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self) -> "AdaptedModel":
        self.model.train()
        return self

    def eval(self) -> "AdaptedModel":
        self.model.eval()
        return self

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ids ``[B, T]`` with the adapter on (autograd follows torch's grad mode)."""
        ids = torch.as_tensor(tokens).to(self.probe.device)
        return self.model(input_ids=ids, use_cache=False).logits

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own next-token cross-entropy (scalar; label ``-100`` = not scored)."""
        dev = self.probe.device
        return self.model(input_ids=torch.as_tensor(tokens).to(dev), labels=torch.as_tensor(labels).to(dev)).loss

    @contextmanager
    def disabled(self) -> Iterator["AdaptedModel"]:
        """The base model inside the block (the adapter switched off, not removed)."""
        with self.model.disable_adapter():
            yield self

    def save(self, folder: str | Path) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (no pickle) into ``folder``
        (created if needed); files appear only once complete."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".partial"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        for f in tmp.iterdir():
            f.replace(out / f.name)
        tmp.rmdir()
        return out


def _copy(probe: "Probe") -> torch.nn.Module:
    """A deep copy of the HF model as transformers built it: the TransformerLens backend wraps modules
    in bridges that PEFT cannot adapt, so the copy gets the originals back (the same weights and
    module paths as under the nnsight backend, so adapter files work with either backend)."""
    return _unwrap(copy.deepcopy(probe.hf_model))


def adapted(probe: "Probe", lora: LoraSpec) -> AdaptedModel:
    """A trainable copy of the probe's model with a fresh LoRA adapter (B = 0: it starts equal to the
    base model; A is drawn from torch's global RNG, so seed first for reproducible runs).

    Raises ConfigError when no entry of ``lora.target_modules`` names a module of the model.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(lora, LoraSpec):
        raise ConfigError(f"adapted() takes a LoraSpec, got {type(lora).__name__}.", hint="probe.adapted(LoraSpec(r=8, ...)).")
    _need_weights(probe, "adapters")
    targets = adapter_targets(probe, lora.target_modules)
    if not targets:
        raise ConfigError(f"target_modules={lora.target_modules} match no module of {probe.info.name}.",
                          hint="Name linear layers of this model, e.g. ('c_attn', 'c_fc', 'c_proj') for GPT-2.")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(targets), lora_dropout=lora.dropout, task_type="CAUSAL_LM")
    return AdaptedModel(probe, get_peft_model(_copy(probe), cfg))


def check_adapter_folder(folder: str | Path) -> Path:
    """``folder`` when it holds a LoRA adapter as :func:`load_adapter` reads it (``adapter_config.json`` and
    ``adapter_model.safetensors``), else :class:`InputError` saying what is missing (nothing is loaded)."""
    p = Path(folder)
    if not (p / "adapter_config.json").is_file():
        raise InputError(f"{str(p)!r} is not a LoRA adapter folder (no adapter_config.json).",
                         hint="Save one with AdaptedModel.save(folder).")
    if not (p / "adapter_model.safetensors").is_file():
        raise InputError(f"{str(p)!r} holds no adapter_model.safetensors; only safetensors adapters are loaded (no pickle).",
                         hint="Re-save the adapter with safe_serialization=True.")
    return p


def load_adapter(probe: "Probe", folder: str | Path) -> AdaptedModel:
    """A copy of the probe's model with the LoRA adapter saved in ``folder`` (``adapter_config.json``
    + ``adapter_model.safetensors``; pickle-based ``.bin`` adapters are refused), in eval mode."""
    from peft import PeftModel

    _need_weights(probe, "adapters")
    p = check_adapter_folder(folder)
    model = PeftModel.from_pretrained(_copy(probe), str(p), is_trainable=False)
    return AdaptedModel(probe, model).eval()


def adapter_probe(probe: "Probe", folder: str | Path) -> "Probe":
    """A new probe of the probe's model with the LoRA adapter saved in ``folder`` merged into a private copy of
    its weights (W + scale·B·A; safetensors only, as :func:`load_adapter` reads it), on the same backend, device and
    dtype; every analysis runs on it as on any probe. The probe itself is untouched. Its name is the base model's
    with the adapter folder's name after a ``+``."""
    from . import from_hf

    merged = load_adapter(probe, folder).model.merge_and_unload()
    p = Path(folder)
    return from_hf(merged, probe.tokenizer, backend=probe.backend, name=f"{probe.info.name}+{p.name}",
                   source=str(p.resolve()))
