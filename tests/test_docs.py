"""The README is assembled from docs/readme/*.md and starts with the two set-up commands."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_readme", ROOT / "docs" / "build_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_assembled_from_sections():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _builder().build(readme) == readme, "README.md is out of date: run python docs/build_readme.py"


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:8]
    cmds = [l.split("#")[0].strip() for l in head if l.startswith("make ")]
    assert cmds == ["make dashboard", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and "TORCH_SPEC" in ci
