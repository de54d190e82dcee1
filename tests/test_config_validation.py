"""Config fields are checked once, from their type hints and ``option`` ranges (analyses.core.base):
one error line naming the field, the value and the legal values; cross-field checks stay in each config."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Literal

import pytest

from analyses.core import base
from probes import ConfigError


@dataclass(frozen=True, kw_only=True)
class _Demo(base.Config):
    k: int = base.option(3, ge=1, le=10)
    tau: float = base.option(0.5, gt=0, lt=1, hint="Use 0.5.")
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    chunk: int | None = base.option(None, ge=1)
    ids: tuple[int, ...] = base.option((0,), ge=0)
    pairs: tuple[tuple[str, str], ...] = (("x", "y"),)

    def __post_init__(self) -> None:
        if self.k == 7 and self.mode == "b":
            raise ConfigError("k=7 and mode='b' do not go together.")


@pytest.mark.parametrize("kw,msg", [
    (dict(k=0), "k=0 is not allowed; use an integer from 1 to 10."),
    (dict(k=2.0), "k=2.0 is not allowed; use an integer from 1 to 10."),
    (dict(k=True), "k=True is not allowed; use an integer from 1 to 10."),
    (dict(tau=1.0), "tau=1.0 is not allowed; use a number in (0, 1). Use 0.5."),
    (dict(tau=float("nan")), "tau=nan is not allowed; use a number in (0, 1). Use 0.5."),
    (dict(mode="c"), "mode='c' is not allowed; use one of 'a', 'b'."),
    (dict(flag=1), "flag=1 is not allowed; use True or False."),
    (dict(chunk=0), "chunk=0 is not allowed; use an integer >= 1 or None."),
    (dict(ids=(1, -2)), "ids=(1, -2) is not allowed; use a tuple of integers >= 0."),
    (dict(ids=[1]), "ids=[1] is not allowed; use a tuple of integers >= 0."),
    (dict(pairs=(("x",),)), "pairs=(('x',),) is not allowed; use a tuple of a tuple (a string, a string)."),
])
def test_field_errors_name_the_field_and_the_legal_values(kw, msg):
    with pytest.raises(ConfigError) as e:
        _Demo(**kw)
    assert str(e.value) == msg and "\n" not in str(e.value)


def test_valid_values_and_cross_field_checks():
    assert _Demo(k=10, tau=0.1, chunk=None, ids=(), pairs=()).k == 10
    assert base.validate_fields(_Demo().replace(k=5)) is None
    with pytest.raises(ConfigError, match="do not go together"):
        _Demo(k=7, mode="b")
    # lists from JSON become tuples, nested too; the dict round trip is exact
    c = _Demo.from_dict({"ids": [1, 2], "pairs": [["p", "q"]]})
    assert c.ids == (1, 2) and c.pairs == (("p", "q"),) and _Demo.from_dict(c.to_dict()) == c


def _configs():
    for m in ("routes", "fiber", "counterfactual", "sinks", "bigram", "critical", "dormant", "component", "bbtoy", "logit_lens"):
        importlib.import_module(f"analyses.{m}")
    todo, seen = list(base.Config.__subclasses__()), []
    while todo:
        c = todo.pop()
        seen.append(c)
        todo.extend(c.__subclasses__())
    return [c for c in seen if c.__module__.startswith("analyses.") and c.__module__ != "analyses.core.checkpoints"]


def test_every_analysis_config_default_is_valid_and_round_trips():
    for cls in _configs():
        c = cls()
        assert cls.from_dict(c.to_dict()) == c, cls
        for f in dataclasses.fields(cls):
            assert f.name in base._hints(cls), (cls, f.name)
