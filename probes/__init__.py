"""Sonde probes: load a causal LM and read or edit its activations through one small API.

>>> from probes import load_model, Mean, l2_norm
>>> probe = load_model("embedded")                      # SmolLM2-135M-Instruct, offline
>>> toks = probe.to_tokens("The capital of France is")
>>> norms = Mean(dims=(0,), transform=l2_norm)
>>> logits = probe.run(toks, reads={"blocks.10.hook_resid_post": norms})
>>> norms.finalize().shape                               # [T]

Backends: ``"nnsight"`` (default; the model keeps SDPA attention) and ``"transformer_lens"``
(TransformerLens 4 ``TransformerBridge``, eager attention). Both give the same numbers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

EMBEDDED = "embedded"  # the model name of the embedded SmolLM2-135M-Instruct

# The public names, imported from their modules on first use (PEP 562): `import probes` (or a light submodule such
# as probes.errors, which the CLI needs before it knows the verb) does not import torch and transformers.
_EXPORTS = {
    ".backend": ("BACKENDS", "ModelInfo", "Probe"),
    ".edits": ("Ablate", "AddVector", "AttendTo", "Edit", "Patch", "ZeroAttention", "as_edits", "parse_head"),
    ".errors": ("ConfigError", "DeviceError", "InputError", "ModelLoadError", "OutOfMemoryError", "SondeError",
                "UnknownSiteError", "UnsupportedModelError"),
    ".labels": ("Component", "LabelError", "ffn_label", "format_label", "head_label", "layer_label", "neuron_label",
                "node_label", "parse_label", "parse_neuron", "parse_node"),
    ".loading": ("cache_dir",),
    ".reducers": ("Collect", "Histogram", "Max", "Mean", "Min", "Moments", "Reducer", "Sum", "TopK", "l2_norm",
                  "reducer_from_state"),
    ".sites": ("Site", "all_sites", "parse_site", "site"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # what static tools see
    from .backend import BACKENDS, ModelInfo, Probe
    from .edits import Ablate, AddVector, AttendTo, Edit, Patch, ZeroAttention, as_edits, parse_head
    from .errors import (ConfigError, DeviceError, InputError, ModelLoadError, OutOfMemoryError, SondeError,
                         UnknownSiteError, UnsupportedModelError)
    from .labels import (Component, LabelError, ffn_label, format_label, head_label, layer_label, neuron_label,
                         node_label, parse_label, parse_neuron, parse_node)
    from .loading import cache_dir
    from .reducers import Collect, Histogram, Max, Mean, Min, Moments, Reducer, Sum, TopK, l2_norm, reducer_from_state
    from .sites import Site, all_sites, parse_site, site


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "load_model", "from_hf", "Probe", "ModelInfo", "BACKENDS", "EMBEDDED",
    "Site", "site", "parse_site", "all_sites",
    "Reducer", "Mean", "Sum", "Max", "Min", "Moments", "Histogram", "TopK", "Collect", "l2_norm", "reducer_from_state",
    "Edit", "Ablate", "Patch", "AddVector", "AttendTo", "ZeroAttention",
    "Component", "parse_label", "parse_head", "parse_neuron", "parse_node", "format_label", "head_label", "neuron_label",
    "ffn_label", "layer_label", "node_label", "LabelError",
    "SondeError", "ConfigError", "InputError", "ModelLoadError", "UnknownSiteError", "UnsupportedModelError",
    "DeviceError", "OutOfMemoryError", "cache_dir",
]


def from_hf(hf_model: Any, tokenizer: Any, *, backend: str = "nnsight", name: str | None = None, source: str | None = None) -> Probe:
    """Wrap an already-loaded HF causal LM (e.g. a tiny model built from a config) in a probe.

    The transformer_lens backend switches the model to eager attention in place; give each
    backend its own model object.
    """
    from .backend import BACKENDS
    from .errors import ConfigError
    from .loading import use_private_compile_caches

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}.", hint=f"Use one of: {', '.join(BACKENDS)}.")
    use_private_compile_caches()  # before any torch.compile of this probe's kernels
    name = name or getattr(hf_model.config, "_name_or_path", None) or hf_model.config.model_type
    hf_model.eval()
    if backend == "nnsight":
        from .nns import NNsightProbe

        return NNsightProbe(hf_model, tokenizer, name=name, source=source or name)
    from .tl import TransformerLensProbe

    return TransformerLensProbe(hf_model, tokenizer, name=name, source=source or name)


def load_model(
    name: str = EMBEDDED,
    *,
    backend: str = "nnsight",
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    remote: bool = False,
) -> Probe:
    """Load a model and wrap it in a :class:`Probe`.

    Args:
        name: ``"embedded"`` (SmolLM2-135M-Instruct, works offline), a Hugging Face id (local cache
            first), a local folder saved with ``save_pretrained`` (safetensors), or a ``.gguf`` file
            (a ``str`` or a ``pathlib.Path``).
        backend: ``"nnsight"`` or ``"transformer_lens"``.
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto`` (fp32 on CPU, bf16 on GPU), ``float32``, ``bfloat16``, ``float16``.
        device_map: passed to accelerate (``"auto"`` spreads a large model over the GPUs, then the CPU).
        max_memory: per-device limits for ``device_map``: ``{0: "20GiB", "cpu": "64GiB"}`` or the string
            ``"0=20GiB,cpu=64GiB"``.
        revision: model revision (branch, tag, commit) for hub models.
        trust_remote_code: run custom modelling code from the model's repository (off by default).
        remote: run the model on NDIF through nnsight (needs an API key and network; see
            :mod:`probes.remote`). Only hub ids, the nnsight backend and module-output sites.
    """
    import os

    from .backend import BACKENDS
    from .errors import ConfigError
    from .loading import load_hf, resolve_device, resolve_dtype

    if isinstance(name, os.PathLike):  # a pathlib.Path of a folder or .gguf file
        name = os.fspath(name)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}.", hint=f"Use one of: {', '.join(BACKENDS)}.")
    if remote:
        if backend != "nnsight":
            raise ConfigError(f"remote=True runs through nnsight; backend={backend!r} cannot run remotely.",
                              hint="Use backend='nnsight' (CLI: --backend nnsight) with --remote.")
        if device_map is not None or max_memory is not None:
            raise ConfigError("remote=True places the model on NDIF; device_map and max_memory do not apply.",
                              hint="Drop --device-map/--max-memory, or drop --remote to place it on local devices.")
        from .remote import load_remote

        return load_remote(name, revision=revision)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, tok, source = load_hf(name, device=dev, dtype=dt, device_map=device_map, max_memory=max_memory,
                                 revision=revision, trust_remote_code=trust_remote_code)
    return from_hf(model, tok, backend=backend, name=name, source=source)
