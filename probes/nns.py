"""nnsight backend: sites are read on the real HF module tree inside ``model.trace``.

The model keeps its own attention kernels (SDPA); q/k/v and patterns come from the taps that
:mod:`probes.attention` installs, so nnsight sees them as ordinary module outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from .attention import install_taps, tap_run
from .backend import Probe, _Plan
from .sites import Site

__all__ = ["NNsightProbe"]


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class NNsightProbe(Probe):
    """Probe backed by :class:`nnsight.NNsight` around the HF model."""

    backend = "nnsight"

    def __init__(self, hf_model, tokenizer, *, name: str, source: str):
        super().__init__(hf_model, tokenizer, name=name, source=source)
        layers = self.module(self.arch.layers)
        self._taps = install_taps(hf_model, [self.module(self.arch.attn, L) for L in range(len(layers))])
        from nnsight import NNsight

        self.nn = NNsight(hf_model)
        from .generation import last_logits_only

        self._last_logits = last_logits_only(hf_model)

    # envoy lookup -----------------------------------------------------------------------
    def _envoy(self, path: str, layer: int | None = None):
        root = self.nn
        full = path if layer is None else f"{self.arch.layers}.{layer}.{path}"
        for part in full.split("."):
            root = root[int(part)] if part.isdigit() else getattr(root, part)
        return root

    def _locate(self, s: Site):
        """(envoy, 'input'|'output', reshape) for a site."""
        a, L, i = self.arch, s.layer, self.info
        if s.kind == "embed":
            return self._envoy(a.embed), "output", None
        if s.kind == "resid_pre":
            return self._envoy(a.layers)[L], "input", None
        if s.kind == "resid_post":
            return self._envoy(a.layers)[L], "output", None
        if s.kind in ("q", "k", "v", "pattern"):
            return self._envoy(f"{a.attn}.sonde_taps.hook_{s.kind}", L), "output", None
        if s.kind == "z":
            return self._envoy(a.o_proj, L), "input", (i.n_heads, i.d_head)
        if s.kind == "attn_out":
            return (self._envoy(a.attn_out[0], L), a.attn_out[1], None)
        if s.kind == "resid_mid":
            return (self._envoy(a.resid_mid[0], L), a.resid_mid[1], None)
        if s.kind == "mlp_pre":
            return (self._envoy(a.mlp_pre[0], L), a.mlp_pre[1], None)
        if s.kind == "mlp_post":
            return self._envoy(a.mlp_down, L), "input", None
        if s.kind == "mlp_out":
            return (self._envoy(a.mlp_out[0], L), a.mlp_out[1], None)
        if s.kind == "ln_final":
            return self._envoy(a.final_norm), "output", None
        if s.kind == "logits":
            return self._envoy(a.lm_head), "output", None
        raise AssertionError(s)

    def _run(self, ids: torch.Tensor, plan: _Plan, attention_mask):
        sites = plan.sites()
        state = {t: (any(s.layer == L and s.kind in ("q", "k", "v") for s in sites), plan.pattern_mode(L))
                 for L, t in enumerate(self._taps)}
        located = [(s, *self._locate(s)) for s in sites]
        with tap_run(state):
            return self._trace(ids, attention_mask, plan, located)

    def _trace(self, ids, attention_mask, plan, located):
        kwargs = {"input_ids": ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if not plan.all_logits:
            kwargs.update(self._last_logits)  # the output layer for the last position only: up to a fifth of a small model's pass
        with self.nn.trace(**kwargs):
            for s, envoy, which, heads in located:
                raw = envoy.input if which == "input" else envoy.output
                x = _first(raw)
                view = x.view(*x.shape[:-1], *heads) if heads else x
                new = self._visit(plan, s, view)
                if new is not None:
                    view.copy_(new)
            out = self.nn.output.save()
        return out.logits
