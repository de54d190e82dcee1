"""Redraw the README's pictures (docs/img/*.png) from the embedded model.

    python docs/make_figures.py                    # every figure
    python docs/make_figures.py logit_lens routes  # some of them

Each figure is the analysis's own ``plot()`` of a small run on the embedded model, exported by
:func:`analyses.core.report.figure_bytes` (kaleido + a headless Chromium) and kept under 150 KB.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMG = ROOT / "docs" / "img"
MAX_BYTES = 150_000
PROMPT = "The Eiffel Tower is located in the city of"


def logit_lens(probe):
    from analyses import logit_lens as L

    return L.run(probe, PROMPT, config=L.Config(k=3)).plot()


def routes(probe):
    from analyses import routes as R

    return R.run(probe, PROMPT).plot()


def sinks(probe):
    from analyses import sinks as S

    return S.run(probe, domain="prose", config=S.Config(n_samples=16)).plot()


def counterfactual(probe):
    from analyses import counterfactual as cf

    return cf.run(probe, "Once upon a time, Lyra", "token:1=sister", config=cf.Config(max_new_tokens=20, seed=3)).plot()


def bigram(probe):
    from analyses import bigram as B

    return B.default_result().plot()  # the shipped mask (blocks 0-1 of the embedded model): no training here


def critical(probe):
    from analyses import critical as C
    from analyses.tasks import Problem, format_prompt, make_checker

    p = Problem("Tom has 3 apples and buys 4 more. How many apples does he have?", 7.0)
    cfg = C.Config(n_rollouts=8, max_new_tokens=8, granularity="token", alternatives="none", seed=0)
    return C.search(probe, format_prompt(probe, p), "3 + 4 = 8.", make_checker(p), config=cfg).plot()


def fiber(probe):
    from analyses import fiber as F

    return F.run(probe, config=F.Config(tokens=tuple(range(0, 49152, 200)), vol_max=300)).plot()


FIGURES = {"logit_lens": logit_lens, "routes": routes, "sinks": sinks, "counterfactual": counterfactual,
           "critical": critical, "fiber": fiber, "bigram": bigram}


def save_png(fig, path: Path, width: int = 900, height: int = 500) -> int:
    """Export ``fig`` as a PNG under MAX_BYTES (smaller scale until it fits); returns the size in bytes."""
    from analyses.core.report import figure_bytes

    fig.update_layout(width=width, height=height)
    for scale in (1.0, 0.8, 0.6):
        data = figure_bytes(fig, "png", width=width, height=height, scale=scale)
        if len(data) <= MAX_BYTES:
            break
    path.write_bytes(data)
    return len(data)


def main(names: list[str]) -> int:
    import torch

    from probes import load_model

    torch.manual_seed(0)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"error: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    IMG.mkdir(parents=True, exist_ok=True)
    probe = load_model("embedded", device="cpu")
    for name in names or list(FIGURES):
        t = time.perf_counter()
        size = save_png(FIGURES[name](probe), IMG / f"{name}.png")
        print(f"docs/img/{name}.png: {size / 1000:.0f} KB in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
