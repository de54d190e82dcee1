"""Dashboard state: the sidebar's model choice, cached probes and results.

Pages call :func:`sidebar_probe` to get the probe the user chose (loaded once per (model, backend,
device, dtype) and shared across sessions, so at most two stay in memory) and :func:`stored` to get an
analysis result by its content key (the analysis's own ``result_key``): from memory, else from the results store the
CLI and notebooks share, else computed and saved there. :func:`memo` and :func:`cached` keep derived
values in the same in-memory layer. Pages never touch hooks: they call ``analyses.<method>.run`` and
render the result.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import streamlit as st

from dashboard import warm
from probes import BACKENDS, Probe, SondeError

__all__ = ["sidebar_probe", "get_probe", "cached", "stored", "result", "find", "keep", "memo", "show_error", "DEFAULT_PROMPT", "param", "context", "prompt_input",
           "inside_results", "results_listing", "read_result", "decode_upload", "url_context", "choose", "BACKENDS", "DTYPES", "DEVICES"]

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]


def default_model() -> str:
    from dashboard.warm import default_key

    return default_key()[0]


@st.cache_resource(max_entries=2, show_spinner=False)
def get_probe(model: str, backend: str, device: str, dtype: str) -> Probe:
    """Load (once) and share a probe between sessions and background runs: the probe serializes its own forward
    passes (edits and weight masks included), so pages never lock."""
    from dashboard import warm
    from probes import load_model

    # `sonde dashboard` starts loading the default model before the first page asks (dashboard.warm)
    return warm.take((model, backend, device, dtype)) or load_model(model, backend=backend, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- query parameters (user input)
_MISSING = object()


def _show(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "…"


def _to_url(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def param(name: str, default: Any, *, kind: type = str, choices: Sequence[Any] | None = None, lo: float | None = None,
          hi: float | None = None, check: Callable[[Any], str | None] | None = None, widget: str | None = None,
          sticky: bool = True) -> Any:
    """A page setting from the URL (``?prompt=...``), validated: the one reader of query parameters.

    ``kind`` is ``str``, ``int``, ``float`` or ``bool`` (``1/0/true/false``); ``choices`` the allowed values;
    ``lo``/``hi`` an inclusive range; ``check(value)`` returns a reason to refuse the value, or None. A missing or
    empty parameter gives ``default``. A bad one shows one ``st.error`` line, is replaced by the default in the URL
    (so it is reported once) and gives ``default``: a pasted link never raises. With ``widget`` (the key of the
    widget the value initialises) the URL is read only while that widget does not exist yet: afterwards the widget's
    own value wins, and a value the user typed is judged by the page, not reported as a bad link. The error line
    stays on later runs while the URL still holds the replacement: a bad setting is never replaced silently
    (``sticky=False``: reported once, for settings read several times a run whose widget shows the replacement).
    """
    bad = st.session_state.setdefault("_sonde_bad_links", {})
    if sticky and name in bad:  # a bad link's value, replaced: its line stays while the URL holds the replacement
        msg, used = bad[name]
        if st.query_params.get(name, "") == used:
            st.error(msg, icon="⚠️")
            return default
        del bad[name]
    if widget is not None and widget in st.session_state:
        return default
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected 1 or 0")
            value: Any = low in ("1", "true", "yes", "on")
        elif kind is int:
            if not re.fullmatch(r"\s*[+-]?\d{1,12}\s*", raw):
                raise ValueError("expected a whole number")
            value = int(raw)
        elif kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
        else:
            value = raw
        if choices is not None and value not in choices:
            raise ValueError("expected one of " + ", ".join(map(str, choices)))
        if lo is not None and value < lo or hi is not None and value > hi:
            raise ValueError(f"expected a value in [{_to_url(lo) if lo is not None else '-∞'}, {_to_url(hi) if hi is not None else '∞'}]")
        if check is not None and (why := check(value)):
            raise ValueError(why)
    except (ValueError, TypeError, OverflowError, SondeError) as e:
        msg = f"Ignored `{name}={_show(raw)}` in the URL: {e}; using {_show(_to_url(default)) or 'the default'!r}."
        st.error(msg, icon="⚠️")
        if default is None or default == "":
            del st.query_params[name]
        else:
            st.query_params[name] = _to_url(default)
        if sticky:
            bad[name] = (msg, st.query_params.get(name, ""))
        return default
    return value


# ----------------------------------------------------------------------------- one context for every page
# model, backend, device, dtype, prompt and BOS policy: one session state, shown in the sidebar of every page and
# written into every URL; a link that carries them sets them, switching pages keeps them.
_CTX_SPECS: dict[str, dict[str, Any]] = {
    "model": {}, "backend": {"choices": list(BACKENDS)}, "device": {"choices": DEVICES}, "dtype": {"choices": DTYPES},
    "prompt": {"check": lambda v: "the prompt is empty" if not v.strip() else None}, "bos": {"kind": bool},
}


def _ctx_defaults() -> dict[str, Any]:
    from dashboard.warm import DEFAULT_KEY  # the probe `sonde dashboard` preloads is the default context's

    _, backend, device, dtype = DEFAULT_KEY
    return {"model": default_model(), "backend": backend, "device": device, "dtype": dtype, "prompt": DEFAULT_PROMPT, "bos": False}


def context() -> dict[str, Any]:
    """The session's shared context (model, backend, device, dtype, prompt, bos), with a link's values applied."""
    ctx = st.session_state.setdefault("_sonde_ctx", _ctx_defaults())
    written = st.session_state.setdefault("_sonde_url", {})
    for name, spec in _CTX_SPECS.items():
        wkey = f"ctx_{name}"
        if wkey in st.session_state and st.session_state[wkey] is not None:  # a widget the user just changed on this page
            ctx[name] = st.session_state[wkey]
        raw = st.query_params.get(name)
        if raw is not None and raw != written.get(name):  # a link (or the user) set it in the URL
            ctx[name] = param(name, ctx[name], **spec, sticky=False)
    return ctx


def _bind(name: str) -> str:
    """Prepare the widget of context field ``name`` (its state follows the context across pages); returns its key."""
    ctx = context()
    st.session_state[f"ctx_{name}"] = ctx[name]
    return f"ctx_{name}"


def _publish(name: str) -> Any:
    """Read the widget of context field ``name`` back into the context and the URL."""
    ctx = st.session_state["_sonde_ctx"]
    v = st.session_state.get(f"ctx_{name}", ctx[name])
    ctx[name] = v
    s = _to_url(v)
    st.query_params[name] = s
    st.session_state.setdefault("_sonde_url", {})[name] = s
    return v


def url_context() -> dict[str, str]:
    """The context as URL parameters (in-app links carry the model, backend, dtype, prompt and BOS policy)."""
    ctx = context()
    return {k: _to_url(ctx[k]) for k in ("model", "backend", "device", "dtype", "prompt", "bos")}


def prompt_input(label: str = "Prompt", *, area: bool = False, where: Any = None, height: int | None = None, help: str | None = None) -> str:
    """The shared prompt's input box (the same prompt on every page)."""
    key = _bind("prompt")
    w = where if where is not None else st
    if area:
        w.text_area(label, key=key, height=height or 80, help=help)
    else:
        w.text_input(label, key=key, help=help)
    return _publish("prompt")


def bos() -> bool:
    """The BOS policy (one toggle in the sidebar; default off: no BOS, which is also SmolLM2's tokenizer's own default)."""
    return bool(context()["bos"])


def sidebar_probe(*, load: bool = True) -> Probe | None:
    """Render the shared context in the sidebar and return the loaded probe (None after an error, or with
    ``load=False``: pages that need no model still show and carry the context)."""
    probe = None
    try:
        probe = _sidebar_probe(load)
    finally:
        warm.end_preload(loaded=probe is not None)
    return probe


def _sidebar_probe(load: bool) -> Probe | None:
    context()
    with st.sidebar:
        st.markdown("### Model")
        st.text_input("Model", key=_bind("model"),
                      help="'embedded' (SmolLM2-135M-Instruct, offline), an HF id, a local folder, or a .gguf file.")
        st.selectbox("Backend", list(BACKENDS), key=_bind("backend"))
        st.selectbox("Device", DEVICES, key=_bind("device"))
        st.selectbox("Dtype", DTYPES, key=_bind("dtype"))
        st.toggle("Prepend BOS", key=_bind("bos"),
                  help="One policy for every page, the CLI (--bos) and notebooks (prepend_bos=True): off = the tokenizer's "
                       "default (SmolLM2 adds no BOS).")
    for name in ("model", "backend", "device", "dtype", "bos"):
        _publish(name)
    ctx = context()
    if "prompt" not in st.query_params:  # every URL carries the prompt, also on pages that do not show it
        _publish("prompt")
    model = str(ctx["model"]).strip()
    if not load:
        with st.sidebar:
            p = str(ctx["prompt"])
            st.caption(f"Prompt: {p[:80]!r}{'…' if len(p) > 80 else ''} · BOS {'on' if ctx['bos'] else 'off'}")
        return None
    if not model:
        st.error("The model name is empty: type 'embedded', an HF id, a local folder or a .gguf file.", icon="⚠️")
        return None
    try:
        with st.spinner(f"Loading {model}…"):
            probe = get_probe(model, ctx["backend"], ctx["device"], ctx["dtype"])
    except SondeError as e:
        show_error(e)
        return None
    with st.sidebar:
        i = probe.info
        st.caption(f"{i.family} · {i.n_layers} layers · {i.n_heads} heads ({i.n_kv_heads} KV) · d={i.d_model} · "
                   f"{i.n_params / 1e6:.0f}M params · {i.device} · {i.dtype}")
        p = str(ctx["prompt"])
        st.caption(f"Prompt: {p[:80]!r}{'…' if len(p) > 80 else ''} · BOS {'on' if ctx['bos'] else 'off'}")
    return probe


# ----------------------------------------------------------------------------- results root, uploads
def inside_results(path: str | Path, root: str | Path | None = None) -> Path | None:
    """``path`` resolved (symlinks followed) when it lies inside the results root, else None."""
    from analyses.core import store as _store

    base = Path(root if root is not None else _store.results_root()).expanduser().resolve()
    try:
        p = Path(path).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return p if p == base or base in p.parents else None


def _outside(folder: Path, man: dict[str, Any], root: Path) -> str | None:
    """Why the result in ``folder`` reaches outside the results root ``root`` (None when it does not): the folder, its
    manifest or a table file it names is a symbolic link or resolves outside. The manifest's own form and its
    table names are judged by the store (:func:`analyses.core.store.read_manifest`, ``read_result``)."""
    if folder.is_symlink() or inside_results(folder, root) is None:
        return "the folder lies outside the results root"
    if (folder / "manifest.json").is_symlink():
        return "manifest.json is a symbolic link"
    tables = man.get("tables", [])
    for t in tables if isinstance(tables, list) else ():
        f = folder / f"{t}.parquet"
        if f.is_symlink() or inside_results(f, folder) is None:
            return f"table {t!r} lies outside the result folder"
    return None


def results_listing(root: Path):
    """Saved results under ``root`` (a folder inside the results root), as :func:`analyses.core.store.list_results`
    lists them, less those that reach outside the results root; with the skipped ones and why: ``(DataFrame, skipped)``,
    ``skipped`` a list of reasons, each naming its folder."""
    import warnings

    from analyses.core import store as _store
    from probes.errors import SondeWarning

    base = Path(_store.results_root()).expanduser().resolve()
    with warnings.catch_warnings(record=True) as caught:  # the store skips a malformed manifest with one warning
        warnings.simplefilter("always", SondeWarning)
        df = _store.list_results(root)
    skipped = [str(w.message) for w in caught if issubclass(w.category, SondeWarning)]
    outside = []
    for path in df["path"]:
        folder = Path(path)
        try:
            why = _outside(folder, _store.read_manifest(folder), base)
        except SondeError as e:  # changed since it was listed
            why = str(e)
        if why is not None:
            outside.append(path)
            skipped.append(f"`{folder.name}` ({why})")
    df = df[~df["path"].isin(outside)].reset_index(drop=True)
    df["seconds"] = df["seconds"].where(df["seconds"] > 0)  # no timings recorded: shown empty, not 0
    return df, skipped


def read_result(path: str | Path):
    """The stored result in ``path`` (:func:`analyses.core.store.read_result`) when it lies inside the results root;
    :class:`probes.errors.InputError` otherwise (or when the store refuses it)."""
    from analyses.core import store as _store
    from probes.errors import InputError

    folder = inside_results(path)
    if folder is None or Path(path).is_symlink():
        raise InputError(f"{str(path)!r} lies outside the results root.", hint="Point $SONDE_RESULTS at another folder to browse it.")
    why = _outside(folder, _store.read_manifest(folder), Path(_store.results_root()).expanduser().resolve())
    if why is not None:
        raise InputError(f"{Path(path).name!r}: {why}.")
    return _store.read_result(folder)


def decode_upload(name: str, data: bytes) -> str:
    """An uploaded file as UTF-8 text; other encodings are refused with the byte offset (as the CLI's read_text)."""
    from analyses.core.io import InputError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name!r} is not UTF-8 text (bad byte at offset {e.start}).",
                         hint="Convert it, e.g. `iconv -f latin1 -t utf-8`.") from e


def choose(key: str, options: Sequence[Any], default: Any, *, reset: bool = False) -> Any:
    """The value the widget ``key`` is to show, set before the widget is drawn: its current value while that is one
    of ``options``, else (or with ``reset``: a new prompt or result) ``default``.

    The value is written through the Session State API, so the browser is told it: a keyed widget keeps its identity
    when its options change, and a value merely dropped from the session would leave the browser showing the old
    one. Draw the widget without ``index``/``value`` (the session state holds it).
    """
    if reset or key not in st.session_state or st.session_state[key] not in options:
        st.session_state[key] = default
    return st.session_state[key]


def show_error(e: Exception) -> None:
    """One clear message for a user-fixable error."""
    st.error(str(e), icon="⚠️")


# ----------------------------------------------------------------------------- results: memory, then the store
# One in-memory layer (st.cache_resource: shared by every session, no copy, no pickle; results are frozen and pages only
# read them) over the results store, which the CLI and notebooks share: a result is found by its content key
# (analysis + model fingerprint + config + input hash, edits included) wherever it was computed.
@st.cache_resource(max_entries=64, show_spinner=False)
def _memo(scope: str, key: str, _compute: Callable[[], Any]) -> Any:
    return _compute()


def _root() -> str:
    from analyses.core import store as _store

    return str(_store.results_root().expanduser().resolve())


class _NotStored(Exception):
    """Raised inside :func:`_memo` when the store has no result with the key (nothing is memoised then)."""


def _load(key: str) -> tuple[Any, str]:
    """(result, folder) of the stored result with this content key; :class:`_NotStored` when there is none."""
    from analyses.core import store as _store
    from analyses.core.base import load_result

    try:
        found = _store.find_result(key)
        if found is not None:
            return load_result(found), str(found)
    except Exception:  # noqa: BLE001 - an unreadable store, or a folder from an older format: compute again
        pass
    raise _NotStored(key)


def _save(res: Any) -> str | None:
    try:
        return str(res.save()) if hasattr(res, "save") else None
    except Exception:  # noqa: BLE001 - a read-only results folder must not break the page
        return None


def folder_size(folder: str | Path) -> str:
    """The bytes a result folder takes on disk, readable (``"2.3 MB"``); ``"?"`` when it cannot be read."""
    from analyses.core.store import readable_bytes, stored_bytes

    try:
        return readable_bytes(stored_bytes(folder))
    except OSError:
        return "?"


def _caption(key: str, folder: str | None) -> None:
    if folder is not None:
        mine = key in st.session_state.get("_sonde_computed", set())
        st.caption(f"{'Saved to' if mine else 'Loaded from'} the results store: `{folder}` ({folder_size(folder)} on disk)")


def find(key: str, *, caption: bool = True) -> Any:
    """The result with content ``key`` from memory or the results store (:func:`analyses.core.store.find_result`:
    saved by the CLI, a notebook or any session), else None. Nothing is computed."""
    try:
        res, folder = _memo(_root(), key, _compute=lambda: _load(key))
    except _NotStored:
        return None
    if caption:
        _caption(key, folder)
    return res


def keep(key: str, res: Any, *, caption: bool = True) -> Any:
    """Save ``res`` (computed here, e.g. in a background run) to the results store and memory under ``key``."""
    st.session_state.setdefault("_sonde_computed", set()).add(key)
    res, folder = _memo(_root(), key, _compute=lambda: (res, _save(res)))
    if caption:
        _caption(key, folder)
    return res


def stored(key: str, compute: Callable[[], Any], *, caption: bool = True) -> Any:
    """The result with content ``key``: from memory, else from the results store (:func:`find`), else ``compute()``
    saved to the store (:func:`keep`). ``key`` must be the key the computed result has
    (the analysis's own ``result_key``), so results of the CLI, notebooks and other sessions are found. A caption names the folder
    (``Loaded from the results store: …`` unless this session computed it). Errors are shown; returns None then."""
    got = find(key, caption=caption)
    if got is not None:
        return got
    try:
        res = compute()  # the probe serializes its own forward passes (Probe.session)
    except SondeError as e:
        show_error(e)
        return None
    return keep(key, res, caption=caption)


def result(key: Callable[[], str], compute: Callable[[], Any], *, spinner: str | None = None, caption: bool = True) -> Any:
    """A page's analysis result: ``key()`` (the analysis's own ``result_key``, called here so an input it refuses is one
    error line) found in memory or the results store, else ``compute()`` saved there (:func:`stored`), under a spinner
    while it runs. None after an error (shown)."""
    from contextlib import nullcontext

    try:
        k = key()
    except SondeError as e:
        show_error(e)
        return None
    with st.spinner(spinner) if spinner else nullcontext():
        return stored(k, compute, caption=caption)


def memo(key: str, compute: Callable[[], Any]) -> Any:
    """A value derived from results (a logit lens of some route nodes, a profile) memoised in memory by ``key``
    (shared by sessions; make ``key`` name everything the value depends on, e.g. a result's content key).
    Errors propagate."""
    return _memo("derived", key, _compute=compute)


def cached(fn: Callable[..., Any], *args: Any, _probe: Probe | None = None, **kwargs: Any) -> Any:
    """Memoise ``fn(probe, *args, **kwargs)`` (shared by sessions) by (function, model fingerprint, backend, arguments),
    for helper values that are not analysis results (a bigram table, a rollout count). Arguments must be hashable by
    their repr (configs are frozen dataclasses). Errors are shown and ``None`` is returned."""
    key = repr((fn.__module__, fn.__qualname__, _probe.info.fingerprint if _probe else None, _probe.backend if _probe else None,
                args, sorted(kwargs.items())))

    def compute():
        return fn(_probe, *args, **kwargs) if _probe is not None else fn(*args, **kwargs)

    try:
        return _memo("helpers", key, _compute=compute)
    except SondeError as e:
        show_error(e)
        return None
