"""Shared pieces of every analysis: frozen configs, typed results, the one save/load format.

An analysis module ``analyses/<method>.py`` defines

* ``Config``: ``@dataclass(frozen=True, kw_only=True)`` subclass of :class:`Config`; every field is
  checked from its type hint and :func:`option` range (one :class:`probes.ConfigError` naming the
  field and the legal values), so its own ``__post_init__`` holds only checks that span fields;
  :mod:`analyses.cli.options` builds CLI options from the same fields (default and help);
* ``<Method>Result``: a subclass of :class:`Result` holding arrays, aligned labels, the config and
  the model summary; each field says where it is saved with :func:`stored` (a table, an array, a
  dict of arrays or a JSON extra), and ``saved_views`` lists what is saved but not held (a tidy
  frame, a summary); it implements ``to_frame()`` and ``plot()`` (a plotly figure, imported lazily);
* ``run(probe, ..., config) -> <Method>Result``: the pure entry point.

``Result.save(dir)`` / ``Result.load(dir)`` go through :mod:`analyses.core.store` (Parquet tables +
safetensors arrays + JSON manifest); both are derived once, here, from the fields' :func:`stored`
metadata, so no result re-lists its fields to save or load them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, TypeVar, Union

import pandas as pd
import torch

from probes.errors import ConfigError, InputError

from . import store

__all__ = ["Config", "Result", "Timer", "register_result", "load_result", "stored", "StoreKind", "option", "validate_fields"]

R = TypeVar("R", bound="Result")
_RESULTS: dict[str, type["Result"]] = {}
_MISSING = dataclasses.MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved type hints (string annotations evaluated in its module)."""
    return typing.get_type_hints(cls)


def option(default: Any = _MISSING, *, default_factory: Any = _MISSING, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, help: str | None = None, hint: str | None = None) -> Any:
    """A config field with its legal range and help text (the CLI reads both; :class:`Config` checks the range).

    Args:
        ge, gt, le, lt: bounds of a number (or of every number in a tuple): ``>=``, ``>``, ``<=``, ``<``.
        help: one line for ``--help`` (the CLI option built from this field).
        hint: a fix suggested after the legal values when the value is refused (e.g. the paper's value).
    """
    md = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, help=help, hint=hint).items() if v is not None}
    return field(default=default, default_factory=default_factory, metadata={"option": md})


_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b), ("le", "<=", lambda v, b: v <= b),
           ("lt", "<", lambda v, b: v < b))
_NOUN = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("True or False", "booleans"),
         str: ("a string", "strings")}


def _fits(v: Any, hint: Any) -> bool:
    """Whether ``v`` has the annotated type (Literal choices, scalars, Optional, tuple elements)."""
    if hint is Any or hint is object:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return v is None
    if origin in (Union, types.UnionType):
        return any(_fits(v, a) for a in args)
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if origin is tuple:
        if not isinstance(v, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(x, args[0]) for x in v)
        return len(v) == len(args) and all(_fits(x, a) for x, a in zip(v, args))
    if origin is not None:  # list[...], dict[...], Callable[...]: the container only
        return not isinstance(origin, type) or isinstance(v, origin)
    return not isinstance(hint, type) or isinstance(v, hint)


def _describe(hint: Any, md: Mapping[str, Any], plural: bool = False) -> str:
    """The legal values of a field, in words (``an integer from 1 to 10``, ``one of 'a', 'b'``, ``... or None``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a, md, plural) for a in arms)
        return text + (" or None" if len(arms) < len(args) else "")
    if origin is Literal:
        return ("values among " if plural else "one of ") + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0], md, plural=True)}"
        return f"a tuple ({', '.join(_describe(a, md) for a in args)})"
    noun = _NOUN.get(hint, (getattr(hint, "__name__", str(hint)),) * 2)[1 if plural else 0]
    bounds = {k: md[k] for k, _, _ in _BOUNDS if k in md}
    lo = next(((k, b) for k, b in bounds.items() if k in ("ge", "gt")), None)
    hi = next(((k, b) for k, b in bounds.items() if k in ("le", "lt")), None)
    if lo and hi and hint is int and lo[0] == "ge" and hi[0] == "le":
        return f"{noun} from {lo[1]:g} to {hi[1]:g}"
    if lo and hi:
        return f"{noun} in {'[' if lo[0] == 'ge' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == 'le' else ')'}"
    for k, sym, _ in _BOUNDS:
        if k in bounds:
            return f"{noun} {sym} {bounds[k]:g}"
    return noun


def _in_range(v: Any, md: Mapping[str, Any]) -> bool:
    if isinstance(v, tuple):
        return all(_in_range(x, md) for x in v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return True
    return all(ok(v, md[k]) for k, _, ok in _BOUNDS if k in md)


def validate_fields(cfg: "Config") -> None:
    """Check every field of ``cfg`` against its type hint and :func:`option` range; raise one
    :class:`ConfigError` naming the field, the value given and the legal values."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v, hint, md = getattr(cfg, f.name), hints.get(f.name, Any), f.metadata.get("option", {})
        if not (_fits(v, hint) and _in_range(v, md)):
            raise ConfigError(f"{f.name}={v!r} is not allowed; use {_describe(hint, md)}.", hint=md.get("hint"))


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of analysis configs: frozen, keyword-only, JSON round-trip.

    Every field is checked against its type hint (``Literal`` choices, ``int``/``float``/``bool``/``str``,
    ``Optional``, tuple elements) and its :func:`option` range before the subclass's own
    ``__post_init__`` runs, so a subclass checks only what spans several fields.
    """

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_validates_fields", False):
            def __post_init__(self, _own=own) -> None:
                validate_fields(self)
                _own(self)

            __post_init__._validates_fields = True  # type: ignore[attr-defined]
            __post_init__.__doc__ = own.__doc__
            cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        validate_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{cls.__module__}.{cls.__name__} has no option(s) {sorted(unknown)}.", hint=f"Options: {sorted(names)}.")
        return cls(**{f.name: _tuples(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

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


StoreKind = Literal["table", "array", "arrays", "extra"]
_KINDS: tuple[str, ...] = typing.get_args(StoreKind)


def stored(kind: StoreKind | None, *, key: str | None = None, save: Callable[[Any], Any] | None = None,
           load: Callable[[Any], Any] | None = None, read: Callable[[store.StoredResult], Any] | None = None,
           **field_kw: Any) -> Any:
    """A result field together with where :meth:`Result.save` puts it and how :meth:`Result.load` gets it back.

    Args:
        kind: ``"table"`` (a DataFrame, ``<key>.parquet``), ``"array"`` (a tensor in ``arrays.safetensors``),
            ``"arrays"`` (a ``{name: tensor}`` dict, saved as arrays ``<key>.<name>``), ``"extra"`` (a
            JSON value in the manifest), or ``None`` (not saved itself; ``read`` rebuilds it).
        key: the stored name (default: the field name).
        save: ``save(result)`` gives the stored value (default: the field's value); a ``None`` table or
            array is not written (an extra stores ``null``).
        load: turns the stored value back into the field's value. By default an extra is converted to
            the field's annotated type (lists to tuples, numbers to ``int``/``float``, ...).
        read: ``read(stored_result)`` rebuilds the field from the whole stored result instead.
        field_kw: passed to :func:`dataclasses.field` (``default``, ``default_factory``, ...). A field with
            a default takes it when an older result lacks the stored entry.
    """
    if kind is not None and kind not in _KINDS:
        raise ConfigError(f"stored(kind={kind!r}) is not a store kind.", hint=f"Use one of: {', '.join(_KINDS)}, or None.")
    if kind is None and read is None:
        raise ConfigError("stored(None) needs read=... to rebuild the field.")
    md = {"store": kind, "key": key, "save": save, "load": load, "read": read}
    return field(metadata={**field_kw.pop("metadata", {}), "store": md}, **field_kw)


def _coerce(v: Any, hint: Any) -> Any:
    """A JSON value converted to the annotated type (tuples, lists, dicts, scalars; nested)."""
    if v is None or hint is Any:
        return v
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return _coerce(v, arms[0]) if len(arms) == 1 else v
    if origin is tuple or hint is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(x, args[0]) for x in v)
        return tuple(_coerce(x, a) for x, a in zip(v, args)) if args else tuple(v)
    if origin is list or hint is list:
        return [_coerce(x, args[0]) for x in v] if args else list(v)
    if origin in (dict, Mapping) or hint is dict:
        return {k: _coerce(x, args[1]) for k, x in v.items()} if args else dict(v)
    if hint in (int, float, bool, str) and not isinstance(v, (list, dict)):
        return hint(v)
    return v


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not _MISSING or f.default_factory is not _MISSING


@dataclass(frozen=True, kw_only=True)
class Result:
    """Base of typed results. Subclasses are frozen dataclasses with ``analysis`` set."""

    analysis: ClassVar[str] = "result"
    # what is saved but not held: (kind, key, fn(result)), e.g. ("table", "main", lambda r: r.to_frame())
    saved_views: ClassVar[tuple[tuple[str, str, Callable[[Any], Any]], ...]] = (("table", "main", lambda r: r.to_frame()),)
    # table columns that hold p-values: reports and pages print them with analyses.core.report.format_p
    # ("9.00e-37", an exact 0 as "< 1e-300"); other "p_*" columns of some analyses are plain probabilities
    p_value_columns: ClassVar[tuple[str, ...]] = ()

    config: Config
    model: dict[str, Any]  # probes.ModelInfo.to_dict()
    input_hash: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    inputs: str = ""  # a readable summary of the inputs (registry.Inputs.label), shown by `sonde results ls`

    # --- to implement -----------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def plot(self, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # --- storage, derived from the fields' ``stored`` metadata ----------------------------------
    @classmethod
    def stored_fields(cls) -> list[tuple[dataclasses.Field, dict[str, Any]]]:
        """The fields saved by :meth:`save`, with their :func:`stored` metadata."""
        return [(f, f.metadata["store"]) for f in dataclasses.fields(cls) if "store" in f.metadata]

    def _saved(self, kinds: tuple[str, ...] = ("table", "array", "extra")) -> dict[str, dict[str, Any]]:
        """What :meth:`save` writes, by kind (only ``kinds`` are computed: views such as a route can be costly)."""
        out: dict[str, dict[str, Any]] = {k: {} for k in kinds}
        for f, md in self.stored_fields():
            kind = "array" if md["store"] == "arrays" else md["store"]
            if kind not in out:
                continue
            v = md["save"](self) if md["save"] is not None else getattr(self, f.name)
            if v is None and kind != "extra":  # an absent table or array; an extra keeps its None
                continue
            key = md["key"] or f.name
            if md["store"] == "arrays":
                out["array"].update({f"{key}.{k}": t for k, t in v.items()})
            else:
                out[kind][key] = v
        for kind, key, fn in self.saved_views:
            if kind in out:
                v = fn(self)
                if v is not None:
                    out[kind][key] = v
        return out

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables :meth:`save` writes (``{name: DataFrame}``)."""
        return self._saved(("table",))["table"]

    def arrays(self) -> dict[str, torch.Tensor]:
        """The arrays :meth:`save` writes (``{name: tensor}``)."""
        return {k: v.contiguous() for k, v in self._saved(("array",))["array"].items()}

    def extra(self) -> dict[str, Any]:
        """The JSON values :meth:`save` writes into the manifest."""
        return self._saved(("extra",))["extra"]

    @classmethod
    def _from_stored(cls, stored: store.StoredResult, base: dict[str, Any]):
        """The result rebuilt from its folder: each :func:`stored` field from its table, array(s) or extra."""
        src = {"table": stored.tables, "array": stored.arrays, "extra": stored.extra}
        kw = dict(base)
        hints = _hints(cls)
        for f, md in cls.stored_fields():
            key = md["key"] or f.name
            if md["read"] is not None:
                kw[f.name] = md["read"](stored)
                continue
            if md["store"] == "arrays":
                pre = f"{key}."
                kw[f.name] = {k[len(pre):]: v for k, v in stored.arrays.items() if k.startswith(pre)}
                continue
            if key not in src[md["store"]]:
                if _has_default(f):
                    continue
                raise InputError(f"{str(stored.path)!r} lacks the {md['store']} {key!r} of its {cls.analysis} result.",
                                 hint="The result is incomplete or damaged; re-run the analysis.")
            v = src[md["store"]][key]
            kw[f.name] = md["load"](v) if md["load"] is not None else (_coerce(v, hints[f.name]) if md["store"] == "extra" else v)
        return cls(**kw)

    # --- shared -------------------------------------------------------------------------------
    @classmethod
    def key_for(cls, model: Any, config: Config, input_hash: str) -> str:
        """The key a result of this class will have, known before it is computed: ``model`` is the probe (or its
        ``info.to_dict()``), ``config`` and ``input_hash`` are the ones the analysis stores. :attr:`key` is built here
        too, so an analysis's ``result_key(...)`` and its result's ``.key`` cannot differ."""
        info = model if isinstance(model, Mapping) else model.info.to_dict()
        return store.result_key(cls.analysis, str(info.get("fingerprint", "")), config.to_dict(), input_hash)

    @property
    def key(self) -> str:
        return type(self).key_for(self.model, self.config, self.input_hash)

    def save(self, out_dir: str | Path | None = None, *, replace: bool = False) -> Path:
        """Write the result (atomically); default folder ``<results_root>/<key>``. An existing result
        at ``out_dir`` is replaced only with ``replace=True`` (see :func:`analyses.core.store.write_result`)."""
        out = Path(out_dir) if out_dir is not None else store.results_root() / self.key
        self._check_same_inputs(out)
        parts = self._saved()  # every field and view once
        return store.write_result(
            out, analysis=self.analysis, model=self.model, config=self.config.to_dict(), input_hash=self.input_hash,
            tables=parts["table"], arrays=parts["array"], extra=parts["extra"], timings=self.timings, replace=replace,
            inputs=self.inputs,
        )

    def _check_same_inputs(self, out: Path) -> None:
        """Refuse to replace a result that has this key but other inputs (its recorded input hash differs): one
        key names one computation, so a mismatch means the key was not derived from the inputs."""
        try:
            man = store.read_manifest(out)
        except InputError:
            return
        if man.get("key") == self.key and man.get("input_hash", "") != self.input_hash:
            raise store.ResultExistsError(
                f"{str(out)!r} holds a {man.get('analysis')} result with the same key but other inputs "
                f"(input hash {man.get('input_hash', '')!r}, this run {self.input_hash!r}); not replacing it.",
                hint="Give another --out; the key of a result must come from its inputs.")

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        stored = store.read_result(path)
        if cls is not Result and stored.analysis != cls.analysis:
            raise ConfigError(f"{str(path)!r} holds a {stored.analysis!r} result, not {cls.analysis!r}.")
        target = cls if cls is not Result else _RESULTS[stored.analysis]
        cfg_cls = _resolve_config_class(target)
        base = dict(config=cfg_cls.from_dict(stored.config), model=stored.manifest["model"],
                    input_hash=stored.manifest.get("input_hash", ""), timings=stored.manifest.get("timings", {}),
                    inputs=stored.manifest.get("inputs", "") if isinstance(stored.manifest.get("inputs"), str) else "")
        return target._from_stored(stored, base)


def _resolve_config_class(target: type[Result]) -> type[Config]:
    import importlib

    mod = importlib.import_module(target.__module__)
    cfg = getattr(target, "config_class", None) or getattr(mod, "Config", None)
    if cfg is None:
        raise ConfigError(f"{target.__name__} has no config class (set config_class or define Config in its module).")
    return cfg


def load_result(path: str | Path) -> Result:
    """Load any registered result type from its folder (its analysis is found through the registry)."""
    from . import registry

    man = store.read_manifest(path)
    name = man["analysis"]
    if name not in _RESULTS:
        specs = registry.all_analyses()  # imports every analysis module once: each registers its result type
        if name in specs:
            _RESULTS.setdefault(name, specs[name].result)
    if name not in _RESULTS:
        raise ConfigError(f"no result type is registered for analysis {name!r}.",
                          hint="The result was written by another version of Sonde, or its manifest is damaged.")
    return _RESULTS[name].load(path)
