"""The measured figures of the README's sinks and counterfactual sections, computed by today's code.

    python docs/readme_numbers.py sinks            # print the "Measured" bullets of docs/readme/sinks.md
    python docs/readme_numbers.py counterfactual   # print the worked example of docs/readme/counterfactual.md

Each function returns the exact Markdown that the section contains; ``tests/test_sinks.py`` and
``tests/test_counterfactual.py`` check that the section still contains it (so every stated number is
reproduced). Everything runs on the embedded SmolLM2-135M-Instruct on the CPU in fp32 with fixed seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["sinks_measured", "counterfactual_example", "CF_PROMPT", "CF_CONFIG"]

SINK_SAMPLES = 16
DORMANT_SAMPLES = 8
BB_STEPS = 300


def _fmt(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def sinks_measured(probe=None) -> str:
    """The "Measured" bullets of docs/readme/sinks.md (about a minute on a CPU)."""
    import torch

    from analyses import bbtoy, dormant, sinks
    from probes import load_model

    probe = probe or load_model("embedded", device="cpu")
    cfg = sinks.Config(n_samples=SINK_SAMPLES, batch_size=8, ablation_samples=4)
    a = sinks.run(probe, domain="prose", config=cfg)
    b = sinks.run(probe, domain="prose", config=cfg.replace(bos="always"))
    L = a.alpha_mean.shape[0]
    LH = a.alpha_mean.shape[0] * a.alpha_mean.shape[1]
    late = [l for l in range(L) if a.sink_pct(layers=[l]) < 1 and l >= 2]
    s = a.summary()
    abl_a, abl_b = a.ablation.set_index("ablated"), b.ablation.set_index("ablated")
    peak = float(sinks.peak_ratio(a.resid_norm, 0).max())
    kept = [f"L{l}" for l in range(2, min(4, len(abl_b) - 1)) if abl_b.loc[f"L{l} MLP", "ratio"] > 0.5 * abl_b.loc["none", "ratio"]]
    d = dormant.run(probe, ["prose", "code", "arithmetic"], config=dormant.Config(n_samples=DORMANT_SAMPLES, heads=("L20H6",)))
    n_d = [int(d.dormant[i].sum()) for i in range(3)]
    code, ar = d.domains.index("code"), d.domains.index("arithmetic")
    bb = bbtoy.run(bbtoy.Config(steps=BB_STEPS))
    br = bbtoy.run(bbtoy.Config(steps=BB_STEPS, attention="relu"))
    h = bb.history
    first_mass = float(h[(h.layer == 0)].sort_values("step").bos_mass.iloc[0])
    lines = [
        f"* Prose, {a.n_samples} samples, T = 64, tokenizer default (no BOS): Sink_1^0.3 = {_fmt(a.sink_pct())} %; "
        f"**{_fmt(a.sink_pct(layers=range(2, L)))} % of heads past layers 0–1**",
        f"  are sink heads, {_fmt(a.sink_pct(layers=[0, 1]))} % in layers 0–1 (below 1 % also in layers "
        f"{', '.join(map(str, late)) or 'none'}); {s['sink heads (majority)']} heads are sink heads on most samples. "
        f"With BOS prepended: {_fmt(b.sink_pct())} % / {_fmt(b.sink_pct(layers=range(2, L)))} %.",
        f"* Key and value norms at the sink (no BOS, mean over layers and heads, relative to the other positions): "
        f"keys {_fmt(s['key norm at pos 0 / mean of others'], 2)}×, raw values {_fmt(s['raw value norm at pos 0 / mean of others'], 2)}×, "
        f"value drain after W_O {_fmt(s['value drain (after W_O) norm at pos 0 / mean of others'], 2)}×.",
        f"* Residual peak at position 0: up to {peak:.0f}× the largest other position (peak at layer {a.peak_layer}). "
        f"Zeroing the **layer-0 MLP** removes it on the first 4 samples",
        f"  (ratio {abl_a.loc['none', 'ratio']:.0f} → {abl_a.loc['L0 MLP', 'ratio']:.1f} without BOS, "
        f"{abl_b.loc['none', 'ratio']:.0f} → {abl_b.loc['L0 MLP', 'ratio']:.2f} with BOS); layer-1 MLP with BOS "
        f"{abl_b.loc['none', 'ratio']:.0f} → {abl_b.loc['L1 MLP', 'ratio']:.1f}; "
        f"{'zeroing layers ' + ' and '.join(kept) + ' leaves more than half of it' if kept else 'no later MLP keeps half of it'}.",
        f"* Dormant heads (θ = 0.9, BOS prepended, {DORMANT_SAMPLES} samples per domain): {n_d[0]}/{LH} on prose, "
        f"{n_d[1]}/{LH} on code, {n_d[2]}/{LH} on",
        f"  arithmetic; {len(d.flips)} heads flip between domains. **L20H6** is "
        f"{'dormant' if d.dormant[code, 20, 6] else 'active'} on code (sink mass {float(d.sink_mass[code, 20, 6]):.2f}, "
        f"Δloss {float(d.delta_loss[code, 20, 6]):+.3f} when moved to",
        f"  BOS) and {'dormant' if d.dormant[ar, 20, 6] else 'active'} on arithmetic ({float(d.sink_mass[ar, 20, 6]):.2f}, "
        f"Δloss {float(d.delta_loss[ar, 20, 6]):+.3f}).",
        f"* BB toy (1 layer, d = 32, seq 32, batch 32, {BB_STEPS} Adam steps): BOS mass at non-trigger positions "
        f"{first_mass:.2f} → {bb.final('bos_mass', 0):.2f},",
        f"  previous-token mass at triggers {bb.final('prev_mass', 0):.2f}, BOS value norm {bb.final('bos_value', 0):.2f}× the "
        f"others; ReLU attention: BOS weight {br.final('bos_mass', 0):.2f}, value {br.final('bos_value', 0):.2f}×.",
    ]
    del torch
    return "\n".join(lines)


CF_PROMPT = "Once upon a time, Lyra"
CF_CONFIG = dict(max_new_tokens=20, seed=3)


def counterfactual_example(probe=None) -> str:
    """The worked example of docs/readme/counterfactual.md (a few seconds on a CPU)."""
    from analyses import counterfactual as cf
    from probes import load_model

    probe = probe or load_model("embedded", device="cpu")
    c = cf.Config(**CF_CONFIG)
    r = cf.run(probe, CF_PROMPT, "token:1=sister", config=c)
    g = cf.run(probe, CF_PROMPT, "token:5=Maeve", config=c.replace(interventional=False))
    div = r.divergence_frame().set_index("kind")
    f = r.factual_str
    return "\n".join([
        f"Example (embedded model, `--seed {c.seed}`, {c.max_new_tokens} new tokens, τ = {c.temperature}): the factual response is",
        f"`{r.factual_text!r}`. With `token:1=sister` (response token 1 is `{f[1]!r}`, which starts a word, so the",
        f"replacement is forced as `{''.join(r.forced_str)!r}`) the counterfactual is `{r.counterfactual_text!r}`",
        f"({div.loc['counterfactual', 'frac_unchanged']:.0%} of the tokens after the edit unchanged, edit distance "
        f"{div.loc['counterfactual', 'edit_distance']:.2f}); the interventional baseline (fresh noise) is",
        f"`{r.texts('interventional')[0]!r}` ({div.loc['interventional', 'frac_unchanged']:.0%} unchanged, edit distance "
        f"{div.loc['interventional', 'edit_distance']:.2f}). Token 5 is `{f[5]!r}`, glued to the word before it, so",
        f"`token:5=Maeve` forces `{''.join(g.forced_str)!r}` (`{g.counterfactual_text[:24]!r}`…); write `token:5=\" Maeve\"` for a new word.",
    ])


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "sinks"
    print({"sinks": sinks_measured, "counterfactual": counterfactual_example}[which]())
