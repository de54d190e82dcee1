"""A probe serializes its own runs (threads sharing it get exactly their serial results), and loading a
model changes no process-wide state (sys.stdout, the root logger, library loggers, progress bars)."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import torch

import tiny_models
from probes import Ablate, AddVector, AttendTo, Collect, load_model

BACKENDS = ("nnsight", "transformer_lens")
RESID = "blocks.1.hook_resid_post"
PATTERN = "blocks.1.attn.hook_pattern"


def _jobs(probe):
    """Two different runs: one zero-ablates a head and steers, the other moves attention (taps in use)."""
    toks = probe.to_tokens(["the cat sat on the mat", "a dog ran far away!!"])
    steer = torch.linspace(-1, 1, probe.info.d_model)

    def a():
        reads = {RESID: Collect()}
        logits = probe.run(toks, reads=reads, edits=[Ablate("blocks.0.attn.hook_z", heads=[1]),
                                                     AddVector("blocks.0.hook_resid_post", vector=steer, scale=2.0)])
        return logits, reads[RESID].finalize()

    def b():
        reads = {PATTERN: Collect(), RESID: Collect()}
        logits = probe.run(toks, reads=reads, edits=[AttendTo(layer=0, heads=[0, 2], key=0)])
        return logits, reads[PATTERN].finalize(), reads[RESID].finalize()

    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_sharing_a_probe_get_their_serial_results(backend, one_thread):
    probe = tiny_models.probe("llama", backend=backend)
    a, b = _jobs(probe)
    ref = {"a": a(), "b": b()}
    plain = probe.forward(probe.to_tokens("the cat sat on the mat"))
    assert not torch.equal(ref["a"][0], ref["b"][0])  # the two edits differ, so a mix-up would show

    start = threading.Barrier(2)
    got: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(key, fn):
        try:
            start.wait()
            for _ in range(12):
                got[key].append(fn())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, f)) for k, f in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for key in ("a", "b"):
        assert len(got[key]) == 12
        for out in got[key]:
            assert all(torch.equal(x, r) for x, r in zip(out, ref[key])), key
    # nothing of the edited runs is left on the shared model
    assert torch.equal(probe.forward(probe.to_tokens("the cat sat on the mat")), plain)


def test_session_holds_other_threads_off():
    probe = tiny_models.probe("llama")
    toks = probe.to_tokens("hello there")
    done = threading.Event()

    def other():
        probe.forward(toks)
        done.set()

    with probe.session() as p:
        assert p is probe
        t = threading.Thread(target=other)
        t.start()
        p.run(toks, reads={RESID: Collect()})  # re-entrant: the probe's own methods work inside
        assert not done.wait(0.3)  # the other thread's forward pass waits for the session
    assert done.wait(120)
    t.join()


def test_tl_loading_changes_no_process_state(tmp_path):
    model, tok = tiny_models.build("gpt2")
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    hf = logging.getLogger("transformers")
    before = (sys.stdout, sys.stderr, root.level, hf.level, logging.getLogger("transformer_lens").level,
              hf_logging.is_progress_bar_enabled())
    root_level = root.level
    root.setLevel(logging.INFO)  # a level the application chose, not the default
    try:
        stdout = sys.stdout
        probe = load_model(str(tmp_path / "m"), backend="transformer_lens", device="cpu")
        assert sys.stdout is stdout
        assert root.level == logging.INFO
    finally:
        root.setLevel(root_level)
    after = (sys.stdout, sys.stderr, root.level, hf.level, logging.getLogger("transformer_lens").level,
             hf_logging.is_progress_bar_enabled())
    assert after == before
    assert probe.run(probe.to_tokens("hi")).shape[-1] == probe.info.d_vocab
