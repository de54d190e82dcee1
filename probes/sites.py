"""Sonde's hook-site vocabulary (TransformerLens-style names), shared by every backend.

Names and the tensor each one carries (B batch, T positions, H query heads, K key/value heads,
d model width, h head width, F MLP hidden width, V vocabulary):

==================================  ====================  ========================================
site                                shape                 meaning
==================================  ====================  ========================================
``hook_embed``                      [B, T, d]             token embeddings (before position embeddings)
``blocks.{L}.hook_resid_pre``       [B, T, d]             residual stream entering block L
``blocks.{L}.attn.hook_q``          [B, T, H, h]          queries after rotary / q-norm
``blocks.{L}.attn.hook_k``          [B, T, K, h]          keys after rotary / k-norm (K = KV heads)
``blocks.{L}.attn.hook_v``          [B, T, K, h]          values (K = KV heads; see ``expand_kv``)
``blocks.{L}.attn.hook_pattern``    [B, H, T, T]          attention probabilities [query, key]
``blocks.{L}.attn.hook_z``          [B, T, H, h]          per-head mixed values (input of W_O)
``blocks.{L}.attn.hook_result``     [B, T, H, d]          per-head output, z_h @ W_O,h (no bias)
``blocks.{L}.hook_attn_out``        [B, T, d]             attention block output (after W_O, bias)
``blocks.{L}.hook_resid_mid``       [B, T, d]             resid_pre + attn_out (sequential blocks)
``blocks.{L}.mlp.hook_pre``         [B, T, F]             MLP pre-activation (gate branch if gated)
``blocks.{L}.mlp.hook_post``        [B, T, F]             MLP hidden activation (input of W_out)
``blocks.{L}.hook_mlp_out``         [B, T, d]             MLP output
``blocks.{L}.hook_resid_post``      [B, T, d]             residual stream leaving block L
``ln_final.hook_normalized``        [B, T, d]             final norm output
``hook_logits``                     [B, T, V]             unembedding output
==================================  ====================  ========================================

Aliases: ``blocks.{L}.attn.hook_out`` = ``hook_attn_out`` and ``blocks.{L}.mlp.hook_out`` =
``hook_mlp_out``. Build names with :func:`site` rather than by hand.
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass
from typing import Literal

from .errors import UnknownSiteError

__all__ = ["Site", "site", "parse_site", "SITE_KINDS", "all_sites", "execution_order"]

SiteKind = Literal[
    "embed", "resid_pre", "q", "k", "v", "pattern", "z", "result", "attn_out", "resid_mid",
    "mlp_pre", "mlp_post", "mlp_out", "resid_post", "ln_final", "logits",
]

# kind -> name template, in the order the forward pass produces them within a block
_TEMPLATES: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "pattern": "blocks.{L}.attn.hook_pattern",
    "z": "blocks.{L}.attn.hook_z",
    "result": "blocks.{L}.attn.hook_result",
    "attn_out": "blocks.{L}.hook_attn_out",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "mlp_pre": "blocks.{L}.mlp.hook_pre",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "resid_post": "blocks.{L}.hook_resid_post",
    "ln_final": "ln_final.hook_normalized",
    "logits": "hook_logits",
}
SITE_KINDS: tuple[str, ...] = tuple(_TEMPLATES)
_ALIASES = {
    "blocks.{L}.attn.hook_out": "attn_out",
    "blocks.{L}.mlp.hook_out": "mlp_out",
    "blocks.{L}.attn.hook_attn_out": "attn_out",
}
_GLOBAL = {"embed", "ln_final", "logits"}


@dataclass(frozen=True, order=True)
class Site:
    """One hook site: a kind and, for per-block kinds, a layer index."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return _TEMPLATES[self.kind].format(L=self.layer)

    @property
    def per_layer(self) -> bool:
        return self.kind not in _GLOBAL

    def __str__(self) -> str:
        return self.name


def site(kind: str, layer: int | None = None) -> Site:
    """Build a site, e.g. ``site("resid_post", layer=3)`` -> ``blocks.3.hook_resid_post``."""
    if kind not in _TEMPLATES:
        close = difflib.get_close_matches(kind, SITE_KINDS, n=3)
        raise UnknownSiteError(
            f"unknown site kind {kind!r}.",
            hint=f"Did you mean {', '.join(close)}?" if close else f"Known kinds: {', '.join(SITE_KINDS)}.",
        )
    if kind in _GLOBAL:
        if layer is not None:
            raise UnknownSiteError(f"site kind {kind!r} has no layer; call site({kind!r}).")
        return Site(kind, None)
    try:  # ints, numpy ints and integer 0-d tensors (a loop over an array gives those); never a float or bool
        index = None if layer is None or isinstance(layer, bool) else operator.index(layer)
    except TypeError:
        index = None
    if index is None or index < 0:
        raise UnknownSiteError(f"site kind {kind!r} needs a layer index >= 0, got layer={layer!r}.")
    return Site(kind, index)


def _patterns():
    pats = []
    for kind, tpl in list(_TEMPLATES.items()) + [(kind, tpl) for tpl, kind in _ALIASES.items()]:
        rx = "^" + re.escape(tpl).replace(re.escape("{L}"), r"(\d+)") + "$"
        pats.append((re.compile(rx), kind))
    return pats


_PATTERNS = None


def parse_site(name: str | Site, n_layers: int | None = None) -> Site:
    """Parse a hook name (or pass a :class:`Site` through), checking the layer against ``n_layers``."""
    global _PATTERNS
    if isinstance(name, Site):
        s = name
    else:
        if _PATTERNS is None:
            _PATTERNS = _patterns()
        name = name.strip()
        s = None
        for rx, kind in _PATTERNS:
            m = rx.match(name)
            if m:
                s = Site(kind, int(m.group(1)) if m.groups() else None)
                break
        if s is None:
            examples = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern", "hook_embed"]
            cands = [t.format(L=0) for t in _TEMPLATES.values()]
            close = difflib.get_close_matches(name, cands, n=2)
            raise UnknownSiteError(
                f"unknown hook name {name!r}.",
                hint=(f"Did you mean {' or '.join(close)}? " if close else "")
                + f"Names look like {', '.join(examples)}; `sonde info --hooks` lists them all.",
            )
    if n_layers is not None and s.layer is not None and s.layer >= n_layers:
        raise UnknownSiteError(
            f"hook {s.name!r} names layer {s.layer}, but the model has layers 0..{n_layers - 1}."
        )
    return s


def all_sites(n_layers: int) -> list[Site]:
    """Every site of a model with ``n_layers`` blocks, in execution order."""
    out = [Site("embed")]
    for L in range(n_layers):
        out += [Site(k, L) for k in SITE_KINDS if k not in _GLOBAL]
    out += [Site("ln_final"), Site("logits")]
    return out


_ORDER = {k: i for i, k in enumerate(SITE_KINDS)}


def execution_order(s: Site) -> tuple[int, int]:
    """Sort key: the order in which a forward pass produces the sites."""
    if s.kind == "embed":
        return (-1, 0)
    if s.kind in ("ln_final", "logits"):
        return (1 << 30, _ORDER[s.kind])
    return (s.layer, _ORDER[s.kind])
