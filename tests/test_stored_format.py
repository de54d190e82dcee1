"""The stored format does not drift: results written by the earlier hand-written save code (folders in
``tests/data/stored``, made by ``tests/stored_results.py`` on tiny random models) load and re-save to the
same tables, arrays and manifest, and the shipped bigram default saves as it always did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyses.core.base import load_result
from stored_results import signature

DATA = Path(__file__).resolve().parent / "data" / "stored"
WANT = json.loads((DATA / "signatures.json").read_text())


@pytest.mark.parametrize("name", ["routes", "logit_lens", "fiber", "sinks", "dormant", "counterfactual"])
def test_saved_result_loads_and_resaves_identically(name, tmp_path):
    assert signature(DATA / name) == WANT[name]
    r = load_result(DATA / name)
    assert r.key == WANT[name]["manifest"]["key"]
    out = r.save(tmp_path / name)
    assert signature(out) == WANT[name]


def test_shipped_bigram_default_saves_as_before(tmp_path):
    from analyses import bigram

    out = bigram.default_result().save(tmp_path / "b")
    assert signature(out) == WANT["bigram_default"]
    assert signature(bigram.BigramResult.load(out).save(tmp_path / "again")) == WANT["bigram_default"]
