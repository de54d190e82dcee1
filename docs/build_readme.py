"""Assemble README.md's long sections from docs/readme/*.md (run after editing a section).

    python docs/build_readme.py          # rewrites README.md in place
    python docs/build_readme.py --check  # exit 1 when README.md is out of date

Everything from the ``## Dashboard`` heading up to ``## Development`` is generated: the dashboard
section, then ``## Analyses`` (one section per analysis, headings demoted to ``###``), then
``## Beyond one machine`` (cluster sweeps and big models). The rest of README.md is hand-written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ROOT / "docs" / "readme"
ANALYSES = ["logit_lens", "routes", "sinks", "bigram", "fiber", "critical", "counterfactual"]
SCALE = ["cluster", "scale", "gpu"]
START, END = "## Dashboard", "## Development"


def _section(name: str, level: int = 3) -> str:
    path = SECTIONS / f"{name}.md"
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8").strip()
    lines = text.splitlines()
    if lines and lines[0].startswith("#"):
        lines[0] = "#" * level + " " + lines[0].lstrip("#").strip()
    # keep the section's inner headings below its own level
    out = [lines[0]] + [re.sub(r"^(#{1,3}) ", lambda m: "#" * max(len(m.group(1)), level + 1) + " ", l) for l in lines[1:]]
    return "\n".join(out)


def build(readme: str) -> str:
    i, j = readme.index(START), readme.index(END)
    parts = [_section("dashboard", 2),
             "## Analyses\n\nOne module per method in `analyses/`, each with a `sonde run` verb, a dashboard page, a notebook in "
             "`notebooks/`, a benchmark in `benchmarks/` and tests.",
             *[s for s in (_section(n) for n in ANALYSES) if s]]
    scale = [s for s in (_section(n) for n in SCALE) if s]
    if scale:
        parts += ["## Beyond one machine\n\nDataset sweeps on Ray, models across devices, remote models through NDIF, a memory "
                  "planner and checkpoint sweeps. Sonde runs on these engines; it has no scheduler of its own.", *scale]
    return readme[:i] + "\n\n".join(p for p in parts if p) + "\n\n" + readme[j:]


def main() -> int:
    path = ROOT / "README.md"
    old = path.read_text(encoding="utf-8")
    new = build(old)
    if "--check" in sys.argv:
        if new != old:
            print("README.md is out of date: run python docs/build_readme.py")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
