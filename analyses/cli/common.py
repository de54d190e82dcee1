"""Shared CLI plumbing: the typer apps, option types, error handling, model loading, output."""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from analyses.core.progress import Phase, Progress, phase

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sonde: an interpretability workbench for causal LMs.")
run_app = typer.Typer(no_args_is_help=True, help="Run an analysis (`sonde run ANALYSIS --help`).")
results_app = typer.Typer(no_args_is_help=True, help="List and show saved results.")
app.add_typer(run_app, name="run")
app.add_typer(results_app, name="results")

_STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _STATE["debug"] = debug


# ----------------------------------------------------------------------------- option checks
# Typer callbacks run while the command line is parsed, before a verb's body: a bad path or value is refused
# before any model loads or any work starts. They raise SondeError (one `error:` line, exit 2) and import no torch.
def _parsing_help(ctx) -> bool:
    return bool(getattr(ctx, "resilient_parsing", False))


def _flag(param) -> str:
    opts = getattr(param, "opts", None) or [f"--{getattr(param, 'name', 'value')}"]
    return max(opts, key=len)


def input_file(ctx: typer.Context, param: typer.CallbackParam, value):
    """``--input``: an existing regular file (a folder, FIFO or device is refused as what it is), or an
    ``hf:`` data set reference; a .csv/.tsv file is refused (its header would be read as a prompt)."""
    from probes.errors import InputError, check_input_file

    if value is None or _parsing_help(ctx) or str(value).startswith("hf:"):
        return value
    flag = _flag(param)
    if Path(str(value)).suffix.lower() in (".csv", ".tsv"):
        raise InputError(f"{flag} {str(value)!r} is a {Path(str(value)).suffix[1:].upper()} file; Sonde does not guess "
                         "which column holds the text.",
                         hint='Convert it to JSONL (one {"text": ...} object per line) or Parquet with a \'text\' column.')
    check_input_file(value, "file", hint=f"Check the {flag} path.", allow_empty=True)
    return value


def data_file(what: str, *, keep: tuple[str, ...] = ()):
    """A callback for an option naming a file to read (``what`` names it in messages); the values in ``keep``
    (e.g. ``builtin``) are not paths. The file must be a regular, non-empty file."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value):
        from probes.errors import check_input_file

        if value is None or _parsing_help(ctx) or str(value) in keep:
            return value
        check_input_file(value, what, hint=f"Check the {_flag(param)} path.")
        return value

    return check


def folder_path(ctx: typer.Context, param: typer.CallbackParam, value):
    """An option naming a folder Sonde writes into (``--checkpoint``): an existing folder, or a new one whose
    nearest existing parent is a writable folder. A file is refused before any work."""
    from probes.errors import InputError

    if value is None or _parsing_help(ctx):
        return value
    flag, p = _flag(param), Path(value)
    if os.path.lexists(p):
        if p.is_symlink() or not p.is_dir():
            raise InputError(f"{flag} {str(p)!r} is {'a link' if p.is_symlink() else 'a file'}, not a folder.",
                             hint=f"Give {flag} a folder (new or one Sonde made).")
        base = p
    else:
        base = p.parent
        while not os.path.lexists(base) and base != base.parent:
            base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(p)!r}: {str(base)!r} is not a writable folder.", hint=f"Give {flag} a writable folder.")
    return value


def adapters_folder(ctx: typer.Context, param: typer.CallbackParam, value):
    """An option naming the θ_p/θ_n adapters of ``contrastive-train`` (``--adapters``): a folder holding ``pos/`` and
    ``neg/``, each with its ``adapter_config.json``; anything else is refused before the model loads."""
    from probes.errors import InputError

    if value is None or _parsing_help(ctx):
        return value
    flag, p = _flag(param), Path(value)
    if not p.is_dir():
        raise InputError(f"{flag} {str(p)!r} {'is not a folder' if os.path.lexists(p) else 'does not exist'}.",
                         hint="Give the --out folder of `sonde run contrastive-train` (it holds pos/ and neg/).")
    missing = [s for s in ("pos", "neg") if not (p / s / "adapter_config.json").is_file()]
    if missing:
        raise InputError(f"{flag} {str(p)!r} holds no {' and no '.join(f'{s}/adapter_config.json' for s in missing)}.",
                         hint="Give the --out folder of `sonde run contrastive-train` (it holds pos/ and neg/).")
    return value


def non_empty_list(ctx: typer.Context, param: typer.CallbackParam, value):
    """A comma-separated option that, when given, must name at least one item (``--hooks ""`` is refused)."""
    from probes.errors import ConfigError

    if value is None or _parsing_help(ctx):
        return value
    if not [x for x in str(value).split(",") if x.strip()]:
        raise ConfigError(f"{_flag(param)} {value!r} names nothing.", hint="Give at least one item (a comma-separated list).")
    return value


_DEVICE_HINT = "Use auto, cpu, cuda, cuda:N or mps."


def device_name(ctx: typer.Context, param: typer.CallbackParam, value):
    """``--device``: auto, cpu, cuda, cuda:N or mps, checked as text (whether this machine has it is checked
    when the model loads, :func:`probes.loading.resolve_device`)."""
    import re

    from probes.errors import DeviceError

    if value is None or _parsing_help(ctx):
        return value
    v = str(value).strip()
    m = re.fullmatch(r"(auto|cpu|cuda|mps)(?::(\d{1,6}))?", v)
    if m is None or (m.group(1) == "auto" and m.group(2) is not None):
        raise DeviceError(f"unknown device {value!r}.", hint=_DEVICE_HINT)
    if m.group(1) in ("cpu", "mps") and m.group(2) not in (None, "0"):
        raise DeviceError(f"device {value!r} does not exist: there is one {m.group(1)} device ({m.group(1)} or {m.group(1)}:0).",
                          hint=_DEVICE_HINT)
    return v


# Reusable options (typer reads the default's metadata)
ModelOpt = typer.Option("embedded", "--model", "-m", help="'embedded', an HF id, a local folder or a .gguf file.")
BackendOpt = typer.Option("nnsight", "--backend", help="nnsight or transformer_lens.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.", callback=device_name)
DtypeOpt = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")
DeviceMapOpt = typer.Option(None, "--device-map", help="Spread the model with accelerate: auto, balanced, sequential (GPUs, then CPU).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Per-device limits for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")
RemoteOpt = typer.Option(False, "--remote", help="Run the model on NDIF through nnsight (needs NDIF_API_KEY and network).")
RevisionOpt = typer.Option(None, "--revision", help="Model revision (branch, tag or commit) of a hub id.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")
OutOpt = typer.Option(None, "--out", "-o", help="Result folder (default: <results store>/<key>, see `sonde results ls`); must be new, empty, or a Sonde result (with --replace).")
HtmlOpt = typer.Option(None, "--html", help="Also write an HTML report of the result (its figure, tables and manifest; "
                       "opens offline).")
_HTML: "contextvars.ContextVar[Path | None]" = contextvars.ContextVar("sonde_html_report", default=None)
ReplaceOpt = typer.Option(False, "--replace", help="Replace an existing Sonde result at --out (never anything else; the old one stays until the new one is in place).")


_SCALE_OPTS: dict[str, tuple[Any, Any]] = {  # name -> (annotation, typer option), added by @model_options
    "device_map": (Optional[str], DeviceMapOpt),
    "max_memory": (Optional[str], MaxMemoryOpt),
    "revision": (Optional[str], RevisionOpt),
    "remote": (bool, RemoteOpt),
}
_SCALE: "contextvars.ContextVar[dict[str, Any]]" = contextvars.ContextVar("sonde_scale_options", default={})


def model_options(fn):
    """Give a verb the shared big-model options (``--device-map``, ``--max-memory``, ``--revision``, ``--remote``).

    The verb's own signature stays as it is; :func:`load_probe` picks the values up, so every verb that
    loads a model takes them the same way.
    """
    sig = inspect.signature(fn)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for n, (ann, opt) in _SCALE_OPTS.items() if n not in sig.parameters]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _SCALE.set({n: kwargs.pop(n) for n in list(kwargs) if n in _SCALE_OPTS and n not in sig.parameters})
        try:
            return fn(*args, **kwargs)
        finally:
            _SCALE.reset(token)

    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = sig.replace(parameters=[*params, *extra, *var_kw])
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), **{p.name: p.annotation for p in extra}}
    del wrapper.__wrapped__  # typer must read the new signature, not fn's
    wrapper.__sonde_globals__ = getattr(fn, "__sonde_globals__", fn.__globals__)  # where fn's annotations resolve
    return wrapper


def writes_file(fn):
    """Mark a verb whose ``--out`` is a file (not a result folder): :func:`output_options` gives it
    ``--replace`` but leaves the check of the file to the verb (:func:`check_out_file`)."""
    fn.__sonde_out_file__ = True
    return fn


def check_out_file(out: Path, replace: bool, is_ours) -> None:
    """Refuse an output file that exists unless ``replace`` and ``is_ours(out)`` (a file Sonde wrote);
    refuse an unwritable location. One line each (InputError)."""
    import tempfile

    from probes.errors import InputError

    if os.path.lexists(out):
        if out.is_symlink() or not out.is_file():
            raise InputError(f"--out {str(out)!r} exists and is not a file Sonde wrote; refusing to overwrite it.",
                             hint="Give a new file name.")
        if not replace:
            raise InputError(f"--out {str(out)!r} already exists; not replacing it.", hint="Pass --replace, or give a new file name.")
        if not is_ours(out):
            raise InputError(f"--out {str(out)!r} is not a file Sonde wrote; refusing to overwrite it.", hint="Give a new file name.")
    base = out.parent
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        from analyses.core.store import _write_test_prefix

        os.rmdir(tempfile.mkdtemp(prefix=_write_test_prefix(), dir=base))
    except OSError as e:
        raise InputError(f"cannot write {str(out)!r}: {str(base)!r} is not a writable folder ({e.strerror or e}).",
                         hint="Give a writable --out.") from None


def check_side_file(path: Path | None, option: str) -> None:
    """Check an extra output file (``--html``, ``--graphml``) before any work: a new file in a writable
    folder; an existing one only with ``--replace`` (and only a plain file)."""
    if path is None:
        return
    from analyses.core import store

    try:
        check_out_file(path, store._REPLACE.get(), lambda p: True)
    except Exception as e:
        from probes.errors import InputError

        if isinstance(e, InputError):
            raise InputError(e.message.replace("--out", option), hint=(e.hint or "").replace("--out", option)) from None
        raise


def write_side_file(path: Path, write: Any) -> None:
    """``write(tmp_name)`` then one rename onto ``path`` (no half-written file is ever visible)."""
    tmp = _side_temp(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_result(result: Any, out: Path | None, side_files: dict | None = None) -> Path:
    """Save ``result`` (``result.save(out)``) together with its side files (``--html``, ``--graphml``).

    ``side_files`` maps each path (``None``: option not given) to ``write(tmp_name)``. Every side file is
    written first, under a temporary name beside it; then the result is saved; then the side files are
    renamed into place. A side file that cannot be written stops the run with one line naming it before
    anything is saved: a failed export leaves neither the result nor a side file (nor a folder made for
    them).
    """
    from analyses.core import store
    from probes.errors import InputError, SondeError

    side_files = dict(side_files or {})
    report = _HTML.get()  # the shared --html of every verb that saves a result
    if report is not None and report not in side_files:
        from analyses.core.report import html_report

        side_files[report] = lambda tmp: Path(tmp).write_bytes(html_report(result))
    jobs = [(Path(p), w) for p, w in side_files.items() if p is not None]
    dest = Path(out) if out is not None else store.results_root() / result.key
    existed = os.path.lexists(dest) and store.is_result(dest)
    temps: list[tuple[Path, Path]] = []
    made: list[Path] = []

    def drop(pending: list[tuple[Path, Path]]) -> None:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        for d in sorted(set(made), key=lambda d: len(d.parts), reverse=True):  # folders made here, innermost first
            try:
                d.rmdir()
            except OSError:
                pass

    try:
        for path, write in jobs:
            p = path.parent
            while not os.path.lexists(p) and p != p.parent:
                made.append(p)
                p = p.parent
            tmp = _side_temp(path)
            temps.append((tmp, path))
            try:
                write(str(tmp))
            except SondeError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of an export is the user's file that could not be written
                why = (e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                raise InputError(f"cannot write {str(path)!r} ({why}); nothing was saved.",
                                 hint="Check the free space and permissions of its folder, or leave the option out.") from e
        saved = result.save(out)
    except BaseException:
        drop(temps)
        raise
    for i, (tmp, path) in enumerate(temps):
        try:
            os.replace(tmp, path)
        except OSError as e:
            drop(temps[i:])
            if not existed:
                store.remove_result(saved)
            raise InputError(f"cannot write {str(path)!r} ({e.strerror or e}); "
                             + ("the result was not kept." if not existed else f"the result {str(saved)!r} was saved."),
                             hint="Check the permissions of its folder.") from None
    return saved


def report_saved(path: Path) -> None:
    """The shared ``--html`` for a verb whose analysis saves its own result folder (checkpoint sweeps): the report
    is written after the result, which is kept if the report cannot be written (the message says so)."""
    report = _HTML.get()
    if report is None:
        return
    from analyses.core.report import html_report
    from probes.errors import InputError

    tmp = _side_temp(Path(report))
    try:
        tmp.write_bytes(html_report(path))
        os.replace(tmp, report)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {str(report)!r} ({e.strerror or e}); the result {str(path)!r} was saved.",
                         hint="Check the free space and permissions of its folder.") from None


def _side_temp(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (named by user, machine and process; a dead run's ones go first)."""
    import tempfile

    from analyses.core import store

    path.parent.mkdir(parents=True, exist_ok=True)
    store.clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=store.scratch_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def output_options(*apps: typer.Typer) -> None:
    """Give every registered verb that has an ``out`` parameter the shared ``--replace`` flag and check
    its ``--out`` before any work: a result folder must be new, empty, or a Sonde result (replaced
    only with ``--replace``, :func:`analyses.core.store.check_destination`), and writable. Called once after
    all verbs are registered, so verbs need nothing of their own."""
    for a in apps:
        for info in a.registered_commands:
            if info.callback is not None and not getattr(info.callback, "__sonde_output__", False):
                info.callback = _with_output(info.callback)
        for grp in a.registered_groups:
            if grp.typer_instance is not None:
                output_options(grp.typer_instance)


def _with_output(fn):
    sig = inspect.signature(fn)
    if "out" not in sig.parameters:
        return fn
    own = "replace" in sig.parameters
    own_html = "html" in sig.parameters
    file_out = getattr(fn, "__sonde_out_file__", False)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from analyses.core import store

        replace = bool(kwargs["replace"] if own else kwargs.pop("replace", False))
        report = None if own_html or file_out else kwargs.pop("html", None)
        out = kwargs.get("out")
        if out is not None and not file_out:
            store.check_destination(out, replace=replace)
        check_side_file(report, "--html")
        token = _HTML.set(report)
        try:
            if not replace:
                return fn(*args, **kwargs)
            with store.replacing(True):
                return fn(*args, **kwargs)
        finally:
            _HTML.reset(token)

    ns = getattr(fn, "__sonde_globals__", getattr(fn, "__globals__", {}))
    params = [p.replace(annotation=eval(p.annotation, ns)) if isinstance(p.annotation, str) else p  # noqa: S307 (own code)
              for p in sig.parameters.values()]
    extra = []
    if not own:
        extra.append(inspect.Parameter("replace", inspect.Parameter.KEYWORD_ONLY, default=ReplaceOpt, annotation=bool))
    if not own_html and not file_out:
        extra.append(inspect.Parameter("html", inspect.Parameter.KEYWORD_ONLY, default=HtmlOpt, annotation=Optional[Path]))
    if extra:
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [*extra, *var_kw]
    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__sonde_output__ = True
    if hasattr(wrapper, "__wrapped__"):
        del wrapper.__wrapped__
    return wrapper


def load_probe(model: str, backend: str = "nnsight", device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, device_map: str | None = None, *, max_memory: str | None = None,
               revision: str | None = None, remote: bool | None = None):
    """Load a probe for a CLI verb (``device_map``/``max_memory``/``revision``/``remote`` as in
    :func:`probes.load_model`; unset ones come from the verb's ``@model_options``)."""
    from probes import load_model

    opts = _SCALE.get()
    device_map = device_map if device_map is not None else opts.get("device_map")
    max_memory = max_memory if max_memory is not None else opts.get("max_memory")
    revision = revision if revision is not None else opts.get("revision")
    remote = bool(remote if remote is not None else opts.get("remote", False))
    where = " on NDIF" if remote else (f", device map {device_map}" if device_map else "")
    with status(f"Loading {model}{'@' + revision if revision else ''} ({backend}{where})"):
        return load_model(model, backend=backend, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          device_map=device_map, max_memory=max_memory, revision=revision, remote=remote)


def planned(config: Any, model: "Any", device: str = "auto", dtype: str = "auto", *, verb: str | None = None,
            with_plan: bool = False, **sizes: Any) -> Any:
    """The memory plan of a ``sonde run`` verb, made from the model's config before any weights load: the verb's
    config, with its batch (routes: chunk budget) lowered to the largest setting that fits the memory free now
    (one ``planner:`` line on stderr says so), or unchanged. A run that does not fit at any setting stops here
    with exit 2 and the largest setting that fits. ``sizes`` adds what the config does not hold (``seq_len`` of a
    prompt; ``batch_size`` / ``max_batch`` of a batch that is a run argument). The analysis's memory model is the one
    declared with it (the registry entry whose config class ``config`` is; ``verb`` names a further verb of it, such
    as ``bigram-eval``); the limit ``$SONDE_MEMORY_LIMIT`` caps the free memory read. ``with_plan``: returns
    ``(config, plan)`` (``plan`` None when nothing was planned; a ``batch_arg`` model's rows per pass are
    ``plan.batch_size``). ``model`` is a model spec, or a
    :class:`analyses.core.planner.ModelShape` when the sizes are not a model's (fiber's matrix file)."""
    from analyses.core import planner, registry

    if _SCALE.get().get("remote") or _SCALE.get().get("device_map"):  # runs elsewhere, or spread over devices
        return (config, None) if with_plan else config
    if verb is not None:
        spec, mm = planner.analysis_of(verb)
    else:
        spec = next((s for s in registry.all_analyses().values() if type(config) is s.config and s.memory is not None), None)
        mm = spec.memory if spec is not None else None
    if mm is None:
        return (config, None) if with_plan else config
    new, p = planner.plan_config(mm, model, config, device=device, dtype=dtype, revision=_SCALE.get().get("revision"),
                                 **sizes)
    if p is not None and p.lowered:
        typer.echo(f"planner: {p.message}", err=True)
    return (new, p) if with_plan else new


@contextmanager
def status(msg: str) -> Iterator[None]:
    """A spinner on stderr for steps over a second (quiet when not a terminal)."""
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(msg):
            yield
    else:
        yield


@contextmanager
def progress_bar(*, every: float = 15.0) -> Iterator[Callable[[Progress], None]]:
    """Show an analysis's :class:`~analyses.core.progress.Progress` events on stderr (stdout stays clean for
    ``--json``): ``with progress_bar() as bar: analysis.run(..., progress=bar)``.

    One bar per phase, with its count, total, elapsed time, ETA and figures. On a terminal the bars are rich's; in a
    log or CI, one plain line when a phase starts, one every ``every`` seconds and one when it ends, so no phase is
    silent; a phase of at most ``FEW`` units (checkpoints, prefixes: each one long) has a line per unit. The ETA
    extrapolates the phase's own rate (units done since it started, resumed ones excluded).
    """
    bars = _Bars(every)
    try:
        yield bars
    finally:
        bars.close()


FEW = 32  # a phase of at most this many units shows each of them in a log


class _Bars:
    def __init__(self, every: float) -> None:
        self.every, self.tty, self.ev, self.shown = every, sys.stderr.isatty(), None, None
        self.rich = self.task = None

    def __call__(self, ev: Progress) -> None:
        import time

        now = time.monotonic()
        if self.ev is None or ev.phase != self.ev.phase:
            self._end()
            self.t0, self.done0, self.last = now, ev.done, 0.0
            if self.tty:
                self._rich_task(ev)
        self.ev = ev
        if self.tty:
            self.rich.update(self.task, completed=ev.done, total=ev.total, description=self._label(ev))
        elif ev.done == self.done0 or ev.finished or now - self.last >= self.every or (ev.total or FEW + 1) <= FEW:
            self._line()

    def _label(self, ev: Progress) -> str:
        return ev.phase + ev.figures

    def _rich_task(self, ev: Progress) -> None:
        if self.rich is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.rich = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self.rich.__enter__()
        self.task = self.rich.add_task(self._label(ev), total=ev.total, completed=ev.done)

    def _line(self) -> None:
        import time

        ev, now = self.ev, time.monotonic()
        el = now - self.t0
        eta = ""
        if ev.total is not None and not ev.finished and ev.done > self.done0:
            eta = f", ETA {_seconds(el * (ev.total - ev.done) / (ev.done - self.done0))}"
        print(f"{ev.phase}: {ev.count}, {_seconds(el)} elapsed{eta}{ev.figures}", file=sys.stderr, flush=True)
        self.last, self.shown = now, ev

    def _end(self) -> None:
        """The phase in course is over: its last state is shown (a plain line unless it already was)."""
        if self.ev is not None and not self.tty and self.shown is not self.ev:
            self._line()

    def close(self) -> None:
        self._end()
        if self.rich is not None:
            self.rich.__exit__(None, None, None)
            self.rich = None


@contextmanager
def phase_bar(name: str, total: int | None, unit: str = "", **info: Any) -> Iterator[Phase]:
    """A CLI loop of its own, shown as one phase: ``with phase_bar("capturing", n, "texts") as ph: ... ph.advance()``."""
    with progress_bar() as bar:
        yield phase(bar, name, total, unit, **info)


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def saved(path: Path, as_json: bool, summary: dict | None = None) -> None:
    """Report a saved result: its summary, its folder and the bytes it takes on disk (JSON: ``stored_bytes``)."""
    from analyses.core.store import readable_bytes, stored_bytes

    size = stored_bytes(path)
    if as_json:
        echo_json({"result": str(path), "stored_bytes": size, **(summary or {})})
    else:
        for k, v in (summary or {}).items():
            typer.echo(f"{k}: {v}")
        typer.echo(f"saved {path} ({readable_bytes(size)})")


def _show_warning(message, category, filename, lineno, file=None, line=None, _orig=None):
    from probes.errors import SondeWarning

    if issubclass(category, SondeWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _orig(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: SondeErrors become one line on stderr and exit status 2; Sonde's warnings
    (a skipped input line, a damaged result in a listing) become one ``warning: ...`` line each."""
    import warnings

    from probes.errors import SondeError, SondeWarning

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("always", SondeWarning)
        warnings.showwarning = functools.partial(_show_warning, _orig=warnings.showwarning)
        _main(argv, SondeError)


def _error_line(text: str) -> None:
    """The one ``error: ...`` line, on stderr after everything else the run printed (stdout is flushed first, so the
    error line is the last line of a terminal that shows both)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    typer.echo("error: " + " ".join(str(text).split()), err=True)


def _main(argv, SondeError) -> None:
    from probes.errors import from_file_library, reason

    try:
        app(args=argv, standalone_mode=False)
    except SondeError as e:
        if _STATE["debug"]:
            raise
        _error_line(str(e))
        raise SystemExit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130)
    except (typer.Exit,) as e:
        raise SystemExit(e.exit_code)
    except OSError as e:  # a path the user gave that cannot be read or written (a full disk, a vanished folder)
        if _STATE["debug"]:
            raise
        where = f" {e.filename!r}" if e.filename else ""
        _error_line(f"cannot use{where}: {e.strerror or e}.")
        raise SystemExit(2)
    except Exception as e:  # click usage errors
        names = {c.__name__ for c in type(e).__mro__}  # click's classes, or typer's vendored copy of them
        if "ClickException" in names:  # one line, like every other bad input
            msg = " ".join(e.format_message().split())
            usage = "UsageError" in names
            _error_line(msg + (" (see --help)" if usage else ""))
            raise SystemExit(2 if usage else e.exit_code)
        if "Abort" in names:
            raise SystemExit(1)
        if _STATE["debug"]:
            raise
        if from_file_library(e):  # last line of defence: a damaged safetensors, Parquet or GGUF file a reader met
            _error_line(f"a file could not be read or written: {reason(e)} (a damaged, truncated or foreign file?).")
            raise SystemExit(2)
        _error_line(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        raise SystemExit(1)
