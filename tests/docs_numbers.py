"""docs/readme_numbers.py, the one module that holds the docs' figures, for the tests that check the pages state them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def numbers():
    """The module docs/readme_numbers.py (imported once, by path: docs/ is not a package)."""
    if "readme_numbers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "docs" / "readme_numbers.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["readme_numbers"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["readme_numbers"]
