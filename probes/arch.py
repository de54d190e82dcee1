"""One table row per architecture family: where each standard part lives in the HF module tree.

The nnsight backend reads sites from these module paths; every backend uses the table for weights
(per-head W_O slices, the unembedding) and for the model summary. Adding a family is one
:class:`ArchSpec` entry; a model whose ``model_type`` has no entry is refused at load time with the
list of supported families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import UnsupportedModelError

__all__ = ["ArchSpec", "ARCHS", "arch_for", "get_module"]

Where = tuple[str, Literal["input", "output"]]  # (module path relative to the block, which tensor)


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Module paths of one family (paths relative to the model root or to one block)."""

    family: str
    layers: str  # path of the ModuleList of blocks
    embed: str
    pos_embed: str | None
    final_norm: str
    lm_head: str = "lm_head"
    attn: str  # block-relative attention module
    o_proj: str  # block-relative output projection (its input is hook_z)
    mlp: str
    mlp_pre: Where  # MLP pre-activation (gate branch for gated MLPs)
    mlp_in: tuple[str, ...]  # block-relative input projections of the MLP (gate/up or fc)
    mlp_down: str  # block-relative output projection (its input is mlp.hook_post)
    attn_out: Where  # what the attention branch adds to the residual
    mlp_out: Where  # what the MLP branch adds to the residual
    resid_mid: Where | None  # None for parallel-residual blocks
    conv1d: bool = False  # GPT-2 stores weights as [in, out]
    parallel: bool = False
    n_heads_attr: str = "num_attention_heads"
    n_kv_attr: str | None = "num_key_value_heads"
    weight_names: tuple[str, ...] = ()  # block-relative weight matrices (for maskers)


_LLAMA_LIKE = dict(
    layers="model.layers", embed="model.embed_tokens", pos_embed=None, final_norm="model.norm",
    attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp", mlp_pre=("mlp.gate_proj", "output"),
    mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_down="mlp.down_proj",
    attn_out=("self_attn", "output"), mlp_out=("mlp", "output"), resid_mid=("post_attention_layernorm", "input"),
    weight_names=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", **_LLAMA_LIKE),
    "mistral": ArchSpec(family="mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec(family="qwen2", **_LLAMA_LIKE),
    "qwen3": ArchSpec(family="qwen3", **_LLAMA_LIKE),
    "olmo": ArchSpec(family="olmo", **_LLAMA_LIKE),
    "olmo2": ArchSpec(family="olmo2", **{**_LLAMA_LIKE, "attn_out": ("post_attention_layernorm", "output"),
                                        "mlp_out": ("post_feedforward_layernorm", "output"),
                                        "resid_mid": ("mlp", "input")}),
    "gemma2": ArchSpec(family="gemma2", **{**_LLAMA_LIKE, "attn_out": ("post_attention_layernorm", "output"),
                                          "mlp_out": ("post_feedforward_layernorm", "output"),
                                          "resid_mid": ("pre_feedforward_layernorm", "input")}),
    "gpt2": ArchSpec(
        family="gpt2", layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
        final_norm="transformer.ln_f", attn="attn", o_proj="attn.c_proj", mlp="mlp",
        mlp_pre=("mlp.c_fc", "output"), mlp_in=("mlp.c_fc",), mlp_down="mlp.c_proj",
        attn_out=("attn", "output"), mlp_out=("mlp", "output"), resid_mid=("ln_2", "input"), conv1d=True,
        n_heads_attr="n_head", n_kv_attr=None,
        weight_names=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ),
    "gpt_neox": ArchSpec(
        family="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in", pos_embed=None,
        final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", attn="attention", o_proj="attention.dense",
        mlp="mlp", mlp_pre=("mlp.dense_h_to_4h", "output"), mlp_in=("mlp.dense_h_to_4h",),
        mlp_down="mlp.dense_4h_to_h", attn_out=("attention", "output"), mlp_out=("mlp", "output"),
        resid_mid=None, parallel=True, n_kv_attr=None,
        weight_names=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
}


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def arch_for(model: Any) -> ArchSpec:
    """The table row of an HF model, adjusting for per-model switches (GPT-NeoX sequential blocks,
    the lm_head name of GPT-NeoX checkpoints)."""
    mt = getattr(model.config, "model_type", None)
    spec = ARCHS.get(mt)
    if spec is None:
        raise UnsupportedModelError(
            f"architecture {mt!r} is not in Sonde's table.",
            hint=f"Supported families: {', '.join(sorted(ARCHS))}. Add an ArchSpec in probes/arch.py.",
        )
    if mt == "gpt_neox":
        import dataclasses

        kw = {}
        if not hasattr(model, "lm_head") and hasattr(model, "embed_out"):
            kw["lm_head"] = "embed_out"
        if not getattr(model.config, "use_parallel_residual", True):
            kw.update(parallel=False, resid_mid=("post_attention_layernorm", "input"))
        if kw:
            spec = dataclasses.replace(spec, **kw)
    return spec
