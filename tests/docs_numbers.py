"""docs/build_readme.py (the docs' one generator) and docs/readme_numbers.py (the one module that holds the docs'
figures), for the tests that check the pages: imported by path, since docs/ is not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def builder():
    """The module docs/build_readme.py (imported once)."""
    if "build_readme" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_readme", ROOT / "docs" / "build_readme.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["build_readme"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["build_readme"]


def numbers():
    """The module docs/readme_numbers.py (imported once, by build_readme's own loader)."""
    return builder().numbers()
