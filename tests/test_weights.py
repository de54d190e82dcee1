"""Weight masks and LoRA adapters scoped to a context (probes/weights.py), on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models
from probes import ConfigError, InputError, UnsupportedModelError
from probes.weights import AdaptedModel, LoraSpec

pytestmark = pytest.mark.usefixtures("one_thread")

TOKS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 7]])


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}


def _assert_restored(model: torch.nn.Module, snap) -> None:
    from torch.nn.utils import parametrize

    now = dict(model.named_parameters(remove_duplicate=False))
    assert set(now) == set(snap)
    for n, (p, v) in snap.items():
        assert now[n] is p, n                       # the same Parameter object (optimizers keep working)
        assert torch.equal(now[n].detach(), v), n   # bit-identical
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def _random_masks(probe, seed: int = 0, keep: float = 0.7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {w.path: torch.rand(w.shape, generator=g) < keep for w in probe.weights()}


# ---------------------------------------------------------------------------- listing
def _train(ad, *, steps: int) -> None:
    """A few AdamW steps of an adapted model on TOKS (language-model loss), then eval mode."""
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2)
    ad.train()
    for _ in range(steps):
        ad.loss(TOKS, TOKS).backward()
        opt.step()
        opt.zero_grad()
    ad.eval()


def test_weights_lists_block_matrices_with_storage_shapes(tiny):
    llama = tiny("llama")
    ws = llama.weights()
    assert len(ws) == 2 * 7 and [w.layer for w in ws] == [0] * 7 + [1] * 7
    assert ws[3].path == "model.layers.0.self_attn.o_proj" and ws[3].name == llama.arch.o_proj
    for w in ws:
        assert tuple(llama.module(w.name, w.layer).weight.shape) == w.shape
    assert [w.layer for w in llama.weights([1])] == [1] * 7
    gpt2 = tiny("gpt2").weights()
    assert [w.name for w in gpt2[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert gpt2[0].shape == (64, 192)  # Conv1D storage [in, out]
    with pytest.raises(ConfigError, match=r"layers=\(2,\) includes \[2\]; this model has blocks 0..1"):
        llama.weights([2])


def test_weights_names_the_table_fix_when_nothing_matches(tiny):
    import dataclasses

    probe = tiny("llama")
    probe.arch = dataclasses.replace(probe.arch, weight_names=("self_attn.nope",))
    with pytest.raises(UnsupportedModelError, match="no weight matrix .* probes/arch.py"):
        probe.weights()


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masked_run_matches_hand_masked_copy_on_both_backends(tiny, family):
    """A masked run equals the same model with its weights multiplied by hand, on nnsight and on the
    TransformerLens bridge (GPT-2's bridge splits c_attn into q/k/v views of the same storage)."""
    nn_probe, tl_probe = tiny(family, backend="nnsight"), tiny(family, backend="transformer_lens")
    masks = _random_masks(nn_probe)
    ref_model, _ = tiny_models.build(family)
    with torch.no_grad():
        for path, m in masks.items():
            w = ref_model.get_submodule(path).weight
            w.mul_(m.to(w.dtype))
        want = ref_model(input_ids=TOKS).logits
    with nn_probe.weight_masks(masks):
        a = nn_probe.run(TOKS)
    with tl_probe.weight_masks(masks):
        b = tl_probe.run(TOKS)
    torch.testing.assert_close(a, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, want, rtol=0, atol=1e-4)  # eager vs SDPA attention
    assert (nn_probe.run(TOKS) - want).abs().max() > 1e-2  # the masks matter, and are gone again
    assert (tl_probe.run(TOKS) - want).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_every_weight_is_bit_identical_after_the_block_even_when_it_raises(tiny, backend):
    probe = tiny("gpt2", backend=backend)
    snap = _snapshot(probe.hf_model)
    plain = probe.run(TOKS)
    with pytest.raises(RuntimeError, match="boom"):
        with probe.weight_masks(_random_masks(probe)):
            probe.run(TOKS)
            raise RuntimeError("boom")
    _assert_restored(probe.hf_model, snap)
    torch.testing.assert_close(probe.run(TOKS), plain, rtol=0, atol=0)


def test_bad_masks_are_refused_and_leave_nothing_behind(tiny):
    probe = tiny("llama")
    snap = _snapshot(probe.hf_model)
    ws = probe.weights()
    with pytest.raises(InputError, match="names no weight of tiny-llama"):
        with probe.weight_masks({"model.layers.0.self_attn.nope": torch.ones(2, 2)}):
            pass
    with pytest.raises(InputError, match=r"has shape \(3, 3\) but the weight is \(64, 64\)"):
        with probe.weight_masks({ws[0].path: torch.ones(3, 3)}):
            pass
    with pytest.raises(InputError, match="give a tensor or a zero-argument callable"):
        with probe.weight_masks({ws[0].path: 0.5}):
            pass
    with probe.weight_masks({ws[0].path: torch.ones(ws[0].shape)}):
        with pytest.raises(ConfigError, match="already carries a mask"):
            with probe.weight_masks({ws[1].path: torch.ones(ws[1].shape), ws[0].path: torch.ones(ws[0].shape)}):
                pass
        from torch.nn.utils import parametrize

        # the failed inner block removed what it had registered (ws[1]) and left the outer mask alone
        assert parametrize.is_parametrized(probe.module(ws[0].name, 0), "weight")
        assert not parametrize.is_parametrized(probe.module(ws[1].name, 0), "weight")
    _assert_restored(probe.hf_model, snap)


def test_callable_factor_trains_a_soft_mask_over_frozen_weights(tiny):
    probe = tiny("llama")
    w = probe.weights([0])[0]
    s = torch.nn.Parameter(torch.zeros(w.shape))
    flags = [p.requires_grad for p in probe.hf_model.parameters()]
    with probe.frozen_weights(), probe.weight_masks({w.path: lambda: torch.sigmoid(s)}):
        assert not any(p.requires_grad for p in probe.hf_model.parameters())
        probe.trainable_logits(TOKS).logsumexp(-1).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert [p.requires_grad for p in probe.hf_model.parameters()] == flags
    assert all(p.grad is None for p in probe.hf_model.parameters())
    with probe.weight_masks({w.path: lambda: None}):  # None leaves the weight as it is
        torch.testing.assert_close(probe.forward(TOKS), probe.run(TOKS), rtol=0, atol=1e-5)


def test_only_blocks_skips_and_restores(tiny):
    probe = tiny("llama")
    blocks = probe.module(probe.arch.layers)
    plain = probe.forward(TOKS)
    zero = {w.path: torch.zeros(w.shape) for w in probe.weights([1])}
    with probe.weight_masks(zero):
        want = probe.forward(TOKS)
    with probe.only_blocks([0]):
        assert len(probe.module(probe.arch.layers)) == 1 and probe.hf_model.config.num_hidden_layers == 1
        got = probe.forward(TOKS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # a bias-free block with zero weights adds nothing
    assert probe.module(probe.arch.layers) is blocks and probe.hf_model.config.num_hidden_layers == 2
    torch.testing.assert_close(probe.forward(TOKS), plain, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="bias-free"):
        with tiny("gpt2").only_blocks([0]):
            pass
    with pytest.raises(ConfigError, match=r"keep=\(5,\)"):
        with probe.only_blocks([5]):
            pass


# ---------------------------------------------------------------------------- adapters
def test_adapter_trains_on_a_private_copy_saves_safetensors_and_loads_back(tiny, tmp_path):
    probe = tiny("llama")
    snap = _snapshot(probe.hf_model)
    base = probe.forward(TOKS)
    spec = LoraSpec(r=2, alpha=4, target_modules=("q_proj", "down_proj", "nope"))
    assert probe.adapter_targets(spec.target_modules) == ["q_proj", "down_proj"]
    assert probe.adapter_targets(["mlp.down_proj", "lp.down_proj"]) == ["mlp.down_proj"]  # suffix after a dot only
    torch.manual_seed(0)
    with probe.adapted(spec) as ad:
        assert isinstance(ad, AdaptedModel)
        assert ad.parameters() and all("lora" in n for n, p in ad.model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            torch.testing.assert_close(ad.logits(TOKS), base, rtol=0, atol=1e-6)  # B = 0: starts as the base model
        _train(ad, steps=3)
        with torch.no_grad():
            tuned = ad.logits(TOKS)
            with ad.disabled():
                torch.testing.assert_close(ad.logits(TOKS), base, rtol=0, atol=1e-6)
        assert (tuned - base).abs().max() > 1e-3
        torch.testing.assert_close(probe.run(TOKS), base, rtol=0, atol=1e-5)  # readers of the probe see the base model
        out = ad.save(tmp_path / "ad")
    assert ad.model is None  # the copy is dropped on exit
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pickle")) for f in files) and ".partial" not in files
    _assert_restored(probe.hf_model, snap)
    assert not any("lora" in n for n, _ in probe.hf_model.named_modules())
    with probe.load_adapter(out) as again, torch.no_grad():
        torch.testing.assert_close(again.logits(TOKS), tuned, rtol=0, atol=1e-6)
    _assert_restored(probe.hf_model, snap)


def test_adapter_bad_inputs(tiny, tmp_path):
    probe = tiny("llama")
    with pytest.raises(ConfigError, match="match no module of tiny-llama"):
        probe.adapted(LoraSpec(target_modules=("c_attn",)))
    with pytest.raises(ConfigError, match="r=0"):
        LoraSpec(r=0)
    with pytest.raises(ConfigError, match="non-empty tuple"):
        LoraSpec(target_modules="q_proj")
    with pytest.raises(ConfigError, match="takes a LoraSpec"):
        probe.adapted({"r": 2})
    with pytest.raises(InputError, match="not a LoRA adapter folder"):
        probe.load_adapter(tmp_path)
    pickled = tmp_path / "old"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(InputError, match="only safetensors adapters"):
        probe.load_adapter(pickled)


def test_remote_probe_says_its_weights_stay_on_the_server(tmp_path):
    import warnings

    from nnsight import LanguageModel

    from probes.remote import RemoteProbe

    m, tok = tiny_models.build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(m, tokenizer=tok)
    probe = RemoteProbe(lm, tok, name="tiny", source="ndif:tiny", remote=True)
    ws = probe.weights()  # shapes come from the config skeleton
    for call in (lambda: probe.weight_masks({ws[0].path: torch.ones(ws[0].shape)}), lambda: probe.only_blocks([0]),
                 lambda: probe.adapted(LoraSpec()), lambda: probe.load_adapter(tmp_path)):
        with pytest.raises(UnsupportedModelError, match="stay on the NDIF server"):
            with call():
                pass


def test_adapter_on_the_transformer_lens_backend_loads_on_nnsight(tiny, tmp_path):
    """The bridge's wrappers are not adaptable by PEFT; the copy is the plain HF model, so an adapter
    trained behind one backend loads behind the other."""
    tl, nn = tiny("gpt2", backend="transformer_lens"), tiny("gpt2", backend="nnsight")
    snap = _snapshot(tl.hf_model)
    assert tl.adapter_targets(("c_attn", "q", "mlp.c_proj")) == ["c_attn", "mlp.c_proj"]  # no bridge-made modules
    torch.manual_seed(0)
    with tl.adapted(LoraSpec(r=2, alpha=4, target_modules=("c_attn", "mlp.c_proj"))) as ad:
        with torch.no_grad():
            torch.testing.assert_close(ad.logits(TOKS), tl.forward(TOKS), rtol=0, atol=1e-5)
        _train(ad, steps=2)
        with torch.no_grad():
            tuned = ad.logits(TOKS)
        out = ad.save(tmp_path / "ad")
    assert (tuned - tl.forward(TOKS)).abs().max() > 1e-3
    _assert_restored(tl.hf_model, snap)
    with nn.load_adapter(out) as again, torch.no_grad():
        torch.testing.assert_close(again.logits(TOKS), tuned, rtol=0, atol=1e-5)
