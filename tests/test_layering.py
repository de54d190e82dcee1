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


def test_cli_and_dashboard_start_import_no_torch():
    """`sonde dashboard` (and `sonde --help`, and an error line) start without torch, transformers or nnsight:
    `probes` exports lazily, so the CLI's `from probes.errors import ...` stays light and the dashboard's server
    answers before the model's libraries are imported (benchmarks/dashboard_start.py)."""
    import subprocess
    import sys

    code = ("import sys, probes, probes.errors, probes.labels, analyses.cli, dashboard.serve, dashboard.warm\n"
            "print(','.join(m for m in ('torch', 'transformers', 'nnsight', 'streamlit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported at start: {out}"


def test_probes_exports_resolve():
    """Every name in probes.__all__ resolves (lazily) to the object its module defines."""
    import importlib

    import probes

    for name in probes.__all__:
        obj = getattr(probes, name)
        mod = probes._WHERE.get(name)
        if mod is not None:
            assert obj is getattr(importlib.import_module(mod, "probes"), name), name
    assert "load_model" in dir(probes) and "Probe" in dir(probes)
    with pytest.raises(AttributeError):
        probes.no_such_name  # noqa: B018
