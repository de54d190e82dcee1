"""Bigram-Backcopy toy (Guo et al. 2024): data generator and the dormant.md claims on a short CPU run."""

from __future__ import annotations

import pytest
import torch

from analyses import bbtoy
from probes import ConfigError


def test_backcopy_rule():
    d = bbtoy.make_data(3)
    x = d.sample(16, 48, generator=torch.Generator().manual_seed(0))
    assert (x[:, 0] == d.bos).all()
    assert not d.is_trigger(x[:, 1]).any()  # x1 drawn without triggers
    trig = d.is_trigger(x)
    n = 0
    for t in range(2, 48):
        m = trig[:, t]
        assert torch.equal(x[m, t + 1], x[m, t - 1])
        n += int(m.sum())
    assert n > 20  # triggers are the most frequent characters
    assert len(d.triggers) == 3 and len(d.vocab) == 64


@pytest.fixture(scope="module")
def softmax_run():
    torch.set_num_threads(1)
    return bbtoy.run(bbtoy.Config(steps=300))


def test_sink_emerges_at_non_trigger_positions(softmax_run):
    r = softmax_run
    h = r.history
    bos = h[(h.metric == "bos_mass") & (h.layer == 0)].set_index("step")["value"]
    assert bos.iloc[-1] > 0.3 and bos.iloc[-1] > 2.5 * bos.iloc[0]  # mass on BOS grows (measured 0.11 -> 0.44)
    assert r.final("prev_mass", 0) > 0.6  # active copying at triggers (measured 0.83)
    assert r.final("bos_value", 0) < 0.6  # value drain (measured 0.42)
    assert r.final("icl_loss") < r.final("markov_loss")
    r.plot()


def test_relu_attention_has_no_sink(softmax_run):
    r = bbtoy.run(bbtoy.Config(steps=300, attention="relu"))
    assert r.final("bos_mass", 0) < 0.2 < softmax_run.final("bos_mass", 0)  # measured 0.04 vs 0.44
    assert r.final("bos_value", 0) > softmax_run.final("bos_value", 0)  # weaker drain (0.70 vs 0.42)


def test_save_load(softmax_run, results_dir):
    back = bbtoy.BBToyResult.load(softmax_run.save(results_dir / "bb"))
    assert back.final("loss") == pytest.approx(softmax_run.final("loss"))


@pytest.mark.parametrize("kw", [dict(n_layers=2), dict(attention="linear"), dict(optimizer="rmsprop"), dict(lr=-1.0)])
def test_config_errors(kw):
    with pytest.raises(ConfigError):
        bbtoy.Config(**kw)


def test_cli_bbtoy(results_dir, capsys):
    from analyses.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "bb-toy", "--layers", "2"])
    assert e.value.code == 2
    main(["run", "bb-toy", "--layers", "3", "--steps", "20", "--optimizer", "sgd", "--out", str(results_dir / "b")])
    assert "L2 bos_mass" in capsys.readouterr().out
