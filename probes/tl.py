"""TransformerLens 4 backend: sites are TransformerBridge hook points.

``TransformerBridge.boot_transformers`` wraps the HF model (raw HF weights, no folding) and switches
it to eager attention, so ``hook_pattern`` is the model's own probability tensor; the conformance
tests compare it with the nnsight backend's recomputed patterns.
"""

from __future__ import annotations

import contextlib
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

# The libraries' own loggers, quieted (by name, restored afterwards) while the bridge boots. Sonde never
# touches the root logger or sys.stdout: they belong to the application.
_LIBRARY_LOGGERS = ("transformer_lens", "transformers")


@contextlib.contextmanager
def _quiet(names, level: int = logging.ERROR):
    """Raise the given loggers to ``level`` for the block, restoring each one's own level after."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, before):
            lg.setLevel(lv)


def _bridge_class():
    """``TransformerBridge``. Importing TransformerLens sets the ``transformers`` logger to ERROR for the whole
    process; the level the caller had is put back, so loading a model changes no global logging state."""
    hf = logging.getLogger("transformers")
    before = hf.level
    try:
        from transformer_lens.model_bridge import TransformerBridge
    finally:
        hf.setLevel(before)
    return TransformerBridge


def _official_name(name: str) -> str:
    """TransformerLens's official name for a legacy alias (it would rename it itself, logging a deprecation
    note on the root logger); any other name unchanged."""
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias
    except ImportError:  # pragma: no cover - an older TransformerLens without aliases
        return name
    return resolve_model_alias(name) or name


class TransformerLensProbe(Probe):
    """Probe backed by :class:`transformer_lens.model_bridge.TransformerBridge`."""

    backend = "transformer_lens"

    def __init__(self, hf_model, tokenizer, *, name: str, source: str):
        super().__init__(hf_model, tokenizer, name=name, source=source)
        bridge = _bridge_class()
        model_name = getattr(tokenizer, "name_or_path", None) or name
        with _quiet(_LIBRARY_LOGGERS):
            self.bridge = bridge.boot_transformers(_official_name(model_name), hf_model=hf_model, tokenizer=tokenizer)
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
