"""TransformerLens 4 backend: sites are TransformerBridge hook points.

``TransformerBridge.boot_transformers`` wraps the HF model (raw HF weights, no folding) and switches
it to eager attention, so ``hook_pattern`` is the model's own probability tensor; the conformance
tests compare it with the nnsight backend's recomputed patterns.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch

from .backend import Probe, _Plan
from .sites import Site

__all__ = ["TransformerLensProbe"]

# Sonde's site names are TransformerLens names, except where the bridge differs
_OVERRIDES = {
    "ln_final": "ln_final.hook_out",  # the bridge's hook_normalized is before the norm's weight
    "logits": "unembed.hook_out",
}


_NO_ROTARY_HOOKS = {"gpt_neox"}


class TransformerLensProbe(Probe):
    """Probe backed by :class:`transformer_lens.model_bridge.TransformerBridge`."""

    backend = "transformer_lens"

    def __init__(self, hf_model, tokenizer, *, name: str, source: str):
        super().__init__(hf_model, tokenizer, name=name, source=source)
        from transformer_lens.model_bridge import TransformerBridge

        # TL logs deprecation notes and prints its own banner; keep the user's console clean.
        with contextlib.redirect_stdout(io.StringIO()):
            prev = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)
            try:
                self.bridge = TransformerBridge.boot_transformers(
                    getattr(tokenizer, "name_or_path", None) or name, hf_model=hf_model, tokenizer=tokenizer
                )
            finally:
                logging.getLogger().setLevel(prev)
        hooks = self.bridge.hook_dict
        self._rot = {k: f"blocks.{{L}}.attn.hook_rot_{k}" for k in ("q", "k") if "blocks.0.attn.hook_rot_q" in hooks}

    def _check_site(self, s: Site) -> None:
        super()._check_site(s)
        # The bridge exposes post-rotary q/k through hook_rot_q/k, which its GPT-NeoX adapter never fires.
        if s.kind in ("q", "k") and self.info.family in _NO_ROTARY_HOOKS:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"the transformer_lens backend gives no post-rotary {s.kind} for {self.info.family} models.",
                hint="Use backend='nnsight' for hook_q/hook_k on this model (hook_pattern works on both).",
            )

    def hook_name(self, s: Site) -> str:
        """The bridge hook that carries a site."""
        if s.kind in self._rot:
            return self._rot[s.kind].format(L=s.layer)
        return _OVERRIDES.get(s.kind, s.name)

    def _run(self, ids: torch.Tensor, plan: _Plan, attention_mask):
        hooks = []
        for s in plan.sites():
            def fn(x, hook, s=s):
                new = self._visit(plan, s, x)
                return new if new is not None else x

            hooks.append((self.hook_name(s), fn))
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = self.bridge.run_with_hooks(ids, fwd_hooks=hooks, return_type="logits", **kwargs)
        return out
