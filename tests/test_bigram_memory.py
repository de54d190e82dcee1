"""Bigram training without dense ``[B, T, V]`` tensors: the chunked soft cross-entropy against the sparse
bigram rows equals the dense loss (value and gradients), and micro-batched steps equal full-batch steps."""

from __future__ import annotations

import pytest
import torch

from analyses import bigram as B

pytestmark = pytest.mark.usefixtures("one_thread")


def _table(V: int, seed: int = 0) -> B.BigramTable:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3000,), generator=g)
    ids[ids == 3] = 4  # token 3 never occurs: its row backs off to the unigram
    return B.BigramTable.from_ids(ids, V)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_dense_loss_and_gradients(softcap, chunk):
    g = torch.Generator().manual_seed(1)
    N, d, V = 120, 12, 40
    h = torch.randn(N, d, generator=g, dtype=torch.float64).float().requires_grad_()
    W = torch.randn(V + 5, d, generator=g).requires_grad_()  # padded vocabulary: the extra rows get no gradient
    b = torch.randn(V + 5, generator=g).requires_grad_()
    table = _table(V)
    tok = torch.randint(0, V, (N,), generator=g)
    tok[::9] = 3
    z = torch.nn.functional.linear(h, W, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    dense = B.soft_cross_entropy(z, table.targets(tok))
    gd = torch.autograd.grad(dense, [h, W, b])
    sparse = B.chunked_soft_cross_entropy(h, W, table.rows(tok), bias=b, chunk=chunk, softcap=softcap)
    gs = torch.autograd.grad(sparse, [h, W, b])
    assert torch.allclose(sparse, dense, rtol=1e-6, atol=1e-6)
    for a, c in zip(gd, gs):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-7)
    assert torch.equal(gs[1][V:], torch.zeros_like(gs[1][V:]))
    # dense targets through the same path (the ``self`` target)
    dd = B.chunked_soft_cross_entropy(h, W, table.targets(tok), bias=b, chunk=chunk, softcap=softcap)
    assert torch.allclose(dd, dense, rtol=1e-6, atol=1e-6)


def test_sparse_rows_round_trip_to_the_dense_rows():
    table = _table(30)
    tok = torch.tensor([[3, 0, 5, 3], [29, 1, 1, 2]])
    rows = table.rows(tok)
    dense = rows.dense(30)
    assert torch.allclose(dense.sum(-1), torch.ones(8))
    assert torch.equal(dense.reshape(2, 4, 30), table.targets(tok))
    part = rows.slice(2, 6)
    assert torch.equal(part.dense(30), dense[2:6])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_model_loss_equals_dense_logits_loss(tiny, family):
    probe = tiny(family)
    V = probe.info.d_vocab
    table = _table(V)
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(2))
    masks = B.MaskSet(B.masked_weights(probe), init=0.3)
    with probe.frozen_weights(), masks.applied(probe):
        dense = B.soft_cross_entropy(probe.trainable_logits(ids), table.targets(ids))
        gd = torch.autograd.grad(dense, list(masks.logits))
        chunked = B._loss(probe, ids, table.rows(ids), chunk=4)
        gc = torch.autograd.grad(chunked, list(masks.logits))
    assert torch.allclose(chunked, dense, rtol=1e-5, atol=1e-6)
    for a, c in zip(gd, gc):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-8)


def test_micro_batches_give_the_full_batch_step(tiny):
    probe = tiny("llama")
    V = probe.info.d_vocab
    rows = torch.randint(0, V, (24, 8), generator=torch.Generator().manual_seed(3))
    table = B.BigramTable.from_ids(rows, V)
    cfg = B.Config(lam=1.0, lr=0.05, steps=3, batch=8, seq_len=8, grad_accum=2, reuse=True, stop_undecided=None, log_every=1)
    steps = []
    full, curve_full, _, _ = B.train_mask(probe, rows, table, cfg)
    small, curve_small, _, _ = B.train_mask(probe, rows, table, cfg, micro_batch=3, progress=steps.append)
    for a, c in zip(full.logits, small.logits):  # Adam (lr 0.05) magnifies float-rounding in near-zero gradients
        assert torch.allclose(a, c, rtol=0, atol=1e-4)
    assert torch.allclose(torch.tensor(curve_full["xent"].values), torch.tensor(curve_small["xent"].values), rtol=1e-5)
    assert [s.done for s in steps] == [0, 1, 2, 3] and all(s.phase == "training" and s.total == 3 for s in steps)
    assert all("xent" in s.info for s in steps[1:])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_masked_weights_are_recomputed_not_kept_and_gradients_stay_exact(tiny, family):
    """Inside recompute_masked a forward pass keeps no masked weight W ⊙ σ(β·s) for its backward pass (each masked
    matrix, saved once by its linear layer, is packed as a reference and recomputed), and the mask gradients are
    bit-identical to those of the plain pass."""
    probe = tiny(family)
    V = probe.info.d_vocab
    table = _table(V)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
    grads, saved = [], []

    def note(t):  # the plain pass: saved tensors computed from a soft mask (W ⊙ σ(β·s), or its transposed view)
        fn = t.grad_fn
        fn = fn.next_functions[0][0] if fn is not None and fn.name() == "TBackward0" else fn
        if fn is not None and type(fn).__name__ == "_MaskedWeightBackward":
            saved.append(tuple(t.shape))
        return t

    for lean in (False, True):
        masks = B.MaskSet(B.masked_weights(probe), init=0.3)
        masks.beta = 2.5
        with probe.frozen_weights(), masks.applied(probe):
            if lean:
                with masks.recompute_masked(probe) as count:
                    loss = B._loss(probe, ids, table.rows(ids), chunk=4)
                    packed = count["packed"]
                    grads.append(torch.autograd.grad(loss, list(masks.logits)))
                    masks.forget()
            else:
                with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
                    loss = B._loss(probe, ids, table.rows(ids), chunk=4)
                grads.append(torch.autograd.grad(loss, list(masks.logits)))
    # block 0's q/k/v read the frozen embeddings, so no gradient flows to their input and nothing keeps those three
    assert packed == len(saved) >= len(B.masked_weights(probe)) - 3
    for a, c in zip(*grads):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------- planned before loading, progress
def test_preflight_lowers_the_micro_batch_or_refuses_before_loading():
    from analyses.core import planner
    from probes import OutOfMemoryError

    need8 = planner.estimate("bigram", _smol(), seq_len=128, batch_size=8).total
    p = planner.preflight("bigram", "embedded", seq_len=128, batch_size=32, max_batch=32, device="cpu", dtype="float32",
                          free_bytes=int(need8 / 0.8) + 1)
    assert p.fits and p.batch_size == 8 and "each batch of 32 rows as 4 passes of ≤ 8 rows (--micro-batch 8)" in p.message
    fixed = planner.estimate("bigram", _smol(), seq_len=16, batch_size=1).total
    with pytest.raises(OutOfMemoryError, match=r"not starting.*largest setting that fits is --micro-batch 1 with rows of \d+ tokens"):
        planner.preflight("bigram", "embedded", seq_len=128, batch_size=32, device="cpu", dtype="float32", free_bytes=int(fixed / 0.8))
    with pytest.raises(OutOfMemoryError, match="Nothing fits"):
        planner.preflight("bigram", "embedded", seq_len=128, batch_size=32, device="cpu", dtype="float32", free_bytes=2**20)


def _smol():
    from analyses.core import planner

    return planner.ModelShape(n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, d_mlp=1536, d_vocab=49152,
                              n_params=134_515_008)


def test_cli_reports_plan_and_every_phase_and_step_on_stderr(tmp_path, capsys):
    import json

    from analyses.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    main(["run", "bigram", "--corpus", str(corpus), "--schedule", "short", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
          "--layers", "0", "--eval-rows", "2", "--out", str(tmp_path / "r"), "--json", "--device", "cpu"])
    cap = capsys.readouterr()
    assert json.loads(cap.out)["steps"] == 3  # stdout holds only the JSON
    err = cap.err
    assert "planner:" not in err  # 2 rows of 16 tokens fit: nothing to lower, nothing said
    assert "tokenizing: 0/1 corpus" in err and "counting bigrams: 0/" in err
    for k in (1, 2, 3):  # every step of a short run (a phase of few units shows each)
        assert f"training: {k}/3 steps" in err.split("evaluating")[0]
    assert "evaluating: 2/2 rows" in err
