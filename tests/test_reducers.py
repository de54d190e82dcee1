"""Streaming reducers: exact statistics, and merging shards equals one pass."""

import pytest
import torch

from probes import Collect, ConfigError, Histogram, Max, Mean, Min, Moments, Sum, TopK, l2_norm, reducer_from_state

torch.manual_seed(0)
DATA = [torch.randn(3, 5, 4) for _ in range(6)]
ALL = torch.cat(DATA)


def one_pass(r):
    for x in DATA:
        r.update(x)
    return r


def sharded(r, splits=(2, 3, 1)):
    parts, i = [], 0
    for n in splits:
        p = r.empty_like()
        for x in DATA[i:i + n]:
            p.update(x)
        parts.append(p)
        i += n
    out = parts[0]
    for p in parts[1:]:
        out.merge(p)
    return out


@pytest.mark.parametrize("make", [lambda: Mean(dims=(0,)), lambda: Mean(dims=(0, 1)), lambda: Sum(dims=(0, 2)),
                                  lambda: Max(dims=(0,)), lambda: Min(dims=(0, 1)),
                                  lambda: Mean(dims=(0,), transform=l2_norm)])
def test_merge_equals_one_pass(make):
    a = one_pass(make()).finalize()
    b = sharded(make()).finalize()
    assert torch.allclose(a, b, atol=1e-10)


def test_values_are_exact():
    assert torch.allclose(one_pass(Mean(dims=(0,))).finalize().float(), ALL.mean(0), atol=1e-6)
    assert torch.allclose(one_pass(Max(dims=(0, 1))).finalize(), ALL.amax(dim=(0, 1)))
    assert torch.allclose(one_pass(Mean(dims=(0,), transform=l2_norm)).finalize().float(), ALL.norm(dim=-1).mean(0), atol=1e-6)


def test_moments_merge_and_values():
    a = one_pass(Moments(dims=(0, 1))).finalize()
    b = sharded(Moments(dims=(0, 1))).finalize()
    ref = ALL.reshape(-1, 4).double()
    assert torch.allclose(a["mean"], ref.mean(0)) and torch.allclose(b["mean"], ref.mean(0))
    assert torch.allclose(b["var"], ref.var(0, unbiased=False))


def test_histogram_merge_counts_everything():
    h = sharded(Histogram(bins=8, range=(-1, 1)))
    f = h.finalize()
    assert int(f["counts"].sum() + f["underflow"].sum() + f["overflow"].sum()) == ALL.numel()
    ref = torch.histc(ALL.clamp(-1, 1 - 1e-9)[(ALL >= -1) & (ALL < 1)], bins=8, min=-1, max=1)
    assert torch.equal(f["counts"].float(), ref)


def test_topk_locations_and_merge():
    a = one_pass(TopK(k=4, dims=(0, 1))).finalize()
    b = sharded(TopK(k=4, dims=(0, 1))).finalize()
    assert torch.allclose(a["values"], b["values"])
    assert torch.equal(a["locations"], b["locations"])
    # locations point at the values: (sample, position) for every feature
    for f in range(4):
        for v, (s, p) in zip(a["values"][f], a["locations"][f]):
            assert ALL[s, p, f] == v
    assert torch.allclose(a["values"][:, 0], ALL.amax(dim=(0, 1)))


def test_state_round_trip():
    r = one_pass(Mean(dims=(0,)))
    again = reducer_from_state(r.state(), Mean(dims=(0,)))
    assert torch.equal(again.finalize(), r.finalize())
    with pytest.raises(ConfigError):
        reducer_from_state(r.state(), Max())


def test_collect_and_errors():
    c = one_pass(Collect())
    assert torch.equal(c.finalize(), ALL)
    with pytest.raises(ConfigError, match="before any update"):
        Mean().finalize()
    r = Mean(dims=(0,))
    r.update(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="changed shape"):
        r.update(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="cannot merge"):
        Mean().merge(Max())
