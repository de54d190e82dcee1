"""Active vs dormant heads (Guo et al. 2024): map, flips, causal check, domains, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from analyses import dormant, domains
from analyses.dormant import Config, dormant_map, status_flips
from probes import ConfigError, InputError


def test_map_and_flips_by_hand():
    m = torch.tensor([[[0.95, 0.2], [0.91, 0.5]], [[0.97, 0.95], [0.3, 0.4]]])  # [D=2, L=2, H=2]
    d = dormant_map(m, 0.9)
    assert d.tolist() == [[[True, False], [True, False]], [[True, True], [False, False]]]
    f = status_flips(d, ["prose", "code"])
    assert set(f["head"]) == {"L0H1", "L1H0"}
    row = f.set_index("head").loc["L1H0"]
    assert row.dormant_on == "prose" and row.active_on == "code"


def test_builtin_domains_are_fixed_and_long_enough(tiny):
    p = tiny("llama")
    for name in domains.BUILTIN:
        a = domains.domain_tokens(p, name, n=3, T=32, seed=0)
        b = domains.domain_tokens(p, name, n=3, T=32, seed=0)
        assert a.tokens.shape == (3, 32) and torch.equal(a.tokens, b.tokens)
    rep = domains.domain_tokens(p, "repeat", n=2, T=16, prepend_bos=True).tokens
    assert (rep[:, 0] == 1).all() and (rep[:, 1:] == rep[:, 1:2]).all()


def test_user_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "a b c", "domain": "x"}, {"text": "d e", "domain": "y"}, {"text": "f"}]))
    assert domains.load_jsonl(f) == {"x": ["a b c"], "y": ["d e"], "user": ["f"]}


@pytest.mark.parametrize("kw,word", [(dict(theta=1.0), "theta"), (dict(theta=0), "theta"), (dict(sink_pos=70), "sink_pos"),
                                     (dict(heads=("H3",)), "L<layer>H<head>"), (dict(intervention="nope"), "intervention")])
def test_config_errors(kw, word):
    with pytest.raises(ConfigError, match=word):
        Config(**kw)


def test_unknown_domain_and_short_texts(tiny):
    p = tiny("llama")
    with pytest.raises(ConfigError, match="unknown domain 'wiki'"):
        dormant.run(p, ["prose", "wiki"], config=Config(T=16, n_samples=2))
    with pytest.raises(InputError, match="shorter than T"):
        dormant.run(p, {"mine": ["too short"]}, config=Config(T=32, n_samples=2))
    with pytest.raises(ConfigError, match="does not exist"):
        dormant.run(p, ["prose"], config=Config(T=16, n_samples=2, heads=("L9H0",)))


def test_run_tiny_with_causal_check(tiny, results_dir):
    p = tiny("llama")
    cfg = Config(T=32, n_samples=4, batch_size=4, heads=("L1H2",), theta=0.5)
    r = dormant.run(p, ["prose", "code", "random"], config=cfg)
    assert r.sink_mass.shape == (3, 2, 4) and r.value_norm.shape == (3, 2, 4, 32) and r.resid_norm.shape == (3, 3, 32)
    assert r.tested == ("L1H2",)
    assert torch.isfinite(r.delta_loss[:, 1, 2]).all() and torch.isnan(r.delta_loss[:, 0, 0]).all()
    back = dormant.DormantResult.load(r.save(results_dir / "d"))
    assert torch.equal(back.dormant, r.dormant) and back.domains == r.domains
    for k in ("map", "diff", "delta"):
        r.plot(k)


def test_zero_attention_intervention(tiny):
    p = tiny("llama")
    r = dormant.run(p, ["prose"], config=Config(T=32, n_samples=4, batch_size=4, heads=("L1H0",), intervention="zero"))
    assert torch.isfinite(r.delta_loss[0, 1, 0]) and abs(float(r.delta_loss[0, 1, 0])) > 0


@pytest.mark.slow
def test_embedded_dormant_head_is_causally_silent(embedded):
    """dormant.md check 3 on the embedded model: L20H6 measured dormant on code (sink mass 0.90, Δloss +0.003)
    and active on arithmetic (0.52, Δloss +0.062) with 8 samples per domain."""
    r = dormant.run(embedded, ["code", "arithmetic"], config=Config(n_samples=8, heads=("L20H6",)))
    dc, da = float(r.delta_loss[0, 20, 6]), float(r.delta_loss[1, 20, 6])
    assert r.sink_mass[0, 20, 6] > r.sink_mass[1, 20, 6]
    assert abs(dc) < abs(da)


def test_cli_dormant(results_dir, capsys):
    from conftest import run_cli

    for argv, want in ((["--theta", "1.5"], "theta"), (["--domains", "prose,wiki"], "unknown domain 'wiki'")):
        code, _, err = run_cli(["run", "dormant", *argv], capsys)
        assert code == 2 and want in err
