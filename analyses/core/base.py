"""Shared pieces of every analysis: frozen configs, typed results, the one save/load format.

An analysis module ``analyses/<method>.py`` defines

* ``Config``: ``@dataclass(frozen=True, kw_only=True)`` subclass of :class:`Config` whose
  ``__post_init__`` only validates (raising :class:`probes.ConfigError` with the legal values);
* ``<Method>Result``: a subclass of :class:`Result` holding arrays, aligned labels, the config and
  the model summary; it implements ``tables()``, ``arrays()``, ``extra()``, ``to_frame()`` and
  ``plot()`` (a plotly figure, imported lazily) and ``_from_stored`` for loading;
* ``run(probe, ..., config) -> <Method>Result``: the pure entry point.

``Result.save(dir)`` / ``Result.load(dir)`` go through :mod:`analyses.core.store` (Parquet tables +
safetensors arrays + JSON manifest).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, TypeVar

import pandas as pd
import torch

from probes.errors import ConfigError

from . import store

__all__ = ["Config", "Result", "Timer", "register_result", "load_result"]

R = TypeVar("R", bound="Result")
_RESULTS: dict[str, type["Result"]] = {}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of analysis configs: frozen, keyword-only, JSON round-trip."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{cls.__module__}.{cls.__name__} has no option(s) {sorted(unknown)}.", hint=f"Options: {sorted(names)}.")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def register_result(cls: type[R]) -> type[R]:
    """Class decorator: lets :func:`load_result` rebuild this result type from its folder."""
    _RESULTS[cls.analysis] = cls
    return cls


class Timer:
    """Collects named wall-clock timings for the manifest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True, kw_only=True)
class Result:
    """Base of typed results. Subclasses are frozen dataclasses with ``analysis`` set."""

    analysis: ClassVar[str] = "result"

    config: Config
    model: dict[str, Any]  # probes.ModelInfo.to_dict()
    input_hash: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    # --- to implement -----------------------------------------------------------------------
    def tables(self) -> dict[str, pd.DataFrame]:
        return {"main": self.to_frame()}

    def arrays(self) -> dict[str, torch.Tensor]:
        return {}

    def extra(self) -> dict[str, Any]:
        return {}

    def to_frame(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def plot(self, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _from_stored(cls, stored: store.StoredResult, base: dict[str, Any]):  # pragma: no cover - abstract
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return store.result_key(self.analysis, str(self.model.get("fingerprint", "")), self.config.to_dict(), self.input_hash)

    def save(self, out_dir: str | Path | None = None, *, replace: bool = False) -> Path:
        """Write the result (atomically); default folder ``<results_root>/<key>``. An existing result
        at ``out_dir`` is replaced only with ``replace=True`` (see :func:`analyses.core.store.write_result`)."""
        out = Path(out_dir) if out_dir is not None else store.results_root() / self.key
        return store.write_result(
            out, analysis=self.analysis, model=self.model, config=self.config.to_dict(), input_hash=self.input_hash,
            tables=self.tables(), arrays=self.arrays(), extra=self.extra(), timings=self.timings, replace=replace,
        )

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        stored = store.read_result(path)
        if cls is not Result and stored.analysis != cls.analysis:
            raise ConfigError(f"{str(path)!r} holds a {stored.analysis!r} result, not {cls.analysis!r}.")
        target = cls if cls is not Result else _RESULTS[stored.analysis]
        cfg_cls = _resolve_config_class(target)
        base = dict(config=cfg_cls.from_dict(stored.config), model=stored.manifest["model"],
                    input_hash=stored.manifest.get("input_hash", ""), timings=stored.manifest.get("timings", {}))
        return target._from_stored(stored, base)


def _resolve_config_class(target: type[Result]) -> type[Config]:
    import importlib

    mod = importlib.import_module(target.__module__)
    cfg = getattr(target, "config_class", None) or getattr(mod, "Config", None)
    if cfg is None:
        raise ConfigError(f"{target.__name__} has no config class (set config_class or define Config in its module).")
    return cfg


def load_result(path: str | Path) -> Result:
    """Load any registered result type from its folder (imports its analysis module)."""
    import importlib

    man = store.read_manifest(path)
    name = man["analysis"]
    for modname in (name.replace("-", "_"), name.replace("-", ""), name.split(".")[0].split("-")[0]):
        if name in _RESULTS:
            break
        try:
            importlib.import_module(f"analyses.{modname}")
        except ImportError:
            pass
    if name not in _RESULTS:
        raise ConfigError(f"no result type is registered for analysis {name!r}.")
    return _RESULTS[name].load(path)
