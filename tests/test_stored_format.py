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


@pytest.mark.parametrize("name", ["logit_lens", "fiber", "sinks", "dormant", "counterfactual"])
def test_saved_result_loads_and_resaves_identically(name, tmp_path):
    assert signature(DATA / name) == WANT[name]
    r = load_result(DATA / name)
    assert r.key == WANT[name]["manifest"]["key"]
    out = r.save(tmp_path / name)
    assert signature(out) == WANT[name]


def test_routes_saved_whole_loads_and_resaves_packed(tmp_path):
    """Routes results saved before packing (the whole [L, T, T, H] array ``attn``) still load; saved again they hold the
    packed importances (table ``attn_lower``, array ``attn_upper``), which load back to the same arrays bit for bit, and
    every other table, array and manifest entry is as before."""
    import torch

    assert signature(DATA / "routes") == WANT["routes"]
    r = load_result(DATA / "routes")
    assert r.key == WANT["routes"]["manifest"]["key"]
    sig = signature(r.save(tmp_path / "routes"))
    assert "attn" not in sig["arrays"] and {"attn_lower", "attn_upper"} <= set(sig["tables"]) | set(sig["arrays"])
    old = WANT["routes"]
    assert {k: v for k, v in sig["arrays"].items() if k != "attn_upper"} == {k: v for k, v in old["arrays"].items() if k != "attn"}
    assert {k: v for k, v in sig["tables"].items() if k != "attn_lower"} == old["tables"]
    drop = ("tables", "arrays")
    assert {k: v for k, v in sig["manifest"].items() if k not in drop} == {k: v for k, v in old["manifest"].items() if k not in drop}
    again = load_result(tmp_path / "routes")
    for f in ("attn", "attn_resid", "ffn", "ffn_resid", "tokens"):
        a, b = getattr(r, f), getattr(again, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    assert nx_edges(r.route()) == nx_edges(again.route())


def nx_edges(g) -> dict:
    return {(u, v): d["weight"] for u, v, d in g.edges(data=True)}


def test_shipped_bigram_default_saves_as_before(tmp_path):
    from analyses import bigram

    out = bigram.default_result().save(tmp_path / "b")
    assert signature(out) == WANT["bigram_default"]
    assert signature(bigram.BigramResult.load(out).save(tmp_path / "again")) == WANT["bigram_default"]
