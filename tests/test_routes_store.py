"""How a routes result is stored: importances packed (each query's keys up to itself, zstd-compressed in a Parquet
table, and one value per row for the later keys) and residuals in float16 where they fit. A 256-token window of the
embedded model (the Information flow page's long-prompt view) stays under :data:`WINDOW_BOUND_BYTES`; routes drawn
from the reloaded result are the fresh result's routes, and its logit lens names the same top tokens within the
measured float16 margin; results saved whole (the layout before packing) still load."""

from __future__ import annotations

import pytest
import torch

from analyses import routes
from analyses.core import store
from analyses.core.base import load_result
from analyses.routes_lens import node_lens, node_probs
from probes import InputError

#: a 256-token window of the embedded model with residuals kept (as the page saves it) of :data:`TEXT`: 53.2 MB measured
#: (packed importances 19.3 MB, float16 residuals 27.0 MB, the tidy edge table 6.7 MB, the manifest 0.2 MB); saved whole
#: as before (float32 [L, T, T, H] importances 70.8 MB, float32 residuals 53.7 MB) it takes 132 MB
WINDOW_BOUND_BYTES = 56_000_000
WINDOW = 256
TEXT = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)  # the long prompt of tests/test_browser_long.py, cut
CASES = [(WINDOW - 1, 0.04, True), (WINDOW - 1, 0.02, False), (130, 0.08, True), (17, 0.01, True)]


slow = pytest.mark.slow  # the window's routes (1-2 min on 2 shared CPU cores) and its lens over the vocabulary


@pytest.fixture(scope="module")
def window(embedded, tmp_path_factory):
    ids = embedded.to_tokens(TEXT, prepend_bos=True)[0][-WINDOW:]
    assert ids.numel() == WINDOW
    fresh = routes.run(embedded, ids, config=routes.Config(keep_residuals=True))
    folder = fresh.save(tmp_path_factory.mktemp("routes") / "window")
    return fresh, folder


def _edges(g) -> dict:
    return {(u, v): (d["kind"], d["weight"], tuple(d.get("heads") or ())) for u, v, d in g.edges(data=True)}


@slow
def test_window_stored_bytes_are_bounded(window):
    fresh, folder = window
    size = store.stored_bytes(folder)
    assert size <= WINDOW_BOUND_BYTES, size
    arrays = store.read_manifest(folder)["arrays"]
    assert "attn" not in arrays and arrays["attn_upper"]["shape"] == [30, WINDOW]
    assert {arrays[f"residual.{k}"]["dtype"] for k in ("resid_mid", "mlp_out", "resid_post", "embed")} == {"float16"}
    # what the whole layout would take: the packed importances are under a third of it
    whole = fresh.attn.numel() * 4
    assert (folder / "attn_lower.parquet").stat().st_size < whole / 3


@slow
def test_reloaded_window_draws_identical_routes(window):
    fresh, folder = window
    back = load_result(folder)
    for f in ("attn", "attn_resid", "ffn", "ffn_resid", "tokens"):
        a, b = getattr(fresh, f), getattr(back, f)
        assert a.dtype == b.dtype == (torch.float32 if f != "tokens" else torch.int64) and torch.equal(a, b), f
    for pos, tau, renorm in CASES:
        a, b = fresh.route(pos, tau=tau, renormalize=renorm), back.route(pos, tau=tau, renormalize=renorm)
        assert a.number_of_edges() > 0 and _edges(a) == _edges(b), (pos, tau, renorm)
        assert torch.equal(fresh.head_importance(pos, tau, renorm), back.head_importance(pos, tau, renorm))


@slow
def test_reloaded_window_lens_names_the_same_tokens(window, embedded):
    """The page's logit lens (top 5 per route node) from float16 residuals: every probability within the measured margin
    of the fresh one, and the same top tokens wherever the fresh ranking is not a near-tie within twice that margin."""
    fresh, folder = window
    back = load_result(folder)
    assert all(v.dtype == torch.float32 for v in back.residuals.values())
    page = sorted(fresh.route(WINDOW - 1, tau=0.04).nodes)  # the page's default route, and a sample of the others
    others = sorted(set().union(*(fresh.route(p, tau=t, renormalize=r).nodes for p, t, r in CASES)) - set(page))
    nodes = page + others[:: max(1, len(others) // 300)]
    pf, pb = node_probs(embedded, fresh.residuals, nodes), node_probs(embedded, back.residuals, nodes)
    margin = float((pf - pb).abs().max())
    assert margin < 3e-3, margin  # measured 1.2e-3: the largest change of any probability of any of these nodes
    k = 5
    top_f, top_b = node_lens(embedded, fresh.residuals, nodes, k), node_lens(embedded, back.residuals, nodes, k)
    vf, idx_f = pf.topk(k + 1)
    idx_b = pb.topk(k).indices
    clear_top1 = 0
    for r, n in enumerate(nodes):
        # every token shown is within twice the margin of the fresh top k (a near-tie may swap two of them) ...
        assert bool((pf[r, idx_b[r]] >= vf[r, k - 1] - 2 * margin).all()), n
        # ... and the top j tokens are the fresh top j, in order, wherever rank j and j + 1 are further apart than that
        gaps = (vf[r, :-1] - vf[r, 1:] > 2 * margin).tolist()
        for j in range(1, k + 1):
            if all(gaps[:j]):
                assert idx_b[r, :j].tolist() == idx_f[r, :j].tolist(), (n, j)
                assert [t for t, _ in top_b[n][:j]] == [t for t, _ in top_f[n][:j]], (n, j)
        clear_top1 += gaps[0]
        for (t, p), (u, q) in zip(top_f[n], top_b[n]):
            if t == u:
                assert abs(p - q) <= margin + 1e-6
    assert clear_top1 >= 0.8 * len(nodes), (clear_top1, len(nodes))  # the top token was compared strictly for most nodes


@slow
def test_result_saved_whole_still_loads(window, tmp_path):
    """A result in the layout before packing (the whole ``attn`` array, float32 residuals; written here key by key as
    that code wrote them) loads to the fresh result's arrays and routes."""
    fresh, _ = window
    parts = fresh._saved()
    del parts["table"]["attn_lower"], parts["array"]["attn_upper"]
    parts["array"]["attn"] = fresh.attn
    parts["array"].update({f"residual.{k}": v for k, v in fresh.residuals.items()})  # float32, as before
    out = store.write_result(tmp_path / "old", analysis=fresh.analysis, model=fresh.model, config=fresh.config.to_dict(),
                             input_hash=fresh.input_hash, tables=parts["table"], arrays=parts["array"], extra=parts["extra"],
                             timings=fresh.timings, inputs=fresh.inputs)
    assert store.read_manifest(out)["arrays"]["attn"]["shape"] == list(fresh.attn.shape)
    assert store.stored_bytes(window[1]) < 0.45 * store.stored_bytes(out)  # measured 0.40
    back = load_result(out)
    assert back.key == fresh.key
    assert torch.equal(back.attn, fresh.attn)
    assert all(torch.equal(back.residuals[k], v) for k, v in fresh.residuals.items())
    for pos, tau, renorm in CASES:
        assert _edges(back.route(pos, tau=tau, renormalize=renorm)) == _edges(fresh.route(pos, tau=tau, renormalize=renorm))
    # saved again, it is packed
    again = back.save(tmp_path / "again")
    assert "attn" not in store.read_manifest(again)["arrays"] and torch.equal(load_result(again).attn, fresh.attn)


@pytest.mark.parametrize("mode", ["all", "route"])
def test_pack_round_trip_tiny(tiny, tmp_path, mode):
    """All positions and top-down rows (a subset of query positions, layers not visited left at zero) pack and unpack
    bit for bit; importances whose later keys do not hold one value per row are stored whole, never approximated."""
    probe = tiny("llama")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    res = routes.run(probe, ids, config=routes.Config(mode=mode, level="neuron"))
    packed = routes.pack_causal(res.attn, res.rows)
    assert set(packed) == {"lower", "upper"}
    assert torch.equal(routes.unpack_causal(packed["lower"], packed["upper"], res.n_tokens, res.rows), res.attn)
    back = load_result(res.save(tmp_path / mode))
    for f in ("attn", "neurons", "neuron_resid", "rows", "computed"):
        a, b = getattr(res, f), getattr(back, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert set(back.route().edges) == set(res.route().edges)
    if mode == "all":
        odd = res.attn.clone()
        odd[0, 3, 4, -1] += 1e-3  # a later key that differs from its row's value
        assert set(routes.pack_causal(odd, res.rows)) == {"dense"}


def test_pack_rows_subset():
    """Rows at some query positions only (as a top-down walk keeps them), one row without later keys."""
    L, T, H = 2, 6, 3
    rows = torch.tensor([1, 4, 5])
    a = torch.rand(L, 3, T, H)
    for r, q in enumerate(rows.tolist()):
        a[:, r, q + 1:] = torch.rand(L, 1, 1)  # one value per row beyond its query
    packed = routes.pack_causal(a, rows)
    assert packed["lower"].shape == (L, 2 + 5 + 6, H) and packed["upper"].shape == (L, 3)
    assert torch.equal(routes.unpack_causal(packed["lower"], packed["upper"], T, rows), a)
    with pytest.raises(InputError, match="damaged"):
        routes.unpack_causal(packed["lower"][:, 1:], packed["upper"], T, rows)

def test_half_if_fits():
    x = torch.tensor([1.0, -65504.0, 3e-8])
    assert routes.half_if_fits(x).dtype == torch.float16
    for bad in (torch.tensor([1.0, 70000.0]), torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])):
        assert routes.half_if_fits(bad) is bad
    assert routes.half_if_fits(torch.zeros(0)).dtype == torch.float32
