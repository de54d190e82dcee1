"""docs/build_readme.py (the docs' one generator) and docs/readme_numbers.py (the one module that holds the docs'
figures), for the tests that check the pages: imported from docs/, which is not a package."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "docs") not in sys.path:
    sys.path.insert(0, str(ROOT / "docs"))


def builder():
    """The module docs/build_readme.py."""
    import build_readme

    return build_readme


def numbers():
    """The module docs/readme_numbers.py (through build_readme's own import)."""
    return builder().numbers()
