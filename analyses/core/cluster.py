"""Dataset sweeps: shard a corpus, run an analysis on workers, merge the partial reducer states.

A sweep cuts the input items (texts or :class:`analyses.core.io.Record`) into contiguous shards
(:func:`analyses.core.domains.shard_ranges`), runs one analysis' shard function on each, and folds the
shards' partial states **in shard order** into one state, which the analysis turns into its usual
result. Because every statistic is a float64 sum or an integer count kept in a streaming reducer
(:mod:`probes.reducers`), the merged result is the one-pass result: the same items in the same
order, grouped into sums differently (≤ 1e-12 relative on the float64 sums; counts exactly).

Threads: a float32 matmul's result depends on how many torch threads split it (≈ 1e-7 relative per
product, up to ≈ 1e-6 on the statistics), so every shard and the finishing step run with the same
torch thread count, ``SweepConfig.threads`` (default: the driver's current ``torch.get_num_threads()``;
the CLI's ``--threads``, default 1, also pins the one-pass run). At equal threads the local engine,
Ray workers and the one-pass run agree bit for bit (tests: tolerance 0).

Engines (one code path for both; the analysis code is the same):

* ``local``: the shards run one after another on a probe in this process (the reference);
* ``ray``: one Ray actor per worker loads the model once (``gpus_per_worker`` GPUs each, so one
  worker per GPU on a multi-GPU box) and takes shards as they come (``ray.wait``). On a laptop
  ``ray.init`` starts a local instance bound to 127.0.0.1 (no dashboard); ``address="auto"`` joins a
  running cluster. Every model option of :class:`ModelSpec` reaches the workers; combinations the
  workers cannot honour (``remote``, a device without ``gpus_per_worker``) are refused before Ray starts.

Failures: a shard that raises is retried by Ray on its actor (``max_task_retries`` with
``retry_exceptions``; a crashed actor is restarted, ``max_restarts``) and, locally, by the same
retry budget here. Retried shards and their attempts are reported (``SweepReport.retried``, the
result's ``timings["sweep.retries"]`` and ``sweep.json`` next to the manifest). A shard that still
fails after ``1 + max_retries`` attempts raises one :class:`probes.SondeError` naming the shard.

Resume: the **merge ledger** (a private folder, mode 0700; by default in the per-user cache,
:func:`default_ledger`) holds the fold of the contiguous prefix of finished shards
(``ledger.safetensors``: ``through`` = shards folded, the merged state) and each finished shard past
a gap (``shard-NNNNN.safetensors``), all in the one state format of :func:`analyses.core.io.save_state`
(safetensors + a JSON header; no pickle). Every file is written to a temporary name and renamed,
shard file before ledger, so a sweep killed at any instant resumes with each shard counted exactly
once. A file whose fingerprint (analysis, model, config, input, sharding), read from its JSON header
before any tensor, differs is ignored. A matching file is checked before it is used (its digest;
``through`` an integer within the shard count and the same in header and contents; every folded
shard recorded; item counts equal to the shards' sizes and to the counts the merged state keeps): a
ledger that fails starts the sweep over, a shard file that fails runs its shard again, each with one
warning line.

Test hooks (read by the driver; documented here because tests use them):

* ``SONDE_FAULT_SHARD="3"`` makes shard 3 raise on its first attempt; ``"3:2,5:always"`` makes
  shard 3 fail twice and shard 5 on every attempt;
* ``SONDE_FAULT_EXIT_AFTER=N`` ends the driver process (``os._exit(75)``, no clean-up, like a kill)
  once N shards are folded into the ledger.

Shardable analyses declare a :class:`analyses.core.registry.ShardProtocol` (accumulate / merge / finish over
one state dict): ``sinks`` (items: texts) and ``routes`` (dataset mode; items: records with domains).
``dormant`` is not shardable: its causal check re-runs the data once per tested head after the
statistics are known. Each analysis derives its result's key from the merged state (the digests of the
items it measured), so a sweep's result has the key of a one-pass run over the same input.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch

from probes.errors import ConfigError, InputError, SondeError

from . import base, registry
from .domains import shard_ranges
from .progress import ProgressFn, phase
from .store import hash_inputs

__all__ = ["SweepConfig", "ModelSpec", "Shard", "SweepReport", "SweepRun", "Ledger",
           "LocalEngine", "RayEngine", "make_engine", "check_ray_model", "plan_shards", "sweep", "parse_faults", "ShardFailedError",
           "default_ledger"]

FAULT_ENV = "SONDE_FAULT_SHARD"
EXIT_ENV = "SONDE_FAULT_EXIT_AFTER"


# ============================================================================ config
@dataclass(frozen=True, kw_only=True)
class SweepConfig(base.Config):
    """How a sweep runs (not what it measures: that is the analysis' own config)."""

    engine: Literal["local", "ray"] = "local"
    address: str | None = None  # None: start Ray here (laptop, one box); "auto" / "ray://host:10001": join a cluster
    workers: int | None = None  # None: one per GPU when gpus_per_worker > 0, else 2
    gpus_per_worker: float = 0.0  # 1 = one model per GPU
    cpus_per_worker: float = 1.0
    shard_size: int = 32  # items per shard; a multiple of the analysis' batch_size keeps one-pass batches
    max_retries: int = 2  # extra attempts of a failing shard
    resume: bool = True  # reuse a matching merge ledger
    threads: int | None = None  # torch threads of every shard and of the finish (None: the driver's current count)

    def __post_init__(self):
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine={self.engine!r}; use 'local' (this process) or 'ray'.")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"workers={self.workers!r}; use a positive number of workers (or leave it unset).")
        if not (isinstance(self.gpus_per_worker, (int, float)) and self.gpus_per_worker >= 0):
            raise ConfigError(f"gpus_per_worker={self.gpus_per_worker!r}; use 0 (CPU), a fraction or a whole number of GPUs.")
        if not (isinstance(self.cpus_per_worker, (int, float)) and self.cpus_per_worker > 0):
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker!r}; use a positive number of CPUs.")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"shard_size={self.shard_size!r}; use a positive number of items per shard.")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1):
            raise ConfigError(f"threads={self.threads!r}; use a positive number of torch threads (or leave it unset).")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries!r}; use 0 (no retry) or more.")
        if self.engine == "local" and (self.address is not None or self.gpus_per_worker):
            raise ConfigError("address/gpus_per_worker are Ray settings but engine='local'.",
                              hint="Pass --engine ray, or drop --address/--gpus-per-worker.")


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: the arguments of :func:`probes.load_model` (all of them reach Ray workers)."""

    name: str = "embedded"
    backend: str = "nnsight"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    device_map: str | None = None
    max_memory: str | None = None
    remote: bool = False

    def load(self):
        from probes import load_model

        return load_model(self.name, backend=self.backend, device=self.device, dtype=self.dtype, revision=self.revision,
                          device_map=self.device_map, max_memory=self.max_memory, remote=self.remote)


def check_ray_model(model: ModelSpec, sweep: SweepConfig) -> None:
    """Refuse, before Ray starts, model options that Ray workers cannot honour (one :class:`ConfigError` line)."""
    from probes.backend import BACKENDS
    from probes.errors import DeviceError
    from probes.loading import _check_device_map, parse_max_memory, resolve_device, resolve_dtype

    if model.remote:
        raise ConfigError("--remote runs the model on NDIF, but --engine ray loads it on Ray workers.",
                          hint="Drop --remote to shard over Ray workers, or drop --engine ray to run remotely.")
    if model.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {model.backend!r}.", hint=f"Use one of: {', '.join(BACKENDS)}.")
    _check_device_map(model.device_map, parse_max_memory(model.max_memory))
    try:
        dev = torch.device(model.device) if model.device != "auto" else None
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {model.device!r}.", hint="Use auto, cpu, cuda, cuda:N or mps.") from None
    resolve_dtype(model.dtype, dev or torch.device("cpu"))
    gpu = sweep.gpus_per_worker > 0
    if dev is not None and dev.type == "cuda":
        if not gpu:
            raise ConfigError(f"--device {model.device} with --engine ray: a Ray worker sees a GPU only when it is given one.",
                              hint="Add --gpus-per-worker 1 (one model per GPU), or use --device cpu.")
        if dev.index not in (None, 0):
            raise ConfigError(f"--device {model.device} with --engine ray: each worker numbers its own GPUs from 0.",
                              hint="Use --device cuda (Ray assigns each worker its GPUs).")
    if dev is not None and dev.type != "cuda" and gpu:
        raise ConfigError(f"--device {model.device} with --gpus-per-worker {sweep.gpus_per_worker:g}: the workers' GPUs would sit idle.",
                          hint="Use --device auto or cuda with --gpus-per-worker, or drop --gpus-per-worker.")
    if sweep.address is None:  # Ray would start here: this machine's devices are the workers' devices
        if gpu and torch.cuda.device_count() < sweep.gpus_per_worker:
            raise DeviceError(f"--gpus-per-worker {sweep.gpus_per_worker:g}, but this machine has {torch.cuda.device_count()} CUDA GPU(s).",
                              hint="Use --gpus-per-worker 0 on a CPU machine, or --address to join a cluster with GPUs.")
        if dev is not None and dev.type == "mps":
            resolve_device(model.device)


@dataclass(frozen=True)
class Shard:
    """Items ``[start, stop)`` of the input, shard number ``index``."""

    index: int
    start: int
    stop: int

    def __str__(self) -> str:
        return f"shard {self.index} (items {self.start}..{self.stop - 1})"


def plan_shards(n_items: int, shard_size: int) -> list[Shard]:
    """Contiguous shards covering ``n_items`` in order."""
    if n_items < 1:
        raise InputError("the input holds no items; there is nothing to sweep.", hint="Check --input / --domains.")
    return [Shard(i, a, b) for i, (a, b) in enumerate(shard_ranges(n_items, shard_size))]


def parse_faults(text: str | None) -> dict[int, float]:
    """``"3"`` / ``"3:2,5:always"`` -> ``{shard: failing attempts}`` (``inf`` = always)."""
    out: dict[int, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        idx, _, n = part.strip().partition(":")
        try:
            out[int(idx)] = math.inf if n == "always" else float(int(n or 1))
        except ValueError:
            raise ConfigError(f"{FAULT_ENV}={text!r} is not understood.", hint="Use e.g. 3 or 3:2,5:always.") from None
    return out


class ShardFault(RuntimeError):
    """The injected failure of the test hook ``SONDE_FAULT_SHARD``."""


class ShardFailedError(SondeError):
    """A shard failed on every attempt."""


# ============================================================================ shardable analyses
def _shardable(name: str) -> registry.Analysis:
    """The declaration of a shardable analysis (its :class:`analyses.core.registry.ShardProtocol`)."""
    return registry.shardable(name)


def hash_items(items: Sequence) -> str:
    """The hash of a sweep's items as given (texts, or records' text and domain, in order): it names the sweep's
    merge ledger; the result's key is the analysis's own (derived from what it measured)."""
    return registry.digests_hash(registry.digests([it if isinstance(it, str) else (it.text, it.domain or "") for it in items]))


def default_ledger(out_dir: str | Path) -> Path:
    """The merge-ledger folder of a result folder: a private folder in the per-user cache keyed by the
    result's absolute path (:func:`analyses.core.io.work_dir`), never a guessable path beside the result."""
    from .io import work_dir

    return work_dir(out_dir, "sweep")


class _threads:
    """``with _threads(n):`` runs torch with ``n`` intra-op threads (None: unchanged), then restores the count."""

    def __init__(self, n: int | None):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


def _run_shard(probe, analysis: str, config, items: Sequence, shard: Shard, attempt: int, faults: Mapping[int, float],
               threads: int | None = None):
    """The worker side of one shard attempt (shared by both engines)."""
    if attempt <= faults.get(shard.index, 0):
        raise ShardFault(f"injected fault ({FAULT_ENV}) in {shard}, attempt {attempt}")
    t0 = time.perf_counter()
    with _threads(threads):
        state = _shardable(analysis).shard.accumulate(probe, items, config)
    return {"state": state, "seconds": time.perf_counter() - t0, "attempts": attempt,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


# ============================================================================ ledger
def _state_items(state: Any, count: Callable[[Any], int] | None) -> int | None:
    """How many items a (merged) shard state covers, by the analysis's own ``ShardProtocol.count`` (``None`` when it
    declares none); :class:`ValueError` when the state's count is not a count."""
    if count is None or not isinstance(state, Mapping):
        return None
    try:
        n = count(state)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"the state keeps no item count ({type(e).__name__})") from None
    if type(n) is not int or n < 0:
        raise ValueError(f"items={n!r} is not a count")
    return n


class Ledger:
    """The on-disk merge ledger of one sweep (see the module docstring); ``folder=None`` keeps it in memory.

    ``sizes`` (items per shard, in order) lets the ledger check item counts: every saved file keeps the
    number of items it covers, and a state that counts its items (``count``, the analysis's
    ``ShardProtocol.count``) must agree.
    Before anything saved is used it is checked: the file digest; ``through`` (an integer between 1
    and ``n_shards``, kept both in the header and beside the state); ``n_shards``; the per-shard records
    of every folded shard; the item counts. A ledger that fails is not used: the sweep starts over
    with one :class:`probes.errors.SondeWarning` line; a shard file that fails is ignored (with one
    line) and its shard runs again.
    """

    LEDGER = "ledger.safetensors"
    _SHARD = re.compile(r"shard-(\d{5,})\.safetensors")

    def __init__(self, folder: str | Path | None, *, fingerprint: str, n_shards: int, merge: Callable[[Any, Any], Any],
                 sizes: Sequence[int] | None = None, count: Callable[[Any], int] | None = None):
        self.folder = None if folder is None else Path(folder)
        self._count = count
        self.fingerprint, self.n_shards, self._merge = fingerprint, int(n_shards), merge
        if sizes is not None and len(sizes) != self.n_shards:
            raise ValueError(f"Ledger: {len(sizes)} shard sizes for {self.n_shards} shards.")
        self.sizes = None if sizes is None else [int(x) for x in sizes]
        self.through = 0
        self.state: Any = None
        self.pending: dict[int, dict] = {}
        self.meta: dict[int, dict] = {}

    # -- io ----------------------------------------------------------------------------------------
    def _write(self, name: str, tree: Any, meta: Mapping[str, Any]) -> None:
        from .io import private_dir, save_state

        private_dir(self.folder)
        save_state(self.folder / name, tree, fingerprint=self.fingerprint, meta=meta)

    def _items(self, through: int) -> int | None:
        return None if self.sizes is None else sum(self.sizes[:through])

    def _warn(self, what: str, problem: str, then: str) -> None:
        import warnings

        from probes.errors import SondeWarning

        warnings.warn(SondeWarning(f"ignoring the {what} ({problem}); {then}"), stacklevel=3)

    def load(self) -> int:
        """Restore a matching ledger; returns the number of shards already done (0 if none matches, or if
        the saved ledger fails its checks: then one warning line says so and the sweep starts over)."""
        from .io import load_state

        if self.folder is None:
            return 0
        path = self.folder / self.LEDGER
        got = load_state(path, self.fingerprint)
        if got is None:
            return 0
        problem = self._ledger_problem(*got)
        if problem:
            self._warn(f"merge ledger {str(path)!r}", problem, "the sweep starts over")
            return 0
        tree = got[0]
        self.through, self.state, self.meta = tree["progress"]["through"], tree["state"], dict(tree["meta"])
        for f in sorted(self.folder.glob("shard-*.safetensors")):
            m = self._SHARD.fullmatch(f.name)
            rec = load_state(f, self.fingerprint) if m else None
            if rec is None:
                continue
            problem = self._shard_problem(int(m.group(1)), *rec)
            if problem:
                self._warn(f"shard file {str(f)!r}", problem, "that shard runs again")
                continue
            idx = rec[0]["progress"]["index"]
            if idx < self.through:  # already folded (killed before its clean-up)
                f.unlink(missing_ok=True)
            else:
                self.pending[idx] = {"index": idx, "state": rec[0]["state"], "meta": rec[0]["meta"]}
                self.meta[idx] = rec[0]["meta"]
        self._fold()
        return len(self.done)

    @staticmethod
    def _envelope_problem(tree: Any, meta: Any, what: str) -> str | None:
        """Why a saved ledger or shard file is not one of this version, or its header and contents disagree."""
        from .io import same_json

        if not (isinstance(tree, dict) and isinstance(tree.get("progress"), dict) and "state" in tree
                and isinstance(tree.get("meta"), dict)):
            return f"not a {what} of this version"
        if not same_json(meta, tree["progress"]):
            return "its header and its contents disagree"
        return None

    def _ledger_problem(self, tree: Any, meta: Any) -> str | None:
        bad = self._envelope_problem(tree, meta, "ledger")
        if bad:
            return bad
        prog = tree["progress"]
        n, t = prog.get("n_shards"), prog.get("through")
        if n != self.n_shards or type(n) is not int:
            return f"it was made for n_shards={n!r}, this sweep has {self.n_shards}"
        if type(t) is not int or not 1 <= t <= self.n_shards:
            return f"through={t!r} is not a shard count between 1 and {self.n_shards}"
        if not all(type(i) is int and 0 <= i < self.n_shards and isinstance(m, dict) for i, m in tree["meta"].items()):
            return "its shard records are damaged"
        missing = [i for i in range(t) if i not in tree["meta"]]
        if missing:
            return f"through={t} but shard {missing[0]} was never recorded"
        return self._count_problem(prog.get("items"), tree["state"], self._items(t), f"the first {t} shards")

    def _shard_problem(self, name_index: int, tree: Any, meta: Any) -> str | None:
        bad = self._envelope_problem(tree, meta, "shard file")
        if bad:
            return bad
        prog = tree["progress"]
        i = prog.get("index")
        if type(i) is not int or not 0 <= i < self.n_shards or i != name_index:
            return f"index={i!r} does not name one of the {self.n_shards} shards (file name: shard {name_index})"
        return self._count_problem(prog.get("items"), tree["state"], None if self.sizes is None else self.sizes[i], f"shard {i}")

    def _count_problem(self, saved: Any, state: Any, want: int | None, what: str) -> str | None:
        if saved is not None and type(saved) is not int:
            return f"items={saved!r} is not a count"
        if want is not None and saved is not None and saved != want:
            return f"it counts {saved} items for {what}, which hold {want}"
        try:
            have = _state_items(state, self._count)
        except ValueError as e:
            return str(e)
        expect = want if want is not None else saved
        if have is not None and expect is not None and have != expect:
            return f"its state covers {have} items, {what} hold {expect}"
        return None

    def clear(self) -> None:
        """Remove the ledger's own files (``ledger.safetensors``, ``shard-*.safetensors``), then its folder if
        that empties it; nothing else in the folder is touched."""
        from .io import _remove_state_files

        if self.folder is not None and self.folder.is_dir():
            _remove_state_files(self.folder, [self.LEDGER] + [f.name for f in self.folder.glob("shard-*.safetensors")
                                                              if self._SHARD.fullmatch(f.name)])

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def done(self) -> set[int]:
        return set(range(self.through)) | set(self.pending)

    def record(self, index: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Store one finished shard (durably before it counts) and fold the contiguous prefix."""
        if index in self.done:  # a duplicate completion (a retried task that had in fact finished)
            return
        rec = {"index": index, "state": state, "meta": dict(meta)}
        self.meta[index] = dict(meta)
        if self.folder is not None and index != self.through:
            prog = {"index": index, "items": None if self.sizes is None else self.sizes[index]}
            self._write(f"shard-{index:05d}.safetensors", {"state": state, "meta": dict(meta), "progress": prog}, prog)
        self.pending[index] = rec
        self._fold()

    def _fold(self) -> None:
        folded = []
        while self.through in self.pending:
            rec = self.pending.pop(self.through)
            self.state = self._merge(self.state, rec["state"])
            folded.append(self.through)
            self.through += 1
        if folded and self.folder is not None:
            prog = {"n_shards": self.n_shards, "through": self.through, "items": self._items(self.through)}
            self._write(self.LEDGER, {"state": self.state, "meta": self.meta, "progress": prog}, prog)
            for i in folded:  # after the ledger: a crash in between leaves files the ledger already covers
                (self.folder / f"shard-{i:05d}.safetensors").unlink(missing_ok=True)


# ============================================================================ engines
class LocalEngine:
    """Shards run one after another on a probe of this process (the single-process reference)."""

    name = "local"

    def __init__(self, probe, *, max_retries: int = 2):
        self.probe, self.max_retries = probe, max_retries
        self.workers = 1

    @property
    def info(self) -> dict[str, Any]:
        return self.probe.info.to_dict()

    def map(self, analysis: str, config, items: Sequence, shards: Sequence[Shard], faults: Mapping[int, float],
            threads: int | None = None) -> Iterator[tuple[Shard, dict | BaseException]]:
        for sh in shards:
            err: BaseException | None = None
            for attempt in range(1, self.max_retries + 2):
                try:
                    out = _run_shard(self.probe, analysis, config, items[sh.start:sh.stop], sh, attempt, faults, threads)
                    yield sh, out
                    break
                except SondeError:
                    raise  # bad input or config: the same on every attempt
                except Exception as e:  # noqa: BLE001 - any other failure of a shard is retried
                    err = e
            else:
                yield sh, err

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(probe, *args, **kwargs)`` on this engine's probe (e.g. drawing a sampled corpus:
        :func:`analyses.core.domains.draw_texts`)."""
        return fn(self.probe, *args, **kwargs)

    def finish(self, analysis: str, state, config, timings: dict, source: str, threads: int | None = None):
        sh = _shardable(analysis).shard
        with _threads(threads):
            return sh.finish(self.probe if sh.needs_probe else self.info, state, config, timings=timings, source=source)

    def close(self) -> None:
        pass


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class _loopback_only:
    """Start Ray bound to 127.0.0.1: its single-node mode (the one Ray uses on macOS/Windows), where the node IP
    is the loopback address and every Ray process (GCS, raylet, agents, workers) listens on it only.

    ``_node_ip_address="127.0.0.1"`` alone does not do it: Ray swaps a loopback address for the routable one.
    The variable reaches the processes Ray starts now; the driver's copy is restored afterwards.
    """

    def __enter__(self):
        try:  # read once when Ray is imported: set it on the loaded module too
            from ray._private import ray_constants
        except ImportError:
            ray_constants = None
        self.const = ray_constants
        self.old_env, self.old = os.environ.get(_LOOPBACK_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
        os.environ[_LOOPBACK_ENV] = "0"
        if ray_constants is not None:
            ray_constants.ENABLE_RAY_CLUSTER = False

    def __exit__(self, *exc):
        if self.const is not None:
            self.const.ENABLE_RAY_CLUSTER = self.old
        if self.old_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = self.old_env


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("engine='ray' needs Ray, which is not installed.", hint="pip install 'sonde[cluster]'.") from None
    return ray


def _worker_class(ray):
    @ray.remote(max_restarts=1)
    class SondeWorker:
        """One Ray actor = one loaded model; it runs shard after shard."""

        def __init__(self, spec: ModelSpec):
            self.probe = spec.load()
            self.attempts: dict[tuple[str, int], int] = {}

        def info(self) -> dict[str, Any]:
            return self.probe.info.to_dict()

        def run_shard(self, key: str, analysis: str, config, items, shard: Shard, faults, threads=None):
            k = (key, shard.index)
            self.attempts[k] = self.attempts.get(k, 0) + 1
            return _run_shard(self.probe, analysis, config, items, shard, self.attempts[k], faults, threads)

        def call(self, fn, args, kwargs):
            return fn(self.probe, *args, **kwargs)

        def finish(self, analysis: str, state, config, timings: dict, source: str, threads=None):
            with _threads(threads):
                return _shardable(analysis).shard.finish(self.probe, state, config, timings=timings, source=source)

    return SondeWorker


class RayEngine:
    """One Ray actor per worker, each holding one loaded model; shards go to whichever actor is free."""

    name = "ray"

    def __init__(self, model: ModelSpec, sweep: SweepConfig = SweepConfig(engine="ray"), *, ray_init: Mapping[str, Any] | None = None):
        check_ray_model(model, sweep)
        ray = self.ray = _ray()
        self.sweep = sweep
        self._started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "runtime_env": {"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM",
                                                                                          "SONDE_RESULTS", "HF_HOME")
                                                               if k in os.environ}}}
            if sweep.address is None:
                from . import ray_session

                kw["num_cpus"] = max(os.cpu_count() or 1, math.ceil((sweep.workers or 2) * sweep.cpus_per_worker))
                private = ray_session.folder()  # mode 0700, in Sonde's cache: not the shared /tmp/ray
                kw["_temp_dir"] = str(ray_session.ray_temp_dir(private))
                ray_session.stop_stale(private)  # Ray processes a killed Sonde driver left running
            else:
                kw["address"] = sweep.address
            kw.update(ray_init or {})
            try:
                if sweep.address is None:
                    with _loopback_only():
                        ray.init(**kw, _node_ip_address="127.0.0.1")
                else:
                    ray.init(**kw)
            except ConnectionError as e:
                raise ConfigError(f"cannot reach a Ray cluster at address={sweep.address!r} ({e}).",
                                  hint="Start one with `ray start --head`, or leave --address out to run Ray here.") from None
            self._started = True
            if sweep.address is None:
                self._session = ray_session.record(private)  # stopped at the next start if this driver is killed
        res = ray.cluster_resources()
        if sweep.gpus_per_worker > 0:
            gpus = res.get("GPU", 0)
            if gpus < sweep.gpus_per_worker:
                raise ConfigError(f"gpus_per_worker={sweep.gpus_per_worker} but the Ray cluster has {gpus:g} GPUs.",
                                  hint="Use --gpus-per-worker 0 on CPU machines.")
            n = sweep.workers or int(gpus // sweep.gpus_per_worker)
        else:
            n = sweep.workers or 2
        self.workers = n
        Worker = _worker_class(ray)
        self.actors = [Worker.options(num_cpus=sweep.cpus_per_worker, num_gpus=sweep.gpus_per_worker).remote(model)
                       for _ in range(n)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayError as e:
            self.close()
            raise ConfigError(f"a Ray worker could not load model {model.name!r}: {_cause(e)}",
                              hint="Check the model name and that every node can reach it (same path or hub access).") from None
        if len({i["fingerprint"] for i in infos}) != 1:
            self.close()
            raise ConfigError("Ray workers loaded different models (fingerprints differ).",
                              hint="Give every node the same model files (or an HF id with the same revision).")
        self.info = infos[0]

    def map(self, analysis: str, config, items: Sequence, shards: Sequence[Shard], faults: Mapping[int, float],
            threads: int | None = None) -> Iterator[tuple[Shard, dict | BaseException]]:
        ray = self.ray
        key = hash_inputs(analysis, config.to_dict(), len(items), time.time_ns())
        queue = list(shards)
        inflight: dict[Any, tuple[Shard, Any]] = {}

        def submit(actor) -> None:
            if queue:
                sh = queue.pop(0)
                ref = actor.run_shard.options(max_task_retries=self.sweep.max_retries, retry_exceptions=True).remote(
                    key, analysis, config, list(items[sh.start:sh.stop]), sh, dict(faults), threads)
                inflight[ref] = (sh, actor)

        for _ in range(2):  # one shard per actor first, then a second so a worker never waits for the driver
            for a in self.actors:
                submit(a)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            sh, actor = inflight.pop(ready[0])
            try:
                out: dict | BaseException = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                out = e
            submit(actor)
            yield sh, out

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(probe, *args, **kwargs)`` on the first worker's probe (every worker holds the same model)."""
        return self.ray.get(self.actors[0].call.remote(fn, args, kwargs))

    def finish(self, analysis: str, state, config, timings: dict, source: str, threads: int | None = None):
        sh = _shardable(analysis).shard
        if not sh.needs_probe:
            with _threads(threads):
                return sh.finish(self.info, state, config, timings=timings, source=source)
        return self.ray.get(self.actors[0].finish.remote(analysis, state, config, timings, source, threads))

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False
            if getattr(self, "_session", None) is not None:
                self._session.unlink(missing_ok=True)


def make_engine(sweep_cfg: SweepConfig, *, model: ModelSpec | None = None, probe=None):
    """The engine of ``sweep_cfg``: local needs ``probe`` (or loads ``model``); Ray needs ``model``."""
    if sweep_cfg.engine == "local":
        return LocalEngine(probe if probe is not None else (model or ModelSpec()).load(), max_retries=sweep_cfg.max_retries)
    return RayEngine(model or ModelSpec(), sweep_cfg)


def _cause(e: BaseException) -> str:
    c = getattr(e, "cause", None) or e
    return f"{type(c).__name__}: {str(c).strip().splitlines()[-1][:200] if str(c).strip() else ''}"


# ============================================================================ driver
@dataclass(frozen=True, kw_only=True)
class SweepReport:
    """What a sweep did: shards planned / run / resumed, retried shards ``{index: attempts}``, seconds."""

    engine: str
    workers: int
    n_items: int
    n_shards: int
    shards_run: int
    shards_resumed: int
    retried: dict[int, int] = field(default_factory=dict)
    threads: int = 0  # torch threads of every shard and of the finish
    seconds: dict[str, float] = field(default_factory=dict)  # map (shards), merge (folding), finish
    shard_seconds: dict[int, float] = field(default_factory=dict)
    shard_workers: dict[int, str] = field(default_factory=dict)  # host:pid that ran each shard

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "workers": self.workers, "n_items": self.n_items, "n_shards": self.n_shards,
                "shards_run": self.shards_run, "shards_resumed": self.shards_resumed, "threads": self.threads,
                "retried": {str(k): v for k, v in self.retried.items()}, "seconds": dict(self.seconds),
                "shard_seconds": {str(k): round(v, 4) for k, v in self.shard_seconds.items()},
                "shard_workers": {str(k): v for k, v in self.shard_workers.items()}}

    def save(self, result_dir: str | Path) -> Path:
        """Write ``sweep.json`` into a saved result (listed in its signed manifest as one of Sonde's files)."""
        import json

        from .store import attach_file

        return attach_file(result_dir, "sweep.json", json.dumps(self.to_dict(), indent=2).encode())


@dataclass(frozen=True)
class SweepRun:
    """The merged result and the report of one sweep."""

    result: base.Result
    report: SweepReport


def sweep(analysis: str, items: Sequence, *, config, engine, sweep_config: SweepConfig = SweepConfig(),
          ledger: str | Path | None = None, source: str = "texts",
          progress: ProgressFn | None = None) -> SweepRun:
    """Run ``analysis`` over ``items`` in shards on ``engine`` and merge the shards exactly.

    Args:
        analysis: a shardable analysis (``sinks``: items are texts; ``routes``: records with domains).
        items: the whole input, in order (shards are contiguous slices of it).
        config: the analysis' config (``sinks.Config`` / ``routes.DatasetConfig``).
        engine: :class:`LocalEngine` or :class:`RayEngine` (see :func:`make_engine`).
        ledger: merge-ledger folder; a re-run with the same folder resumes (``sweep_config.resume``).
        progress: :class:`~analyses.core.progress.Progress` events: phase ``shards`` (resumed shards count as done).
    Returns:
        :class:`SweepRun` (the analysis' usual result, with ``timings["sweep.*"]``, and a report).
    """
    spec = _shardable(analysis)
    registry.check_config(config, spec.config, f"a {analysis} sweep")
    items = list(items)
    shards = plan_shards(len(items), sweep_config.shard_size)
    info = engine.info
    # the ledger's own resume fingerprint names the items as given (the result's key comes from the analysis)
    items_hash = hash_items(items)
    threads = sweep_config.threads or torch.get_num_threads()
    fp = hash_inputs(analysis, info.get("fingerprint", ""), config.to_dict(), items_hash, sweep_config.shard_size, len(items),
                     threads)
    led = Ledger(ledger, fingerprint=fp, n_shards=len(shards), merge=lambda a, b: spec.shard.merge(a, b, config, info),
                 sizes=[s.stop - s.start for s in shards], count=spec.shard.count)
    resumed = led.load() if sweep_config.resume else 0
    if not sweep_config.resume:
        led.clear()
    todo = [s for s in shards if s.index not in led.done]
    faults = parse_faults(os.environ.get(FAULT_ENV))
    exit_after = int(os.environ[EXIT_ENV]) if os.environ.get(EXIT_ENV) else None
    bar = phase(progress, "shards", len(shards), "shards", done=len(led.done))
    t_map, t_merge, failed = time.perf_counter(), 0.0, []
    retried: dict[int, int] = {}
    shard_seconds: dict[int, float] = {}
    shard_workers: dict[int, str] = {}
    ran = 0
    for sh, out in engine.map(analysis, config, items, todo, faults, threads=threads):
        if isinstance(out, BaseException):
            failed.append((sh, out))
            continue
        if out["attempts"] > 1:
            retried[sh.index] = out["attempts"]
        shard_seconds[sh.index] = out["seconds"]
        shard_workers[sh.index] = out["worker"]
        t0 = time.perf_counter()
        led.record(sh.index, out["state"], {"attempts": out["attempts"], "seconds": out["seconds"], "worker": out["worker"]})
        t_merge += time.perf_counter() - t0
        ran += 1
        bar.set(len(led.done))
        if exit_after is not None and led.through >= exit_after:
            os._exit(75)  # test hook: die like a killed process (no clean-up)
    t_map = time.perf_counter() - t_map - t_merge
    if failed:
        sh, err = min(failed, key=lambda f: f[0].index)
        more = f" ({len(failed) - 1} more shards failed too)" if len(failed) > 1 else ""
        raise ShardFailedError(f"{sh} failed after {sweep_config.max_retries + 1} attempts: {_cause(err)}{more}.",
                               hint=(f"The {len(led.done)} finished shards are kept in the merge ledger {str(ledger)!r}; fix the "
                                     "cause and re-run the same command to resume.") if ledger else
                               "Fix the cause and re-run (a ledger folder keeps finished shards for a resume).")
    for i, m in led.meta.items():  # shards retried in an earlier, interrupted run
        if m.get("attempts", 1) > 1:
            retried.setdefault(i, m["attempts"])
    timings = {"sweep.map": t_map, "sweep.merge": t_merge, "sweep.retries": float(len(retried)),
               "sweep.shards": float(len(shards)), "sweep.workers": float(engine.workers),
               "sweep.threads": float(threads)}
    t0 = time.perf_counter()
    result = engine.finish(analysis, led.state, config, timings, source, threads=threads)
    t_finish = time.perf_counter() - t0
    result.timings["sweep.finish"] = t_finish
    report = SweepReport(engine=engine.name, workers=engine.workers, n_items=len(items), n_shards=len(shards),
                         shards_run=ran, shards_resumed=resumed, retried=retried, threads=threads,
                         seconds={"map": round(t_map, 4), "merge": round(t_merge, 4), "finish": round(t_finish, 4)},
                         shard_seconds=shard_seconds, shard_workers={i: out for i, out in shard_workers.items()})
    return SweepRun(result, report)
