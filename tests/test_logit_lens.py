"""Logit lens (analyses/logit_lens.py): math, fidelity to the model's output, backends, store, CLI, errors."""

from __future__ import annotations

import json

import pytest
import torch

from analyses import logit_lens as ll
from analyses.core.base import load_result
from probes import ConfigError, InputError

PROMPT = "The Eiffel Tower is located in the city of"


# --------------------------------------------------------------------------------------------- math
def test_lens_topk_and_target_probs_hand_case():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    p, i = ll.lens_topk(logits, 2)
    assert i.tolist() == [[1, 2], [0, 1]] or i.tolist() == [[1, 2], [0, 2]]
    assert torch.allclose(p[:, 0], torch.tensor([0.6, 0.5]), atol=1e-6)
    tp = ll.target_probs(logits, torch.tensor([2, 0]))
    assert torch.allclose(tp, torch.tensor([0.3, 0.5]), atol=1e-6)
    # k larger than the vocabulary is clipped, not an error
    assert ll.lens_topk(logits, 10)[0].shape == (2, 3)


# --------------------------------------------------------------------------------------------- embedded
@pytest.fixture(scope="module")
def eiffel(embedded):
    return ll.run(embedded, PROMPT)


def test_last_layer_lens_is_the_model_output(embedded, eiffel):
    r = eiffel
    L, T, k = r.top_ids.shape
    assert (L, T, k) == (embedded.info.n_layers, len(r.str_tokens), 5)
    out = torch.softmax(embedded.forward(embedded.to_tokens(PROMPT))[0].float(), -1)
    vals, ids = out.topk(5, -1)
    # resid_post of the last block -> final norm -> unembedding is the output distribution (up to float rounding)
    assert torch.allclose(r.top_probs[-1], vals.cpu(), atol=1e-5)
    # ranks are compared where the probability gaps to the neighbouring ranks exceed the measured difference
    tol = max(20 * (r.top_probs[-1] - vals.cpu()).abs().max().item(), 1e-7)
    gaps = -out.topk(6, -1).values.cpu().diff(dim=-1)  # [T, 5]: rank j -> j + 1
    safe = (gaps > tol) & torch.cat([torch.ones_like(gaps[:, :1], dtype=torch.bool), gaps[:, :-1] > tol], dim=1)
    assert safe.float().mean() > 0.8, (safe.float().mean(), tol)
    assert torch.equal(r.top_ids[-1][safe], ids.cpu()[safe]) and torch.equal(r.next_ids[safe], ids.cpu()[safe])
    assert torch.allclose(r.target[-1], r.next_probs[:, 0], atol=1e-5)
    assert ((r.target >= 0) & (r.target <= 1)).all()


def test_embedded_predicts_paris_and_lens_sharpens_late(eiffel):
    r = eiffel
    assert r.final_strs[-1] == " Paris"
    assert float(r.next_probs[-1, 0]) > 0.5
    # the lens only finds " Paris" in the last few blocks (early layers decode to generic tokens)
    p_paris = r.target[:, -1]
    assert float(p_paris[:10].max()) < 0.05
    assert float(p_paris[-1]) > 0.5


def test_frames_and_plot(eiffel):
    r = eiffel
    df = r.to_frame()
    L, T, k = r.top_ids.shape
    assert len(df) == L * T * k
    assert {"model", "layer", "pos", "token", "rank", "pred_token", "value", "final_token_prob"} <= set(df.columns)
    assert df.groupby(["layer", "pos"])["value"].apply(lambda s: s.is_monotonic_decreasing).all()
    nf = r.next_frame()
    assert len(nf) == T and nf["top1"].iloc[-1] == " Paris"
    fig = r.plot()
    hm = fig.data[0]
    assert hm.type == "heatmap" and tuple(hm.z.shape) == (L, T)
    assert "final top-1" in hm.customdata[0][0]
    assert tuple(r.plot(color="top1").data[0].z.shape) == (L, T)
    with pytest.raises(ConfigError, match="color"):
        r.plot(color="entropy")


def test_save_load_roundtrip(eiffel, results_dir):
    path = eiffel.save()
    assert path.parent == results_dir and path.name.startswith("logit_lens-")
    back = load_result(path)
    assert isinstance(back, ll.LogitLensResult)
    assert back.top_strs == eiffel.top_strs and back.next_strs == eiffel.next_strs and back.str_tokens == eiffel.str_tokens
    assert torch.equal(back.top_ids, eiffel.top_ids) and torch.allclose(back.target, eiffel.target)
    assert back.config == eiffel.config and back.key == eiffel.key


def test_layer_subset_and_bos(embedded):
    r = ll.run(embedded, PROMPT, config=ll.Config(layers=(0, 15, 29), k=3, prepend_bos=True))
    assert r.layers == [0, 15, 29] and r.top_ids.shape[0] == 3 and r.top_ids.shape[2] == 3
    assert int(r.token_ids[0]) == embedded.bos_token_id


# --------------------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_tiny_matches_naive_reference(tiny, family):
    probe = tiny(family)
    toks = probe.to_tokens("hello lens")
    r = ll.run(probe, toks[0], config=ll.Config(k=4))
    cache = probe.cache(toks, [f"blocks.{l}.hook_resid_post" for l in range(probe.info.n_layers)])
    for l in range(probe.info.n_layers):
        ref = torch.softmax(probe.unembed(cache[f"blocks.{l}.hook_resid_post"][0]).float(), -1)
        vals, _ = ref.topk(4, -1)
        assert torch.allclose(r.top_probs[l], vals.cpu(), atol=1e-5), (family, l)
    out = torch.softmax(probe.forward(toks)[0].float(), -1)  # gemma2's softcap is applied by unembed too
    assert torch.allclose(r.top_probs[-1], out.topk(4, -1).values.cpu(), atol=1e-5)


def test_backends_agree_on_tiny_llama(tiny):
    a = ll.run(tiny("llama", backend="nnsight"), "abc def", config=ll.Config(k=3))
    b = ll.run(tiny("llama", backend="transformer_lens"), "abc def", config=ll.Config(k=3))
    assert torch.allclose(a.top_probs, b.top_probs, atol=1e-4)
    assert torch.allclose(a.target, b.target, atol=1e-4)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(k=0), "k=0"), (dict(k=1000), "k=1000"), (dict(layers=()), "layers"),
    (dict(layers=(1, 1)), "repeats"), (dict(layers=(-1,)), "-1"), (dict(layers=[0, 1]), "tuple"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ll.Config(**kw)


def test_run_errors(tiny):
    probe = tiny("llama")
    with pytest.raises(ConfigError, match="has 2 blocks"):
        ll.run(probe, "abc", config=ll.Config(layers=(5,)))
    with pytest.raises(InputError, match="empty"):
        ll.run(probe, "   ")
    with pytest.raises(InputError, match="one prompt"):
        ll.run(probe, torch.ones(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------- CLI
def test_cli_logit_lens(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "ll"
    main(["run", "logit-lens", "--prompt", PROMPT, "--layers", "20-29", "--k", "3", "--device", "cpu", "--out", str(out),
          "--html", str(tmp_path / "ll.html"), "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["result"] == str(out) and got["next_token"] == " Paris" and got["layers"] == 10
    assert (tmp_path / "ll.html").stat().st_size > 1000
    back = load_result(out)
    assert back.layers == list(range(20, 30)) and back.top_ids.shape[-1] == 3


@pytest.mark.parametrize("args, match", [(["--layers", "x"], "--layers 'x'"), (["--layers", "99"], "has 30 blocks"),
                                         (["--k", "0"], "k=0"), (["--prompt", ""], "empty")])
def test_cli_bad_input(args, match, capsys):
    from analyses.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "logit-lens", "--device", "cpu", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_progress_reports_the_forward_pass_then_each_chunk_and_can_stop_the_run(tiny, monkeypatch):
    """Progress events: phase ``forward`` (one pass), then ``unembedding`` (one per chunk of rows); an exception the
    callback raises stops the run there (the dashboard's Cancel)."""
    p = tiny("llama")
    monkeypatch.setattr(ll, "_CHUNK_ELEMS", p.info.d_vocab * 7)  # 7 rows a chunk: several chunks on a short prompt
    ids = list(range(1, 12))
    events = []
    res = ll.run(p, ids, progress=events.append)
    n_chunks = -(-p.info.n_layers * len(ids) // 7)
    assert [(e.phase, e.done, e.total) for e in events] == \
        [("forward", 0, 1), ("forward", 1, 1)] + [("unembedding", i, n_chunks) for i in range(n_chunks + 1)]
    assert res.top_probs.shape[:2] == (p.info.n_layers, len(ids))

    class Stop(Exception):
        pass

    def stop_in_the_unembedding(ev):
        events.append(ev)
        if ev.phase == "unembedding" and ev.done == 1:
            raise Stop

    events.clear()
    with pytest.raises(Stop):
        ll.run(p, ids, progress=stop_in_the_unembedding)
    assert events[-1].phase == "unembedding" and events[-1].done == 1
