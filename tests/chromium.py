"""What the headless-Chromium tests share: the browser's path, the artifacts folder, bounds and checks.
The ``server`` (``sonde dashboard``'s server on a free loopback port) and ``browser`` fixtures are in conftest.py."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "_artifacts"
COLD_START_S = 180  # a cold server loads torch + the model and runs the first lens before the first paint


def _no_exception(page) -> None:
    exc = page.locator("[data-testid='stException']")
    assert exc.count() == 0, "Streamlit shows an exception: " + exc.first.inner_text()[:2000]
