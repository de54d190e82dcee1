"""Layering: analyses reach the model only through the probe API (probes/), never its HF module tree."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = sorted(p for p in (ROOT / "analyses").rglob("*.py"))


def _param(p: Path):
    return pytest.param(p, id=p.relative_to(ROOT).as_posix())


def test_the_scan_sees_the_analyses():
    assert len(ANALYSES) > 10 and any(p.name == "bigram.py" for p in ANALYSES)
    assert any(p.parent.name == "core" for p in ANALYSES) and any(p.parent.name == "cli" for p in ANALYSES)


@pytest.mark.parametrize("path", [_param(p) for p in ANALYSES])
def test_analyses_never_touch_hf_model(path: Path):
    lines = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if "hf_model" in line]
    assert not lines, f"{path.relative_to(ROOT)} reaches into probe.hf_model (use the probe API, probes/):\n" + "\n".join(lines)
