"""constraints.txt (the exact tested versions) satisfies the ranges pyproject.toml declares."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    reqs = [Requirement(r) for r in reqs]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins, "torch's build is chosen by TORCH_SPEC, not constraints.txt"
            continue
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"


def test_ci_torch_is_within_range():
    torch = next(r for r in _declared() if canonicalize_name(r.name) == "torch")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    m = re.search(r"TORCH_SPEC:-torch==([0-9][^}\"']*)", ci)
    assert m, ".ci/run does not pin torch through TORCH_SPEC"
    assert torch.specifier.contains(Version(m.group(1)))


def test_major_libraries_are_capped():
    caps = {canonicalize_name(r.name): r.specifier for r in _declared()}
    for name in ("torch", "transformers", "transformer-lens", "nnsight", "streamlit"):
        assert any(s.operator in ("<", "<=", "~=", "==") for s in caps[name]), f"{name} has no upper bound"
        assert any(s.operator in (">", ">=", "~=", "==") for s in caps[name]), f"{name} has no floor"


def test_constraints_match_the_needs_of_pinned_libraries():
    """transformer-lens's own floors hold for the versions pyproject allows (not only the pinned ones)."""
    declared = {canonicalize_name(r.name): r.specifier for r in _declared()}
    # transformer-lens 4.3 requires torch>=2.6 and transformers>=5.9: pyproject's floors are no lower
    for name, floor in (("torch", "2.6"), ("transformers", "5.9")):
        lowest = [Version(s.version) for s in declared[name] if s.operator == ">="]
        assert lowest and min(lowest) >= Version(floor), f"{name}'s floor is below what transformer-lens needs"
