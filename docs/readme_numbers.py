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

__all__ = ["sinks_measured", "sinks_parts", "render_sinks", "counterfactual_example", "CF_PROMPT", "CF_CONFIG"]

SINK_SAMPLES = 16
DORMANT_SAMPLES = 8
BB_STEPS = 300


def _fmt(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def _sink_part(probe, bos: str) -> dict:
    from analyses import sinks

    a = sinks.run(probe, domain="prose", config=sinks.Config(n_samples=SINK_SAMPLES, batch_size=8, ablation_samples=4, bos=bos))
    L = a.alpha_mean.shape[0]
    s = a.summary()
    abl = a.ablation.set_index("ablated")
    return {"n": a.n_samples, "pct": a.sink_pct(), "late": a.sink_pct(layers=range(2, L)), "early": a.sink_pct(layers=[0, 1]),
            "quiet": [l for l in range(2, L) if a.sink_pct(layers=[l]) < 1], "majority": s["sink heads (majority)"],
            "key": s["key norm at pos 0 / mean of others"], "raw": s["raw value norm at pos 0 / mean of others"],
            "drain": s["value drain (after W_O) norm at pos 0 / mean of others"],
            "peak": float(sinks.peak_ratio(a.resid_norm, 0).max()), "peak_layer": a.peak_layer,
            "abl": {k: float(v) for k, v in abl["ratio"].items()}}


def _dormant_part(probe) -> dict:
    from analyses import dormant

    d = dormant.run(probe, ["prose", "code", "arithmetic"], config=dormant.Config(n_samples=DORMANT_SAMPLES, heads=("L20H6",)))
    out = {"LH": int(d.dormant[0].numel()), "n": [int(d.dormant[i].sum()) for i in range(3)], "flips": len(d.flips)}
    for dom in ("code", "arithmetic"):
        i = d.domains.index(dom)
        out[dom] = {"dormant": bool(d.dormant[i, 20, 6]), "mass": float(d.sink_mass[i, 20, 6]), "dl": float(d.delta_loss[i, 20, 6])}
    return out


def _bb_part() -> dict:
    from analyses import bbtoy

    out = {}
    for att in ("softmax", "relu"):
        bb = bbtoy.run(bbtoy.Config(steps=BB_STEPS, attention=att))
        h = bb.history[(bb.history.metric == "bos_mass") & (bb.history.layer == 0)]
        out[att] = {"first": float(h[h.step == h.step.min()]["value"].mean()), "mass": bb.final("bos_mass", 0),
                    "prev": bb.final("prev_mass", 0), "value": bb.final("bos_value", 0)}
    return out


def sinks_parts(probe=None) -> dict:
    """The measurements behind :func:`render_sinks` (JSON-able)."""
    from probes import load_model

    probe = probe or load_model("embedded", device="cpu")
    return {"never": _sink_part(probe, "tokenizer"), "bos": _sink_part(probe, "always"), "dormant": _dormant_part(probe),
            "bb": _bb_part()}


def render_sinks(parts: dict) -> str:
    a, b, d, bb = parts["never"], parts["bos"], parts["dormant"], parts["bb"]
    abl_a, abl_b = a["abl"], b["abl"]
    kept = [f"L{l}" for l in (2, 3) if f"L{l} MLP" in abl_b and abl_b[f"L{l} MLP"] > 0.5 * abl_b["none"]]
    LH = d["LH"]
    role = lambda x: "dormant" if x else "active"  # noqa: E731
    c, r = d["code"], d["arithmetic"]
    sm, rl = bb["softmax"], bb["relu"]
    return "\n".join([
        f"* Prose, {a['n']} samples, T = 64, tokenizer default (no BOS): Sink_1^0.3 = {_fmt(a['pct'])} %; "
        f"**{_fmt(a['late'])} % of heads past layers 0–1**",
        f"  are sink heads, {_fmt(a['early'])} % in layers 0–1 (below 1 % also in layers "
        f"{', '.join(map(str, a['quiet'])) or 'none'}); {a['majority']} heads are sink heads on most samples. "
        f"With BOS prepended: {_fmt(b['pct'])} % / {_fmt(b['late'])} %.",
        f"* Key and value norms at the sink (no BOS, mean over layers and heads, relative to the other positions): "
        f"keys {_fmt(a['key'], 2)}×, raw values {_fmt(a['raw'], 2)}×, value drain after W_O {_fmt(a['drain'], 2)}×.",
        f"* Residual peak at position 0: up to {a['peak']:.0f}× the largest other position (peak at layer {a['peak_layer']}). "
        f"Zeroing the **layer-0 MLP** removes it on the first 4 samples",
        f"  (ratio {abl_a['none']:.0f} → {abl_a['L0 MLP']:.1f} without BOS, {abl_b['none']:.0f} → {abl_b['L0 MLP']:.2f} with BOS); "
        f"layer-1 MLP with BOS {abl_b['none']:.0f} → {abl_b['L1 MLP']:.1f}; "
        f"{'zeroing layers ' + ' and '.join(kept) + ' leaves more than half of it' if kept else 'no later MLP keeps half of it'}.",
        f"* Dormant heads (θ = 0.9, BOS prepended, {DORMANT_SAMPLES} samples per domain): {d['n'][0]}/{LH} on prose, "
        f"{d['n'][1]}/{LH} on code, {d['n'][2]}/{LH} on",
        f"  arithmetic; {d['flips']} heads flip between domains. **L20H6** is {role(c['dormant'])} on code (sink mass "
        f"{c['mass']:.2f}, Δloss {c['dl']:+.3f} when moved to",
        f"  BOS) and {role(r['dormant'])} on arithmetic ({r['mass']:.2f}, Δloss {r['dl']:+.3f}).",
        f"* BB toy (1 layer, d = 32, seq 32, batch 32, {BB_STEPS} Adam steps): BOS mass at non-trigger positions "
        f"{sm['first']:.2f} → {sm['mass']:.2f},",
        f"  previous-token mass at triggers {sm['prev']:.2f}, BOS value norm {sm['value']:.2f}× the others; ReLU attention: "
        f"BOS weight {rl['mass']:.2f}, value {rl['value']:.2f}×.",
    ])


def sinks_measured(probe=None) -> str:
    """The "Measured" bullets of docs/readme/sinks.md (a few minutes on a CPU)."""
    return render_sinks(sinks_parts(probe))


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
    import json

    which = sys.argv[1] if len(sys.argv) > 1 else "sinks"
    if which.startswith("part:"):  # one measurement as JSON (parts can run in parallel): part:never|bos|dormant|bb
        from probes import load_model

        name = which[5:]
        if name == "bb":
            print(json.dumps(_bb_part()))
        else:
            pr = load_model("embedded", device="cpu")
            print(json.dumps(_dormant_part(pr) if name == "dormant" else _sink_part(pr, "always" if name == "bos" else "tokenizer")))
    elif which == "render":  # render from part files: render never.json bos.json dormant.json bb.json
        parts = dict(zip(("never", "bos", "dormant", "bb"), (json.loads(Path(f).read_text()) for f in sys.argv[2:6])))
        print(render_sinks(parts))
    else:
        print({"sinks": sinks_measured, "counterfactual": counterfactual_example}[which]())
