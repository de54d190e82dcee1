"""The analysis registry: each method declares once what it is, and every layer reads the declaration.

As :mod:`probes.arch` declares each architecture once (``ArchSpec``), each analysis module declares one
:class:`Analysis` at its end and registers it::

    SPEC = registry.register(Analysis(
        name="logit_lens", title="Logit lens", config=Config, result=LogitLensResult, run=run, prepare=_prepare,
        cli="logit-lens", page="model", memory=planner.FORWARD, sweep=Sweep(run=..., rows=...)))
    result_key = SPEC.key          # the key run() will give, from the same _prepare

The declaration holds

* ``name``: the results' ``analysis`` (the key's prefix, the manifest's name);
* ``config`` / ``result``: the frozen :class:`~analyses.core.base.Config` and the typed result;
* ``run`` and ``prepare``: ``run(probe, inputs..., *, config=..., ...)`` computes; ``prepare`` takes the same
  arguments, checks them and turns the inputs into what ``run`` computes on, with the hash that names them
  (:class:`Inputs`). ``run`` calls ``prepare`` itself, and :meth:`Analysis.key` calls the same ``prepare``
  without computing, so a result's key always comes from the analysis's own inputs, never from a caller;
* ``shard`` (optional): the shard protocol of dataset sweeps (:class:`ShardProtocol`: accumulate / merge /
  finish over one state dict), read by :mod:`analyses.core.cluster`;
* ``sweep`` (optional): how a checkpoint sweep runs it and which rows it keeps (:class:`Sweep`), read by
  :mod:`analyses.core.checkpoints`;
* ``memory`` (optional): its :class:`analyses.core.planner.MemoryModel`, read by the planner; ``verbs``: its further
  ``sonde run`` verbs, each with the memory model it runs with (bigram: ``bigram-eval``);
* ``cli`` / ``page``: the ``sonde run`` verb and the dashboard page (a test holds both to exist);
* ``order`` / ``doc``: its place and section in the docs (``docs/build_readme.py`` lists the README's analysis
  sections from them);
* ``title`` / ``summary``: the method's name and one line on what it finds, for listings.

The infrastructure (``analyses/core``) finds the methods through :func:`all_analyses`, which imports every
module of the ``analyses`` package once; it never imports a method module by name (a test checks this).
Adding a method is writing its module and registering its declaration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from probes.errors import ConfigError, InputError

__all__ = ["Analysis", "Inputs", "ShardProtocol", "Sweep", "register", "get", "all_analyses", "key",
           "shardable", "sweepable", "check_probe", "check_config", "digests", "digests_hash"]


@dataclass(frozen=True)
class Inputs:
    """What an analysis was given, checked and prepared once.

    ``hash`` names the inputs in the result's key (token ids, records, files, edits: whatever changes the
    numbers and is not in the config); ``data`` is whatever ``run`` computes on (tokens, batches, ...);
    ``label`` is a readable summary for people (the prompt's first characters, a file name and row count), which
    the result keeps in its manifest (``sonde results ls`` shows it).
    """

    hash: str
    data: Any = None
    label: str = ""


@dataclass(frozen=True)
class ShardProtocol:
    """How a dataset sweep shards an analysis (:mod:`analyses.core.cluster`).

    * ``accumulate(probe, items, config) -> state``: one shard on a worker; ``state`` is one plain dict of
      tensors, numbers and lists (saved with :func:`analyses.core.io.save_state`);
    * ``merge(a | None, b, config, info) -> state``: folds consecutive shards (``a`` first);
    * ``finish(probe_or_info, state, config, timings, source) -> Result``: the result, whose key the
      analysis derives from the merged state (the same key a one-pass run over the same inputs gets);
      ``needs_probe``: it runs where the model is loaded.
    * ``name``: what a sweep calls it (``sonde run routes --engine``: ``routes``; default: the analysis's name);
    * ``count(state) -> int``: how many items a state covers (the merge ledger checks it against the shards).
    """

    accumulate: Callable[..., dict]
    merge: Callable[..., dict]
    finish: Callable[..., Any]
    needs_probe: bool = False
    name: str | None = None
    count: Callable[[Mapping[str, Any]], int] | None = None


@dataclass(frozen=True)
class Sweep:
    """How a checkpoint sweep (:mod:`analyses.core.checkpoints`) runs an analysis and what it keeps.

    * ``run(probe, config, *, texts, domain, prompt, n_prompts) -> Result``: one checkpoint;
    * ``rows(result) -> list[dict]``: rows ``{"metric", "layer", "head", "value"}``;
    * ``config``: the config class the sweep's ``settings`` build (default: the analysis's).
    """

    run: Callable[..., Any]
    rows: Callable[[Any], list[dict]]
    config: type | None = None


@dataclass(frozen=True)
class Analysis:
    """One analysis, declared once (see the module docstring)."""

    name: str
    title: str
    config: type
    result: type
    run: Callable[..., Any]
    prepare: Callable[..., Inputs] | None = None
    summary: str = ""
    cli: str | None = None
    page: str | None = None
    shard: ShardProtocol | None = None
    sweep: Sweep | None = None
    memory: Any = None  # analyses.core.planner.MemoryModel
    verbs: tuple[tuple[str, Any], ...] = ()  # further `sonde run` verbs of the analysis, each with its memory model
    needs_probe: bool = True
    order: int = 100  # where it stands in the docs index and menus (the method's paper order)
    doc: str | None = None  # its section of the docs (docs/readme/<doc>.md); default: its module's name

    def __post_init__(self) -> None:
        if getattr(self.result, "analysis", None) != self.name:
            raise ConfigError(f"analysis {self.name!r} declares the result {self.result.__name__}, whose analysis is "
                              f"{getattr(self.result, 'analysis', None)!r}.")

    @property
    def module(self) -> str:
        return self.run.__module__

    @property
    def doc_section(self) -> str:
        return self.doc or self.module.rsplit(".", 1)[-1]

    def inputs(self, probe: Any, *args: Any, config: Any = None, **kw: Any) -> Inputs:
        """The checked, prepared inputs of ``run(probe, *args, config=config, **kw)`` (no computation)."""
        config = self.default_config() if config is None else config
        if self.needs_probe:
            check_probe(probe, self.name)
        check_config(config, self.config, self.name)
        if self.prepare is None:
            return Inputs("")
        return self.prepare(probe, *args, config=config, **kw)

    def default_config(self):
        return self.config()

    def key(self, probe: Any = None, *args: Any, config: Any = None, **kw: Any) -> str:
        """The key ``run(probe, *args, config=config, **kw).key`` will have, computed from the same inputs
        without running the analysis (tokenizing or reading files only)."""
        if self.prepare is None:
            raise ConfigError(f"the key of a {self.name} result is known only once it has run (it depends on what the run finds).",
                              hint="Run it and read result.key.")
        config = self.default_config() if config is None else config
        inp = self.inputs(probe, *args, config=config, **kw)
        model = self.model_of(probe, inp)
        return self.result.key_for(model, config, inp.hash)

    def keyer(self, prepare: Callable[..., Inputs]) -> Callable[..., str]:
        """The key function of a second entry point of this analysis that prepares its inputs with ``prepare``
        (e.g. ``critical.search`` beside ``critical.run``): ``keyer(_prepare_search)(probe, ..., config=...)``."""
        spec = dataclasses.replace(self, prepare=prepare)

        def key(probe: Any = None, *args: Any, config: Any = None, **kw: Any) -> str:
            return spec.key(probe, *args, config=config, **kw)

        key.__doc__ = f"The key the entry point prepared by {prepare.__name__} gives these inputs (no computation)."
        return key

    def entry_inputs(self, prepare: Callable[..., Inputs], probe: Any, *args: Any, config: Any = None, **kw: Any) -> Inputs:
        """:meth:`inputs` of a second entry point (see :meth:`keyer`)."""
        return dataclasses.replace(self, prepare=prepare).inputs(probe, *args, config=config, **kw)

    def model_of(self, probe: Any, inp: Inputs) -> Mapping[str, Any]:
        """The model summary a result of these inputs records (an analysis without a probe overrides it
        through ``Inputs.data['model']``)."""
        if isinstance(inp.data, Mapping) and "model" in inp.data:
            return inp.data["model"]
        return probe.info.to_dict()


_REGISTRY: dict[str, Analysis] = {}
_SCANNED = False


def register(spec: Analysis) -> Analysis:
    """Add a declaration (a module registers its own, once; re-importing a module replaces it)."""
    if not isinstance(spec, Analysis):
        raise ConfigError(f"register() takes an Analysis, got {type(spec).__name__}.")
    old = _REGISTRY.get(spec.name)
    if old is not None and old.module != spec.module:
        raise ConfigError(f"analysis {spec.name!r} is declared twice ({old.module} and {spec.module}).")
    _REGISTRY[spec.name] = spec
    return spec


def _scan() -> None:
    """Import every module of the ``analyses`` package once, so that each registers its declaration."""
    global _SCANNED
    if _SCANNED:
        return
    import analyses

    for mod in pkgutil.iter_modules(analyses.__path__):
        if not mod.ispkg:
            importlib.import_module(f"analyses.{mod.name}")
    _SCANNED = True


def all_analyses() -> dict[str, Analysis]:
    """Every registered analysis by name (in the order their modules registered them)."""
    _scan()
    return dict(_REGISTRY)


def doc_sections() -> list[str]:
    """The docs' analysis sections in order: each declared analysis's :attr:`Analysis.doc_section`, once, by ``order``."""
    seen: dict[str, int] = {}
    for s in all_analyses().values():
        seen[s.doc_section] = min(seen.get(s.doc_section, s.order), s.order)
    return sorted(seen, key=lambda d: (seen[d], d))


def get(name: str) -> Analysis:
    """The declaration of ``name`` (a result name such as ``routes.dataset`` or a CLI verb such as ``logit-lens``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    specs = all_analyses()
    if name in specs:
        return specs[name]
    for s in specs.values():
        if s.cli == name:
            return s
    raise ConfigError(f"no analysis is called {name!r}.", hint=f"Analyses: {', '.join(sorted(specs))}.")


def shardable(name: str) -> Analysis:
    """The analysis a dataset sweep calls ``name`` (its shard protocol's name or its own)."""
    specs = [s for s in all_analyses().values() if s.shard is not None]
    for s in specs:
        if name in (s.shard.name, s.name):
            return s
    raise ConfigError(f"analysis {name!r} cannot be swept over shards.",
                      hint=f"Shardable analyses: {', '.join(s.shard.name or s.name for s in specs)}.")


def sweepable() -> dict[str, Analysis]:
    """``{name: declaration}`` of the analyses a checkpoint sweep can run (CLI verbs and result names)."""
    out: dict[str, Analysis] = {}
    for s in all_analyses().values():
        if s.sweep is not None:
            out[s.cli or (s.shard.name if s.shard and s.shard.name else s.name)] = s
    return out


def key(name: str, probe: Any = None, *args: Any, config: Any = None, **kw: Any) -> str:
    """The key the analysis ``name`` will give these inputs (see :meth:`Analysis.key`)."""
    return get(name).key(probe, *args, config=config, **kw)


def text_label(text: str, n: int = 80) -> str:
    """A text's first ``n`` characters on one line (``…`` when cut)."""
    one = " ".join(str(text).split())
    return one if len(one) <= n else one[: n - 1] + "…"


def tokens_label(probe: Any, tokens: torch.Tensor) -> str:
    """A prompt's summary from its ids ``[1, T]``: its decoded text (first 80 characters) and its length."""
    ids = tokens.reshape(-1)
    text = probe.tokenizer.decode(ids[:200].tolist()) if hasattr(probe, "tokenizer") else ""
    return f"{text_label(text)!r} ({ids.numel()} tokens)"


def check_probe(probe: Any, what: str) -> None:
    """One :class:`InputError` when ``probe`` is not a loaded probe (a model name, ``None``, a module...)."""
    if hasattr(probe, "info") and hasattr(probe, "run") and hasattr(probe, "to_tokens"):
        return
    if isinstance(probe, str):
        raise InputError(f"{what} needs a loaded probe, got the string {probe!r}.",
                         hint=f"Load it first: probe = probes.load_model({probe!r}).")
    raise InputError(f"{what} needs a loaded probe, got {type(probe).__name__}.",
                     hint="Load one with probes.load_model('embedded') (or an HF id, a folder, a .gguf).")


def check_config(config: Any, cls: type, what: str) -> None:
    """One :class:`ConfigError` when ``config`` is not an instance of the analysis's config class."""
    if isinstance(config, cls):
        return
    where = f"{cls.__module__}.{cls.__name__}"
    if isinstance(config, Mapping):
        raise ConfigError(f"{what}: config must be {where}, got a dict.",
                          hint=f"Build it: config={where}(**d) or {where}.from_dict(d).")
    raise ConfigError(f"{what}: config must be {where}, got {type(config).__name__}.",
                      hint=f"Pass config={where}(...).")


def signature_matches(spec: Analysis) -> list[str]:
    """The parameters of ``spec.prepare`` that ``spec.run`` lacks (empty when ``run`` accepts all of them);
    a test holds every declaration to this, so that :meth:`Analysis.key` takes what ``run`` takes."""
    if spec.prepare is None:
        return []
    run = inspect.signature(spec.run).parameters
    return [n for n, p in inspect.signature(spec.prepare).parameters.items()
            if n not in run and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def digests(items: Sequence[Any]) -> torch.Tensor:
    """An 8-byte digest of each item (a string, or a tuple of strings / ints / token-id tensors), ``[n, 8]`` uint8.

    Dataset analyses name their inputs by the hash of these digests (:func:`digests_hash`): a sharded sweep
    concatenates its shards' digests in order, so it derives the same key as one pass over the same inputs.
    """
    out = bytearray()
    for it in items:
        h = hashlib.blake2b(digest_size=8)
        for part in it if isinstance(it, tuple) else (it,):
            if isinstance(part, torch.Tensor):
                h.update(part.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
            else:
                h.update(str(part).encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        out += h.digest()
    return torch.frombuffer(out, dtype=torch.uint8).reshape(-1, 8).clone() if out else torch.zeros(0, 8, dtype=torch.uint8)


def digests_hash(d: torch.Tensor) -> str:
    """The input hash of the items whose :func:`digests` are ``d`` ``[n, 8]``."""
    return hashlib.sha256(d.detach().cpu().to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()[:16]
