"""Every figure the docs state, computed by today's code, in one module.

    python docs/readme_numbers.py sinks            # print the "Measured" bullets of docs/readme/sinks.md
    python docs/readme_numbers.py counterfactual   # print the worked example of docs/readme/counterfactual.md

* ``GALLERY``: the README's first command per analysis and what it prints on the embedded model
  (``benchmarks/readme_commands.py`` runs them and checks the printed figures).
* Sinks, counterfactual, critical tokens, bigram and fiber: functions that return the exact Markdown (or phrases) the
  manual pages state; the tests of each analysis check that the page still contains them.
* Tables read from ``benchmarks/RESULTS.md`` (the routes timing table): ``docs/build_readme.py`` writes them into the
  pages' ``<!-- generated: NAME -->`` blocks.

Everything runs on the embedded SmolLM2-135M-Instruct on the CPU in fp32 with fixed seeds.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["GALLERY", "Example", "gallery_checked", "routes_table", "sinks_measured", "sinks_parts", "render_sinks",
           "counterfactual_example", "CF_PROMPT", "CF_CONFIG", "critical_figures", "bigram_figures", "fiber_numbers",
           "fiber_full_numbers", "fiber_phrases"]

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


# ------------------------------------------------------------------------------------------------ the README gallery
@dataclass(frozen=True)
class Example:
    """One README gallery command: what it prints on the embedded model (``key: value`` lines of its output)."""

    section: str  # its manual page, docs/readme/<section>.md
    verb: str
    command: str  # the whole command line, starting with "sonde "
    prints: tuple[str, ...] = ()  # lines of its output; a number matches within ``tol`` (absolute)
    tol: float = 0.0
    note: str = ""  # what else to read from it (shown beside the figures)
    long: str = ""  # a command known to take over 3 min on 2 idle cores: its time ("about 18 min"); not run by default

    def line(self) -> str:
        t = self.long or gallery_times().get(self.command, "")
        return self.command + (f"   # {'long: ' if self.long else ''}{t}" if t else "")


PROMPT = "The Eiffel Tower is located in the city of"
CF_PROMPT = "Once upon a time, Lyra"
CF_CONFIG = dict(max_new_tokens=20, seed=3)
GALLERY: tuple[Example, ...] = (
    Example("logit_lens", "logit-lens", f'sonde run logit-lens --prompt "{PROMPT}" --html lens.html',
            ("next_token:  Paris", "p_next: 0.7015", "first_layer_top1_last_pos: 27"), tol=0.002,
            note="`lens.html` is the heat map above (opens offline)"),
    Example("routes", "routes", f'sonde run routes --prompt "{PROMPT}" --position -1',
            ("route_nodes: 195", "route_edges: 233"), note="and the heads that carry most of it, L1H6 first"),
    Example("sinks", "sinks", "sonde run sinks --domain prose -n 16",
            ("Sink_1^0.3 (%): 71.9", "Sink_1 past layer 1 (%): 77.03", "sink heads (majority): 199/270"), tol=0.1),
    Example("sinks", "dormant", "sonde run dormant --domains prose,code,arithmetic --heads L20H6 -n 8",
            ("dormant heads on prose: 3/270", "dormant heads on code: 5/270", "dormant heads on arithmetic: 13/270",
             "heads that flip between domains: 14")),
    Example("sinks", "bb-toy", "sonde run bb-toy --layers 1 --steps 300",
            ("L0 bos_mass: 0.442", "L0 prev_mass: 0.827", "L0 bos_value: 0.425"), tol=0.03,
            note="a sink forming in a toy transformer trained from scratch"),
    Example("bigram", "bigram",
            "sonde run bigram --corpus builtin --schedule short --steps 20 --batch-size 4 --seq-len 32 --layers 0,1 "
            "--drop-other-layers --eval-rows 16",
            note="20 steps show the training and the ablation table, not yet a sparse mask: the shipped mask pictured "
                 "took 800 steps (about 18 min, the page's last command)"),
    Example("fiber", "fiber", "sonde run fiber --tokens 0:49152:200 --vol-max 300",
            ("tested: 246", "singular[none]: 71", "gap[none]: 17", "singular[holm]: 52"),
            note="every 200th token, tested against the whole vocabulary"),
    Example("critical", "critical",
            "sonde run critical --problems 1 --samples 4 --rollouts 8 --max-new-tokens 32 --granularity step "
            "--alternatives none",
            note="samples answers to a built-in word problem until one is wrong, then rolls out each prefix of it"),
    Example("counterfactual", "counterfactual",
            f'sonde run counterfactual --prompt "{CF_PROMPT}" --intervene "token:1=sister" --max-new-tokens 20 --seed 3',
            ("""counterfactual: "'s sister, Nana, had the pleasure of creating a magical creature called the Lyra's Kiss\"""",)),
)
# The checker's rows in benchmarks/RESULTS.md start with this heading text.
CHECK_HEADING = "README commands"


def _checks() -> list[tuple[str, list[list[str]]]]:
    """Every ``README commands`` section of benchmarks/RESULTS.md, oldest first: (heading, table rows as cells)."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    out = []
    for part in text.split("\n## ")[1:]:
        head, _, body = part.partition("\n")
        if CHECK_HEADING in head:
            out.append((head, [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in body.splitlines()
                               if ln.startswith("| `sonde")]))
    return out


def _latest_rows() -> dict[str, tuple[str, str, str]]:
    """Command -> (result, time, date) of its latest check (a command a run did not get to keeps its earlier one)."""
    rows = {}
    for head, cells in _checks():
        for r in cells:
            if len(r) >= 3 and not r[1].startswith("not run"):
                rows[r[0].strip("`")] = (r[1], r[2], head.split()[0])
    return rows


def gallery_times() -> dict[str, str]:
    """Command -> its wall-clock time in its latest check (e.g. "41 s")."""
    return {cmd: t for cmd, (_, t, _) in _latest_rows().items() if t}  # a command not run keeps no time


def gallery_checked() -> str:
    """When the gallery's commands were last checked, and how they fared (for the README)."""
    rows = _latest_rows()
    mine = [rows[ex.command] for ex in GALLERY if ex.command in rows]
    if not mine:
        return "not yet run"
    passed = sum(1 for r in mine if r[0].startswith("pass"))
    dates = sorted({r[2] for r in mine})
    when = dates[-1] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return f"{passed} of {len(GALLERY)} passed when last run, {when}; times and conditions in benchmarks/RESULTS.md"


# ------------------------------------------------------------------------------------- tables from RESULTS.md
def results_sections() -> list[tuple[str, str]]:
    """benchmarks/RESULTS.md as (heading, body) pairs in file order (new entries are appended)."""
    text = RESULTS.read_text(encoding="utf-8")
    return [(p.split("\n", 1)[0], p.split("\n", 1)[1] if "\n" in p else "") for p in text.split("\n## ")[1:]]


def routes_table() -> str:
    """The routes page's timing table, from the latest benchmarks/RESULTS.md section with the compiled-kernel and
    top-down rows of ``benchmarks/routes.py``."""
    found = [(h, b) for h, b in results_sections() if "**compiled kernel**" in b and "top-down route" in b]
    head, body = found[-1]

    def cell(kind: str, T: int, what: str = "ratio") -> str:
        m = re.search(rf"\| `routes.py` \| {kind}[^|]*T={T} \| ([^|]*)\|", body)
        got = m and re.search(r"([\d.]+×)" if what == "ratio" else r"peak RSS ([\d.]+ [GM]B)", m.group(1))
        return got.group(1) if got else "—"

    compiled = re.escape("all-position graph, **compiled kernel**")
    rows = ["| Prompt length | All positions, compiled | All positions, eager | Top-down route | Peak RSS (compiled) |",
            "|---|---|---|---|---|"]
    for T in (128, 512):
        rows.append(f"| T = {T} | {cell(compiled, T)} | {cell('all-position graph, eager kernel', T)} | "
                    f"{cell('top-down route', T)} | {cell(compiled, T, 'peak')} |")
    date, _, where = head.replace("same machine, ", "2-core CPU, ").partition(" — ")
    timing = "in process CPU time " if "in CPU time" in body else ""
    return (f"**Measured numbers** (`benchmarks/routes.py`, {date}, {where or 'CPU'}; embedded model, fp32, ratios "
            f"{timing}against a plain SDPA forward of the same input in the same run; warm compiled kernel; the latest rows of "
            "[benchmarks/RESULTS.md](../../benchmarks/RESULTS.md)):\n\n" + "\n".join(rows))


def time_bullet() -> str:
    """The README's "Time" bullet: the latest `make test` on a fresh clone recorded in benchmarks/RESULTS.md."""
    found = [(h, b) for h, b in results_sections() if "`make test` on a fresh clone" in h]
    head, body = found[-1]
    m = re.search(r"tests (\d+ min \d+ s) \(([\d,]+) passed", " ".join(body.split()))
    cpu = re.search(r"CPU \(([^)]*)\)", head)
    return ("* **Time**: every analysis has a first command that runs in seconds to a few minutes on 2 CPU cores (the "
            "gallery below); longer runs print a progress bar with the time left. `make test` ran "
            f"{m.group(2)} tests in {m.group(1)} on a fresh clone ({cpu.group(1) if cpu else 'CPU'}, {head.split()[0]}; "
            "every run: [benchmarks/RESULTS.md](benchmarks/RESULTS.md)).")


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



# ------------------------------------------------------------------------------------------------ critical tokens
def critical_figures(example=None) -> dict[str, str]:
    """Every figure docs/readme/critical.md states, as the text it shows (``tests/test_critical.py`` checks each appears
    there). ``example``: the result of :func:`analyses.critical.doc_example` (adds its figures)."""
    from analyses.critical import Config, simulate_sprt, token_decision

    t = Config().sprt()
    f = {"min_dead": f"{t.min_dead()} rollouts", "min_alive": f"{t.min_alive()} successes",
         "one_vs_zero": f"1 of 8 then 0 of 8 is `{token_decision(t.decide(8, 1), t.decide(8, 0), False)}`"}
    dead, alive = simulate_sprt(t, t.p_dead), simulate_sprt(t, t.p_alive)
    f["sim_dead"] = f"p = 3/64: called alive {dead['alive']:.1%}, {dead['mean_rollouts']:.1f} rollouts on average"
    f["sim_alive"] = f"p = 0.25: called dead {alive['dead']:.1%}, {alive['mean_rollouts']:.1f} rollouts on average"
    if example is not None:
        r = example.traces.iloc[0]
        f["example"] = (f"{r.decision}: {r.critical_token.strip()!r} at {r.critical_pos}, success {r.score_before:.2f} "
                        f"[{r.ci_before_lo:.2f}, {r.ci_before_hi:.2f}] ({r.n_before} rollouts) -> {r.score_after:.2f} "
                        f"[{r.ci_after_lo:.2f}, {r.ci_after_hi:.2f}] ({r.n_after} rollouts)")
        alts = example.alternatives
        f["alternatives"] = ", ".join(f"{a.token.strip()!r} {a.n_correct}/{a.n}" for a in alts.itertuples())
    return f


# ------------------------------------------------------------------------------------------------------- bigram
def bigram_figures(result=None) -> dict[str, str]:
    """The figures docs/readme/bigram.md states, as the text it shows (``tests/test_bigram.py`` checks each appears
    there): the paper schedule cut to 250 steps, and for ``result`` its sparsity, final undecided fraction and held-out
    bigram CE against the random same-size mask, the full model and the bigram rows' own entropy."""
    from analyses.bigram import short_run_config, temperature_after

    f = {"paper_250": f"β = {temperature_after(250):.2f} after 250 steps",
         "short_250": f"temp_mult = {short_run_config(250).temp_mult:.4f}"}
    if result is not None:
        ab = result.ablation.set_index("variant")
        und = float(result.curve["undecided"].iloc[-1]) if len(result.curve) else float("nan")
        f["kept"] = f"{result.sparsity:.2%} of block weights kept"
        f["undecided"] = f"{und:.3%} of mask entries undecided"
        f["ce"] = (f"held-out bigram CE {ab.loc['subnetwork', 'bigram_xent_nats']:.2f} nats (random same-size mask "
                   f"{ab.loc['random', 'bigram_xent_nats']:.2f}, full model {ab.loc['full', 'bigram_xent_nats']:.2f}, "
                   f"bigram entropy {ab.loc['bigram', 'bigram_xent_nats']:.2f})")
    return f


# -------------------------------------------------------------------------------------------------------- fiber
FIBER_SUBSET = (0, 49152, 50)  # the notebook's tokens: every 50th row


def fiber_numbers(probe, *, full: bool = True, progress=None) -> dict:
    """Every number docs/readme/fiber.md states, computed by today's code.

    ``full=False`` skips the full-vocabulary runs (minutes on CPU) and returns the fast part: duplicate
    rows, the uniform 2-sphere check and the notebook subset (every 50th token, volumes 10–300).
    """
    import numpy as np
    import torch

    from analyses.fiber import Config, run

    E = probe.W_E.detach().float()
    _, inv, cnt = torch.unique(E, dim=0, return_inverse=True, return_counts=True)
    out: dict = {"vocab": int(E.shape[0]), "duplicate_rows": int((cnt[inv] > 1).sum())}
    x = np.random.default_rng(0).normal(size=(1000, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for mode in ("parity", "calibrated"):
        r = run(embeddings=x, config=Config(vol_min=10, vol_max=100, mode=mode, keep_curves="none"))
        out[f"sphere_{mode}"] = int(r.verdicts()["reject_manifold"].sum())
    toks = tuple(range(*FIBER_SUBSET))
    for mode in ("calibrated", "parity"):
        r = run(probe, config=Config(tokens=toks, vol_max=300, mode=mode, keep_curves="none"))
        c = r.counts().set_index("correction")
        out[f"subset_{mode}"] = {m: {k: int(c.loc[m, k]) for k in ("singular", "gap", "no_rejection")} for m in ("none", "holm", "bh")}
    out["subset_tokens"] = len(toks)
    if full:
        out.update(fiber_full_numbers(probe, progress=progress))
    return out


def fiber_full_numbers(probe, *, progress=None) -> dict:
    """The full-vocabulary part of :func:`fiber_numbers`: calibrated mode, volumes 10–1000, α = 1e−3."""
    from analyses.fiber import Config, run

    res = run(probe, config=Config(keep_curves="none"), progress=progress)
    c = res.counts().set_index("correction")
    return {"full_calibrated": {m: {k: int(c.loc[m, k]) for k in ("singular", "gap", "no_rejection", "reject_fb_small", "reject_fb_large")}
                                for m in ("none", "holm", "bh")},
            "full_tested": int(res.testable.sum()), "kinds": res.kind_table("holm").to_dict(orient="records"),
            "timings": {k: round(v, 1) for k, v in res.timings.items()}}


def fiber_phrases(numbers: dict) -> list[str]:
    """The sentences of docs/readme/fiber.md that carry :func:`fiber_numbers` (``tests/test_fiber.py`` checks them)."""
    from analyses.fiber import kinds_markdown

    n = numbers
    sc, sp = n["subset_calibrated"], n["subset_parity"]
    out = [f"the embedded model has {n['duplicate_rows']} such rows",
           f"it flags {n['sphere_parity']}/1000 points, where calibrated mode flags {n['sphere_calibrated']}/1000",
           (f"On every 50th token ({n['subset_tokens']} tokens, volumes 10–300, as in the notebook) calibrated mode finds "
            f"{sc['none']['singular']} singular, {sc['none']['gap']} gap and {sc['none']['no_rejection']} with no rejection "
            f"({sc['holm']['singular']}, {sc['holm']['gap']} and {sc['holm']['no_rejection']} with Holm); parity mode rejects "
            f"“manifold” at {sp['none']['singular']} ({sp['holm']['singular']} with Holm)")]
    if "full_calibrated" in n:
        fc = n["full_calibrated"]
        out.append(f"of {n['full_tested']} tokens, {fc['none']['singular']} are singular, {fc['none']['gap']} gap and "
                   f"{fc['none']['no_rejection']} show no rejection with no correction; with Holm {fc['holm']['singular']}, "
                   f"{fc['holm']['gap']} and {fc['holm']['no_rejection']}; with BH {fc['bh']['singular']}, {fc['bh']['gap']} and "
                   f"{fc['bh']['no_rejection']}")
        out.append(f"{fc['holm']['reject_fb_small']} singular tokens (Holm) reject “fiber bundle” at the smaller radius and "
                   f"{fc['holm']['reject_fb_large']} at the larger")
        out.append(kinds_markdown(n["kinds"]))
    return out

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
